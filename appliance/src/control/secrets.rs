//! Secrets: created, changed and deleted in the store, then made live in the host table.

use serde_json::Value;
use tracing::info;

use super::{new_id, now, Control, ControlError};
use crate::model::{self, SecretInput, SecretRecord, SecretSpec, SecretView, ValidationError};

impl Control {
    /// The view of `record`, whose definition must still validate.
    fn secret_view(&self, record: SecretRecord) -> Result<SecretView, ControlError> {
        let spec = validated(&record)?;
        let last_used = self.events.last_used(&record.id);
        Ok(SecretView::new(record, &spec, last_used))
    }

    /// Every secret, by name.
    pub fn list_secrets(&self) -> Result<Vec<SecretView>, ControlError> {
        self.store
            .list_secrets()?
            .into_iter()
            .map(|record| self.secret_view(record))
            .collect()
    }

    /// One secret, by id or name.
    pub fn get_secret(&self, id_or_name: &str) -> Result<SecretView, ControlError> {
        let record = self.store.get_secret(id_or_name)?;
        self.secret_view(record)
    }

    /// Creates a secret; `input` must carry its value.
    pub fn create_secret(&self, mut input: SecretInput) -> Result<SecretView, ControlError> {
        let spec = input.validate()?;
        let value = input.value.take().ok_or_else(|| ValidationError {
            field: "value".into(),
            message:
                "is required: the real credential (it is stored encrypted and never shown again)"
                    .into(),
        })?;
        let stamp = now();
        let record = SecretRecord {
            id: new_id("sec"),
            name: spec.name.clone(),
            definition: input,
            preview: value.preview(),
            created_at: stamp.clone(),
            updated_at: stamp,
        };
        self.store.create_secret(&record, &value)?;
        self.rebuild_host_table()?;
        info!(target: "appliance::audit", event = "secret_created", id = %record.id, name = %record.name, "secret created");
        Ok(SecretView::new(record, &spec, None))
    }

    /// Applies a PATCH body: each field given replaces the stored one, `null` removes it,
    /// `value` replaces the value. Changed rules must suit the value already stored.
    pub fn update_secret(
        &self,
        id_or_name: &str,
        patch: Value,
    ) -> Result<SecretView, ControlError> {
        let current = self.store.get_secret(id_or_name)?;
        let mut input = model::patched(&current.definition, patch, &[])?;
        let spec = input.validate()?;
        let value = input.value.take();
        if value.is_none() {
            spec.check_value(&self.store.secret_value(&current.id)?)?;
        }
        let record = SecretRecord {
            id: current.id,
            name: spec.name.clone(),
            definition: input,
            preview: value
                .as_ref()
                .map_or(current.preview, |value| value.preview()),
            created_at: current.created_at,
            updated_at: now(),
        };
        self.store
            .replace_secret(&current.name, &record, value.as_ref())?;
        self.rebuild_host_table()?;
        info!(target: "appliance::audit", event = "secret_updated", id = %record.id, name = %record.name, "secret updated");
        let last_used = self.events.last_used(&record.id);
        Ok(SecretView::new(record, &spec, last_used))
    }

    /// Deletes a secret, by id or name.
    pub fn delete_secret(&self, id_or_name: &str) -> Result<(), ControlError> {
        let record = self.store.delete_secret(id_or_name)?;
        self.rebuild_host_table()?;
        info!(target: "appliance::audit", event = "secret_deleted", id = %record.id, name = %record.name, "secret deleted");
        Ok(())
    }
}

fn validated(record: &SecretRecord) -> Result<SecretSpec, ControlError> {
    record
        .definition
        .validate()
        .map_err(ControlError::damaged("secret", &record.id))
}
