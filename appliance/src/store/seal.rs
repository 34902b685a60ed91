//! The master key and sealing of values with it (AES-256-GCM from ring, the crypto library
//! rustls already uses here).

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};
use zeroize::Zeroizing;

/// Name of the master key file, in the state directory or in `$CREDENTIALS_DIRECTORY`.
pub const KEY_FILE: &str = "master.key";
const KEY_BYTES: usize = 32;
const FORMAT_VERSION: u8 = 1;

/// Problems with the master key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("master key file {}: {action} failed", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The key file does not hold a key.
    #[error("master key file {} must hold 64 hexadecimal characters (32 bytes); restore the right file", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
    },
    /// The key file is readable by others.
    #[error("master key file {} is readable by group or others; run `chmod 600 {}`", path.display(), path.display())]
    TooOpen {
        /// The file.
        path: PathBuf,
    },
    /// The systemd credential is missing.
    #[error("$CREDENTIALS_DIRECTORY is set but holds no {KEY_FILE}; add `LoadCredential={KEY_FILE}:<path>` to the unit")]
    NoCredential,
}

/// Where the key came from, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A systemd credential.
    Credential(PathBuf),
    /// An existing key file.
    File(PathBuf),
    /// A key file created now.
    Created(PathBuf),
}

/// The 32-byte master key, wiped from memory when dropped.
pub struct MasterKey(Zeroizing<[u8; KEY_BYTES]>);

fn parse_hex(text: &str) -> Option<[u8; KEY_BYTES]> {
    let text = text.trim();
    if text.len() != KEY_BYTES * 2 {
        return None;
    }
    let mut key = [0u8; KEY_BYTES];
    for (index, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(key)
}

fn read_key(path: &Path, check_mode: bool) -> Result<MasterKey, KeyError> {
    let io_error = |action| {
        move |source| KeyError::Io {
            action,
            path: path.into(),
            source,
        }
    };
    if check_mode {
        let mode = fs::metadata(path)
            .map_err(io_error("reading"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen { path: path.into() });
        }
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io_error("reading"))?);
    parse_hex(&text)
        .map(|key| MasterKey(Zeroizing::new(key)))
        .ok_or(KeyError::Malformed { path: path.into() })
}

impl MasterKey {
    /// The key from the systemd credential `master.key` when `credentials_dir` is given,
    /// else from `<state_dir>/master.key`, created (0600) on first start.
    pub fn load_or_create(
        credentials_dir: Option<&Path>,
        state_dir: &Path,
    ) -> Result<(Self, KeySource), KeyError> {
        if let Some(dir) = credentials_dir {
            let path = dir.join(KEY_FILE);
            if !path.exists() {
                return Err(KeyError::NoCredential);
            }
            // systemd controls the credential's permissions.
            return Ok((read_key(&path, false)?, KeySource::Credential(path)));
        }
        let path = state_dir.join(KEY_FILE);
        if path.exists() {
            return Ok((read_key(&path, true)?, KeySource::File(path)));
        }
        let key = Self::create_file(&path)?;
        Ok((key, KeySource::Created(path)))
    }

    /// The key in the file at `path`, which must be private to its owner (0600).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        read_key(path, true)
    }

    /// Generates a new key and writes it to `path` (which must not exist) as 64 hex digits,
    /// mode 0600.
    pub fn create_file(path: &Path) -> Result<Self, KeyError> {
        let io_error = |action| {
            move |source| KeyError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        SystemRandom::new()
            .fill(key.as_mut())
            .map_err(|_| io_error("generating")(io::Error::other("no system randomness")))?;
        let hex = Zeroizing::new(
            key.iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>(),
        );
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_error("creating its directory"))?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_error("creating"))?;
        file.write_all(hex.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error("writing"))?;
        Ok(Self(key))
    }
}

/// Opening a sealed value failed: wrong key, or tampered or damaged data.
#[derive(Debug, thiserror::Error)]
#[error("decryption failed: wrong master key, or damaged data")]
pub struct OpenError;

/// Seals and opens values with the master key.
pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl Sealer {
    /// A sealer using `key`.
    pub fn new(key: &MasterKey) -> Self {
        let unbound =
            UnboundKey::new(&AES_256_GCM, key.0.as_ref()).expect("32 bytes is an AES-256 key");
        Self {
            key: LessSafeKey::new(unbound),
            random: SystemRandom::new(),
        }
    }

    /// Encrypts `plaintext` with a fresh random nonce, binding `context` (the record id) so a
    /// sealed value cannot be moved to another record.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system random generator does not fail on Linux");
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
        sealed.push(FORMAT_VERSION);
        sealed.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut body,
            )
            .expect("sealing cannot fail for in-memory buffers");
        sealed.extend_from_slice(&body);
        // `body` held ciphertext only; nothing to wipe.
        sealed
    }

    /// Decrypts what [`Sealer::seal`] produced for the same `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let (&version, rest) = sealed.split_first().ok_or(OpenError)?;
        if version != FORMAT_VERSION || rest.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
        let mut buffer = Zeroizing::new(body.to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(context), buffer.as_mut_slice())
            .map_err(|_| OpenError)?
            .len();
        buffer.truncate(plain_len);
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_key_file_is_created_once_private_then_reused() {
        let dir = temp_dir("key-create");
        let (first, source) = MasterKey::load_or_create(None, &dir).unwrap();
        assert!(matches!(source, KeySource::Created(_)));
        assert_eq!(
            fs::metadata(dir.join(KEY_FILE)).unwrap().mode() & 0o777,
            0o600
        );
        let (second, source) = MasterKey::load_or_create(None, &dir).unwrap();
        assert!(matches!(source, KeySource::File(_)));
        assert_eq!(*first.0, *second.0);
    }

    #[test]
    fn bad_key_files_are_refused_with_the_fix() {
        let dir = temp_dir("key-bad");
        let path = dir.join(KEY_FILE);
        fs::write(&path, "abc").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let error = MasterKey::load_or_create(None, &dir).err().unwrap();
        assert!(error.to_string().contains("64 hexadecimal"), "{error}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = MasterKey::load_or_create(None, &dir).err().unwrap();
        assert!(error.to_string().contains("chmod 600"), "{error}");
        let credentials = temp_dir("key-cred");
        let error = MasterKey::load_or_create(Some(&credentials), &dir)
            .err()
            .unwrap();
        assert!(error.to_string().contains("LoadCredential"), "{error}");
    }

    #[test]
    fn sealing_binds_the_context_and_uses_fresh_nonces() {
        let dir = temp_dir("seal");
        let (key, _) = MasterKey::load_or_create(None, &dir).unwrap();
        let sealer = Sealer::new(&key);
        let one = sealer.seal(b"id-1", b"sk-secret");
        let two = sealer.seal(b"id-1", b"sk-secret");
        assert_ne!(one, two, "same plaintext must not give the same ciphertext");
        assert!(!one.windows(9).any(|window| window == b"sk-secret"));
        assert_eq!(sealer.open(b"id-1", &one).unwrap().as_slice(), b"sk-secret");
        assert!(
            sealer.open(b"id-2", &one).is_err(),
            "moved to another record"
        );
        let mut tampered = one.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(sealer.open(b"id-1", &tampered).is_err());
        let (other_key, _) = MasterKey::load_or_create(None, &temp_dir("seal-other")).unwrap();
        assert!(Sealer::new(&other_key).open(b"id-1", &one).is_err());
    }
}
