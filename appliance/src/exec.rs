//! `appliance exec`: run a command inside a fresh intercepted cgroup, trusting the appliance
//! CA through the daemon's trust files (see [`crate::trust`]) unless told not to.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::Path;
use std::process::Command;

use crate::capture::{self, CaptureError, Cgroup};
use crate::trust;

/// Errors of `appliance exec`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The cgroup name is unusable.
    #[error("invalid --cgroup name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The agents cgroup does not exist.
    #[error("the agents cgroup {} does not exist; is the appliance daemon running (and using the same --agents-cgroup)?", path.display())]
    NoAgentsCgroup {
        /// Where it was looked for.
        path: std::path::PathBuf,
    },
    /// The cgroup would not be intercepted.
    #[error("cgroup {} is not intercepted by the appliance; is the daemon running (and using the same --agents-cgroup)? Pass --allow-unprotected to run anyway", path.display())]
    NotIntercepted {
        /// The cgroup.
        path: std::path::PathBuf,
    },
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] CaptureError),
    /// The command could not be started.
    #[error("starting {program:?} failed")]
    Spawn {
        /// The program.
        program: OsString,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// How `appliance exec` runs a command.
pub struct ExecOptions<'a> {
    /// The daemon's agents cgroup.
    pub agents_cgroup: &'a Path,
    /// The cgroup to create under it (default `exec-<pid>`).
    pub name: Option<&'a str>,
    /// Run even when the cgroup is not intercepted.
    pub allow_unprotected: bool,
    /// The daemon's trust directory, whose files the command is pointed at; `None` leaves
    /// its environment as it is.
    pub trust_dir: Option<&'a Path>,
}

/// Runs `command` in `<agents_cgroup>/<name>` and returns its exit code (128 + signal number
/// when it was killed by a signal). The cgroup is removed afterwards when this call created
/// it and it is empty.
pub fn run(options: &ExecOptions<'_>, command: &[OsString]) -> Result<i32, ExecError> {
    in_cgroup(options, |cgroup| {
        let (program, mut child) = prepared(cgroup, command, options)?;
        let mut child = child.spawn().map_err(|source| ExecError::Spawn {
            program: program.clone(),
            source,
        })?;
        // The terminal's Ctrl-C reaches the child directly; stay alive to clean up after it.
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
        }
        let status = child
            .wait()
            .map_err(|source| ExecError::Spawn { program, source })?;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    })
}

/// Runs `command` as [`run`] does, with its output captured.
pub fn output(
    options: &ExecOptions<'_>,
    command: &[OsString],
) -> Result<std::process::Output, ExecError> {
    in_cgroup(options, |cgroup| {
        let (program, mut child) = prepared(cgroup, command, options)?;
        child
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| ExecError::Spawn { program, source })
    })
}

/// Runs `work` with `<agents_cgroup>/<name>`, created for it and removed afterwards when it
/// is empty.
fn in_cgroup<T>(
    options: &ExecOptions<'_>,
    work: impl FnOnce(&Cgroup) -> Result<T, ExecError>,
) -> Result<T, ExecError> {
    let ExecOptions {
        agents_cgroup,
        name,
        ..
    } = *options;
    let name = name.map_or_else(|| format!("exec-{}", std::process::id()), str::to_owned);
    if !valid_name(&name) {
        return Err(ExecError::InvalidName { name });
    }
    let root = Cgroup::open(agents_cgroup).map_err(|error| match error {
        CaptureError::CgroupNotFound { path } => ExecError::NoAgentsCgroup { path },
        other => other.into(),
    })?;
    let path = root.path().join(&name);
    let created = !path.exists();
    let cgroup = Cgroup::create(&path)?;
    let outcome = work(&cgroup);
    if created {
        // Still busy when the command left background processes behind; leave it then.
        if let Err(error) = std::fs::remove_dir(cgroup.path()) {
            tracing::debug!(%error, cgroup = %cgroup.path().display(), "cgroup left in place");
        }
    }
    outcome
}

