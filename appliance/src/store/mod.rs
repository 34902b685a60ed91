//! The store: secrets, agents and access rules in a sled database in the state directory.
//! Records are the model's, kept as versioned JSON; secret values only sealed with the master
//! key, each with a fresh nonce and bound to its record id. The store checks what keeps the
//! database consistent (unique names, records present); whether a definition makes sense is
//! the model's business, checked before anything reaches the store. Every write is flushed to
//! disk before the call returns.

mod key_check;
mod records;
mod rotate;
pub mod seal;

use std::path::{Path, PathBuf};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;

use crate::model::{AccessRuleRecord, AgentRecord, SecretRecord, SecretValue};
use records::{Collection, Versioned};
pub use rotate::{rotate_master_key, Rotation, RotationError};
pub use seal::{KeyError, KeySource, MasterKey, Sealer};

const KEY_CHECK: &[u8] = b"key-check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"appliance store key check";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    /// A stored record is damaged, or written by a newer appliance.
    #[error("stored record {id} is damaged: {reason}")]
    Corrupt {
        /// The record.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

/// The secret store.
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    secrets: sled::Tree,
    names: sled::Tree,
    values: sled::Tree,
    agents: Collection<AgentRecord>,
    rules: Collection<AccessRuleRecord>,
    sealer: Sealer,
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
            agents: Collection::new(&db, db.open_tree("agents").map_err(database)?, "agent"),
            rules: Collection::new(&db, db.open_tree("rules").map_err(database)?, "rule"),
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

    /// Stores a new secret and, for an inline one, its value; its name must be free.
    pub fn create_secret(
        &self,
        record: &SecretRecord,
        value: Option<&SecretValue>,
    ) -> Result<(), StoreError> {
        let sealed = value.map(|value| self.sealer.seal(record.id.as_bytes(), value.expose()));
        let serialized = Versioned::serialize(record);
        (&self.secrets, &self.names, &self.values)
            .transaction(|(secrets, names, values)| {
                if names.get(record.name.as_bytes())?.is_some() {
                    return abort(duplicate("secret", &record.name));
                }
                names.insert(record.name.as_bytes(), record.id.as_bytes())?;
                secrets.insert(record.id.as_bytes(), serialized.as_slice())?;
                if let Some(sealed) = &sealed {
                    values.insert(record.id.as_bytes(), sealed.as_slice())?;
                }
                Ok(())
            })
            .map_err(|error| self.transaction_error(error))?;
        self.flush()
    }

    /// Reads one secret by id or name.
    pub fn get_secret(&self, id_or_name: &str) -> Result<SecretRecord, StoreError> {
        let id = self.resolve_id(id_or_name)?;
        let raw = self
            .secrets
            .get(id.as_bytes())
            .map_err(|e| self.database(e))?
            .ok_or_else(|| not_found("secret", id_or_name))?;
        Versioned::deserialize(&id, &raw)
    }

    /// Every secret, by name.
    pub fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let mut records = self
            .secrets
            .iter()
            .map(|entry| {
                let (id, raw) = entry.map_err(|e| self.database(e))?;
                Versioned::deserialize(&String::from_utf8_lossy(&id), &raw)
            })
            .collect::<Result<Vec<SecretRecord>, _>>()?;
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Replaces the secret `record.id`, which was named `previous_name`, and changes its
    /// sealed value as `value` says. A new name must be free.
    pub fn replace_secret(
        &self,
        previous_name: &str,
        record: &SecretRecord,
        value: ValueChange<'_>,
    ) -> Result<(), StoreError> {
        let sealed = match value {
            ValueChange::Replace(value) => {
                Some(Some(self.sealer.seal(record.id.as_bytes(), value.expose())))
            }
            ValueChange::Remove => Some(None),
            ValueChange::Keep => None,
        };
        let serialized = Versioned::serialize(record);
        (&self.secrets, &self.names, &self.values)
            .transaction(|(secrets, names, values)| {
                if secrets.get(record.id.as_bytes())?.is_none() {
                    return abort(not_found("secret", &record.id));
                }
                if record.name != previous_name {
                    if names.get(record.name.as_bytes())?.is_some() {
                        return abort(duplicate("secret", &record.name));
                    }
                    names.remove(previous_name.as_bytes())?;
                    names.insert(record.name.as_bytes(), record.id.as_bytes())?;
                }
                secrets.insert(record.id.as_bytes(), serialized.as_slice())?;
                match &sealed {
                    Some(Some(sealed)) => {
                        values.insert(record.id.as_bytes(), sealed.as_slice())?;
                    }
                    Some(None) => {
                        values.remove(record.id.as_bytes())?;
                    }
                    None => {}
                }
                Ok(())
            })
            .map_err(|error| self.transaction_error(error))?;
        self.flush()
    }

    /// Deletes a secret by id or name; returns the record it had.
    pub fn delete_secret(&self, id_or_name: &str) -> Result<SecretRecord, StoreError> {
        let record = self.get_secret(id_or_name)?;
        (&self.secrets, &self.names, &self.values)
            .transaction(|(secrets, names, values)| {
                secrets.remove(record.id.as_bytes())?;
                names.remove(record.name.as_bytes())?;
                values.remove(record.id.as_bytes())?;
                Ok(())
            })
            .map_err(|error| self.transaction_error(error))?;
        self.flush()?;
        Ok(record)
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
    pub fn secret_value(&self, id: &str) -> Result<SecretValue, StoreError> {
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

    /// Every secret with its decrypted value (inline secrets have one), by name.
    pub fn load_secrets(&self) -> Result<Vec<(SecretRecord, Option<SecretValue>)>, StoreError> {
        self.list_secrets()?
            .into_iter()
            .map(|record| {
                let sealed = self
                    .values
                    .contains_key(record.id.as_bytes())
                    .map_err(|e| self.database(e))?;
                let value = sealed.then(|| self.secret_value(&record.id)).transpose()?;
                Ok((record, value))
            })
            .collect()
    }

    /// Stores a new agent; its name must be free.
    pub fn create_agent(&self, record: &AgentRecord) -> Result<(), StoreError> {
        self.agents.create(agent_key(record), record)
    }

    /// Every agent, by name.
    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.agents.list()
    }

    /// One agent by name.
    pub fn get_agent(&self, name: &str) -> Result<AgentRecord, StoreError> {
        self.agents.get(name)
    }

    /// Replaces the agent named `previous_name` (a rename when the record's name differs; the
    /// new name must be free).
    pub fn replace_agent(
        &self,
        previous_name: &str,
        record: &AgentRecord,
    ) -> Result<(), StoreError> {
        self.agents
            .replace(previous_name, agent_key(record), record)
    }

    /// Deletes an agent; returns the record it had.
    pub fn delete_agent(&self, name: &str) -> Result<AgentRecord, StoreError> {
        self.agents.delete(name)
    }

    /// Stores a new access rule.
    pub fn create_rule(&self, record: &AccessRuleRecord) -> Result<(), StoreError> {
        self.rules.create(&record.id, record)
    }

    /// Every access rule, by id.
    pub fn list_rules(&self) -> Result<Vec<AccessRuleRecord>, StoreError> {
        self.rules.list()
    }

    /// One access rule by id.
    pub fn get_rule(&self, id: &str) -> Result<AccessRuleRecord, StoreError> {
        self.rules.get(id)
    }

    /// Replaces an access rule.
    pub fn replace_rule(&self, record: &AccessRuleRecord) -> Result<(), StoreError> {
        self.rules.replace(&record.id, &record.id, record)
    }

    /// Deletes an access rule; returns the record it had.
    pub fn delete_rule(&self, id: &str) -> Result<AccessRuleRecord, StoreError> {
        self.rules.delete(id)
    }
}

#[cfg(test)]
impl Store {
    fn agents_tree(&self) -> &sled::Tree {
        self.agents.tree()
    }
}

/// What an update does to a secret's sealed value.
#[derive(Clone, Copy)]
pub enum ValueChange<'a> {
    /// Leave it.
    Keep,
    /// Seal this one instead.
    Replace(&'a SecretValue),
    /// Remove it (the value comes from a source now).
    Remove,
}

/// An agent is stored under its name.
fn agent_key(record: &AgentRecord) -> &str {
    record.definition.name.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessRuleInput, Action, AgentInput, Provider, SecretInput};
    use crate::test_support::temp_dir;

    const VALUE: &str = "sk-ant-api03-PLAINTEXT-NEVER-ON-DISK-0123456789";
    const STAMP: &str = "2026-12-01T00:00:00Z";

    fn open(dir: &Path) -> Store {
        let (key, _) = MasterKey::load_or_create(None, dir).unwrap();
        Store::open(&dir.join("store"), &key).unwrap()
    }

    fn record(id: &str, name: &str) -> SecretRecord {
        SecretRecord {
            id: id.into(),
            name: name.into(),
            definition: SecretInput {
                name: Some(name.into()),
                kind: Some(Provider::Openai),
                ..SecretInput::default()
            },
            preview: Some("••••".into()),
            created_at: STAMP.into(),
            updated_at: STAMP.into(),
        }
    }

    fn value(text: &str) -> SecretValue {
        SecretValue::new(text.as_bytes().to_vec()).unwrap()
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
            .create_secret(&record("sec_a", "a"), Some(&value(VALUE)))
            .unwrap();
        store
            .replace_secret(
                "a",
                &record("sec_a", "a"),
                ValueChange::Replace(&value(&format!("{VALUE}-rotated"))),
            )
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
        open(&dir)
            .create_secret(&record("sec_a", "a"), Some(&value(VALUE)))
            .unwrap();
        let loaded = open(&dir).load_secrets().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].1.as_ref().unwrap().expose(), VALUE.as_bytes());
        assert_eq!(loaded[0].0.id, "sec_a");

        let other = temp_dir("store-other-key");
        let (wrong, _) = MasterKey::load_or_create(None, &other).unwrap();
        let before = snapshot(&dir.join("store"));
        let error = Store::open(&dir.join("store"), &wrong).err().unwrap();
        assert!(matches!(error, StoreError::WrongKey { .. }), "{error}");
        assert!(
            before == snapshot(&dir.join("store")),
            "a wrong key changed the store"
        );
        assert_eq!(open(&dir).load_secrets().unwrap().len(), 1, "data lost");
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
            .create_secret(&record("sec_a", "a"), Some(&value(VALUE)))
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
        assert_eq!(open(&dir).load_secrets().unwrap().len(), 1);
        assert!(dir.join("store/key-check").exists());
    }

    #[test]
    fn names_are_unique_and_renames_free_the_old_name() {
        let dir = temp_dir("store-names");
        let store = open(&dir);
        store
            .create_secret(&record("sec_a", "a"), Some(&value(VALUE)))
            .unwrap();
        let duplicate = store
            .create_secret(&record("sec_other", "a"), Some(&value(VALUE)))
            .unwrap_err();
        assert!(matches!(duplicate, StoreError::Duplicate { .. }));
        store
            .create_secret(&record("sec_b", "b"), Some(&value("x")))
            .unwrap();
        let rename = store
            .replace_secret("b", &record("sec_b", "a"), ValueChange::Keep)
            .unwrap_err();
        assert!(matches!(rename, StoreError::Duplicate { .. }));
        store
            .replace_secret("b", &record("sec_b", "c"), ValueChange::Keep)
            .unwrap();
        assert!(matches!(
            store.get_secret("b"),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.get_secret("c").unwrap().id, "sec_b");
        assert_eq!(store.secret_value("sec_b").unwrap().expose(), b"x");
        assert_eq!(store.delete_secret("c").unwrap().id, "sec_b");
        assert!(matches!(
            store.get_secret("sec_b"),
            Err(StoreError::NotFound { .. })
        ));
        store.create_secret(&record("sec_c", "c"), None).unwrap();
        let loaded = store.load_secrets().unwrap();
        let c = loaded
            .iter()
            .find(|(record, _)| record.name == "c")
            .unwrap();
        assert!(
            c.1.is_none(),
            "a secret created without a value has none sealed"
        );
    }

    #[test]
    fn records_written_before_versions_were_recorded_still_read() {
        let dir = temp_dir("store-unversioned");
        let store = open(&dir);
        // As this appliance wrote them before its records carried a version.
        let old = r#"{"id":"sec_old","name":"old","definition":{"name":"old","type":"openai","pathPattern":null},"createdAt":"2026-01-01T00:00:00Z","updatedAt":"2026-01-01T00:00:00Z","preview":"sk-pro••••789"}"#;
        store.secrets.insert("sec_old", old.as_bytes()).unwrap();
        store.names.insert("old", "sec_old").unwrap();
        let agent = br#"{"name":"lab","cgroups":["agents/lab"],"create":false,"createdAt":"2026-01-01T00:00:00Z","updatedAt":"2026-01-01T00:00:00Z"}"#;
        store.agents_tree().insert("lab", agent.as_slice()).unwrap();
        let record = store.get_secret("old").unwrap();
        assert_eq!(record.definition.kind, Some(Provider::Openai));
        assert_eq!(record.preview.as_deref(), Some("sk-pro••••789"));
        let agent = store.get_agent("lab").unwrap();
        assert_eq!(
            agent.definition.cgroups,
            Some(vec!["agents/lab".to_owned()])
        );
    }

    #[test]
    fn agents_and_rules_round_trip() {
        let dir = temp_dir("store-records");
        let store = open(&dir);
        let agent = |name: &str| AgentRecord {
            definition: AgentInput {
                name: Some(name.into()),
                cgroups: Some(vec!["agents/research".into()]),
                create: Some(false),
            },
            created_at: STAMP.into(),
            updated_at: STAMP.into(),
        };
        store.create_agent(&agent("research")).unwrap();
        let duplicate = store.create_agent(&agent("research")).unwrap_err();
        assert!(matches!(
            duplicate,
            StoreError::Duplicate { kind: "agent", .. }
        ));
        store.replace_agent("research", &agent("lab")).unwrap();
        assert!(matches!(
            store.get_agent("research"),
            Err(StoreError::NotFound { .. })
        ));
        let rule = AccessRuleRecord {
            id: "rule_1".into(),
            definition: AccessRuleInput {
                host: Some("api.example.com".into()),
                method: Some("DELETE".into()),
                action: Some(Action::Block),
                ..AccessRuleInput::default()
            },
            created_at: STAMP.into(),
            updated_at: STAMP.into(),
        };
        store.create_rule(&rule).unwrap();
        let mut allowed = rule.clone();
        allowed.definition.action = Some(Action::Allow);
        store.replace_rule(&allowed).unwrap();
        drop(store);
        let store = open(&dir);
        assert_eq!(
            store.list_agents().unwrap()[0].definition.name.as_deref(),
            Some("lab")
        );
        let rules = store.list_rules().unwrap();
        assert_eq!(rules[0].id, "rule_1");
        assert_eq!(rules[0].definition.action, Some(Action::Allow));
        store.delete_rule("rule_1").unwrap();
        assert!(store.list_rules().unwrap().is_empty());
        store.delete_agent("lab").unwrap();
        assert!(store.list_agents().unwrap().is_empty());
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
                        .create_secret(&record(&format!("sec_same{n}"), "same"), Some(&value("v")));
                    let own = store.create_secret(
                        &record(&format!("sec_own{n}"), &format!("own{n}")),
                        Some(&value("v")),
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
