//! The few bpf(2) and socket calls aya does not expose: opening a pinned link as a plain file
//! descriptor, swapping the program inside a link, and listing a cgroup's effective programs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
/// `BPF_CGROUP_INET4_CONNECT` in `enum bpf_attach_type`.
pub const ATTACH_INET4_CONNECT: u32 = 10;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// The kernel refuses the call unless every byte past `path_fd` is zero; implicit padding
    /// would hold whatever the stack held.
    zero: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapNextKeyAttr {
    map_fd: u32,
    /// Keeps `key` at its 8-byte aligned offset, zero as the kernel requires.
    padding: u32,
    key: u64,
    next_key: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    padding: u32,
    prog_attach_flags: u64,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized bpf_attr prefix for `command`; the kernel
    // checks that the size covers the fields the command reads.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Opens a pinned bpf object (here: a link) as a file descriptor.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Number of keys in the hash map pinned at `pin` whose keys are `key_size` bytes, walked
/// with `BPF_MAP_GET_NEXT_KEY`; entries added or removed meanwhile may or may not count.
pub fn count_keys(pin: &Path, key_size: usize) -> io::Result<usize> {
    let map = open_pinned(pin)?;
    let mut current = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut count = 0;
    let mut first = true;
    loop {
        let mut attr = MapNextKeyAttr {
            map_fd: map.as_raw_fd() as u32,
            // A null key asks for the first one.
            key: if first { 0 } else { current.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                count += 1;
                first = false;
                std::mem::swap(&mut current, &mut next);
            }
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(error) => return Err(error),
        }
    }
}

/// Replaces the program a link runs, atomically: the hook is never without a program.
pub fn update_link_program(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Ids of the programs that run for `attach_type` on sockets of the cgroup open as `cgroup`,
/// including those inherited from ancestors.
pub fn effective_program_ids(cgroup: impl AsFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_fd().as_raw_fd() as u32,
        attach_type,
        query_flags: BPF_F_QUERY_EFFECTIVE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// The cookie of the network namespace a socket lives in (Linux 5.14+).
pub fn netns_cookie(socket: impl AsFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, output buffer and length of the right size.
    let result = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// Marks a listening socket `IP_TRANSPARENT` (and `IPV6_TRANSPARENT` for IPv6), so that it may
/// accept and answer connections to addresses that are not the host's.
pub fn set_transparent(socket: BorrowedFd<'_>) -> io::Result<()> {
    let enable: libc::c_int = 1;
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket fd, output buffer and length of the right size.
    if unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let (level, option) = if domain == libc::AF_INET6 {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    };
    // SAFETY: valid socket fd and an int option value of the right size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
