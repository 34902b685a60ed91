//! cgroup v2 paths: finding the hierarchy, naming cgroups, moving processes.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

use super::CaptureError;

/// A cgroup v2 id: the inode number of the cgroup's directory, as
/// `bpf_get_current_cgroup_id()` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

impl fmt::Display for CgroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An existing cgroup v2 directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
    id: CgroupId,
}

impl Cgroup {
    /// Opens the cgroup at `path`: absolute, or relative to the cgroup2 mount.
    pub fn open(path: &Path) -> Result<Self, CaptureError> {
        let path = resolve(path)?;
        let meta = fs::metadata(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => CaptureError::CgroupNotFound { path: path.clone() },
            _ => CaptureError::Io {
                action: "reading cgroup",
                path: path.clone(),
                source,
            },
        })?;
        if !meta.is_dir() || !is_cgroup2(&path) {
            return Err(CaptureError::NotACgroup { path });
        }
        Ok(Self {
            id: CgroupId(meta.ino()),
            path,
        })
    }

    /// Opens the cgroup at `path`, creating it and its parents when missing.
    pub fn create(path: &Path) -> Result<Self, CaptureError> {
        let path = resolve(path)?;
        fs::create_dir_all(&path).map_err(|source| CaptureError::Io {
            action: "creating cgroup",
            path: path.clone(),
            source,
        })?;
        Self::open(&path)
    }

    /// Absolute path of the cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's id.
    pub fn id(&self) -> CgroupId {
        self.id
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn contains(&self, other: &Path) -> bool {
        other.starts_with(&self.path)
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid systems), read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CaptureError> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|source| CaptureError::Io {
            action: "reading",
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    find_mount(&mountinfo, "cgroup2").ok_or(CaptureError::Cgroup2NotMounted)
}

/// The mount point of the first filesystem of type `fstype` in a mountinfo text.
pub(crate) fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split(' ').nth(4)?;
        (after.split(' ').next()? == fstype).then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup v2 directory of the calling process.
pub fn own_cgroup_path() -> Result<PathBuf, CaptureError> {
    let text = fs::read_to_string("/proc/self/cgroup").map_err(|source| CaptureError::Io {
        action: "reading",
        path: "/proc/self/cgroup".into(),
        source,
    })?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(CaptureError::Cgroup2NotMounted)?;
    Ok(cgroup2_mount()?.join(relative.trim_start_matches('/')))
}

fn resolve(path: &Path) -> Result<PathBuf, CaptureError> {
    if path
        .components()
        .any(|component| matches!(component, Component::ParentDir))
    {
        return Err(CaptureError::NotACgroup { path: path.into() });
    }
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(cgroup2_mount()?.join(path))
    }
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|stat| stat.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Moves the calling process into `cgroup`. Only async-signal-safe calls, so that it can run
/// between `fork` and `exec`.
pub fn move_self_into(procs_file: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: plain open/write/close on a NUL-terminated path; no allocation.
    unsafe {
        let fd = libc::open(procs_file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // Writing "0" moves the writer itself.
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/my\\040dir rw - cgroup cgroup rw,memory
";

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_systems() {
        assert_eq!(
            find_mount(HYBRID, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_mount(HYBRID, "cgroup"),
            Some(PathBuf::from("/sys/fs/cgroup/my dir"))
        );
        assert_eq!(find_mount(HYBRID, "bpf"), None);
    }

    #[test]
    fn parent_components_are_rejected() {
        assert!(matches!(
            resolve(Path::new("agents/../../etc")),
            Err(CaptureError::NotACgroup { .. })
        ));
    }

    #[test]
    fn containment_is_by_path_components() {
        let cgroup = Cgroup {
            path: "/sys/fs/cgroup/a".into(),
            id: CgroupId(1),
        };
        assert!(cgroup.contains(Path::new("/sys/fs/cgroup/a")));
        assert!(cgroup.contains(Path::new("/sys/fs/cgroup/a/b")));
        assert!(!cgroup.contains(Path::new("/sys/fs/cgroup/ab")));
    }
}
