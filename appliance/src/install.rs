//! Installing the appliance on a host (or into a staging root): binary, systemd unit, default
//! configuration, master key, shell completion, man page; and removing it again.

use std::fs;
use std::io;

use std::path::{Path, PathBuf};

const UNIT: &str = include_str!("../../systemd/appliance.service");
const CONFIG: &str = include_str!("../../systemd/config.toml");

/// Files an installation owns, relative to the root.
const BINARY: &str = "usr/local/bin/appliance";
const UNIT_PATH: &str = "etc/systemd/system/appliance.service";
const CONFIG_PATH: &str = "etc/appliance/config.toml";
/// Where the master key is installed, relative to the root: the source of the unit's
/// `LoadCredential=master.key`.
pub const KEY_PATH: &str = "etc/appliance/master.key";
const COMPLETION_PATH: &str = "usr/share/bash-completion/completions/appliance";
const MAN_PATH: &str = "usr/share/man/man1/appliance.1";
const STATE_DIR: &str = "var/lib/appliance";

/// Installation failures.
#[derive(Debug, thiserror::Error)]
#[error("{action} {} failed", path.display())]
pub struct InstallError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn failed<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    crate::files::write_atomically(path, contents, mode).map_err(failed("installing", path))
}

/// What an installation did, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Files kept because the operator's copy exists.
    pub kept: Vec<PathBuf>,
}

/// Installs into `root` (`/` for the host): `binary` as the executable, the unit, the
/// completion and man page (replaced on every install), and the configuration and master key
/// (created only when absent: an upgrade keeps the operator's).
pub fn install(
    root: &Path,
    binary: &Path,
    completion: &[u8],
    man: &[u8],
) -> Result<Report, InstallError> {
    let mut report = Report::default();
    let executable = fs::read(binary).map_err(failed("reading", binary))?;
    for (relative, contents, mode) in [
        (BINARY, executable.as_slice(), 0o755),
        (UNIT_PATH, UNIT.as_bytes(), 0o644),
        (COMPLETION_PATH, completion, 0o644),
        (MAN_PATH, man, 0o644),
    ] {
        let path = root.join(relative);
        write(&path, contents, mode)?;
        report.written.push(path);
    }
    let config = root.join(CONFIG_PATH);
    if config.exists() {
        report.kept.push(config);
    } else {
        write(&config, CONFIG.as_bytes(), 0o644)?;
        report.written.push(config);
    }
    let key = root.join(KEY_PATH);
    if key.exists() {
        report.kept.push(key);
    } else {
        crate::store::MasterKey::create_file(&key).map_err(|error| InstallError {
            action: "creating the master key",
            path: key.clone(),
            source: io::Error::other(error),
        })?;
        report.written.push(key);
    }
    Ok(report)
}

/// Removes what [`install`] wrote. With `purge`, also the configuration, the master key and
/// the state (CA and store): the secrets are gone for good.
pub fn uninstall(root: &Path, purge: bool) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    let mut owned = vec![BINARY, UNIT_PATH, COMPLETION_PATH, MAN_PATH];
    if purge {
        owned.extend([CONFIG_PATH, KEY_PATH]);
    }
    for relative in owned {
        let path = root.join(relative);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(failed("removing", &path)(error)),
        }
    }
    if purge {
        for relative in [STATE_DIR, "etc/appliance"] {
            let path = root.join(relative);
            match fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(failed("removing", &path)(error)),
            }
        }
    }
    Ok(removed)
}
