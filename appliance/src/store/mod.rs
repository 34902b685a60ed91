//! The store: secrets in a sled database in the state directory. Definitions are kept as
//! JSON; values only sealed with the master key, each with a fresh nonce and bound to its
//! record id. Every write is flushed to disk before the call returns.

mod key_check;
mod records;
mod rotate;
pub mod seal;

use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom as _, SystemRandom};
use serde_json::{json, Value};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::injection::LoadedSecret;
use crate::policy::{AccessRule, AgentSpec};
use crate::secret::{SecretSpec, SecretValue, ValidationError};
use records::{merge, Collection};
pub use rotate::{rotate_master_key, Rotation, RotationError};
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
    #[error("no {kind} is named or has the id {key:?}")]
    NotFound {
        /// `secret`, `agent` or `rule`.
        kind: &'static str,
        /// What was asked for.
        key: String,
    },
    /// The name is taken.
    #[error("a {kind} named {name:?} already exists; choose another name or update that one")]
    Duplicate {
        /// `secret` or `agent`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The master key does not open this store.
    #[error("the master key does not match the store in {}; restore the key this store was created with, or run `appliance key rotate` again if a rotation was interrupted (nothing was changed)", path.display())]
    WrongKey {
        /// The store.
        path: PathBuf,
    },
    /// The key-check file beside the database could not be read or written.
    #[error("the key-check file of the store in {} failed: {source}", path.display())]
    KeyCheck {
        /// The store.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
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
    meta: sled::Tree,
    secrets: sled::Tree,
    names: sled::Tree,
    values: sled::Tree,
    agents: Collection,
    rules: Collection,
    sealer: Sealer,
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator does not fail on Linux");
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{prefix}_{hex}")
}

fn not_found(kind: &'static str, key: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        key: key.to_owned(),
    }
}

fn duplicate(kind: &'static str, name: &str) -> StoreError {
    StoreError::Duplicate {
        kind,
        name: name.to_owned(),
    }
}

/// Whether `sealer`'s key opens the store at `path`, asked of a copy: opening a sled database
/// writes to it, and a wrong key must change nothing.
fn key_opens_a_copy(path: &Path, sealer: &Sealer) -> Result<bool, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".key-check-{}", std::process::id()));
    let copy = PathBuf::from(name);
    let _ = std::fs::remove_dir_all(&copy);
    let copied = key_check::copy_store(path, &copy);
    let sealed = copied
        .map_err(|source| StoreError::KeyCheck {
            path: path.into(),
            source,
        })
        .and_then(|()| {
            let read = || -> Result<_, sled::Error> {
                open_database(&copy)?.open_tree("meta")?.get(KEY_CHECK)
            };
            read().map_err(|source| StoreError::Database {
                path: path.into(),
                source,
            })
        });
    let _ = std::fs::remove_dir_all(&copy);
    Ok(sealed?.is_none_or(|sealed| key_check::opens(sealer, &sealed)))
}

