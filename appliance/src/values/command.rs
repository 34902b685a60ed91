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

/// Runs `argv` (an absolute program path first) with an empty environment but for `PATH`,
/// no input, and `timeout`; returns its standard output. The daemon's environment (which may
/// hold a 1Password token) is not handed down.
pub async fn run(argv: &[String], timeout: Duration) -> Result<Vec<u8>, CommandError> {
    let program = argv[0].clone();
    let mut child = tokio::process::Command::new(&program)
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Start {
            program: program.clone(),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let finished = async {
        let mut output = Vec::new();
        // One byte over the limit is enough to tell that it is too long.
        (&mut stdout)
            .take((MAX_VALUE_BYTES + 3) as u64)
            .read_to_end(&mut output)
            .await
            .map_err(|source| CommandError::Output {
                program: program.clone(),
                source,
            })?;
        let status = child.wait().await.map_err(|source| CommandError::Output {
            program: program.clone(),
            source,
        })?;
        Ok::<_, CommandError>((output, status))
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
