//! Secrets: the API's input (serde types that refuse unknown fields), the validated
//! definition the injection layer works with, and the view the API returns.

use std::fmt;

use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize};
use zeroize::Zeroizing;

use super::error::invalid;
use super::pattern::{HostPattern, PathPattern};
use super::source::{SourceFields, SourceKind, ValueSource};
use super::{check_name, ValidationError};

/// Longest secret value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 10_000;
/// Most hosts one rule may list.
pub const MAX_HOSTS: usize = 16;
const PLACEHOLDER: &str = "{value}";

/// A secret's value. Never printed; wiped from memory when dropped.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Wraps `bytes`, checking the length limits.
    pub fn new(bytes: Vec<u8>) -> Result<Self, ValidationError> {
        let value = Self(Zeroizing::new(bytes));
        value.check_length()?;
        Ok(value)
    }

    fn check_length(&self) -> Result<(), ValidationError> {
        if self.0.is_empty() || self.0.len() > MAX_VALUE_BYTES {
            return Err(invalid(
                "value",
                format!("must be 1 to {MAX_VALUE_BYTES} bytes long"),
            ));
        }
        Ok(())
    }

    /// The bytes, for injection and encryption only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// A masked preview that cannot recover the value: a short prefix and suffix of long
    /// values, nothing of short ones.
    pub fn preview(&self) -> String {
        let text = String::from_utf8_lossy(&self.0);
        let chars: Vec<char> = text.chars().collect();
        if chars.len() < 16 {
            return "••••".into();
        }
        let head: String = chars[..6].iter().collect();
        let tail: String = chars[chars.len() - 3..].iter().collect();
        format!("{head}••••{tail}")
    }
}

/// Any string; the length is checked with the rest of the definition, so that the error
/// names the field like every other.
impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(deserializer)?);
        Ok(Self(Zeroizing::new(text.as_bytes().to_vec())))
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// Shortcuts that fill in hosts and injection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// `x-api-key` on api.anthropic.com.
    Anthropic,
    /// `Authorization: Bearer` on api.openai.com.
    Openai,
    /// Bearer on api.github.com, Basic `x-access-token:<value>` on github.com (git over HTTPS).
    Github,
    /// `Authorization: Bearer` on api.stripe.com.
    Stripe,
    /// Explicit hosts and injection.
    #[default]
    Generic,
}

impl Provider {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anthropic => "anthropic",
            Self::Openai => "openai",
            Self::Github => "github",
            Self::Stripe => "stripe",
            Self::Generic => "generic",
        }
    }
}

/// `prefix{value}suffix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueFormat {
    /// Text before the value.
    pub prefix: String,
    /// Text after the value.
    pub suffix: String,
}

impl ValueFormat {
    fn parse(field: &str, text: &str) -> Result<Self, ValidationError> {
        let mut parts = text.split(PLACEHOLDER);
        let prefix = parts.next().unwrap_or_default().to_owned();
        let Some(suffix) = parts.next() else {
            return Err(invalid(
                field,
                "must contain `{value}` exactly once, as in `Bearer {value}`",
            ));
        };
        if parts.next().is_some() {
            return Err(invalid(field, "must contain `{value}` exactly once"));
        }
        Ok(Self {
            prefix,
            suffix: suffix.to_owned(),
        })
    }

    fn plain() -> Self {
        Self {
            prefix: String::new(),
            suffix: String::new(),
        }
    }

    fn bearer() -> Self {
        Self {
            prefix: "Bearer ".into(),
            suffix: String::new(),
        }
    }
}

/// One header to set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderInjection {
    /// The header.
    pub name: HeaderName,
    /// Its value around the secret.
    pub format: ValueFormat,
}

/// How a rule puts the secret into a request.
#[derive(Clone, Debug)]
pub enum Injection {
    /// Set one or more headers (replacing whatever the client sent).
    Headers(Vec<HeaderInjection>),
    /// Set a query parameter (replacing the client's).
    Query {
        /// The parameter.
        name: String,
        /// Its value around the secret.
        format: ValueFormat,
    },
    /// Replace the placeholder in a path shaped like `prefix{value}suffix…`.
    PathTemplate {
        /// Path text before the secret.
        prefix: String,
        /// Path text right after the secret (may be empty: up to the next `/`).
        suffix: String,
    },
    /// Rewrite the path with a regular expression; the replacement may use `$N` and `{value}`.
    PathRegex {
        /// Compiled once, when the secret is created or changed.
        regex: Regex,
        /// The replacement text.
        replacement: String,
    },
    /// `Authorization: Basic base64(username:value)`.
    Basic {
        /// The user name.
        username: String,
    },
}

