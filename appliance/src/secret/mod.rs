//! The secret model: what a secret is, where it applies and how it is injected, parsed from
//! the API's JSON with errors that name the offending field and say how to fix it.

pub mod pattern;

use std::fmt;

use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

pub use pattern::{HostPattern, PathPattern};

/// Longest secret value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 10_000;
/// Most hosts one rule may list.
pub const MAX_HOSTS: usize = 16;
const MAX_NAME_CHARS: usize = 128;
const PLACEHOLDER: &str = "{value}";

/// A rejected input: which field, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// JSON path of the field, such as `rules[0].injection.headerName`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// How an error names a field given by `key`: the key, or `""` for an empty one, so that
/// the name is never blank.
pub(crate) fn field_name(key: &str) -> String {
    if key.is_empty() {
        "\"\"".into()
    } else {
        key.into()
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

/// A secret's value. Never printed; wiped from memory when dropped.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Wraps `bytes`, checking the length limits.
    pub fn new(bytes: Vec<u8>) -> Result<Self, ValidationError> {
        let value = Self(Zeroizing::new(bytes));
        if value.0.is_empty() || value.0.len() > MAX_VALUE_BYTES {
            return Err(invalid(
                "value",
                format!("must be 1 to {MAX_VALUE_BYTES} bytes long"),
            ));
        }
        Ok(value)
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

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// Shortcuts that fill in hosts and injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    Generic,
}

impl Provider {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "anthropic" => Self::Anthropic,
            "openai" => Self::Openai,
            "github" => Self::Github,
            "stripe" => Self::Stripe,
            "generic" => Self::Generic,
            _ => return None,
        })
    }

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

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(first) if first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && name.chars().count() <= MAX_NAME_CHARS
}

/// Parses a name; shared by secrets and agents.
pub fn parse_name(field: &str, value: Option<&Value>) -> Result<String, ValidationError> {
    let name = value
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(field, "is required and must be a string"))?;
    if !valid_name(name) {
        return Err(invalid(
            field,
            "must be 1-128 characters: a letter or `_`, then letters, digits, `_` or `-`",
        ));
    }
    Ok(name.to_owned())
}

fn string<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    key: &str,
) -> Result<Option<&'a str>, ValidationError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(invalid(format!("{field}{key}"), "must be a string")),
    }
}

fn parse_hosts(
    object: &Map<String, Value>,
    field: &str,
) -> Result<Vec<HostPattern>, ValidationError> {
    let texts: Vec<(String, &str)> = match (object.get("hostPattern"), object.get("hosts")) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{field}hosts"),
                "give either hostPattern or hosts, not both",
            ))
        }
        (Some(Value::String(host)), None) => vec![(format!("{field}hostPattern"), host.as_str())],
        (Some(_), None) => return Err(invalid(format!("{field}hostPattern"), "must be a string")),
        (None, Some(Value::Array(hosts))) => {
            if hosts.is_empty() || hosts.len() > MAX_HOSTS {
                return Err(invalid(
                    format!("{field}hosts"),
                    format!("must list 1 to {MAX_HOSTS} hosts"),
                ));
            }
            hosts
                .iter()
                .enumerate()
                .map(|(index, host)| {
                    host.as_str()
                        .map(|text| (format!("{field}hosts[{index}]"), text))
                        .ok_or_else(|| {
                            invalid(format!("{field}hosts[{index}]"), "must be a string")
                        })
                })
                .collect::<Result<_, _>>()?
        }
        (None, Some(_)) => {
            return Err(invalid(
                format!("{field}hosts"),
                "must be an array of host names",
            ))
        }
        (None, None) => return Err(invalid(
            format!("{field}hostPattern"),
            "is required: the host the secret is for, such as `api.example.com` or `*.example.com`",
        )),
    };
    texts
        .into_iter()
        .map(|(field, text)| HostPattern::parse(text).map_err(|message| invalid(field, message)))
        .collect()
}

const HEADER_KEYS: &[&str] = &["headerName", "valueFormat"];
const HEADERS_KEYS: &[&str] = &["headers"];
const QUERY_KEYS: &[&str] = &["paramName", "paramFormat"];
const TEMPLATE_KEYS: &[&str] = &["pathTemplate"];
const REGEX_KEYS: &[&str] = &["pathRegex", "pathReplacement"];
const BASIC_KEYS: &[&str] = &["username"];
const VARIANTS: [(&str, &[&str]); 6] = [
    ("header", HEADER_KEYS),
    ("headers", HEADERS_KEYS),
    ("query", QUERY_KEYS),
    ("pathTemplate", TEMPLATE_KEYS),
    ("pathRegex", REGEX_KEYS),
    ("basic", BASIC_KEYS),
];

