//! Every process a test starts ends with the test: when it passes, when it panics, and when the
//! test binary itself is killed.
//!
//! - [`test_command`] builds a `Command` whose process gets SIGKILL from the kernel when the thread
//!   that started it ends (`PR_SET_PDEATHSIG`). Each test runs on a thread of its own, so a test
//!   that panics, or a test binary killed with SIGKILL, takes its helpers with it.
//! - [`Running`] holds a process that must outlive one call (a server, a streaming client) and
//!   kills and reaps it when dropped, so it ends with the scope that started it.
//! - `cargo xtask test` adds a last net: it reaps whatever a test orphaned and fails the run.

use std::ffi::OsStr;
use std::io::Read as _;
use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};

/// A command whose process is killed when the starting thread (the test) ends.
pub fn test_command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    end_with_test(&mut command);
    command
}

/// Makes `command`'s process receive SIGKILL when the thread that spawns it ends.
pub fn end_with_test(command: &mut Command) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then no signal would come.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other(
                    "the test ended before its helper started",
                ));
            }
            Ok(())
        });
    }
    command
}

/// A running helper process, killed and reaped when dropped.
pub struct Running {
    child: Child,
}

impl Running {
    /// Spawns `command` (built with [`test_command`], so it also dies with the test binary).
    pub fn spawn(command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("starting {command:?}: {error}"));
        Self { child }
    }

    /// Waits for the line `ready` on the helper's piped stdout. A helper that says anything
    /// else, or exits, fails the test with its own stderr (it must be piped too).
    pub fn wait_ready(&mut self) {
        let mut stdout = self.child.stdout.take().expect("helper stdout is piped");
        let mut line = Vec::new();
        let mut byte = [0u8];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        self.child.stdout = Some(stdout);
        if line == b"ready" {
            return;
        }
        let _ = self.child.kill();
        let status = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        panic!(
            "helper did not start ({status:?}); it said {:?} on stdout and on stderr:\n{stderr}",
            String::from_utf8_lossy(&line)
        );
    }
}

impl Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