/// How long opening waits for a lock that this process may still hold: sled's background
/// threads keep a dropped database, and its file lock, alive for a moment.
const LOCK_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the sled database at `path`. Without sled's periodic flusher (every write here is
/// flushed before it returns anyway), and waiting up to [`LOCK_RELEASE_WAIT`] for the file
/// lock: a store closed and opened again at once in one process (`key rotate`) was refused
/// as in use while sled's threads let go of it. Another process's lock (a running daemon)
/// is still refused after the wait.
fn open_database(path: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_RELEASE_WAIT;
    loop {
        match sled::Config::new().path(path).flush_every_ms(None).open() {
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return opened,
        }
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(error: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(error))
}

impl Store {
    /// Opens (or creates) the store at `path` with `key`. A key that does not match the store
    /// is refused before anything is written: the store stays the same byte for byte.
    pub fn open(path: &Path, key: &MasterKey) -> Result<Self, StoreError> {
        let database = |source| StoreError::Database {
            path: path.into(),
            source,
        };
        let key_check_failed = |source| StoreError::KeyCheck {
            path: path.into(),
            source,
        };
        let wrong_key = || StoreError::WrongKey { path: path.into() };
        let sealer = Sealer::new(key);
        match key_check::accepts(path, &sealer).map_err(key_check_failed)? {
            Some(true) => {}
            Some(false) => return Err(wrong_key()),
            // A store made before the key-check file existed.
            None if path.join("db").exists() && !key_opens_a_copy(path, &sealer)? => {
                return Err(wrong_key());
            }
            None => {}
        }
        let db = open_database(path).map_err(database)?;
        let meta = db.open_tree("meta").map_err(database)?;
        match meta.get(KEY_CHECK).map_err(database)? {
            Some(sealed) => {
                if !key_check::opens(&sealer, &sealed) {
                    return Err(wrong_key());
                }
            }
            None => {
                meta.insert(KEY_CHECK, key_check::seal(&sealer))
                    .map_err(database)?;
                db.flush().map_err(database)?;
            }
        }
        // The database holds this key: the file names it alone from now on (an interrupted
        // rotation may have left two).
        key_check::write(path, &[key_check::seal(&sealer)]).map_err(key_check_failed)?;
        Ok(Self {
            meta,
            secrets: db.open_tree("secrets").map_err(database)?,
            names: db.open_tree("secret_names").map_err(database)?,
            values: db.open_tree("secret_values").map_err(database)?,
            agents: Collection {
                db: db.clone(),
                tree: db.open_tree("agents").map_err(database)?,
                kind: "agent",
            },
            rules: Collection {
                db: db.clone(),
                tree: db.open_tree("rules").map_err(database)?,
                kind: "rule",
            },
            path: path.into(),
            db,
            sealer,
        })
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
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
            None => Err(not_found("secret", id_or_name)),
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
            id: new_id("sec"),
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
                    return abort(duplicate("secret", &record.name));
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
            .ok_or_else(|| not_found("secret", id_or_name))?;
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
        let current = self.get_secret(id_or_name)?;
        let merged = merge(&current.definition, patch, &[])?;
        let (spec, value) = SecretSpec::from_json(&merged)?;
        if value.is_none() {
            // New rules must suit the value already stored.
            spec.check_value(&self.stored_value(&current.id)?)?;
        }
        let mut merged = merged.as_object().cloned().unwrap_or_default();
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
                    return abort(not_found("secret", id_or_name));
                }
                if record.name != current.name {
                    if names.get(record.name.as_bytes())?.is_some() {
                        return abort(duplicate("secret", &record.name));
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

    /// Seals every value, and the key check, again under `key`, in one transaction: the store
    /// opens with the old key or with the new one, never with a mix. Callers swap the key file
    /// afterwards (see [`rotate_master_key`]). Returns how many values it re-sealed.
    pub fn reseal(&self, key: &MasterKey) -> Result<usize, StoreError> {
        let sealer = Sealer::new(key);
        let mut resealed = Vec::new();
        for entry in self.values.iter() {
            let (id, sealed) = entry.map_err(|e| self.database(e))?;
            let plain = self
                .sealer
                .open(&id, &sealed)
                .map_err(|error| StoreError::Corrupt {
                    id: String::from_utf8_lossy(&id).into_owned(),
                    reason: error.to_string(),
                })?;
            let sealed = sealer.seal(&id, &plain);
            resealed.push((id, sealed));
        }
        let check = key_check::seal(&sealer);
        let key_check_failed = |source| StoreError::KeyCheck {
            path: self.path.clone(),
            source,
        };
        // Until the transaction is known to be on disk, either key may be the one it holds.
        key_check::write(&self.path, &[key_check::seal(&self.sealer), check.clone()])
            .map_err(key_check_failed)?;
        (&self.values, &self.meta)
            .transaction(|(values, meta)| {
                for (id, sealed) in &resealed {
                    values.insert(id.as_ref(), sealed.as_slice())?;
                }
                meta.insert(KEY_CHECK, check.as_slice())?;
                Ok(())
            })
            .map_err(|error: TransactionError<StoreError>| self.transaction_error(error))?;
        self.flush()?;
        key_check::write(&self.path, &[check]).map_err(key_check_failed)?;
        Ok(resealed.len())
    }

    /// The decrypted value of the secret with `id`.
    fn stored_value(&self, id: &str) -> Result<SecretValue, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: id.to_owned(),
            reason,
        };
        let sealed = self
            .values
            .get(id.as_bytes())
            .map_err(|e| self.database(e))?
            .ok_or_else(|| corrupt("its value is missing".into()))?;
        let plain = self
            .sealer
            .open(id.as_bytes(), &sealed)
            .map_err(|error| corrupt(error.to_string()))?;
        SecretValue::new(plain.to_vec()).map_err(|error| corrupt(error.to_string()))
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
                let value = self.stored_value(&record.id)?;
                Ok(LoadedSecret {
                    id: record.id,
                    spec,
                    value,
                })
            })
            .collect()
    }
}

const RECORD_STAMPS: [&str; 2] = ["createdAt", "updatedAt"];

fn stamped(mut record: Value, created_at: Option<&Value>) -> Value {
    let now = Value::String(now());
    if let Some(object) = record.as_object_mut() {
        object.insert(
            "createdAt".into(),
            created_at.cloned().unwrap_or_else(|| now.clone()),
        );
        object.insert("updatedAt".into(), now);
    }
    record
}

