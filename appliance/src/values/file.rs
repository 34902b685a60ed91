//! The `file` and `credential` sources: a value read from a regular file that only root (or
//! the daemon's own user) can change. Whoever may create secrets chooses the path, and the
//! daemon reads it as root, so a file source may name only a file inside the directories the
//! configuration allows (systemd's credentials directory is the daemon's own), by its real
//! path, never through a link, and never a device, FIFO or `/proc` file.

use std::fs;
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::model::secret::MAX_VALUE_BYTES;

/// Why a file cannot be a value source. Never carries the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be opened or read.
    #[error("reading {} failed", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It lies outside the allowed directories.
    #[error("{} is outside the directories value files may be read from ({allowed}); move it into one of them, or add its directory to values.file_dirs in the daemon's configuration", path.display())]
    OutsideDirectories {
        /// The file.
        path: PathBuf,
        /// The allowed directories.
        allowed: String,
    },
    /// Its path goes through a symbolic link, or is not spelled as its real path.
    #[error("{} is not the file's real path (it resolves to {}); name the file itself", path.display(), real.display())]
    NotRealPath {
        /// The file as named.
        path: PathBuf,
        /// Where it leads.
        real: PathBuf,
    },
    /// It is not a regular file, or one the kernel makes up (`/proc`, `/sys` and the like).
    #[error("{} is not a regular file; a value file must be one (no device, FIFO, socket, or /proc or /sys file)", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// Someone other than root or the daemon's user owns it, and could change the value.
    #[error("{} belongs to uid {uid}; a value file must belong to root or the daemon's user", path.display())]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// Every user may write it.
    #[error("{} can be written by every user (mode {mode:o}); chmod o-w it", path.display())]
    WorldWritable {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// The directories file sources may read from, each as its real path (one that does not
/// exist stays as given: nothing can be read from it).
pub fn real_directories(directories: &[PathBuf]) -> Vec<PathBuf> {
    directories
        .iter()
        .map(|dir| fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()))
        .collect()
}

/// A value file's contents, and what [`read`] found besides. No `Debug`: it holds the value.
pub struct Contents {
    /// At most `MAX_VALUE_BYTES + 3` bytes: enough to tell that a file is too long.
    pub bytes: Vec<u8>,
    /// Every user may read the file.
    pub world_readable: bool,
}