/// Where and how one secret applies.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Hosts the rule applies to.
    pub hosts: Vec<HostPattern>,
    /// Paths it applies to; all when absent.
    pub path: Option<PathPattern>,
    /// What it does.
    pub injection: Injection,
}

/// A validated secret definition, without its value.
#[derive(Clone, Debug)]
pub struct SecretSpec {
    /// Unique name.
    pub name: String,
    /// The shortcut it was made from.
    pub provider: Provider,
    /// Its rules.
    pub rules: Vec<Rule>,
    /// The agent it is bound to; global when absent.
    pub agent: Option<String>,
    /// Where its value comes from.
    pub source: ValueSource,
}

fn header_rule(host: &str, header: &'static str, format: ValueFormat) -> Rule {
    Rule {
        hosts: vec![HostPattern::Exact(host.into())],
        path: None,
        injection: Injection::Headers(vec![HeaderInjection {
            name: HeaderName::from_static(header),
            format,
        }]),
    }
}

fn provider_rules(provider: Provider) -> Vec<Rule> {
    match provider {
        Provider::Anthropic => vec![header_rule(
            "api.anthropic.com",
            "x-api-key",
            ValueFormat::plain(),
        )],
        Provider::Openai => vec![header_rule(
            "api.openai.com",
            "authorization",
            ValueFormat::bearer(),
        )],
        Provider::Stripe => vec![header_rule(
            "api.stripe.com",
            "authorization",
            ValueFormat::bearer(),
        )],
        Provider::Github => vec![
            header_rule("api.github.com", "authorization", ValueFormat::bearer()),
            Rule {
                hosts: vec![HostPattern::Exact("github.com".into())],
                path: None,
                injection: Injection::Basic {
                    username: "x-access-token".into(),
                },
            },
        ],
        Provider::Generic => Vec::new(),
    }
}

/// One header of a `headers` injection, as the API takes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an object such as {\"headerName\": \"x-api-key\"}"
)]
pub struct HeaderInput {
    /// The header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_name: Option<String>,
    /// `prefix{value}suffix`; the bare value when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_format: Option<String>,
}

/// How a rule injects its secret, as the API takes it: the fields of exactly one kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an object such as {\"headerName\": \"authorization\", \"valueFormat\": \"Bearer {value}\"}"
)]
pub struct InjectionInput {
    /// One header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_name: Option<String>,
    /// Its value around the secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_format: Option<String>,
    /// Several headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<HeaderInput>>,
    /// A query parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param_name: Option<String>,
    /// Its value around the secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param_format: Option<String>,
    /// A path with `{value}` where the secret goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_template: Option<String>,
    /// A regular expression over the path...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// ...and its replacement, with `$N` and `{value}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_replacement: Option<String>,
    /// Basic credentials with this user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

/// Where a secret applies and how, as the API takes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an object such as {\"hostPattern\": \"api.example.com\", \"injection\": {\"headerName\": \"x-api-key\"}}"
)]
pub struct RuleInput {
    /// One host pattern...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_pattern: Option<String>,
    /// ...or several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// Paths it applies to; all when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_pattern: Option<String>,
    /// How the secret is injected...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injection: Option<InjectionInput>,
    /// ...under OneCLI's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injection_config: Option<InjectionInput>,
}

