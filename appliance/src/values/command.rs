//! The `command` source: a program run by the daemon, without a shell, whose standard output
//! is the value.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

use crate::model::secret::MAX_VALUE_BYTES;

/// Why a command gave no value. Its output is never quoted: it may be the value.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started.
    #[error("starting {program} failed")]
    Start {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It did not finish in time (it was killed).
    #[error("{program} did not finish within {seconds} s and was killed")]
    Timeout {
        /// The program.
        program: String,
        /// The limit.
        seconds: u64,
    },
    /// It failed.
    #[error("{program} exited with {status}")]
    Failed {
        /// The program.
        program: String,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// Reading its output failed.
    #[error("reading the output of {program} failed")]
    Output {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Kills every process left in the process group `group` when dropped: what a command
/// started in the background must not outlive it, nor hold its output open.
struct GroupKiller {
    group: Option<i32>,
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(group) = self.group {
            // SAFETY: kill(2) on a process group this command leads; ESRCH when it is empty.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
        }
    }
}

/// Runs `argv` (an absolute program path first) in a process group of its own, with an
/// empty environment but for `PATH`, no input, and `timeout`; returns its standard output.
/// The daemon's environment (which may hold a 1Password token) is not handed down. When the
/// program exits, or the time is up, whatever it left running in its group is killed.
pub async fn run(argv: &[String], timeout: Duration) -> Result<Vec<u8>, CommandError> {
    let program = argv[0].clone();
    let mut child = tokio::process::Command::new(&program)
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Start {
            program: program.clone(),
            source,
        })?;
    let mut group = GroupKiller {
        group: child.id().and_then(|pid| i32::try_from(pid).ok()),
    };
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let output_error = |source| CommandError::Output {
        program: program.clone(),
        source,
    };
    let finished = async {
        let mut output = Vec::new();
        // One byte over the limit is enough to tell that it is too long.
        let mut limited = (&mut stdout).take((MAX_VALUE_BYTES + 3) as u64);
        let reading = limited.read_to_end(&mut output);
        let waiting = async {
            let status = child.wait().await;
            // A background child may still hold the output open: the program is done.
            drop(std::mem::replace(&mut group, GroupKiller { group: None }));
            status
        };
        let (read, status) = tokio::join!(reading, waiting);
        read.map_err(output_error)?;
        Ok::<_, CommandError>((output, status.map_err(output_error)?))
    };
    let (output, status) = tokio::time::timeout(timeout, finished)
        .await
        .map_err(|_| CommandError::Timeout {
            program: program.clone(),
            seconds: timeout.as_secs(),
        })??;
    if !status.success() {
        return Err(CommandError::Failed { program, status });
    }
    Ok(output)
}
