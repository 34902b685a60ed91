//! Access rules: allow or block requests by host, path, method and agent.

use http::Method;
use serde::{Deserialize, Serialize};

use super::error::invalid;
use super::pattern::{HostPattern, PathPattern};
use super::{check_name, ValidationError};

/// What an access rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let matching requests through (overrides a less specific block).
    Allow,
    /// Answer matching requests with 403; they never reach the upstream.
    Block,
}

impl Action {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Block => "block",
        }
    }
}

/// An access rule as the API takes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct AccessRuleInput {
    /// Host pattern.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path pattern; all paths when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP method; all when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// What it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The agent it is limited to; every workload when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// A validated access rule.
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

/// A stored access rule, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessRuleRecord {
    /// Stable id.
    pub id: String,
    /// Its definition as given.
    #[serde(flatten)]
    pub definition: AccessRuleInput,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl AccessRuleInput {
    /// Checks every field.
    pub fn validate(&self) -> Result<AccessRule, ValidationError> {
        let host = self
            .host
            .as_deref()
            .ok_or_else(|| invalid("host", "is required: a host name or `*.example.com`"))?;
        let host = HostPattern::parse(host).map_err(|message| invalid("host", message))?;
        let path = self
            .path
            .as_deref()
            .map(|path| PathPattern::parse(path).map_err(|message| invalid("path", message)))
            .transpose()?;
        let method = self
            .method
            .as_deref()
            .map(|method| {
                Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                    .map_err(|_| invalid("method", "must be an HTTP method such as GET or POST"))
            })
            .transpose()?;
        let action = self
            .action
            .ok_or_else(|| invalid("action", "is required: \"allow\" or \"block\""))?;
        let agent = self
            .agent
            .as_deref()
            .map(|agent| check_name("agent", Some(agent)))
            .transpose()?;
        Ok(AccessRule {
            host,
            path,
            method,
            action,
            agent,
        })
    }
}

impl AccessRule {
    /// Reads and validates a rule as the API receives it.
    pub fn from_json(json: &serde_json::Value) -> Result<Self, ValidationError> {
        super::from_value::<AccessRuleInput>(json.clone())?.validate()
    }

    /// How specific the rule is: the most specific matching rule decides.
    pub fn specificity(&self) -> (bool, bool, usize, bool) {
        (
            self.agent.is_some(),
            matches!(self.host, HostPattern::Exact(_)),
            self.path.as_ref().map_or(0, PathPattern::specificity),
            self.method.is_some(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_validate_their_fields() {
        for (input, field) in [
            (json!({"action": "block"}), "host"),
            (json!({"host": "https://x.com", "action": "block"}), "host"),
            (json!({"host": "x.example.com", "action": "deny"}), "action"),
            (json!({"host": "x.example.com"}), "action"),
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
            (
                json!({"host": "x.example.com", "action": "block", "colour": 1}),
                "colour",
            ),
        ] {
            assert_eq!(
                AccessRule::from_json(&input).unwrap_err().field,
                field,
                "{input}"
            );
        }
    }
}