fn agent_record(spec: &AgentSpec) -> Value {
    json!({
        "name": spec.name,
        "cgroups": spec.cgroups.iter().map(|path| path.display().to_string()).collect::<Vec<_>>(),
        "create": spec.create,
    })
}

/// The fields of a rule record that define it (the rest is bookkeeping).
fn rule_definition(record: &Value) -> Value {
    let mut definition = record.clone();
    if let Some(object) = definition.as_object_mut() {
        for key in ["id", "createdAt", "updatedAt"] {
            object.remove(key);
        }
    }
    definition
}

impl Store {
    /// Creates an agent once `check` accepts it; returns its record.
    pub fn create_agent(
        &self,
        input: &Value,
        check: impl FnOnce(&AgentSpec) -> Result<(), ValidationError>,
    ) -> Result<Value, StoreError> {
        let spec = AgentSpec::from_json(input)?;
        check(&spec)?;
        let record = stamped(agent_record(&spec), None);
        self.agents.create(&spec.name, &record)?;
        Ok(record)
    }

    /// Every agent.
    pub fn list_agents(&self) -> Result<Vec<Value>, StoreError> {
        self.agents.list()
    }

    /// One agent by name.
    pub fn get_agent(&self, name: &str) -> Result<Value, StoreError> {
        self.agents.get(name)
    }

    /// Changes an agent once `check` accepts the result; returns its new record.
    pub fn update_agent(
        &self,
        name: &str,
        patch: &Value,
        check: impl FnOnce(&AgentSpec) -> Result<(), ValidationError>,
    ) -> Result<Value, StoreError> {
        let current = self.agents.get(name)?;
        let merged = merge(&current, patch, &RECORD_STAMPS)?;
        let mut definition = merged.clone();
        if let Some(object) = definition.as_object_mut() {
            for key in RECORD_STAMPS {
                object.remove(key);
            }
        }
        let spec = AgentSpec::from_json(&definition)?;
        check(&spec)?;
        let record = stamped(agent_record(&spec), current.get("createdAt"));
        self.agents.replace(name, &spec.name, &record)?;
        Ok(record)
    }

    /// Deletes an agent; returns the record it had.
    pub fn delete_agent(&self, name: &str) -> Result<Value, StoreError> {
        self.agents.delete(name)
    }

    /// Every agent, parsed.
    pub fn load_agents(&self) -> Result<Vec<AgentSpec>, StoreError> {
        self.agents
            .list()?
            .iter()
            .map(|record| {
                let mut definition = record.clone();
                if let Some(object) = definition.as_object_mut() {
                    for key in RECORD_STAMPS {
                        object.remove(key);
                    }
                }
                AgentSpec::from_json(&definition).map_err(|error| StoreError::Corrupt {
                    id: format!("agent {}", record["name"]),
                    reason: error.to_string(),
                })
            })
            .collect()
    }

    /// Creates an access rule; returns its record.
    pub fn create_rule(&self, input: &Value) -> Result<Value, StoreError> {
        AccessRule::from_json(input)?;
        let id = new_id("rule");
        let mut record = input.clone();
        if let Some(object) = record.as_object_mut() {
            object.insert("id".into(), Value::String(id.clone()));
        }
        let record = stamped(record, None);
        self.rules.create(&id, &record)?;
        Ok(record)
    }

    /// Every access rule.
    pub fn list_rules(&self) -> Result<Vec<Value>, StoreError> {
        self.rules.list()
    }

    /// One access rule by id.
    pub fn get_rule(&self, id: &str) -> Result<Value, StoreError> {
        self.rules.get(id)
    }

    /// Changes an access rule; returns its new record.
    pub fn update_rule(&self, id: &str, patch: &Value) -> Result<Value, StoreError> {
        let current = self.rules.get(id)?;
        let merged = merge(&current, patch, &["id", "createdAt", "updatedAt"])?;
        AccessRule::from_json(&rule_definition(&merged))?;
        let record = stamped(merged, current.get("createdAt"));
        self.rules.replace(id, id, &record)?;
        Ok(record)
    }

    /// Deletes an access rule.
    pub fn delete_rule(&self, id: &str) -> Result<Value, StoreError> {
        self.rules.delete(id)
    }