/// A secret as the API takes it (and as the store keeps its definition, without the value).
/// A generic secret has one rule inline or a list of `rules`; a provider shortcut has none.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a JSON object"
)]
pub struct SecretInput {
    /// Unique name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The shortcut (Superserve calls it `provider`)...
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<Provider>,
    /// ...under its other name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    /// The real credential, inline; never serialized.
    #[serde(skip_serializing)]
    pub value: Option<SecretValue>,
    /// Where the value comes from; inferred from the one source field given when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_source: Option<SourceKind>,
    /// A 1Password reference, `op://<vault>/<item>/[<section>/]<field>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_ref: Option<String>,
    /// A file the daemon reads the value from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_file: Option<String>,
    /// A command the daemon runs for the value: an absolute program path and its arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_command: Option<Vec<String>>,
    /// A systemd credential of the daemon's service that holds the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_credential: Option<String>,
    /// The one rule, inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_pattern: Option<String>,
    /// The one rule, inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// The one rule, inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_pattern: Option<String>,
    /// The one rule, inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injection: Option<InjectionInput>,
    /// The one rule, inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injection_config: Option<InjectionInput>,
    /// Several rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleInput>>,
    /// The agent it is bound to; global when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl SecretInput {
    /// Whether the input leaves the value where it lives (1Password, a file, a command, a
    /// credential), so that it carries no value of its own.
    pub fn names_external_source(&self) -> bool {
        self.op_ref.is_some()
            || self.value_file.is_some()
            || self.value_command.is_some()
            || self.value_credential.is_some()
            || self
                .value_source
                .is_some_and(|kind| kind != SourceKind::Inline)
    }
}

fn value_format(field: &str, text: Option<&str>) -> Result<ValueFormat, ValidationError> {
    match text {
        Some(format) => ValueFormat::parse(field, format),
        None => Ok(ValueFormat::plain()),
    }
}

fn required(text: Option<&str>, field: String) -> Result<&str, ValidationError> {
    text.ok_or_else(|| invalid(field, "is required"))
}

impl HeaderInput {
    fn validate(&self, field: &str) -> Result<HeaderInjection, ValidationError> {
        let name = required(self.header_name.as_deref(), format!("{field}headerName"))?;
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            invalid(
                format!("{field}headerName"),
                "is not a valid HTTP header name",
            )
        })?;
        let format = value_format(&format!("{field}valueFormat"), self.value_format.as_deref())?;
        Ok(HeaderInjection { name, format })
    }
}

impl InjectionInput {
    /// The kinds of injection whose fields are given.
    fn kinds(&self) -> Vec<&'static str> {
        [
            (
                "header",
                self.header_name.is_some() || self.value_format.is_some(),
            ),
            ("headers", self.headers.is_some()),
            (
                "query",
                self.param_name.is_some() || self.param_format.is_some(),
            ),
            ("pathTemplate", self.path_template.is_some()),
            (
                "pathRegex",
                self.path_regex.is_some() || self.path_replacement.is_some(),
            ),
            ("basic", self.username.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, given)| given.then_some(kind))
        .collect()
    }

    /// Validates the injection at `field` (a prefix ending in `.`).
    fn validate(&self, field: &str) -> Result<Injection, ValidationError> {
        let this = field.trim_end_matches('.');
        let kind = match self.kinds().as_slice() {
            [one] => *one,
            [] => return Err(invalid(this, "is empty: choose one injection")),
            many => {
                return Err(invalid(
                    this,
                    format!(
                        "mixes {}: use exactly one injection per rule",
                        many.join(" and ")
                    ),
                ))
            }
        };
        match kind {
            "header" => Ok(Injection::Headers(vec![HeaderInput {
                header_name: self.header_name.clone(),
                value_format: self.value_format.clone(),
            }
            .validate(field)?])),
            "headers" => {
                let list = self
                    .headers
                    .as_deref()
                    .filter(|list| !list.is_empty())
                    .ok_or_else(|| {
                        invalid(
                            format!("{field}headers"),
                            "must be a non-empty array of {headerName, valueFormat}",
                        )
                    })?;
                list.iter()
                    .enumerate()
                    .map(|(index, header)| header.validate(&format!("{field}headers[{index}].")))
                    .collect::<Result<_, _>>()
                    .map(Injection::Headers)
            }
            "query" => {
                let name = self.param_name.as_deref().filter(|name| !name.is_empty());
                let name = required(name, format!("{field}paramName"))?;
                let format =
                    value_format(&format!("{field}paramFormat"), self.param_format.as_deref())?;
                Ok(Injection::Query {
                    name: name.to_owned(),
                    format,
                })
            }
            "pathTemplate" => {
                let template_field = format!("{field}pathTemplate");
                let template = required(self.path_template.as_deref(), template_field.clone())?;
                if !template.starts_with('/') {
                    return Err(invalid(template_field, "must start with `/`"));
                }
                let format = ValueFormat::parse(&template_field, template)?;
                Ok(Injection::PathTemplate {
                    prefix: format.prefix,
                    suffix: format.suffix,
                })
            }
            "pathRegex" => {
                let pattern = required(self.path_regex.as_deref(), format!("{field}pathRegex"))?;
                let replacement = self.path_replacement.as_deref().ok_or_else(|| {
                    invalid(
                        format!("{field}pathReplacement"),
                        "is required with pathRegex",
                    )
                })?;
                let regex = Regex::new(pattern).map_err(|error| {
                    invalid(
                        format!("{field}pathRegex"),
                        format!("is not a valid regular expression: {error}"),
                    )
                })?;
                if !replacement.contains(PLACEHOLDER) {
                    return Err(invalid(
                        format!("{field}pathReplacement"),
                        "must contain `{value}`",
                    ));
                }
                Ok(Injection::PathRegex {
                    regex,
                    replacement: replacement.to_owned(),
                })
            }
            _ => {
                let username = required(self.username.as_deref(), format!("{field}username"))?;
                if username.contains(':') {
                    return Err(invalid(format!("{field}username"), "must not contain `:`"));
                }
                Ok(Injection::Basic {
                    username: username.to_owned(),
                })
            }
        }
    }
}

