//! A test run starts clean and leaves nothing running.
//!
//! The tests name what they create `appliance-test-<pid>-…` (the demo `appliance-demo-…<pid>`),
//! after the test binary's (or the demo shell's) process id. What a killed run left behind is
//! swept before the next run starts: its bpffs pins (which keep programs attached), its cgroups
//! and its files under the temporary directory. While the tests run, this process is the
//! subreaper of everything they start, so a helper whose parent died without reaping it is
//! found, killed and named when the run ends.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Prefixes of the names the tests and the demo give their resources, each followed by the
/// owning process id.
const OWNED_PREFIXES: &[&str] = &[
    "appliance-test-",
    "appliance-demo-agents-",
    "appliance-demo-",
];

/// The process id a resource name carries, for names the tests and the demo give.
fn owner_pid(name: &str) -> Option<u32> {
    OWNED_PREFIXES.iter().find_map(|prefix| {
        let rest = name.strip_prefix(prefix)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let after = &rest[digits.len()..];
        (after.is_empty() || after.starts_with('-'))
            .then(|| digits.parse().ok())
            .flatten()
    })
}

fn is_running(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Entries of `dir` that an earlier run, no longer running, left behind.
fn leftovers_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(owner_pid)
                .is_some_and(|pid| !is_running(pid))
        })
        .map(|entry| entry.path())
        .collect()
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split(' ').nth(4)?;
        after
            .starts_with("cgroup2 ")
            .then(|| PathBuf::from(mount_point))
    })
}

/// Kills what still runs in a cgroup subtree and removes it, deepest first.
fn remove_cgroup_tree(path: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(path)?.filter_map(Result::ok) {
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // cgroup.kill (Linux 5.14) ends every process of the subtree at once.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => return Err(error),
        }
    }
    fs::remove_dir(path)
}

/// Removes the pins, cgroups and temporary files of earlier runs that are no longer running.
/// Pins go first: they keep programs attached to the cgroups.
pub fn sweep_leftovers() -> anyhow::Result<()> {
    let mut swept = Vec::new();
    for pins in leftovers_in(Path::new("/sys/fs/bpf")) {
        fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
        swept.push(pins);
    }
    if let Some(mount) = cgroup2_mount() {
        for cgroup in leftovers_in(&mount) {
            remove_cgroup_tree(&cgroup)
                .with_context(|| format!("removing cgroup {}", cgroup.display()))?;
            swept.push(cgroup);
        }
    }
    for path in leftovers_in(&std::env::temp_dir()) {
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.with_context(|| format!("removing {}", path.display()))?;
        swept.push(path);
    }
    if !swept.is_empty() {
        eprintln!(
            "xtask: removed {} leftovers of earlier runs: {}",
            swept.len(),
            swept
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Makes this process the parent of every process its descendants orphan.
pub fn adopt_orphans() -> anyhow::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("becoming the subreaper of the tests");
    }
    Ok(())
}

/// A child of this process, as /proc shows it.
struct Child {
    pid: i32,
    /// Exited but not reaped: nothing runs any more.
    zombie: bool,
    cmdline: String,
}

/// This process's children: once every command it ran has been waited for, only orphans
/// that were reparented here.
fn children() -> Vec<Child> {
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // Fields after the command name, which is in parentheses and may hold spaces:
            // state, then parent pid.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?;
            let ppid = fields.next()?;
            (ppid == me).then(|| {
                let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                Child {
                    pid,
                    zombie: state == "Z",
                    cmdline: cmdline.trim().to_owned(),
                }
            })
        })
        .collect()
}

/// Reaps the orphans that already exited, kills and reaps every one the tests left running,
/// and their descendants (which become orphans in turn), and returns what the running ones
/// were.
pub fn reap_orphans() -> Vec<String> {
    let mut killed = Vec::new();
    for _ in 0..50 {
        let orphans = children();
        if orphans.is_empty() {
            break;
        }
        for orphan in orphans {
            if !orphan.zombie {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(orphan.pid, libc::SIGKILL) };
                killed.push(format!("{} ({})", orphan.pid, orphan.cmdline));
            }
            // SAFETY: waitpid on our own child.
            unsafe { libc::waitpid(orphan.pid, std::ptr::null_mut(), 0) };
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn resource_names_carry_their_owner() {
        assert_eq!(owner_pid("appliance-test-4242-18-git"), Some(4242));
        assert_eq!(
            owner_pid("appliance-test-4242-0-empty-config.toml"),
            Some(4242)
        );
        assert_eq!(owner_pid("appliance-demo-agents-77"), Some(77));
        assert_eq!(owner_pid("appliance-demo-77"), Some(77));
        assert_eq!(owner_pid("appliance-demo.Xy12ab"), None);
        assert_eq!(owner_pid("appliance-agents"), None);
        assert_eq!(owner_pid("appliance-test-x-1"), None);
        assert_eq!(owner_pid("appliance-test-12abc"), None);
    }
}
