//! Secrets: validated, their value checked where it will be injected (fetched from its source
//! when it lives elsewhere), written to the store, then made live in the host table.

use serde_json::Value;
use tracing::info;

use super::{blocking, new_id, now, Control, ControlError};
use crate::model::{
    self, SecretCheck, SecretInput, SecretRecord, SecretSpec, SecretValue, SecretView,
    ValidationError, ValueSource,
};
use crate::store::ValueChange;

/// An error about a fetched value, named after the field that chose its source.
fn at_source_field(source: &ValueSource, error: ValidationError) -> ValidationError {
    ValidationError {
        field: source.kind().field().into(),
        message: error.message,
    }
}

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

    /// The value a secret from `source` has now: fetched (a failure refuses the input,
    /// naming the source's field), and checked to fit where `spec` injects it.
    async fn fetched_value(&self, spec: &SecretSpec) -> Result<SecretValue, ControlError> {
        let value = self
            .sources
            .fetch(&spec.source)
            .await
            .map_err(|error| ValidationError {
                field: spec.source.kind().field().into(),
                message: format!(
                    "cannot be read now: {}; fix the source, or check the daemon's access to it",
                    error.chain()
                ),
            })?;
        spec.check_value(&value)
            .map_err(|error| at_source_field(&spec.source, error))?;
        Ok(value)
    }

    /// Creates a secret. Its value is inline in `input`, or fetched from its source now, so
    /// that a source that does not answer, or a value that cannot be injected, is refused
    /// here rather than at the first request.
    pub async fn create_secret(&self, mut input: SecretInput) -> Result<SecretView, ControlError> {
        let spec = input.validate()?;
        let inline = input.value.take();
        let fetched = match (&spec.source, &inline) {
            (ValueSource::Inline, None) => {
                return Err(ValidationError {
                    field: "value".into(),
                    message: "is required: the real credential (it is stored encrypted and never shown again), or give opRef, valueFile, valueCommand or valueCredential".into(),
                }
                .into())
            }
            (ValueSource::Inline, Some(_)) => None,
            (_, _) => Some(self.fetched_value(&spec).await?),
        };
        let stamp = now();
        let record = SecretRecord {
            id: new_id("sec"),
            name: spec.name.clone(),
            definition: input,
            preview: inline.as_ref().map(SecretValue::preview),
            created_at: stamp.clone(),
            updated_at: stamp,
        };
        blocking(|| self.store.create_secret(&record, inline.as_ref()))?;
        if let Some(value) = fetched {
            self.sources.remember(&record.id, &spec.source, value);
        }
        self.set_secret(self.loaded_secret(&record.id, spec.clone(), inline)?);
        info!(target: "appliance::audit", event = "secret_created", id = %record.id, name = %record.name, value_source = spec.source.kind().as_str(), "secret created");
        Ok(SecretView::new(record, &spec, None))
    }

    /// Applies a PATCH body: each field given replaces the stored one, `null` removes it,
    /// `value` replaces the value. Changed rules must suit the value (the stored one, or the
    /// source's now).
    pub async fn update_secret(
        &self,
        id_or_name: &str,
        patch: Value,
    ) -> Result<SecretView, ControlError> {
        let current = blocking(|| self.store.get_secret(id_or_name))?;
        let mut input = model::patched(&current.definition, patch, &[])?;
        let spec = input.validate()?;
        let inline = input.value.take();
        let replaced = inline.is_some();
        // The value the secret is live with: the new or the stored inline one (sealed), or
        // the one fetched from its source now.
        let (sealed, fetched, preview) = match (&spec.source, inline) {
            (ValueSource::Inline, Some(value)) => {
                let preview = Some(value.preview());
                (Some(value), None, preview)
            }
            (ValueSource::Inline, None) => {
                let stored = match current.definition.validate().map(|spec| spec.source) {
                    Ok(ValueSource::Inline) => blocking(|| self.store.secret_value(&current.id))?,
                    _ => {
                        return Err(ValidationError {
                            field: "value".into(),
                            message: "is required when the value stops coming from a source: give the real credential".into(),
                        }
                        .into())
                    }
                };
                spec.check_value(&stored)?;
                (Some(stored), None, current.preview.clone())
            }
            (_, _) => (None, Some(self.fetched_value(&spec).await?), None),
        };
        let change = match (&sealed, replaced) {
            (Some(value), true) => ValueChange::Replace(value),
            (Some(_), false) => ValueChange::Keep,
            (None, _) => ValueChange::Remove,
        };
        let record = SecretRecord {
            id: current.id,
            name: spec.name.clone(),
            definition: input,
            preview,
            created_at: current.created_at,
            updated_at: now(),
        };
        blocking(|| self.store.replace_secret(&current.name, &record, change))?;
        if let Some(value) = fetched {
            self.sources.remember(&record.id, &spec.source, value);
        }
        self.set_secret(self.loaded_secret(&record.id, spec.clone(), sealed)?);
        info!(target: "appliance::audit", event = "secret_updated", id = %record.id, name = %record.name, value_source = spec.source.kind().as_str(), "secret updated");
        let last_used = self.events.last_used(&record.id);
        Ok(SecretView::new(record, &spec, last_used))
    }

    /// Deletes a secret, by id or name.
    pub fn delete_secret(&self, id_or_name: &str) -> Result<(), ControlError> {
        let record = self.store.delete_secret(id_or_name)?;
        self.drop_secret(&record.id);
        info!(target: "appliance::audit", event = "secret_deleted", id = %record.id, name = %record.name, "secret deleted");
        Ok(())
    }

    /// Resolves a secret's value now (from its source, bypassing the cache) and checks that
    /// it fits where the secret injects it.
    pub async fn check_secret(&self, id_or_name: &str) -> Result<SecretCheck, ControlError> {
        let record = blocking(|| self.store.get_secret(id_or_name))?;
        let spec = validated(&record)?;
        let outcome = match &spec.source {
            ValueSource::Inline => blocking(|| self.store.secret_value(&record.id))
                .map_err(|error| error.to_string())
                .and_then(|value| spec.check_value(&value).map_err(|error| error.message)),
            source => match self.sources.fetch(source).await {
                Ok(value) => spec.check_value(&value).map_err(|error| error.message),
                Err(error) => Err(error.chain()),
            },
        };
        info!(target: "appliance::audit", event = "secret_checked", id = %record.id, name = %record.name, ok = outcome.is_ok(), "secret checked");
        Ok(SecretCheck {
            id: record.id,
            name: record.name,
            value_source: spec.source.kind(),
            source: spec.source.describe(),
            ok: outcome.is_ok(),
            error: outcome.err(),
        })
    }
}

fn validated(record: &SecretRecord) -> Result<SecretSpec, ControlError> {
    record
        .definition
        .validate()
        .map_err(ControlError::damaged("secret", &record.id))
}
