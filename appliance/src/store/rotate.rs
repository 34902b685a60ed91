//! Master key rotation: every sealed value sealed again under a fresh key, and the key file
//! replaced, in an order that a crash at any point leaves recoverable by running it again.
//!
//! 1. the new key is written beside the old one, as `<key file>.next`;
//! 2. the store is re-sealed under it in one transaction;
//! 3. `<key file>.next` is renamed over the key file.
//!
//! Interrupted before 2, the old key still opens the store and the leftover new key is
//! discarded; interrupted between 2 and 3, only the new key opens the store and the rename
//! is finished.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{KeyError, MasterKey, Store, StoreError};

/// What [`rotate_master_key`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Rotation {
    /// This many values were sealed under a new key, which replaced the key file.
    Rotated {
        /// Values re-sealed.
        values: usize,
    },
    /// An interrupted rotation had already re-sealed the store; the new key now replaced the
    /// key file.
    Finished,
}

/// Why a rotation did not happen. In every case the old key still opens the store, or the
/// error says which file does.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// There is no store to rotate.
    #[error("no store at {}; pass the daemon's state directory with --state-dir", path.display())]
    NoStore {
        /// Where the store was expected.
        path: PathBuf,
    },
    /// The store could not be opened, typically because the daemon holds its lock.
    #[error("the store in {} cannot be opened ({source}); stop the daemon first (`systemctl stop appliance`), then run this again", path.display())]
    InUse {
        /// The store.
        path: PathBuf,
        /// Why.
        #[source]
        source: sled::Error,
    },
    /// A key file could not be read or written.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store refused: wrong key, or a damaged value.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Replacing the key file failed; the new key is in `from` and already seals the store.
    #[error("moving the new key {} over {} failed: {source}; move it by hand (the store already uses it)", from.display(), to.display())]
    Replace {
        /// The new key.
        from: PathBuf,
        /// The key file.
        to: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Re-seals the store at `store_path` under a new master key and replaces `key_file`, which
/// holds the current one, with it. The store must not be open elsewhere: stop the daemon
/// first (the store's lock refuses otherwise).
pub fn rotate_master_key(store_path: &Path, key_file: &Path) -> Result<Rotation, RotationError> {
    if !store_path.is_dir() {
        return Err(RotationError::NoStore {
            path: store_path.into(),
        });
    }
    let next_path = next_key_path(key_file);
    let current = MasterKey::from_file(key_file)?;
    let store = match Store::open(store_path, &current).map_err(in_use) {
        Ok(store) => store,
        Err(RotationError::Store(StoreError::WrongKey { .. })) if next_path.exists() => {
            let next = MasterKey::from_file(&next_path)?;
            drop(Store::open(store_path, &next).map_err(in_use)?);
            replace(&next_path, key_file)?;
            return Ok(Rotation::Finished);
        }
        Err(error) => return Err(error),
    };
    if next_path.exists() {
        fs::remove_file(&next_path).map_err(|source| KeyError::Io {
            action: "removing the unused key of an interrupted rotation",
            path: next_path.clone(),
            source,
        })?;
    }
    let next = MasterKey::create_file(&next_path)?;
    sync_parent(&next_path).map_err(|source| KeyError::Io {
        action: "syncing the directory of",
        path: next_path.clone(),
        source,
    })?;
    let values = store.reseal(&next)?;
    drop(store);
    replace(&next_path, key_file)?;
    Ok(Rotation::Rotated { values })
}

fn in_use(error: StoreError) -> RotationError {
    match error {
        StoreError::Database { path, source } => RotationError::InUse { path, source },
        other => RotationError::Store(other),
    }
}

fn next_key_path(key_file: &Path) -> PathBuf {
    let mut name = OsString::from(key_file.as_os_str());
    name.push(".next");
    PathBuf::from(name)
}

fn replace(from: &Path, to: &Path) -> Result<(), RotationError> {
    fs::rename(from, to)
        .and_then(|()| sync_parent(to))
        .map_err(|source| RotationError::Replace {
            from: from.into(),
            to: to.into(),
            source,
        })
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SecretRecord, SecretValue};
    use crate::store::seal::KEY_FILE;
    use crate::test_support::temp_dir;

    const VALUE: &str = "sk-rotate-0123456789";

    /// A store with one secret, and its key file.
    fn store_with_a_secret(name: &str) -> (PathBuf, PathBuf) {
        let dir = temp_dir(name);
        let (key, _) = MasterKey::load_or_create(None, &dir).unwrap();
        let store = Store::open(&dir.join("store"), &key).unwrap();
        let record = SecretRecord {
            id: "sec_openai".into(),
            name: "openai".into(),
            definition: serde_json::from_value(
                serde_json::json!({"name": "openai", "type": "openai"}),
            )
            .unwrap(),
            preview: Some("••••".into()),
            created_at: "2026-12-01T00:00:00Z".into(),
            updated_at: "2026-12-01T00:00:00Z".into(),
        };
        let value = SecretValue::new(VALUE.as_bytes().to_vec()).unwrap();
        store.create_secret(&record, Some(&value)).unwrap();
        (dir.join("store"), dir.join(KEY_FILE))
    }

    fn values(store: &Path, key_file: &Path) -> Vec<String> {
        let key = MasterKey::from_file(key_file).unwrap();
        Store::open(store, &key)
            .unwrap()
            .load_secrets()
            .unwrap()
            .iter()
            .map(|(_, value)| String::from_utf8(value.as_ref().unwrap().expose().to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn a_rotated_store_opens_only_with_the_new_key() {
        let (store, key_file) = store_with_a_secret("rotate");
        let old_key_file = temp_dir("rotate-old").join(KEY_FILE);
        fs::copy(&key_file, &old_key_file).unwrap();
        assert_eq!(
            rotate_master_key(&store, &key_file).unwrap(),
            Rotation::Rotated { values: 1 }
        );
        assert_ne!(
            fs::read(&key_file).unwrap(),
            fs::read(&old_key_file).unwrap()
        );
        assert!(!next_key_path(&key_file).exists());
        assert_eq!(values(&store, &key_file), [VALUE]);
        let old_key = MasterKey::from_file(&old_key_file).unwrap();
        assert!(matches!(
            Store::open(&store, &old_key).err().unwrap(),
            StoreError::WrongKey { .. }
        ));
    }

    #[test]
    fn a_rotation_interrupted_before_resealing_starts_over() {
        let (store, key_file) = store_with_a_secret("rotate-early");
        MasterKey::create_file(&next_key_path(&key_file)).unwrap();
        assert_eq!(
            rotate_master_key(&store, &key_file).unwrap(),
            Rotation::Rotated { values: 1 }
        );
        assert_eq!(values(&store, &key_file), [VALUE]);
    }

    #[test]
    fn a_rotation_interrupted_before_the_key_swap_is_finished() {
        let (store, key_file) = store_with_a_secret("rotate-late");
        let next_path = next_key_path(&key_file);
        let next = MasterKey::create_file(&next_path).unwrap();
        let current = MasterKey::from_file(&key_file).unwrap();
        Store::open(&store, &current)
            .unwrap()
            .reseal(&next)
            .unwrap();
        assert_eq!(
            rotate_master_key(&store, &key_file).unwrap(),
            Rotation::Finished
        );
        assert!(!next_path.exists());
        assert_eq!(values(&store, &key_file), [VALUE]);
    }

    #[test]
    fn a_store_in_use_or_missing_is_refused_and_left_alone() {
        let (store, key_file) = store_with_a_secret("rotate-busy");
        let key = MasterKey::from_file(&key_file).unwrap();
        let open = Store::open(&store, &key).unwrap();
        let error = rotate_master_key(&store, &key_file).unwrap_err();
        assert!(
            error.to_string().contains("stop the daemon first"),
            "{error}"
        );
        drop(open);
        assert_eq!(values(&store, &key_file), [VALUE]);
        let error = rotate_master_key(&store.with_file_name("nowhere"), &key_file).unwrap_err();
        assert!(error.to_string().contains("--state-dir"), "{error}");
    }
}
