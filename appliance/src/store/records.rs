//! Plain JSON records (agents, access rules): validated before every write, flushed before
//! returning, keyed by a unique name or id.

use serde_json::{Map, Value};
use sled::transaction::ConflictableTransactionError;

use super::{duplicate, not_found, StoreError};
use crate::secret::ValidationError;

/// One kind of record in its own tree.
pub struct Collection {
    pub(super) db: sled::Db,
    pub(super) tree: sled::Tree,
    pub(super) kind: &'static str,
}

impl Collection {
    fn database(&self, source: sled::Error) -> StoreError {
        StoreError::Database {
            path: std::path::PathBuf::from(format!("{} records", self.kind)),
            source,
        }
    }

    fn corrupt(&self, key: &str, reason: impl ToString) -> StoreError {
        StoreError::Corrupt {
            id: format!("{} {key}", self.kind),
            reason: reason.to_string(),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(|e| self.database(e))
    }

    /// Stores a new record under `key`; a taken key is a duplicate.
    pub fn create(&self, key: &str, record: &Value) -> Result<(), StoreError> {
        let swapped = self
            .tree
            .compare_and_swap(
                key,
                None as Option<&[u8]>,
                Some(record.to_string().into_bytes()),
            )
            .map_err(|e| self.database(e))?;
        if swapped.is_err() {
            return Err(duplicate(self.kind, key));
        }
        self.flush()
    }

    /// The record under `key`.
    pub fn get(&self, key: &str) -> Result<Value, StoreError> {
        let raw = self
            .tree
            .get(key)
            .map_err(|e| self.database(e))?
            .ok_or_else(|| not_found(self.kind, key))?;
        serde_json::from_slice(&raw).map_err(|error| self.corrupt(key, error))
    }

    /// Every record, in key order.
    pub fn list(&self) -> Result<Vec<Value>, StoreError> {
        self.tree
            .iter()
            .map(|entry| {
                let (key, raw) = entry.map_err(|e| self.database(e))?;
                serde_json::from_slice(&raw)
                    .map_err(|error| self.corrupt(&String::from_utf8_lossy(&key), error))
            })
            .collect()
    }

    /// Replaces the record under `old_key` by `record` under `new_key` (a rename when they
    /// differ), atomically.
    pub fn replace(&self, old_key: &str, new_key: &str, record: &Value) -> Result<(), StoreError> {
        let serialized = record.to_string();
        self.tree
            .transaction(|tree| {
                if tree.get(old_key)?.is_none() {
                    return Err(ConflictableTransactionError::Abort(not_found(
                        self.kind, old_key,
                    )));
                }
                if old_key != new_key {
                    if tree.get(new_key)?.is_some() {
                        return Err(ConflictableTransactionError::Abort(duplicate(
                            self.kind, new_key,
                        )));
                    }
                    tree.remove(old_key)?;
                }
                tree.insert(new_key, serialized.as_bytes())?;
                Ok(())
            })
            .map_err(|error| match error {
                sled::transaction::TransactionError::Abort(error) => error,
                sled::transaction::TransactionError::Storage(source) => self.database(source),
            })?;
        self.flush()
    }

    /// Removes and returns the record under `key`.
    pub fn delete(&self, key: &str) -> Result<Value, StoreError> {
        let removed = self.get(key)?;
        self.tree.remove(key).map_err(|e| self.database(e))?;
        self.flush()?;
        Ok(removed)
    }
}

/// Merges a PATCH body into `current`: given fields replace, `null` removes. An empty patch
/// is refused.
pub fn merge(current: &Value, patch: &Value, read_only: &[&str]) -> Result<Value, ValidationError> {
    let patch = patch.as_object().ok_or_else(|| ValidationError {
        field: "body".into(),
        message: "must be a JSON object".into(),
    })?;
    if patch.is_empty() {
        return Err(ValidationError {
            field: "body".into(),
            message: "no fields provided".into(),
        });
    }
    if let Some(key) = patch.keys().find(|key| read_only.contains(&key.as_str())) {
        return Err(ValidationError {
            field: key.clone(),
            message: "is set by the appliance and cannot be changed".into(),
        });
    }
    let mut merged: Map<String, Value> = current.as_object().cloned().unwrap_or_default();
    for (key, value) in patch {
        if value.is_null() {
            merged.remove(key);
        } else {
            merged.insert(key.clone(), value.clone());
        }
    }
    Ok(Value::Object(merged))
}