fn parse_header(
    object: &Map<String, Value>,
    field: &str,
) -> Result<HeaderInjection, ValidationError> {
    let name = string(object, field, "headerName")?
        .ok_or_else(|| invalid(format!("{field}headerName"), "is required"))?;
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        invalid(
            format!("{field}headerName"),
            "is not a valid HTTP header name",
        )
    })?;
    let format = match string(object, field, "valueFormat")? {
        Some(format) => ValueFormat::parse(&format!("{field}valueFormat"), format)?,
        None => ValueFormat::plain(),
    };
    Ok(HeaderInjection { name, format })
}

fn parse_injection(value: Option<&Value>, field: &str) -> Result<Injection, ValidationError> {
    let object = value.and_then(Value::as_object).ok_or_else(|| {
        invalid(
            field.trim_end_matches('.'),
            "is required: an object such as {\"headerName\": \"authorization\", \"valueFormat\": \"Bearer {value}\"}",
        )
    })?;
    let all_known: Vec<&str> = VARIANTS
        .iter()
        .flat_map(|(_, keys)| keys.iter().copied())
        .collect();
    if let Some(unknown) = object.keys().find(|key| !all_known.contains(&key.as_str())) {
        return Err(invalid(
            format!("{field}{unknown}"),
            format!(
                "is not an injection setting; known: {}",
                all_known.join(", ")
            ),
        ));
    }
    let used: Vec<&str> = VARIANTS
        .iter()
        .filter(|(_, keys)| keys.iter().any(|key| object.contains_key(*key)))
        .map(|(variant, _)| *variant)
        .collect();
    let variant = match used.as_slice() {
        [one] => *one,
        [] => {
            return Err(invalid(
                field.trim_end_matches('.'),
                "is empty: choose one injection",
            ))
        }
        many => {
            return Err(invalid(
                field.trim_end_matches('.'),
                format!(
                    "mixes {}: use exactly one injection per rule",
                    many.join(" and ")
                ),
            ))
        }
    };
    match variant {
        "header" => Ok(Injection::Headers(vec![parse_header(object, field)?])),
        "headers" => {
            let list = object
                .get("headers")
                .and_then(Value::as_array)
                .filter(|list| !list.is_empty())
                .ok_or_else(|| {
                    invalid(
                        format!("{field}headers"),
                        "must be a non-empty array of {headerName, valueFormat}",
                    )
                })?;
            list.iter()
                .enumerate()
                .map(|(index, entry)| {
                    let entry_field = format!("{field}headers[{index}].");
                    let entry = entry.as_object().ok_or_else(|| {
                        invalid(entry_field.trim_end_matches('.'), "must be an object")
                    })?;
                    if let Some(unknown) = entry
                        .keys()
                        .find(|key| !HEADER_KEYS.contains(&key.as_str()))
                    {
                        return Err(invalid(
                            format!("{entry_field}{unknown}"),
                            "is not a header setting; known: headerName, valueFormat",
                        ));
                    }
                    parse_header(entry, &entry_field)
                })
                .collect::<Result<_, _>>()
                .map(Injection::Headers)
        }
        "query" => {
            let name = string(object, field, "paramName")?
                .filter(|name| !name.is_empty())
                .ok_or_else(|| invalid(format!("{field}paramName"), "is required"))?;
            let format = match string(object, field, "paramFormat")? {
                Some(format) => ValueFormat::parse(&format!("{field}paramFormat"), format)?,
                None => ValueFormat::plain(),
            };
            Ok(Injection::Query {
                name: name.to_owned(),
                format,
            })
        }
        "pathTemplate" => {
            let template_field = format!("{field}pathTemplate");
            let template = string(object, field, "pathTemplate")?
                .ok_or_else(|| invalid(&template_field, "is required"))?;
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
            let pattern = string(object, field, "pathRegex")?
                .ok_or_else(|| invalid(format!("{field}pathRegex"), "is required"))?;
            let replacement = string(object, field, "pathReplacement")?.ok_or_else(|| {
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
            let username = string(object, field, "username")?
                .ok_or_else(|| invalid(format!("{field}username"), "is required"))?;
            if username.contains(':') {
                return Err(invalid(format!("{field}username"), "must not contain `:`"));
            }
            Ok(Injection::Basic {
                username: username.to_owned(),
            })
        }
    }
}

fn parse_rule(object: &Map<String, Value>, field: &str) -> Result<Rule, ValidationError> {
    let hosts = parse_hosts(object, field)?;
    let path = string(object, field, "pathPattern")?
        .map(|text| {
            PathPattern::parse(text)
                .map_err(|message| invalid(format!("{field}pathPattern"), message))
        })
        .transpose()?;
    let injection_key = if object.contains_key("injectionConfig") {
        "injectionConfig"
    } else {
        "injection"
    };
    let injection = parse_injection(
        object.get(injection_key),
        &format!("{field}{injection_key}."),
    )?;
    Ok(Rule {
        hosts,
        path,
        injection,
    })
}

const SECRET_KEYS: &[&str] = &[
    "name",
    "type",
    "provider",
    "value",
    "hostPattern",
    "hosts",
    "pathPattern",
    "injection",
    "injectionConfig",
    "rules",
    "agent",
];
const RULE_KEYS: &[&str] = &[
    "hostPattern",
    "hosts",
    "pathPattern",
    "injection",
    "injectionConfig",
];

impl SecretSpec {
    /// Parses a secret definition (the value, if present, is returned separately).
    pub fn from_json(json: &Value) -> Result<(Self, Option<SecretValue>), ValidationError> {
        let object = json
            .as_object()
            .ok_or_else(|| invalid("body", "must be a JSON object"))?;
        if let Some(unknown) = object
            .keys()
            .find(|key| !SECRET_KEYS.contains(&key.as_str()))
        {
            return Err(invalid(
                field_name(unknown),
                format!("is not a secret field; known: {}", SECRET_KEYS.join(", ")),
            ));
        }
        let name = parse_name("name", object.get("name"))?;
        let provider_field = if object.contains_key("provider") {
            "provider"
        } else {
            "type"
        };
        if object.contains_key("provider") && object.contains_key("type") {
            return Err(invalid("type", "give either type or provider, not both"));
        }
        let provider = match string(object, "", provider_field)? {
            None => Provider::Generic,
            Some(text) => Provider::parse(text).ok_or_else(|| {
                invalid(
                    provider_field,
                    "must be one of anthropic, openai, github, stripe, generic",
                )
            })?,
        };
        let value = match object.get("value") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(SecretValue::new(text.as_bytes().to_vec())?),
            Some(_) => return Err(invalid("value", "must be a string")),
        };
        let agent = match object.get("agent") {
            None | Some(Value::Null) => None,
            some => Some(parse_name("agent", some)?),
        };
        let rules = if provider == Provider::Generic {
            match object.get("rules") {
                Some(Value::Array(rules)) => {
                    if let Some(key) = [
                        "hostPattern",
                        "hosts",
                        "pathPattern",
                        "injection",
                        "injectionConfig",
                    ]
                    .into_iter()
                    .find(|key| object.contains_key(*key))
                    {
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
                        .map(|(index, rule)| {
                            let field = format!("rules[{index}].");
                            let rule = rule.as_object().ok_or_else(|| {
                                invalid(field.trim_end_matches('.'), "must be an object")
                            })?;
                            if let Some(unknown) =
                                rule.keys().find(|key| !RULE_KEYS.contains(&key.as_str()))
                            {
                                return Err(invalid(
                                    format!("{field}{unknown}"),
                                    format!("is not a rule field; known: {}", RULE_KEYS.join(", ")),
                                ));
                            }
                            parse_rule(rule, &field)
                        })
                        .collect::<Result<_, _>>()?
                }
                Some(_) => return Err(invalid("rules", "must be an array")),
                None => vec![parse_rule(object, "")?],
            }
        } else {
            if let Some(key) = [
                "hostPattern",
                "hosts",
                "pathPattern",
                "injection",
                "injectionConfig",
                "rules",
            ]
            .into_iter()
            .find(|key| object.contains_key(*key))
            {
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
        let spec = Self {
            name,
            provider,
            rules,
            agent,
        };
        if let Some(value) = &value {
            spec.check_value(value)?;
        }
        Ok((spec, value))
    }

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