impl RuleInput {
    fn validate_hosts(&self, field: &str) -> Result<Vec<HostPattern>, ValidationError> {
        let texts: Vec<(String, &str)> = match (&self.host_pattern, &self.hosts) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{field}hosts"),
                    "give either hostPattern or hosts, not both",
                ))
            }
            (Some(host), None) => vec![(format!("{field}hostPattern"), host.as_str())],
            (None, Some(hosts)) => {
                if hosts.is_empty() || hosts.len() > MAX_HOSTS {
                    return Err(invalid(
                        format!("{field}hosts"),
                        format!("must list 1 to {MAX_HOSTS} hosts"),
                    ));
                }
                hosts
                    .iter()
                    .enumerate()
                    .map(|(index, host)| (format!("{field}hosts[{index}]"), host.as_str()))
                    .collect()
            }
            (None, None) => return Err(invalid(
                format!("{field}hostPattern"),
                "is required: the host the secret is for, such as `api.example.com` or `*.example.com`",
            )),
        };
        texts
            .into_iter()
            .map(|(field, text)| {
                HostPattern::parse(text).map_err(|message| invalid(field, message))
            })
            .collect()
    }

    /// Validates the rule at `field` (a prefix ending in `.`, or empty at the top).
    fn validate(&self, field: &str) -> Result<Rule, ValidationError> {
        let hosts = self.validate_hosts(field)?;
        let path = self
            .path_pattern
            .as_deref()
            .map(|text| {
                PathPattern::parse(text)
                    .map_err(|message| invalid(format!("{field}pathPattern"), message))
            })
            .transpose()?;
        let (key, injection) = match (&self.injection, &self.injection_config) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{field}injectionConfig"),
                    "give either injection or injectionConfig, not both",
                ))
            }
            (Some(injection), None) => ("injection", injection),
            (None, Some(injection)) => ("injectionConfig", injection),
            (None, None) => return Err(invalid(
                format!("{field}injection"),
                "is required: an object such as {\"headerName\": \"authorization\", \"valueFormat\": \"Bearer {value}\"}",
            )),
        };
        Ok(Rule {
            hosts,
            path,
            injection: injection.validate(&format!("{field}{key}."))?,
        })
    }
}

