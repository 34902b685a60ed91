//! Records as the store keeps them: the model's record types as JSON with a layout version,
//! and a tree of one kind of record keyed by a unique name or id.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::ConflictableTransactionError;

use super::{duplicate, not_found, StoreError};

/// The layout of the records this appliance writes. Records written before versions were
/// recorded have the same layout, and read as this one.
const RECORD_VERSION: u32 = 1;

fn unversioned() -> u32 {
    RECORD_VERSION
}

/// A record with the version of its layout, so that a later appliance can tell an old record
/// from a new one, and this one refuses what a later one wrote instead of misreading it.
#[derive(Serialize, Deserialize)]
pub(super) struct Versioned<T> {
    #[serde(default = "unversioned")]
    version: u32,
    #[serde(flatten)]
    record: T,
}

impl Versioned<()> {
    /// `record` as stored.
    pub(super) fn serialize<T: Serialize>(record: &T) -> Vec<u8> {
        serde_json::to_vec(&Versioned {
            version: RECORD_VERSION,
            record,
        })
        .expect("records serialize: their keys are strings")
    }

    /// The record stored under `id`.
    pub(super) fn deserialize<T: DeserializeOwned>(id: &str, raw: &[u8]) -> Result<T, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: id.to_owned(),
            reason,
        };
        let stored: Versioned<T> =
            serde_json::from_slice(raw).map_err(|error| corrupt(error.to_string()))?;
        if stored.version > RECORD_VERSION {
            return Err(corrupt(format!(
                "it has layout version {}, written by a newer appliance (this one reads up to {RECORD_VERSION}); upgrade the appliance",
                stored.version
            )));
        }
        Ok(stored.record)
    }
}

/// One kind of record in its own tree.
pub struct Collection<T> {
    db: sled::Db,
    tree: sled::Tree,
    kind: &'static str,
    records: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Collection<T> {
    /// The records of `kind` in `tree` of `db`.
    pub fn new(db: &sled::Db, tree: sled::Tree, kind: &'static str) -> Self {
        Self {
            db: db.clone(),
            tree,
            kind,
            records: PhantomData,
        }
    }

    /// The tree itself, for tests that write what an older appliance wrote.
    #[cfg(test)]
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn database(&self, source: sled::Error) -> StoreError {
        StoreError::Database {
            path: std::path::PathBuf::from(format!("{} records", self.kind)),
            source,
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(|e| self.database(e))
    }

    fn read(&self, key: &str, raw: &[u8]) -> Result<T, StoreError> {
        Versioned::deserialize(&format!("{} {key}", self.kind), raw)
    }

    /// Stores a new record under `key`; a taken key is a duplicate.
    pub fn create(&self, key: &str, record: &T) -> Result<(), StoreError> {
        let swapped = self
            .tree
            .compare_and_swap(
                key,
                None as Option<&[u8]>,
                Some(Versioned::serialize(record)),
            )
            .map_err(|e| self.database(e))?;
        if swapped.is_err() {
            return Err(duplicate(self.kind, key));
        }
        self.flush()
    }

    /// The record under `key`.
    pub fn get(&self, key: &str) -> Result<T, StoreError> {
        let raw = self
            .tree
            .get(key)
            .map_err(|e| self.database(e))?
            .ok_or_else(|| not_found(self.kind, key))?;
        self.read(key, &raw)
    }

    /// Every record, in key order.
    pub fn list(&self) -> Result<Vec<T>, StoreError> {
        self.tree
            .iter()
            .map(|entry| {
                let (key, raw) = entry.map_err(|e| self.database(e))?;
                self.read(&String::from_utf8_lossy(&key), &raw)
            })
            .collect()
    }

    /// Replaces the record under `old_key` by `record` under `new_key` (a rename when they
    /// differ), atomically.
    pub fn replace(&self, old_key: &str, new_key: &str, record: &T) -> Result<(), StoreError> {
        let serialized = Versioned::serialize(record);
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
                tree.insert(new_key, serialized.as_slice())?;
                Ok(())
            })
            .map_err(|error| match error {
                sled::transaction::TransactionError::Abort(error) => error,
                sled::transaction::TransactionError::Storage(source) => self.database(source),
            })?;
        self.flush()
    }

    /// Removes and returns the record under `key`.
    pub fn delete(&self, key: &str) -> Result<T, StoreError> {
        let removed = self.get(key)?;
        self.tree.remove(key).map_err(|e| self.database(e))?;
        self.flush()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        name: String,
    }

    #[test]
    fn records_carry_their_version_and_newer_ones_are_refused() {
        let stored = Versioned::serialize(&Probe { name: "a".into() });
        let json: serde_json::Value = serde_json::from_slice(&stored).unwrap();
        assert_eq!(json, serde_json::json!({"version": 1, "name": "a"}));
        let old: Probe = Versioned::deserialize("p", br#"{"name": "a"}"#).unwrap();
        assert_eq!(old, Probe { name: "a".into() });
        let error =
            Versioned::deserialize::<Probe>("p", br#"{"version": 2, "name": "a"}"#).unwrap_err();
        assert!(error.to_string().contains("newer appliance"), "{error}");
    }
}
