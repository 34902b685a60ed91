//! Agents (named sets of cgroups) and access rules (allow or block by host, path and method),
//! parsed from the API's JSON with errors that name the field.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use http::Method;
use serde_json::{Map, Value};

use crate::secret::{field_name, parse_name, HostPattern, PathPattern, ValidationError};

/// Most cgroups one agent may name.
pub const MAX_AGENT_CGROUPS: usize = 32;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

fn reject_unknown(
    object: &Map<String, Value>,
    known: &[&str],
    what: &str,
) -> Result<(), ValidationError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        Some(unknown) => Err(invalid(
            field_name(unknown),
            format!("is not {what} field; known: {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// A named set of cgroups whose processes are one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSpec {
    /// Unique name.
    pub name: String,
    /// cgroup v2 paths (absolute, or relative to the cgroup2 mount).
    pub cgroups: Vec<PathBuf>,
    /// Create missing cgroups instead of refusing them.
    pub create: bool,
}

impl AgentSpec {
    /// Parses an agent definition.
    pub fn from_json(json: &Value) -> Result<Self, ValidationError> {
        let object = json
            .as_object()
            .ok_or_else(|| invalid("body", "must be a JSON object"))?;
        reject_unknown(object, &["name", "cgroups", "create"], "an agent")?;
        let name = parse_name("name", object.get("name"))?;
        let list = object
            .get("cgroups")
            .and_then(Value::as_array)
            .filter(|list| (1..=MAX_AGENT_CGROUPS).contains(&list.len()))
            .ok_or_else(|| {
                invalid(
                    "cgroups",
                    format!("must list 1 to {MAX_AGENT_CGROUPS} cgroup v2 paths, such as [\"agents/research\"]"),
                )
            })?;
        let cgroups = list
            .iter()
            .enumerate()
            .map(|(index, path)| {
                let field = format!("cgroups[{index}]");
                let text = path
                    .as_str()
                    .filter(|text| !text.is_empty())
                    .ok_or_else(|| invalid(&field, "must be a non-empty string"))?;
                let path = Path::new(text);
                if path
                    .components()
                    .any(|component| matches!(component, Component::ParentDir))
                {
                    return Err(invalid(&field, "must not contain `..`"));
                }
                Ok(path.to_path_buf())
            })
            .collect::<Result<_, _>>()?;
        let create = match object.get("create") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(create)) => *create,
            Some(_) => return Err(invalid("create", "must be true or false")),
        };
        Ok(Self {
            name,
            cgroups,
            create,
        })
    }
}

/// What an access rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let matching requests through (overrides a less specific block).
    Allow,
    /// Answer matching requests with 403; they never reach the upstream.
    Block,
}

/// One access rule.
#[derive(Clone, Debug)]
pub struct AccessRule {
    /// Host it applies to.
    pub host: HostPattern,
    /// Paths it applies to; all when absent.
    pub path: Option<PathPattern>,
    /// Method it applies to; all when absent.
    pub method: Option<Method>,
    /// What it does.
    pub action: Action,
    /// The agent it is limited to; every workload when absent.
    pub agent: Option<String>,
}

impl AccessRule {
    /// Parses a rule.
    pub fn from_json(json: &Value) -> Result<Self, ValidationError> {
        let object = json
            .as_object()
            .ok_or_else(|| invalid("body", "must be a JSON object"))?;
        reject_unknown(
            object,
            &["host", "path", "method", "action", "agent"],
            "a rule",
        )?;
        let host = object
            .get("host")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("host", "is required: a host name or `*.example.com`"))?;
        let host = HostPattern::parse(host).map_err(|message| invalid("host", message))?;
        let path = match object.get("path") {
            None | Some(Value::Null) => None,
            Some(Value::String(path)) => {
                Some(PathPattern::parse(path).map_err(|message| invalid("path", message))?)
            }
            Some(_) => return Err(invalid("path", "must be a string")),
        };
        let method = match object.get("method") {
            None | Some(Value::Null) => None,
            Some(Value::String(method)) => Some(
                Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                    .map_err(|_| invalid("method", "must be an HTTP method such as GET or POST"))?,
            ),
            Some(_) => return Err(invalid("method", "must be a string")),
        };
        let action = match object.get("action").and_then(Value::as_str) {
            Some("allow") => Action::Allow,
            Some("block") => Action::Block,
            _ => return Err(invalid("action", "must be \"allow\" or \"block\"")),
        };
        let agent = match object.get("agent") {
            None | Some(Value::Null) => None,
            some => Some(parse_name("agent", some)?),
        };
        Ok(Self {
            host,
            path,
            method,
            action,
            agent,
        })
    }

    fn specificity(&self) -> (bool, bool, usize, bool) {
        (
            self.agent.is_some(),
            matches!(self.host, HostPattern::Exact(_)),
            self.path.as_ref().map_or(0, PathPattern::specificity),
            self.method.is_some(),
        )
    }
}

/// Access rules indexed by host; the most specific matching rule decides.
#[derive(Default)]
pub struct AccessPolicy {
    rules: Vec<(String, AccessRule)>,
    exact: HashMap<String, Vec<usize>>,
    wildcard: HashMap<String, Vec<usize>>,
}