impl SecretInput {
    /// The fields of the inline rule that are given, by name.
    fn inline_rule_fields(&self) -> impl Iterator<Item = &'static str> {
        [
            ("hostPattern", self.host_pattern.is_some()),
            ("hosts", self.hosts.is_some()),
            ("pathPattern", self.path_pattern.is_some()),
            ("injection", self.injection.is_some()),
            ("injectionConfig", self.injection_config.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, given)| given.then_some(key))
    }

    fn inline_rule(&self) -> RuleInput {
        RuleInput {
            host_pattern: self.host_pattern.clone(),
            hosts: self.hosts.clone(),
            path_pattern: self.path_pattern.clone(),
            injection: self.injection.clone(),
            injection_config: self.injection_config.clone(),
        }
    }

    /// The shortcut this secret is made from: `type` or `provider`, generic when neither.
    fn provider(&self) -> Result<Provider, ValidationError> {
        match (self.kind, self.provider) {
            (Some(_), Some(_)) => Err(invalid("type", "give either type or provider, not both")),
            (Some(provider), None) | (None, Some(provider)) => Ok(provider),
            (None, None) => Ok(Provider::Generic),
        }
    }

    /// Checks every field and builds the definition the injection layer uses. A value, if
    /// given, must fit where the rules put it.
    pub fn validate(&self) -> Result<SecretSpec, ValidationError> {
        let name = check_name("name", self.name.as_deref())?;
        let provider = self.provider()?;
        if let Some(value) = &self.value {
            value.check_length()?;
        }
        let source = SourceFields {
            kind: self.value_source,
            value_given: self.value.is_some(),
            op_ref: self.op_ref.as_deref(),
            file: self.value_file.as_deref(),
            command: self.value_command.as_deref(),
            credential: self.value_credential.as_deref(),
        }
        .validate()?;
        let agent = self
            .agent
            .as_deref()
            .map(|agent| check_name("agent", Some(agent)))
            .transpose()?;
        let rules = if provider == Provider::Generic {
            match &self.rules {
                Some(rules) => {
                    if let Some(key) = self.inline_rule_fields().next() {
                        return Err(invalid(
                            key,
                            "goes inside each entry of rules when rules is given",
                        ));
                    }
                    if rules.is_empty() {
                        return Err(invalid("rules", "must not be empty"));
                    }
                    rules
                        .iter()
                        .enumerate()
                        .map(|(index, rule)| rule.validate(&format!("rules[{index}].")))
                        .collect::<Result<_, _>>()?
                }
                None => vec![self.inline_rule().validate("")?],
            }
        } else {
            let given = self
                .inline_rule_fields()
                .chain(self.rules.is_some().then_some("rules"))
                .next();
            if let Some(key) = given {
                return Err(invalid(
                    key,
                    format!(
                        "is set by type `{}`; use type `generic` to choose it yourself",
                        provider.as_str()
                    ),
                ));
            }
            provider_rules(provider)
        };
        let spec = SecretSpec {
            name,
            provider,
            rules,
            agent,
            source,
        };
        if let Some(value) = &self.value {
            spec.check_value(value)?;
        }
        Ok(spec)
    }
}

impl SecretSpec {
    /// Checks that `value` can be injected everywhere the rules put it. A header takes no
    /// control characters (a line break would end it and start another); the query, the path
    /// and Basic credentials carry the value encoded, so anything goes there.
    pub fn check_value(&self, value: &SecretValue) -> Result<(), ValidationError> {
        if HeaderValue::from_bytes(value.expose()).is_ok() {
            return Ok(());
        }
        for rule in &self.rules {
            if let Injection::Headers(headers) = &rule.injection {
                if let Some(header) = headers.first() {
                    return Err(invalid(
                        "value",
                        format!(
                            "cannot be sent in the {} header: it contains control characters \
                             (such as a line break); remove them, or inject the value into the \
                             query or path instead",
                            header.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads and validates a definition as the API receives it; the value, if given, comes
    /// back beside it.
    pub fn from_json(
        json: &serde_json::Value,
    ) -> Result<(Self, Option<SecretValue>), ValidationError> {
        let mut input: SecretInput = super::from_value(json.clone())?;
        let spec = input.validate()?;
        Ok((spec, input.value.take()))
    }
}

/// A stored secret without its value: the definition as given, and the bookkeeping.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretRecord {
    /// Stable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// The definition as given, without the value.
    pub definition: SecretInput,
    /// Masked value, e.g. `sk-pro••••789`; inline values only (a fetched value is never
    /// kept, so there is nothing to preview).
    pub preview: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// A secret as the API shows it: its record, what its definition means, and when it was
/// last injected. Never its value.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretView {
    /// The stored record.
    #[serde(flatten)]
    pub record: SecretRecord,
    /// The shortcut it was made from.
    #[serde(rename = "type")]
    pub provider: Provider,
    /// The agent it is bound to; global when absent.
    pub agent: Option<String>,
    /// Where its value comes from.
    pub value_source: SourceKind,
    /// The 1Password reference, for `onepassword` values.
    pub op_ref: Option<String>,
    /// Its rules, shortcuts filled in.
    pub rules: Vec<RuleView>,
    /// RFC 3339, when an injection last used it.
    pub last_used_at: Option<String>,
}

/// What `appliance secret check` reports: whether the value resolves now and fits where
/// the secret injects it. Never the value.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretCheck {
    /// The secret's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where its value comes from.
    pub value_source: SourceKind,
    /// The source, described (`1Password op://…`, `file /run/…`).
    pub source: String,
    /// Whether the value resolved and can be injected.
    pub ok: bool,
    /// Why not, when not.
    pub error: Option<String>,
}

/// One rule of a [`SecretView`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleView {
    /// Host patterns.
    pub hosts: Vec<String>,
    /// Path pattern; all paths when absent.
    pub path_pattern: Option<String>,
    /// How the secret goes in.
    pub injection: InjectionView,
}

/// One header of an [`InjectionView`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderView {
    /// The header.
    pub header_name: String,
    /// `prefix{value}suffix`.
    pub value_format: String,
}

/// How a rule injects, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum InjectionView {
    /// Headers set.
    Headers {
        /// The headers.
        headers: Vec<HeaderView>,
    },
    /// A query parameter set.
    Query {
        /// The parameter.
        param_name: String,
        /// `prefix{value}suffix`.
        param_format: String,
    },
    /// A path template filled in.
    PathTemplate {
        /// The template.
        path_template: String,
    },
    /// A path rewritten.
    PathRegex {
        /// The expression.
        path_regex: String,
        /// The replacement.
        path_replacement: String,
    },
    /// Basic credentials.
    Basic {
        /// The user name.
        username: String,
    },
}

impl fmt::Display for ValueFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{PLACEHOLDER}{}", self.prefix, self.suffix)
    }
}

