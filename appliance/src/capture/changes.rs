//! What tells the daemon to look at containers again: rtnetlink announcements of links (a
//! runtime adding or removing a container's veth), and inotify on the selected
//! cgroup trees (a container's cgroup appearing, going away, or becoming populated, which
//! `cgroup.events` reports). The events carry no state of their own: each one only means
//! "reconcile now", and reconciling reads the state afresh, so a lost or merged event costs
//! nothing but the wait for the next one or for the periodic rescan.

use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// The rtnetlink multicast group of link announcements (`RTMGRP_LINK`). Address groups are
/// left out: a container's addresses live in its own namespace, where this socket hears
/// nothing, while the host's own addresses are announced again and again (`RTM_NEWADDR`
/// arrived several times a second on an idle test machine), each of which cost a reconcile.
const RTMGRP_LINK: u32 = 0x1;

/// The two event sources, non-blocking and registered with tokio.
pub struct ChangeEvents {
    netlink: AsyncFd<OwnedFd>,
    inotify: AsyncFd<Watches>,
}

/// The inotify instance, in the shape tokio registers (`AsRawFd`).
struct Watches(Inotify);

impl std::os::fd::AsRawFd for Watches {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

impl ChangeEvents {
    /// Subscribes to link announcements of the daemon's network namespace and
    /// opens an inotify instance with no watches yet (see [`ChangeEvents::watch_cgroups`]).
    /// Needs a tokio runtime.
    pub fn open() -> io::Result<Self> {
        let netlink = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )?;
        bind(netlink.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))?;
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        // SAFETY: each AsyncFd owns its descriptor, which therefore stays open, and the same,
        // for as long as it is registered.
        let (netlink, inotify) = unsafe {
            (
                AsyncFd::register(netlink).map_err(|error| error.into_parts().1)?,
                AsyncFd::register(Watches(inotify)).map_err(|error| error.into_parts().1)?,
            )
        };
        Ok(Self { netlink, inotify })
    }

    /// Waits until either source has something to read, then lets the burst settle for
    /// `settle` and reads it all.
    pub async fn changed(&self, settle: std::time::Duration) {
        tokio::select! {
            ready = self.netlink.readable() => { if let Ok(mut guard) = ready { guard.clear_ready(); } }
            ready = self.inotify.readable() => { if let Ok(mut guard) = ready { guard.clear_ready(); } }
        }
        tokio::time::sleep(settle).await;
        self.drain();
    }

    /// Watches every cgroup directory under `roots` (the roots included) for child cgroups
    /// created or removed and for `cgroup.events` changes. Watching a directory twice is
    /// harmless, so this runs after every reconcile to pick up cgroups made since; watches
    /// of removed cgroups go away with them.
    pub fn watch_cgroups(&self, roots: &[PathBuf]) {
        let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MODIFY;
        let mut pending: Vec<PathBuf> = roots.to_vec();
        while let Some(dir) = pending.pop() {
            // A cgroup removed meanwhile simply has nothing to watch.
            if self.inotify.get_ref().0.add_watch(&dir, flags).is_err() {
                continue;
            }
            pending.extend(child_directories(&dir));
        }
    }

    /// Reads everything pending on both sources and says whether there was anything.
    fn drain(&self) -> bool {
        let mut any = false;
        let mut buffer = [0u8; 8192];
        loop {
            match recv(
                self.netlink.as_raw_fd(),
                &mut buffer,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) | Err(Errno::EAGAIN) => break,
                Ok(_) => any = true,
                // The socket's buffer overflowed: announcements were lost, so look again.
                Err(Errno::ENOBUFS) => any = true,
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "reading link announcements failed");
                    break;
                }
            }
        }
        loop {
            match self.inotify.get_ref().0.read_events() {
                Ok(events) if events.is_empty() => break,
                Ok(_) => any = true,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "reading cgroup events failed");
                    break;
                }
            }
        }
        any
    }
}

fn child_directories(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.path())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn directory_changes_are_reported_and_drained() {
        let root = std::env::temp_dir().join(format!("appliance-changes-{}", std::process::id()));
        std::fs::create_dir_all(root.join("existing")).unwrap();
        let events = ChangeEvents::open().unwrap();
        events.watch_cgroups(std::slice::from_ref(&root));
        events.drain();
        std::fs::create_dir(root.join("existing/child")).unwrap();
        assert!(events.drain(), "a directory created below a watched one");
        std::fs::write(root.join("cgroup.events"), "populated 1\n").unwrap();
        assert!(events.drain(), "a file changed in a watched directory");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