impl AccessPolicy {
    /// Indexes `(id, rule)` pairs.
    pub fn new(rules: Vec<(String, AccessRule)>) -> Self {
        let mut policy = Self::default();
        for (number, (_, rule)) in rules.iter().enumerate() {
            let (map, key) = match &rule.host {
                HostPattern::Exact(host) => (&mut policy.exact, host),
                HostPattern::Wildcard(suffix) => (&mut policy.wildcard, suffix),
            };
            map.entry(key.clone()).or_default().push(number);
        }
        policy.rules = rules;
        policy
    }

    fn candidates<'a>(
        &'a self,
        host: &str,
        agent: Option<&'a str>,
    ) -> impl Iterator<Item = &'a (String, AccessRule)> + 'a {
        let parent = host.split_once('.').map(|(_, parent)| parent);
        self.exact
            .get(host)
            .into_iter()
            .flatten()
            .chain(
                parent
                    .and_then(|parent| self.wildcard.get(parent))
                    .into_iter()
                    .flatten(),
            )
            .map(|&number| &self.rules[number])
            .filter(move |(_, rule)| rule.agent.is_none() || rule.agent.as_deref() == agent)
    }

    /// Whether any rule concerns `host` for `agent` (such hosts must be intercepted).
    pub fn concerns(&self, host: &str, agent: Option<&str>) -> bool {
        self.candidates(host, agent).next().is_some()
    }

    /// The deciding rule for a request, if any: `(rule id, action)`.
    pub fn decide<'a>(
        &'a self,
        host: &str,
        path: &str,
        method: &Method,
        agent: Option<&'a str>,
    ) -> Option<(&'a str, Action)> {
        self.candidates(host, agent)
            .filter(|(_, rule)| {
                rule.path
                    .as_ref()
                    .is_none_or(|pattern| pattern.matches(path))
            })
            .filter(|(_, rule)| rule.method.as_ref().is_none_or(|wanted| wanted == method))
            .max_by_key(|(_, rule)| rule.specificity())
            .map(|(id, rule)| (id.as_str(), rule.action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(json: Value) -> AccessRule {
        AccessRule::from_json(&json).unwrap()
    }

    #[test]
    fn agents_validate_their_fields() {
        let agent = AgentSpec::from_json(
            &json!({"name": "research", "cgroups": ["agents/r"], "create": true}),
        )
        .unwrap();
        assert_eq!(agent.cgroups, [PathBuf::from("agents/r")]);
        for (input, field) in [
            (json!({"name": "a"}), "cgroups"),
            (json!({"name": "a", "cgroups": []}), "cgroups"),
            (json!({"name": "a", "cgroups": ["../etc"]}), "cgroups[0]"),
            (json!({"name": "a", "cgroups": [""]}), "cgroups[0]"),
            (
                json!({"name": "a", "cgroups": ["x"], "create": "yes"}),
                "create",
            ),
            (json!({"name": "a b", "cgroups": ["x"]}), "name"),
            (json!({"name": "a", "cgroups": ["x"], "extra": 1}), "extra"),
        ] {
            assert_eq!(
                AgentSpec::from_json(&input).unwrap_err().field,
                field,
                "{input}"
            );
        }
    }

    #[test]
    fn rules_validate_their_fields() {
        for (input, field) in [
            (json!({"action": "block"}), "host"),
            (json!({"host": "https://x.com", "action": "block"}), "host"),
            (json!({"host": "x.example.com", "action": "deny"}), "action"),
            (
                json!({"host": "x.example.com", "action": "block", "path": "v1"}),
                "path",
            ),
            (
                json!({"host": "x.example.com", "action": "block", "method": "GE T"}),
                "method",
            ),
            (
                json!({"host": "x.example.com", "action": "block", "agent": "?"}),
                "agent",
            ),
        ] {
            assert_eq!(
                AccessRule::from_json(&input).unwrap_err().field,
                field,
                "{input}"
            );
        }
    }

    #[test]
    fn the_most_specific_rule_decides() {
        let policy = AccessPolicy::new(vec![
            (
                "r1".into(),
                rule(json!({"host": "*.example.com", "action": "block"})),
            ),
            (
                "r2".into(),
                rule(json!({"host": "api.example.com", "path": "/v1/*", "action": "allow"})),
            ),
            (
                "r3".into(),
                rule(
                    json!({"host": "api.example.com", "path": "/v1/*", "method": "DELETE", "action": "block"}),
                ),
            ),
            (
                "r4".into(),
                rule(json!({"host": "api.example.com", "action": "allow", "agent": "trusted"})),
            ),
        ]);
        let get = Method::GET;
        assert_eq!(
            policy.decide("web.example.com", "/", &get, None),
            Some(("r1", Action::Block))
        );
        assert_eq!(
            policy.decide("api.example.com", "/v1/x", &get, None),
            Some(("r2", Action::Allow))
        );
        assert_eq!(
            policy.decide("api.example.com", "/v1/x", &Method::DELETE, None),
            Some(("r3", Action::Block))
        );
        assert_eq!(
            policy.decide("api.example.com", "/v2", &get, None),
            Some(("r1", Action::Block))
        );
        assert_eq!(
            policy.decide("api.example.com", "/v2", &get, Some("trusted")),
            Some(("r4", Action::Allow))
        );
        assert_eq!(policy.decide("example.org", "/", &get, None), None);
        assert!(policy.concerns("web.example.com", None));
        assert!(!policy.concerns("example.org", None));
    }
}
