//! The key check kept in a file beside the database. Opening a sled database writes to it (it
//! grows the file and may take a snapshot), so the master key is checked against this file
//! first: a wrong key is refused with the store unchanged, byte for byte.
//!
//! The file holds one sealed check per line (base64). It names one key, except while a
//! rotation re-seals the store, when it names the old and the new key, so that whichever
//! key the database holds after a crash still passes; the check inside the database stays the
//! authority.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::seal::Sealer;
use super::{KEY_CHECK, KEY_CHECK_PLAINTEXT};

const FILE_NAME: &str = "key-check";

fn file(store: &Path) -> PathBuf {
    store.join(FILE_NAME)
}

/// A check that `sealer`'s key opens.
pub(super) fn seal(sealer: &Sealer) -> Vec<u8> {
    sealer.seal(KEY_CHECK, KEY_CHECK_PLAINTEXT)
}

/// Whether `sealed` is a check of `sealer`'s key.
pub(super) fn opens(sealer: &Sealer, sealed: &[u8]) -> bool {
    sealer
        .open(KEY_CHECK, sealed)
        .is_ok_and(|plain| plain.as_slice() == KEY_CHECK_PLAINTEXT)
}

/// What the file says of `sealer`'s key: `None` when there is no file (a new store, or one
/// made before the file existed).
pub(super) fn accepts(store: &Path, sealer: &Sealer) -> io::Result<Option<bool>> {
    let text = match fs::read_to_string(file(store)) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    Ok(Some(text.lines().any(|line| {
        STANDARD
            .decode(line.trim())
            .is_ok_and(|sealed| opens(sealer, &sealed))
    })))
}

/// Replaces the file with these checks.
pub(super) fn write(store: &Path, checks: &[Vec<u8>]) -> io::Result<()> {
    let mut text = String::new();
    for check in checks {
        text.push_str(&STANDARD.encode(check));
        text.push('\n');
    }
    crate::files::write_atomically(&file(store), text.as_bytes(), 0o600)
}

/// Copies the store directory `from` to `to`, for opening a store that has no key-check
/// file yet without writing to it.
pub(super) fn copy_store(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_store(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
