//! Access rules: created, changed and deleted in the store, then made live in the host table.

use serde_json::Value;
use tracing::info;

use super::{new_id, now, Control, ControlError};
use crate::model::{self, AccessRuleInput, AccessRuleRecord};

/// Fields of a rule record that the appliance sets.
const BOOKKEEPING: &[&str] = &["id", "createdAt", "updatedAt"];

impl Control {
    /// Every access rule, by id.
    pub fn list_access_rules(&self) -> Result<Vec<AccessRuleRecord>, ControlError> {
        Ok(self.store.list_rules()?)
    }

    /// One access rule.
    pub fn get_access_rule(&self, id: &str) -> Result<AccessRuleRecord, ControlError> {
        Ok(self.store.get_rule(id)?)
    }

    /// Creates an access rule.
    pub fn create_access_rule(
        &self,
        input: AccessRuleInput,
    ) -> Result<AccessRuleRecord, ControlError> {
        let rule = input.validate()?;
        let stamp = now();
        let record = AccessRuleRecord {
            id: new_id("rule"),
            definition: input,
            created_at: stamp.clone(),
            updated_at: stamp,
        };
        self.store.create_rule(&record)?;
        self.set_access_rule(&record.id, Some(rule));
        info!(target: "appliance::audit", event = "rule_created", id = %record.id, "access rule created");
        Ok(record)
    }

    /// Applies a PATCH body to an access rule.
    pub fn update_access_rule(
        &self,
        id: &str,
        patch: Value,
    ) -> Result<AccessRuleRecord, ControlError> {
        let current = self.store.get_rule(id)?;
        let definition = model::patched(&current.definition, patch, BOOKKEEPING)?;
        let rule = definition.validate()?;
        let record = AccessRuleRecord {
            id: current.id,
            definition,
            created_at: current.created_at,
            updated_at: now(),
        };
        self.store.replace_rule(&record)?;
        self.set_access_rule(&record.id, Some(rule));
        info!(target: "appliance::audit", event = "rule_updated", id = %record.id, "access rule updated");
        Ok(record)
    }

    /// Deletes an access rule.
    pub fn delete_access_rule(&self, id: &str) -> Result<(), ControlError> {
        self.store.delete_rule(id)?;
        self.set_access_rule(id, None);
        info!(target: "appliance::audit", event = "rule_deleted", id = %id, "access rule deleted");
        Ok(())
    }
}