/// One variable `appliance exec` gives the command.
#[derive(Debug)]
pub struct TrustSetting {
    /// The variable.
    pub key: &'static str,
    /// Its value for the command.
    pub value: OsString,
    /// The caller's own value, which `value` builds on: their roots with the CA added, or
    /// their Java options with the trust store's.
    pub theirs: Option<OsString>,
}

/// The variables that make a command's runtimes trust the CA, from `trust_dir`. Where the
/// caller's environment already names a root bundle (conda, CI images and corporate hosts
/// set `SSL_CERT_FILE` and the like), the command gets that bundle with the CA added, so
/// hosts passed through verify as they did; Java options are added to theirs.
pub fn trust_environment(trust_dir: &Path) -> Vec<TrustSetting> {
    if !trust::is_ready(trust_dir) {
        eprintln!(
            "appliance: warning: no trust files in {} (is the daemon running, with this --socket?); the command is not told to trust the appliance CA",
            trust_dir.display()
        );
        return Vec::new();
    }
    let java_store = trust::java_trust_store(trust_dir);
    let ours = trust::environment(trust_dir, java_store.as_deref());
    // Bundle variables the caller set that the trust files have no variable for get their
    // roots plus the CA too; the full bundle is their fallback.
    let others: Vec<_> = trust::BUNDLE_VARIABLES
        .iter()
        .filter(|key| !ours.iter().any(|(ours, _)| ours == *key))
        .map(|&key| (key, trust::bundle_path(trust_dir).display().to_string()))
        .collect();
    ours.into_iter()
        .map(|(key, value)| (key, value, true))
        .chain(others.into_iter().map(|(key, value)| (key, value, false)))
        .filter_map(|(key, value, always)| {
            let theirs = std::env::var_os(key).filter(|theirs| !theirs.is_empty());
            let value = match &theirs {
                None if always => OsString::from(value),
                None => return None,
                Some(theirs) if key == "JAVA_TOOL_OPTIONS" => {
                    let mut joined = theirs.clone();
                    joined.push(" ");
                    joined.push(value);
                    joined
                }
                Some(theirs) => match trust::merged_bundle(trust_dir, Path::new(theirs)) {
                    Ok(merged) => merged.into_os_string(),
                    Err(error) => {
                        eprintln!(
                            "appliance: warning: {key}={}: {:#}; the command gets the appliance's file instead",
                            theirs.to_string_lossy(),
                            anyhow::Error::new(error)
                        );
                        OsString::from(value)
                    }
                },
            };
            Some(TrustSetting { key, value, theirs })
        })
        .collect()
}

/// `command` made ready to start inside `cgroup`, with the trust environment: the program's
/// name (for errors) and the command.
fn prepared(
    cgroup: &Cgroup,
    command: &[OsString],
    options: &ExecOptions<'_>,
) -> Result<(OsString, Command), ExecError> {
    if !options.allow_unprotected && !capture::is_intercepted(cgroup)? {
        return Err(ExecError::NotIntercepted {
            path: cgroup.path().into(),
        });
    }
    let procs =
        CString::new(cgroup.path().join("cgroup.procs").as_os_str().as_bytes()).map_err(|_| {
            CaptureError::NotACgroup {
                path: cgroup.path().into(),
            }
        })?;
    let (program, args) = command.split_first().expect("clap requires a command");
    let mut child = Command::new(program);
    child.args(args);
    if let Some(dir) = options.trust_dir {
        child.envs(
            trust_environment(dir)
                .into_iter()
                .map(|setting| (setting.key, setting.value)),
        );
    }
    // SAFETY: the hook only makes async-signal-safe calls (open, write, close).
    unsafe {
        child.pre_exec(move || capture::cgroup::move_self_into(&procs));
    }
    Ok((program.clone(), child))
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn cgroup_names_are_single_safe_components() {
        for good in ["agent", "exec-1234", "claude_code.v2", "A"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