    /// Every access rule, parsed, with its id.
    pub fn load_rules(&self) -> Result<Vec<(String, AccessRule)>, StoreError> {
        self.rules
            .list()?
            .iter()
            .map(|record| {
                let id = record["id"].as_str().unwrap_or_default().to_owned();
                AccessRule::from_json(&rule_definition(record))
                    .map(|rule| (id.clone(), rule))
                    .map_err(|error| StoreError::Corrupt {
                        id: format!("rule {id}"),
                        reason: error.to_string(),
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
        let before = snapshot(&dir.join("store"));
        let error = Store::open(&dir.join("store"), &wrong).err().unwrap();
        assert!(matches!(error, StoreError::WrongKey { .. }), "{error}");
        assert!(
            before == snapshot(&dir.join("store")),
            "a wrong key changed the store"
        );
        assert_eq!(open(&dir).load_all().unwrap().len(), 1, "data lost");
    }

    /// Every file of a directory tree with its contents.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = files_under(dir)
            .into_iter()
            .map(|file| {
                let bytes = std::fs::read(&file).unwrap();
                (file, bytes)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_store_made_before_the_key_check_file_is_checked_without_writing_to_it() {
        let dir = temp_dir("store-legacy");
        open(&dir)
            .create_secret(&json!({"name": "a", "type": "openai", "value": VALUE}))
            .unwrap();
        std::fs::remove_file(dir.join("store/key-check")).unwrap();
        let before = snapshot(&dir.join("store"));
        let other = temp_dir("store-legacy-other-key");
        let (wrong, _) = MasterKey::load_or_create(None, &other).unwrap();
        let error = Store::open(&dir.join("store"), &wrong).err().unwrap();
        assert!(matches!(error, StoreError::WrongKey { .. }), "{error}");
        assert!(
            before == snapshot(&dir.join("store")),
            "a wrong key changed the store"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert!(
            leftovers
                .iter()
                .all(|name| !name.to_string_lossy().contains("key-check")),
            "the checked copy was left behind: {leftovers:?}"
        );
        assert_eq!(open(&dir).load_all().unwrap().len(), 1);
        assert!(dir.join("store/key-check").exists());
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
        assert!(matches!(duplicate, StoreError::Duplicate { .. }));
        store
            .create_secret(&json!({"name": "b", "type": "stripe", "value": "x"}))
            .unwrap();
        let rename = store.update_secret("b", &json!({"name": "a"})).unwrap_err();
        assert!(matches!(rename, StoreError::Duplicate { .. }));
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
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn agents_and_rules_round_trip_with_validation() {
        let dir = temp_dir("store-records");
        let store = open(&dir);
        store
            .create_agent(
                &json!({"name": "research", "cgroups": ["agents/research"]}),
                |_| Ok(()),
            )
            .unwrap();
        let duplicate = store
            .create_agent(&json!({"name": "research", "cgroups": ["x"]}), |_| Ok(()))
            .unwrap_err();
        assert!(matches!(
            duplicate,
            StoreError::Duplicate { kind: "agent", .. }
        ));
        let renamed = store
            .update_agent("research", &json!({"name": "lab", "create": true}), |_| {
                Ok(())
            })
            .unwrap();
        assert_eq!(renamed["cgroups"], json!(["agents/research"]));
        assert!(matches!(
            store.get_agent("research"),
            Err(StoreError::NotFound { .. })
        ));
        let bad = store
            .update_agent("lab", &json!({"cgroups": []}), |_| Ok(()))
            .unwrap_err();
        assert!(
            matches!(bad, StoreError::Invalid(ValidationError { ref field, .. }) if field == "cgroups")
        );

        let rule = store
            .create_rule(&json!({"host": "api.example.com", "action": "block", "method": "DELETE"}))
            .unwrap();
        let id = rule["id"].as_str().unwrap();
        store.update_rule(id, &json!({"action": "allow"})).unwrap();
        let refused = store
            .create_agent(&json!({"name": "checked", "cgroups": ["x"]}), |_| {
                Err(ValidationError {
                    field: "cgroups[0]".into(),
                    message: "does not exist".into(),
                })
            })
            .unwrap_err();
        assert!(matches!(refused, StoreError::Invalid(_)));
        assert!(matches!(
            store.get_agent("checked"),
            Err(StoreError::NotFound { .. })
        ));
        let stamp = store.update_rule(id, &json!({"id": "other"})).unwrap_err();
        assert!(
            matches!(stamp, StoreError::Invalid(ValidationError { ref field, .. }) if field == "id")
        );
        drop(store);
        let store = open(&dir);
        assert_eq!(store.load_agents().unwrap()[0].name, "lab");
        let rules = store.load_rules().unwrap();
        assert_eq!(rules[0].0, id);
        assert_eq!(rules[0].1.action, crate::policy::Action::Allow);
        store.delete_rule(id).unwrap();
        assert!(store.load_rules().unwrap().is_empty());
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