/// Reads `path`, which must lie inside one of `allowed` (real paths) when given, be named by
/// its real path, and be a regular file of root or the daemon's user that not everyone may
/// write. Blocks: run it off the reactor.
pub fn read(path: &Path, allowed: Option<&[PathBuf]>) -> Result<Contents, FileError> {
    let read_error = |source| FileError::Read {
        path: path.to_path_buf(),
        source,
    };
    if let Some(allowed) = allowed {
        let real = fs::canonicalize(path).map_err(read_error)?;
        if !allowed.iter().any(|dir| real.starts_with(dir)) {
            return Err(FileError::OutsideDirectories {
                path: path.to_path_buf(),
                allowed: allowed
                    .iter()
                    .map(|dir| dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if real != path {
            return Err(FileError::NotRealPath {
                path: path.to_path_buf(),
                real,
            });
        }
    }
    // O_NOFOLLOW: a link put in place since is refused; O_NONBLOCK: opening a FIFO does not
    // wait for a writer (and it is refused below).
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.file_type().is_file() || is_kernel_file(&file).map_err(read_error)? {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != own_uid {
        return Err(FileError::Owner {
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(FileError::WorldWritable {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    file.take((MAX_VALUE_BYTES + 3) as u64)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    Ok(Contents {
        bytes,
        world_readable: mode & 0o004 != 0,
    })
}

/// Whether `file` lies on a file system the kernel makes up as it is read (proc, sysfs,
/// debugfs and their kin report their files as regular ones).
fn is_kernel_file(file: &fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    const KERNEL_FILE_SYSTEMS: &[i64] = &[
        0x9fa0,      // proc
        0x6265_6572, // sysfs
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0x6367_7270, // cgroup2
        0x0027_e0eb, // cgroup
        0xcafe_4a11, // bpf
        0x6265_6570, // configfs
        0xde5e_81e4, // efivarfs
    ];
    // SAFETY: a zeroed statfs is a valid out-parameter, and the descriptor is open.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs by architecture"
    )]
    let kind = stat.f_type as i64;
    Ok(KERNEL_FILE_SYSTEMS.contains(&kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;
    use std::os::unix::fs::PermissionsExt as _;

    fn allowed(dir: &Path) -> Vec<PathBuf> {
        real_directories(&[dir.to_path_buf()])
    }

    fn refused(path: &Path, allowed: Option<&[PathBuf]>) -> FileError {
        match read(path, allowed) {
            Ok(_) => panic!("{} was read", path.display()),
            Err(error) => error,
        }
    }

    #[test]
    fn a_private_file_inside_an_allowed_directory_is_read() {
        let dir = temp_dir("value-file-ok");
        let file = dir.join("key");
        fs::write(&file, "sk-value\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let read = read(&file, Some(&allowed(&dir))).unwrap();
        assert_eq!(read.bytes, b"sk-value\n");
        assert!(!read.world_readable);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            super::read(&file, Some(&allowed(&dir)))
                .unwrap()
                .world_readable
        );
    }

    #[test]
    fn files_outside_the_directories_links_and_special_files_are_refused() {
        let dir = temp_dir("value-file-refused");
        let inside = dir.join("inside");
        fs::create_dir_all(&inside).unwrap();
        let allowed = allowed(&inside);
        let outside = dir.join("outside-key");
        fs::write(&outside, "sk-outside").unwrap();
        let error = refused(&outside, Some(&allowed));
        assert!(
            matches!(error, FileError::OutsideDirectories { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("values.file_dirs"), "{error}");

        // A link inside that leads out, and a path that climbs out with `..`.
        let link = inside.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let error = refused(&link, Some(&allowed));
        assert!(
            matches!(error, FileError::OutsideDirectories { .. }),
            "{error}"
        );
        let climbing = inside.join("../outside-key");
        let error = refused(&climbing, Some(&allowed));
        assert!(
            matches!(error, FileError::OutsideDirectories { .. }),
            "{error}"
        );
        // A link that stays inside is refused too: the file is named by its real path.
        let key = inside.join("key");
        fs::write(&key, "sk-inside").unwrap();
        let inner_link = inside.join("inner-link");
        std::os::unix::fs::symlink(&key, &inner_link).unwrap();
        let error = refused(&inner_link, Some(&allowed));
        assert!(matches!(error, FileError::NotRealPath { .. }), "{error}");

        // Root's secrets: a /proc file and /etc/shadow, outside any allowed directory, and
        // a /proc file even where /proc is allowed.
        for path in ["/proc/self/environ", "/etc/shadow"] {
            let error = refused(Path::new(path), Some(&allowed));
            assert!(
                matches!(error, FileError::OutsideDirectories { .. }),
                "{path}: {error}"
            );
        }
        let status = PathBuf::from(format!("/proc/{}/status", std::process::id()));
        let error = refused(&status, Some(&real_directories(&["/proc".into()])));
        assert!(matches!(error, FileError::NotRegular { .. }), "{error}");

        // A FIFO is refused at once instead of waiting for a writer.
        let fifo = inside.join("fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a valid C string.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let error = refused(&fifo, Some(&allowed));
        assert!(matches!(error, FileError::NotRegular { .. }), "{error}");

        let writable = inside.join("writable");
        fs::write(&writable, "sk-writable").unwrap();
        fs::set_permissions(&writable, fs::Permissions::from_mode(0o666)).unwrap();
        let error = refused(&writable, Some(&allowed));
        assert!(matches!(error, FileError::WorldWritable { .. }), "{error}");
    }

    #[test]
    fn a_long_file_is_read_only_as_far_as_it_takes_to_tell() {
        let dir = temp_dir("value-file-long");
        let file = dir.join("long");
        fs::write(&file, vec![b'a'; 10 * MAX_VALUE_BYTES]).unwrap();
        let read = read(&file, Some(&allowed(&dir))).unwrap();
        assert_eq!(read.bytes.len(), MAX_VALUE_BYTES + 3);
    }
}
