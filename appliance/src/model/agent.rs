//! Agents: named sets of cgroups whose processes are one workload.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::invalid;
use super::{check_name, ValidationError};

/// Most cgroups one agent may name.
pub const MAX_AGENT_CGROUPS: usize = 32;

/// An agent as the API takes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct AgentInput {
    /// Unique name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// cgroup v2 paths (absolute, or relative to the cgroup2 mount).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroups: Option<Vec<String>>,
    /// Create missing cgroups instead of refusing them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create: Option<bool>,
}

/// A validated agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSpec {
    /// Unique name.
    pub name: String,
    /// cgroup v2 paths (absolute, or relative to the cgroup2 mount).
    pub cgroups: Vec<PathBuf>,
    /// Create missing cgroups instead of refusing them.
    pub create: bool,
}

/// A stored agent, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRecord {
    /// Its definition, every field filled in.
    #[serde(flatten)]
    pub definition: AgentInput,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl AgentInput {
    /// Checks every field.
    pub fn validate(&self) -> Result<AgentSpec, ValidationError> {
        let name = check_name("name", self.name.as_deref())?;
        let list = self
            .cgroups
            .as_deref()
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
            .map(|(index, text)| {
                let field = format!("cgroups[{index}]");
                if text.is_empty() {
                    return Err(invalid(field, "must be a non-empty string"));
                }
                let path = Path::new(text);
                if path
                    .components()
                    .any(|component| matches!(component, Component::ParentDir))
                {
                    return Err(invalid(field, "must not contain `..`"));
                }
                Ok(path.to_path_buf())
            })
            .collect::<Result<_, _>>()?;
        Ok(AgentSpec {
            name,
            cgroups,
            create: self.create.unwrap_or(false),
        })
    }
}

impl AgentSpec {
    /// Reads and validates an agent as the API receives it.
    pub fn from_json(json: &serde_json::Value) -> Result<Self, ValidationError> {
        super::from_value::<AgentInput>(json.clone())?.validate()
    }

    /// The definition with every field filled in, as it is stored and shown.
    pub fn definition(&self) -> AgentInput {
        AgentInput {
            name: Some(self.name.clone()),
            cgroups: Some(
                self.cgroups
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect(),
            ),
            create: Some(self.create),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            (json!({"name": "a", "cgroups": [7]}), "cgroups[0]"),
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
}
