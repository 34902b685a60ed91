//! The store: secrets in a sled database in the state directory. Definitions are kept as
//! JSON; values only sealed with the master key, each with a fresh nonce and bound to its
//! record id. Every write is flushed to disk before the call returns.

pub mod seal;

use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom as _, SystemRandom};
use serde_json::{json, Map, Value};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::injection::LoadedSecret;
use crate::secret::{SecretSpec, SecretValue, ValidationError};
pub use seal::{KeyError, KeySource, MasterKey, Sealer};

const KEY_CHECK: &[u8] = b"key-check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"appliance store key check";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The input is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No record has this id or name.
    #[error("no secret is named or has the id {0:?}")]
    NotFound(String),
    /// The name is taken.
    #[error("a secret named {0:?} already exists; choose another name or update that one")]
    Duplicate(String),
    /// The master key does not open this store.
    #[error("the master key does not match the store in {}; restore the key this store was created with (nothing was changed)", path.display())]
    WrongKey {
        /// The store.
        path: PathBuf,
    },
    /// The database could not be opened or written.
    #[error("the store in {} failed: {source}; is another appliance daemon using it?", path.display())]
    Database {
        /// The store.
        path: PathBuf,
        /// Why.
        #[source]
        source: sled::Error,
    },
    /// A stored record is damaged.
    #[error("stored record {id} is damaged: {reason}")]
    Corrupt {
        /// The record.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

/// The read side of a secret: never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRecord {
    /// Stable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// The definition as given (without the value).
    pub definition: Value,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Masked value, e.g. `sk-pro••••789`.
    pub preview: String,
}

impl SecretRecord {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "definition": self.definition,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "preview": self.preview,
        })
    }

    fn from_json(id: &str, value: &Value) -> Result<Self, StoreError> {
        let text = |key: &str| {
            value[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| StoreError::Corrupt {
                    id: id.to_owned(),
                    reason: format!("missing {key}"),
                })
        };
        Ok(Self {
            id: text("id")?,
            name: text("name")?,
            definition: value["definition"].clone(),
            created_at: text("createdAt")?,
            updated_at: text("updatedAt")?,
            preview: text("preview")?,
        })
    }
}

/// The secret store.
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    secrets: sled::Tree,
    names: sled::Tree,
    values: sled::Tree,
    sealer: Sealer,
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn new_id() -> String {
    let mut bytes = [0u8; 12];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator does not fail on Linux");
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sec_{hex}")
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(error: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(error))
}

impl Store {
    /// Opens (or creates) the store at `path` with `key`. A key that does not match the store
    /// is refused before anything is written.
    pub fn open(path: &Path, key: &MasterKey) -> Result<Self, StoreError> {
        let database = |source| StoreError::Database {
            path: path.into(),
            source,
        };
        let db = sled::open(path).map_err(database)?;
        let sealer = Sealer::new(key);
        let meta = db.open_tree("meta").map_err(database)?;
        match meta.get(KEY_CHECK).map_err(database)? {
            Some(sealed) => {
                let opened = sealer.open(KEY_CHECK, &sealed);
                if !opened.is_ok_and(|plain| plain.as_slice() == KEY_CHECK_PLAINTEXT) {
                    return Err(StoreError::WrongKey { path: path.into() });
                }
            }
            None => {
                meta.insert(KEY_CHECK, sealer.seal(KEY_CHECK, KEY_CHECK_PLAINTEXT))
                    .map_err(database)?;
                db.flush().map_err(database)?;
            }
        }
        Ok(Self {
            secrets: db.open_tree("secrets").map_err(database)?,
            names: db.open_tree("secret_names").map_err(database)?,
            values: db.open_tree("secret_values").map_err(database)?,
            path: path.into(),
            db,
            sealer,
        })
    }