impl From<&Injection> for InjectionView {
    fn from(injection: &Injection) -> Self {
        match injection {
            Injection::Headers(headers) => Self::Headers {
                headers: headers
                    .iter()
                    .map(|header| HeaderView {
                        header_name: header.name.as_str().to_owned(),
                        value_format: header.format.to_string(),
                    })
                    .collect(),
            },
            Injection::Query { name, format } => Self::Query {
                param_name: name.clone(),
                param_format: format.to_string(),
            },
            Injection::PathTemplate { prefix, suffix } => Self::PathTemplate {
                path_template: format!("{prefix}{PLACEHOLDER}{suffix}"),
            },
            Injection::PathRegex { regex, replacement } => Self::PathRegex {
                path_regex: regex.as_str().to_owned(),
                path_replacement: replacement.clone(),
            },
            Injection::Basic { username } => Self::Basic {
                username: username.clone(),
            },
        }
    }
}

impl SecretView {
    /// The view of `record`, whose definition validated as `spec`.
    pub fn new(record: SecretRecord, spec: &SecretSpec, last_used_at: Option<String>) -> Self {
        Self {
            provider: spec.provider,
            agent: spec.agent.clone(),
            value_source: spec.source.kind(),
            op_ref: match &spec.source {
                ValueSource::OnePassword(reference) => Some(reference.to_string()),
                _ => None,
            },
            rules: spec
                .rules
                .iter()
                .map(|rule| RuleView {
                    hosts: rule.hosts.iter().map(ToString::to_string).collect(),
                    path_pattern: rule.path.as_ref().map(|path| path.as_str().to_owned()),
                    injection: InjectionView::from(&rule.injection),
                })
                .collect(),
            record,
            last_used_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(json: Value) -> Result<SecretSpec, ValidationError> {
        SecretSpec::from_json(&json).map(|(spec, _)| spec)
    }

    #[test]
    fn an_empty_unknown_key_is_still_named() {
        // Found by the secret_definition fuzz target: the field name came out blank.
        let error = parse(json!({"name": "s", "type": "openai", "": 1})).unwrap_err();
        assert_eq!(error.field, "\"\"");
    }

    #[test]
    fn values_that_would_split_a_header_are_refused_where_they_go_into_one() {
        for value in ["x\r\nX-Evil: 1", "a\nb", "nul\0", "del\u{7f}"] {
            let error = SecretSpec::from_json(&json!({"name": "s", "hostPattern": "h.example.com",
                "injection": {"headerName": "x-key"}, "value": value}))
            .unwrap_err();
            assert_eq!(error.field, "value");
            assert!(error.message.contains("x-key"), "{}", error.message);
            assert!(!error.message.contains(value));
            SecretSpec::from_json(&json!({"name": "s", "hostPattern": "h.example.com",
                "injection": {"paramName": "key"}, "value": value}))
            .unwrap();
        }
        SecretSpec::from_json(&json!({"name": "s", "type": "openai", "value": "sk-\tok"})).unwrap();
    }

    fn field_of(json: Value) -> String {
        parse(json).unwrap_err().field
    }

    #[test]
    fn providers_fill_in_hosts_and_injection() {
        let spec = parse(json!({"name": "gh", "type": "github", "value": "ghp_x"})).unwrap();
        assert_eq!(spec.rules.len(), 2);
        assert!(
            matches!(spec.rules[1].injection, Injection::Basic { ref username } if username == "x-access-token")
        );
        let spec = parse(json!({"name": "a", "provider": "anthropic"})).unwrap();
        assert_eq!(
            spec.rules[0].hosts,
            vec![HostPattern::Exact("api.anthropic.com".into())]
        );
    }

    #[test]
    fn each_value_source_parses_from_its_field() {
        use crate::model::source::OpRef;
        let source = |extra: Value| {
            let mut json = json!({"name": "s", "type": "openai"});
            json.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parse(json).unwrap().source
        };
        assert_eq!(source(json!({"value": "v"})), ValueSource::Inline);
        assert_eq!(source(json!({})), ValueSource::Inline);
        assert_eq!(
            source(json!({"valueSource": "onepassword", "opRef": "op://v/i/s/f"})),
            ValueSource::OnePassword(OpRef::parse("op://v/i/s/f").unwrap())
        );
        assert_eq!(
            source(json!({"valueFile": "/run/keys/openai"})),
            ValueSource::File("/run/keys/openai".into())
        );
        assert_eq!(
            source(json!({"valueCommand": ["/usr/bin/pass", "show", "openai"]})),
            ValueSource::Command(vec!["/usr/bin/pass".into(), "show".into(), "openai".into()])
        );
        assert_eq!(
            source(json!({"valueCredential": "openai-key"})),
            ValueSource::Credential("openai-key".into())
        );
    }

    #[test]
    fn every_injection_variant_parses() {
        for injection in [
            json!({"headerName": "x-api-key"}),
            json!({"headerName": "authorization", "valueFormat": "Bearer {value}"}),
            json!({"headers": [{"headerName": "a"}, {"headerName": "b", "valueFormat": "k={value}"}]}),
            json!({"paramName": "key"}),
            json!({"paramName": "key", "paramFormat": "v1:{value}"}),
            json!({"pathTemplate": "/bot{value}/"}),
            json!({"pathRegex": "^/v1/([^/]+)/k/[^/]+", "pathReplacement": "/v1/$1/k/{value}"}),
            json!({"username": "api"}),
        ] {
            let spec =
                json!({"name": "s", "hostPattern": "api.example.com", "injection": injection});
            assert!(parse(spec.clone()).is_ok(), "{spec}");
        }
    }

    #[test]
    fn each_rejection_names_its_field() {
        let base = |injection: Value| json!({"name": "s", "hostPattern": "h.example.com", "injection": injection});
        let cases = [
            (json!({"name": "1bad", "hostPattern": "a.b"}), "name"),
            (
                json!({"name": "x".repeat(129), "hostPattern": "a.b"}),
                "name",
            ),
            (
                json!({"name": "s", "hostPattern": "a.b", "injection": {"headerName": "a"}, "color": 1}),
                "color",
            ),
            (json!({"name": "s", "type": "nope"}), "type"),
            (
                json!({"name": "s", "type": "openai", "hostPattern": "a.b"}),
                "hostPattern",
            ),
            (
                json!({"name": "s", "value": "", "hostPattern": "a.b", "injection": {"headerName": "a"}}),
                "value",
            ),
            (
                json!({"name": "s", "value": "x".repeat(10_001), "hostPattern": "a.b", "injection": {"headerName": "a"}}),
                "value",
            ),
            (
                json!({"name": "s", "injection": {"headerName": "a"}}),
                "hostPattern",
            ),
            (
                json!({"name": "s", "hosts": [], "injection": {"headerName": "a"}}),
                "hosts",
            ),
            (
                json!({"name": "s", "hosts": vec!["a.example.com"; 17], "injection": {"headerName": "a"}}),
                "hosts",
            ),
            (
                json!({"name": "s", "hosts": ["ok.example.com", "https://x.com"], "injection": {"headerName": "a"}}),
                "hosts[1]",
            ),
            (
                json!({"name": "s", "hostPattern": "a.b", "pathPattern": "v1", "injection": {"headerName": "a"}}),
                "pathPattern",
            ),
            (json!({"name": "s", "hostPattern": "a.b"}), "injection"),
            (base(json!({})), "injection"),
            (
                base(json!({"headerName": "a", "paramName": "b"})),
                "injection",
            ),
            (
                base(json!({"headerName": "a", "bogus": 1})),
                "injection.bogus",
            ),
            (
                base(json!({"headerName": "bad header"})),
                "injection.headerName",
            ),
            (
                base(json!({"headerName": "a", "valueFormat": "Bearer"})),
                "injection.valueFormat",
            ),
            (
                base(json!({"headerName": "a", "valueFormat": "{value}{value}"})),
                "injection.valueFormat",
            ),
            (
                base(json!({"pathTemplate": "bot{value}"})),
                "injection.pathTemplate",
            ),
            (
                base(json!({"pathTemplate": "/bot"})),
                "injection.pathTemplate",
            ),
            (base(json!({"pathRegex": "("})), "injection.pathReplacement"),
            (
                base(json!({"pathRegex": "(", "pathReplacement": "{value}"})),
                "injection.pathRegex",
            ),
            (
                base(json!({"pathRegex": "^/a", "pathReplacement": "/b"})),
                "injection.pathReplacement",
            ),
            (base(json!({"username": "a:b"})), "injection.username"),
            (base(json!({"headers": []})), "injection.headers"),
            (
                base(json!({"headers": [{"headerName": "a", "x": 1}]})),
                "injection.headers[0].x",
            ),
            (
                json!({"name": "s", "rules": [{"hostPattern": "a.example.com", "injection": {"headerName": "a"}, "extra": 1}]}),
                "rules[0].extra",
            ),
            (json!({"name": "s", "rules": [], }), "rules"),
            (
                json!({"name": "s", "hostPattern": "a.b", "rules": [{"hostPattern": "a.b", "injection": {"headerName": "a"}}]}),
                "hostPattern",
            ),
            (
                json!({"name": "s", "agent": "has space", "hostPattern": "a.b", "injection": {"headerName": "a"}}),
                "agent",
            ),
            (
                json!({"name": "s", "type": "openai", "value": "v", "opRef": "op://v/i/f"}),
                "opRef",
            ),
            (
                json!({"name": "s", "type": "openai", "valueSource": "file", "opRef": "op://v/i/f"}),
                "valueSource",
            ),
            (
                json!({"name": "s", "type": "openai", "valueSource": "onepassword"}),
                "opRef",
            ),
            (
                json!({"name": "s", "type": "openai", "opRef": "vault/item"}),
                "opRef",
            ),
            (
                json!({"name": "s", "type": "openai", "valueFile": "keys/openai"}),
                "valueFile",
            ),
            (
                json!({"name": "s", "type": "openai", "valueCommand": []}),
                "valueCommand",
            ),
            (
                json!({"name": "s", "type": "openai", "valueCommand": ["pass", "show"]}),
                "valueCommand[0]",
            ),
            (
                json!({"name": "s", "type": "openai", "valueCredential": "../key"}),
                "valueCredential",
            ),
            (
                json!({"name": "s", "type": "openai", "valueSource": "vault"}),
                "valueSource",
            ),
        ];
        for (input, field) in cases {
            assert_eq!(field_of(input.clone()), field, "{input}");
        }
    }

    #[test]
    fn values_never_show_in_debug_output_and_previews_hide_them() {
        let value = SecretValue::new(b"sk-proj-abcdefghijklmnop789".to_vec()).unwrap();
        assert_eq!(format!("{value:?}"), "SecretValue(<redacted>)");
        assert_eq!(value.preview(), "sk-pro••••789");
        assert_eq!(
            SecretValue::new(b"short".to_vec()).unwrap().preview(),
            "••••"
        );
    }
}
