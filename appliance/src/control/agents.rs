//! Agents: created, changed and deleted in the store, then followed by capture.

use serde_json::Value;
use tracing::info;

use super::{now, Control, ControlError};
use crate::capture::{CaptureError, Cgroup};
use crate::model::{self, AgentInput, AgentRecord, AgentSpec, ValidationError};

/// Fields of an agent record that the appliance sets.
const BOOKKEEPING: &[&str] = &["createdAt", "updatedAt"];

/// An agent's cgroups, opened (or created, when the agent says so); a missing one is a
/// validation error naming it.
pub fn agent_cgroups(spec: &AgentSpec) -> Result<Vec<Cgroup>, ValidationError> {
    spec.cgroups
        .iter()
        .enumerate()
        .map(|(index, path)| {
            let opened = if spec.create {
                Cgroup::create(path)
            } else {
                Cgroup::open(path)
            };
            opened.map_err(|error| ValidationError {
                field: format!("cgroups[{index}]"),
                message: match error {
                    CaptureError::CgroupNotFound { .. } => {
                        "does not exist; create it, or set \"create\": true".into()
                    }
                    other => other.to_string(),
                },
            })
        })
        .collect()
}

impl Control {
    /// Every agent, by name.
    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, ControlError> {
        Ok(self.store.list_agents()?)
    }

    /// One agent.
    pub fn get_agent(&self, name: &str) -> Result<AgentRecord, ControlError> {
        Ok(self.store.get_agent(name)?)
    }

    /// Creates an agent and intercepts its cgroups.
    pub fn create_agent(&self, input: AgentInput) -> Result<AgentRecord, ControlError> {
        let spec = input.validate()?;
        agent_cgroups(&spec)?;
        let stamp = now();
        let record = AgentRecord {
            definition: spec.definition(),
            created_at: stamp.clone(),
            updated_at: stamp,
        };
        self.store.create_agent(&record)?;
        self.reconcile_agents()?;
        info!(target: "appliance::audit", event = "agent_created", name = %spec.name, "agent created");
        Ok(record)
    }

    /// Applies a PATCH body to an agent (a new name renames it).
    pub fn update_agent(&self, name: &str, patch: Value) -> Result<AgentRecord, ControlError> {
        let current = self.store.get_agent(name)?;
        let spec = model::patched(&current.definition, patch, BOOKKEEPING)?.validate()?;
        agent_cgroups(&spec)?;
        let record = AgentRecord {
            definition: spec.definition(),
            created_at: current.created_at,
            updated_at: now(),
        };
        self.store.replace_agent(name, &record)?;
        self.reconcile_agents()?;
        info!(target: "appliance::audit", event = "agent_updated", name = %spec.name, "agent updated");
        Ok(record)
    }

    /// Deletes an agent; capture lets go of the cgroups nothing else selects.
    pub fn delete_agent(&self, name: &str) -> Result<(), ControlError> {
        self.store.delete_agent(name)?;
        self.reconcile_agents()?;
        info!(target: "appliance::audit", event = "agent_deleted", name = %name, "agent deleted");
        Ok(())
    }
}