    fn database(&self, source: sled::Error) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            source,
        }
    }

    fn transaction_error(&self, error: TransactionError<StoreError>) -> StoreError {
        match error {
            TransactionError::Abort(error) => error,
            TransactionError::Storage(source) => self.database(source),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(drop)
            .map_err(|source| self.database(source))
    }

    fn resolve_id(&self, id_or_name: &str) -> Result<String, StoreError> {
        if self
            .secrets
            .contains_key(id_or_name)
            .map_err(|e| self.database(e))?
        {
            return Ok(id_or_name.to_owned());
        }
        match self.names.get(id_or_name).map_err(|e| self.database(e))? {
            Some(id) => Ok(String::from_utf8_lossy(&id).into_owned()),
            None => Err(StoreError::NotFound(id_or_name.to_owned())),
        }
    }

    /// Creates a secret from its API definition, which must include `value`.
    pub fn create_secret(&self, input: &Value) -> Result<SecretRecord, StoreError> {
        let (spec, value) = SecretSpec::from_json(input)?;
        let value = value.ok_or_else(|| ValidationError {
            field: "value".into(),
            message:
                "is required: the real credential (it is stored encrypted and never shown again)"
                    .into(),
        })?;
        let mut definition = input.as_object().cloned().unwrap_or_default();
        definition.remove("value");
        let stamp = now();
        let record = SecretRecord {
            id: new_id(),
            name: spec.name.clone(),
            definition: Value::Object(definition),
            created_at: stamp.clone(),
            updated_at: stamp,
            preview: value.preview(),
        };
        let sealed = self.sealer.seal(record.id.as_bytes(), value.expose());
        let serialized = record.to_json().to_string();
        (&self.secrets, &self.names, &self.values)
            .transaction(|(secrets, names, values)| {
                if names.get(record.name.as_bytes())?.is_some() {
                    return abort(StoreError::Duplicate(record.name.clone()));
                }
                names.insert(record.name.as_bytes(), record.id.as_bytes())?;
                secrets.insert(record.id.as_bytes(), serialized.as_bytes())?;
                values.insert(record.id.as_bytes(), sealed.as_slice())?;
                Ok(())
            })
            .map_err(|error| self.transaction_error(error))?;
        self.flush()?;
        Ok(record)
    }

    /// Reads one secret by id or name.
    pub fn get_secret(&self, id_or_name: &str) -> Result<SecretRecord, StoreError> {
        let id = self.resolve_id(id_or_name)?;
        let raw = self
            .secrets
            .get(id.as_bytes())
            .map_err(|e| self.database(e))?
            .ok_or_else(|| StoreError::NotFound(id_or_name.to_owned()))?;
        parse_record(&id, &raw)
    }

    /// Every secret, by name.
    pub fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let mut records = self
            .secrets
            .iter()
            .map(|entry| {
                let (id, raw) = entry.map_err(|e| self.database(e))?;
                parse_record(&String::from_utf8_lossy(&id), &raw)
            })
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Applies a partial update: each top-level field given replaces the stored one, `null`
    /// removes it, `value` replaces the value.
    pub fn update_secret(
        &self,
        id_or_name: &str,
        patch: &Value,
    ) -> Result<SecretRecord, StoreError> {
        let patch = patch.as_object().ok_or_else(|| ValidationError {
            field: "body".into(),
            message: "must be a JSON object".into(),
        })?;
        if patch.is_empty() {
            return Err(ValidationError {
                field: "body".into(),
                message: "no fields provided".into(),
            }
            .into());
        }
        let current = self.get_secret(id_or_name)?;
        let mut merged: Map<String, Value> =
            current.definition.as_object().cloned().unwrap_or_default();
        for (key, value) in patch {
            if value.is_null() {
                merged.remove(key);
            } else {
                merged.insert(key.clone(), value.clone());
            }
        }
        let (spec, value) = SecretSpec::from_json(&Value::Object(merged.clone()))?;
        merged.remove("value");
        let record = SecretRecord {
            id: current.id.clone(),
            name: spec.name.clone(),
            definition: Value::Object(merged),
            created_at: current.created_at.clone(),
            updated_at: now(),
            preview: value
                .as_ref()
                .map_or(current.preview.clone(), SecretValue::preview),
        };
        let sealed = value.map(|value| self.sealer.seal(record.id.as_bytes(), value.expose()));
        let serialized = record.to_json().to_string();
        (&self.secrets, &self.names, &self.values)
            .transaction(|(secrets, names, values)| {
                if secrets.get(record.id.as_bytes())?.is_none() {
                    return abort(StoreError::NotFound(id_or_name.to_owned()));
                }
                if record.name != current.name {
                    if names.get(record.name.as_bytes())?.is_some() {
                        return abort(StoreError::Duplicate(record.name.clone()));
                    }
                    names.remove(current.name.as_bytes())?;
                    names.insert(record.name.as_bytes(), record.id.as_bytes())?;
                }
                secrets.insert(record.id.as_bytes(), serialized.as_bytes())?;
                if let Some(sealed) = &sealed {
                    values.insert(record.id.as_bytes(), sealed.as_slice())?;
                }
                Ok(())
            })
            .map_err(|error| self.transaction_error(error))?;
        self.flush()?;
        Ok(record)
    }

    /// Deletes a secret by id or name.
    pub fn delete_secret(&self, id_or_name: &str) -> Result<(), StoreError> {
        let record = self.get_secret(id_or_name)?;
        (&self.secrets, &self.names, &self.values)
            .transaction(|(secrets, names, values)| {
                secrets.remove(record.id.as_bytes())?;
                names.remove(record.name.as_bytes())?;
                values.remove(record.id.as_bytes())?;
                Ok(())
            })
            .map_err(|error| self.transaction_error(error))?;
        self.flush()
    }

    /// Every secret with its decrypted value, for the injection layer.
    pub fn load_all(&self) -> Result<Vec<LoadedSecret>, StoreError> {
        self.list_secrets()?
            .into_iter()
            .map(|record| {
                let corrupt = |reason: String| StoreError::Corrupt {
                    id: record.id.clone(),
                    reason,
                };
                let (spec, _) = SecretSpec::from_json(&record.definition)
                    .map_err(|error| corrupt(error.to_string()))?;
                let sealed = self
                    .values
                    .get(record.id.as_bytes())
                    .map_err(|e| self.database(e))?
                    .ok_or_else(|| corrupt("its value is missing".into()))?;
                let plain = self
                    .sealer
                    .open(record.id.as_bytes(), &sealed)
                    .map_err(|error| corrupt(error.to_string()))?;
                let value =
                    SecretValue::new(plain.to_vec()).map_err(|error| corrupt(error.to_string()))?;
                Ok(LoadedSecret {
                    id: record.id,
                    spec,
                    value,
                })
            })
            .collect()
    }
}

fn parse_record(id: &str, raw: &[u8]) -> Result<SecretRecord, StoreError> {
    let value: Value = serde_json::from_slice(raw).map_err(|error| StoreError::Corrupt {
        id: id.to_owned(),
        reason: error.to_string(),
    })?;
    SecretRecord::from_json(id, &value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;

    const VALUE: &str = "sk-ant-api03-PLAINTEXT-NEVER-ON-DISK-0123456789";

    fn open(dir: &Path) -> Store {
        let (key, _) = MasterKey::load_or_create(None, dir).unwrap();
        Store::open(&dir.join("store"), &key).unwrap()
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[test]
    fn values_never_reach_the_disk_in_plaintext() {
        let dir = temp_dir("store-plain");
        let store = open(&dir);
        store
            .create_secret(&json!({"name": "a", "type": "anthropic", "value": VALUE}))
            .unwrap();
        store
            .update_secret("a", &json!({"value": format!("{VALUE}-rotated")}))
            .unwrap();
        drop(store);
        let files = files_under(&dir.join("store"));
        assert!(!files.is_empty());
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes
                    .windows(VALUE.len())
                    .any(|window| window == VALUE.as_bytes()),
                "{} contains the plaintext",
                file.display()
            );
        }
    }

    #[test]
    fn data_survives_reopening_and_a_wrong_key_changes_nothing() {
        let dir = temp_dir("store-reopen");
        let record = open(&dir)
            .create_secret(&json!({"name": "a", "type": "openai", "value": VALUE}))
            .unwrap();
        let loaded = open(&dir).load_all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].value.expose(), VALUE.as_bytes());
        assert_eq!(loaded[0].id, record.id);

        let other = temp_dir("store-other-key");
        let (wrong, _) = MasterKey::load_or_create(None, &other).unwrap();
        let error = Store::open(&dir.join("store"), &wrong).err().unwrap();
        assert!(matches!(error, StoreError::WrongKey { .. }), "{error}");
        assert_eq!(open(&dir).load_all().unwrap().len(), 1, "data lost");
    }

    #[test]
    fn names_are_unique_and_reads_never_include_the_value() {
        let dir = temp_dir("store-names");
        let store = open(&dir);
        let record = store
            .create_secret(&json!({"name": "a", "type": "stripe", "value": VALUE}))
            .unwrap();
        assert!(!record.to_json().to_string().contains(VALUE));
        assert_eq!(record.preview, "sk-ant••••789");
        let duplicate = store
            .create_secret(&json!({"name": "a", "type": "stripe", "value": VALUE}))
            .unwrap_err();
        assert!(matches!(duplicate, StoreError::Duplicate(_)));
        store
            .create_secret(&json!({"name": "b", "type": "stripe", "value": "x"}))
            .unwrap();
        let rename = store.update_secret("b", &json!({"name": "a"})).unwrap_err();
        assert!(matches!(rename, StoreError::Duplicate(_)));
        let missing = store
            .create_secret(&json!({"name": "c", "type": "stripe"}))
            .unwrap_err();
        assert!(
            matches!(missing, StoreError::Invalid(ValidationError { ref field, .. }) if field == "value")
        );
    }

    #[test]
    fn updates_are_partial_and_empty_ones_are_refused() {
        let dir = temp_dir("store-update");
        let store = open(&dir);
        store
            .create_secret(
                &json!({"name": "g", "hostPattern": "api.example.com", "value": VALUE,
                "injection": {"headerName": "x-key"}}),
            )
            .unwrap();
        let updated = store
            .update_secret("g", &json!({"pathPattern": "/v1/*"}))
            .unwrap();
        assert_eq!(updated.definition["hostPattern"], "api.example.com");
        assert_eq!(updated.definition["pathPattern"], "/v1/*");
        assert_eq!(
            store.load_all().unwrap()[0].value.expose(),
            VALUE.as_bytes()
        );
        let empty = store.update_secret("g", &json!({})).unwrap_err();
        assert!(empty.to_string().contains("no fields provided"));
        let invalid = store
            .update_secret("g", &json!({"hostPattern": "https://x"}))
            .unwrap_err();
        assert!(
            matches!(invalid, StoreError::Invalid(ValidationError { ref field, .. }) if field == "hostPattern")
        );
        assert_eq!(
            store.get_secret("g").unwrap().definition["hostPattern"],
            "api.example.com"
        );
        store.delete_secret(&updated.id).unwrap();
        assert!(matches!(
            store.get_secret("g"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn concurrent_writers_keep_names_unique() {
        let dir = temp_dir("store-concurrent");
        let store = std::sync::Arc::new(open(&dir));
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    let same = store
                        .create_secret(&json!({"name": "same", "type": "openai", "value": "v"}));
                    let own = store.create_secret(
                        &json!({"name": format!("own{n}"), "type": "openai", "value": "v"}),
                    );
                    (same.is_ok(), own.is_ok())
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|(same, _)| *same).count(), 1);
        assert!(results.iter().all(|(_, own)| *own));
        assert_eq!(store.list_secrets().unwrap().len(), 9);
    }
}
