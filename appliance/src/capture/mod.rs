//! Capture: the eBPF programs that redirect selected cgroups' connections to the engine, and
//! their loader.
//!
//! Everything the kernel side holds is pinned under one bpffs directory:
//!
//! ```text
//! <bpffs_dir>/maps/<MAP>                 CONFIG, PORTS, SOCKETS, ORIG_DST, CLOSED, FOREIGN,
//!                                        COVERED, ENGINE, GUARDED, REFUSED
//! <bpffs_dir>/links/<cgroup id>/<prog>   one link per program and selected cgroup
//! <bpffs_dir>/links/netns/steer          the sk_lookup link in the engine's namespace
//! <bpffs_dir>/links/guard/<ifindex>      the guard's tcx link on a served container's veth
//! ```
//!
//! Pinned links keep redirecting while the daemon is down: an intercepted connection then
//! finds no listener and fails, instead of bypassing the engine. A restarted daemon adopts the
//! pinned links by swapping its freshly loaded programs into them, so a cgroup never runs two
//! copies and is never without one.

pub mod cgroup;
pub mod changes;
pub mod containers;
mod origdst;
pub(crate) mod sys;

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};

use appliance_common::{
    ipv4_mapped, map_names, CoveredSource, ProgramSettings, ENGINE_LISTENER_V4, ENGINE_LISTENER_V6,
    FLAG_REDIRECT_UNSERVED_NETNS, FLAG_REFUSE_FOREIGN_NETNS, GUARD_PROGRAM, PROGRAM_NAMES,
    STEERING_PROGRAM,
};
use aya::maps::{Array, HashMap, MapError, SockMap};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{
    links::FdLink, CgroupAttachMode, LinkOrder, Program, ProgramError, SchedClassifier, SkLookup,
    TcAttachType,
};
use aya::{Ebpf, EbpfLoader};

pub use cgroup::{Cgroup, CgroupId};
pub use origdst::{KernelOriginalDestinations, LookupError, OriginalDestinations, Redirect};

#[cfg(test)]
pub use origdst::FixedOriginalDestinations;

static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/appliance-ebpf"));

const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Errors of the capture layer.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup v2 hierarchy is mounted; mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    Cgroup2NotMounted,
    /// A selected cgroup does not exist.
    #[error("cgroup {} does not exist; create it, or select an existing cgroup", path.display())]
    CgroupNotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// A path is not a cgroup v2 directory.
    #[error("{} is not a cgroup v2 directory; give a path under the cgroup2 mount, without `..`", path.display())]
    NotACgroup {
        /// The offending path.
        path: PathBuf,
    },
    /// The pin directory is not on a bpf filesystem.
    #[error("{} is not on a bpf filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose a directory under it", path.display())]
    NotBpffs {
        /// The offending path.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{action} {} failed", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the eBPF object.
    #[error("loading the eBPF object failed; the daemon needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and a kernel with cgroup BPF and BTF")]
    Load(#[source] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("eBPF program {name} failed")]
    Program {
        /// Program name.
        name: &'static str,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// A map is missing or could not be used.
    #[error("eBPF map {name} failed")]
    Map {
        /// Map name.
        name: &'static str,
        /// Why.
        #[source]
        source: MapError,
    },
    /// The embedded eBPF object could not be read.
    #[error("reading the embedded eBPF object failed")]
    Object(#[source] aya_obj::ParseError),
    /// The eBPF log reader could not start.
    #[error("starting the eBPF log reader failed")]
    Log(#[source] aya_log::Error),
}

/// How the eBPF programs are set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    /// Directory on a bpffs where maps and links are pinned.
    pub bpffs_dir: PathBuf,
    /// Engine listener address for IPv4 clients.
    pub engine_v4: Ipv4Addr,
    /// Engine listener address for IPv6 clients.
    pub engine_v6: Ipv6Addr,
    /// Engine listener port (both families).
    pub engine_port: u16,
    /// Destination ports whose TCP connections are redirected and whose UDP is refused.
    pub intercepted_ports: Vec<u16>,
    /// `SO_MARK` of the engine's own upstream sockets, which are never redirected.
    pub own_mark: u32,
    /// Refuse intercepted connections from other network namespaces that are not set up for
    /// delivery, instead of letting them go out unredirected.
    pub refuse_foreign_netns: bool,
    /// Redirect those connections to the container addresses instead, until the daemon has
    /// set their namespace up (containers are served, and the engine listens there).
    pub redirect_unserved_netns: bool,
    /// Engine addresses that containers in `redirect` namespaces, and namespaces not set up
    /// yet, connect to.
    pub container_v4: Ipv4Addr,
    /// Same, IPv6.
    pub container_v6: Ipv6Addr,
    /// Mark bits that select container packets for `tproxy` delivery when only some cgroups
    /// of a namespace are captured ([`ContainerSelection::Cgroups`]).
    pub container_mark: u32,
    /// A listener of the daemon's that intercepted cgroups may not connect to: the metrics,
    /// which name every agent, secret and host.
    pub private_listener: Option<std::net::SocketAddr>,
    /// Most verbose level the eBPF programs emit (aya-log: 1 error … 5 trace).
    pub ebpf_log_level: u8,
}

/// What [`Capture::attach`] did for a cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Links pinned by an earlier daemon now run this daemon's programs.
    Adopted,
    /// New links were created and pinned.
    Attached,
}

/// The loaded eBPF programs and their pinned maps.
pub struct Capture {
    ebpf: Ebpf,
    layout: PinLayout,
}

struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    fn cgroup_links(&self, cgroup: CgroupId) -> PathBuf {
        self.links().join(cgroup.to_string())
    }

    fn steering_link(&self) -> PathBuf {
        self.links().join("netns").join(STEERING_PROGRAM)
    }

    fn guard_links(&self) -> PathBuf {
        self.links().join(GUARD_PROGRAM)
    }

    fn guard_link(&self, ifindex: u32) -> PathBuf {
        self.guard_links().join(ifindex.to_string())
    }
}

/// How connections from a covered foreign namespace reach the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Unrewritten; policy routing and the sk_lookup program deliver them.
    Tproxy,
    /// Rewritten to the engine's container address.
    Redirect,
}

impl Delivery {
    fn kernel_value(self) -> u32 {
        u32::from(match self {
            Self::Tproxy => appliance_common::DELIVERY_TPROXY,
            Self::Redirect => appliance_common::DELIVERY_REDIRECT,
        })
    }
}

/// What of a served container's network namespace is captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerSelection {
    /// Every process in it: its port-443 TCP all goes to the engine (a process outside the
    /// selected cgroups has no record there and is closed), and the guard lets nothing else
    /// out to those ports.
    Namespace,
    /// Only processes in selected cgroups: the guard marks their connections' packets for
    /// the policy rule; the rest of the namespace (a pod's sidecars) goes out directly.
    Cgroups,
}

impl ContainerSelection {
    fn guard_value(self) -> u8 {
        match self {
            Self::Namespace => appliance_common::GUARD_WHOLE_NAMESPACE,
            Self::Cgroups => appliance_common::GUARD_SELECTED_CGROUPS,
        }
    }
}

/// Traffic from a container, as the host sees it: from `source` (every source when `None`)
/// arriving on host interface `ifindex`. The sk_lookup program gives such traffic to the
/// engine (`ifindex` the bridge or routed veth); the guard lets it send TCP to intercepted
/// ports (`ifindex` the container's own veth).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoveredTraffic {
    /// Host-side interface index (the bridge, or a routed veth).
    pub ifindex: u32,
    /// Source address; `None` covers the whole interface.
    pub source: Option<std::net::IpAddr>,
}

impl CoveredTraffic {
    fn key(self) -> CoveredSource {
        CoveredSource {
            ifindex: self.ifindex,
            ip6: match self.source {
                None => [0; 4],
                Some(std::net::IpAddr::V4(ip)) => ipv4_mapped(u32::from_ne_bytes(ip.octets())),
                Some(ip @ std::net::IpAddr::V6(_)) => crate::addr::to_kernel_words(ip),
            },
        }
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CaptureError + 'a {
    move |source| CaptureError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|stat| stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `dir` exists on a bpffs, mounting the standard one when it is missing.
fn ensure_bpffs_dir(dir: &Path) -> Result<(), CaptureError> {
    let standard = Path::new(DEFAULT_BPFFS);
    if dir.starts_with(standard) && !is_bpffs(standard) {
        fs::create_dir_all(standard).map_err(io_error("creating", standard))?;
        nix::mount::mount(
            Some("bpf"),
            standard,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|errno| CaptureError::Io {
            action: "mounting bpffs at",
            path: standard.into(),
            source: errno.into(),
        })?;
        tracing::info!(path = %standard.display(), "mounted bpffs");
    }
    fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    if !is_bpffs(dir) {
        return Err(CaptureError::NotBpffs { path: dir.into() });
    }
    Ok(())
}

fn program_error(name: &'static str) -> impl FnOnce(ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source }
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

impl Capture {
    /// Loads the eBPF programs into the kernel (pinned maps are reused when present) and
    /// writes `settings` into their configuration maps. Nothing is attached yet.
    pub fn load(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        let layout = PinLayout {
            root: settings.bpffs_dir.clone(),
        };
        ensure_bpffs_dir(&layout.maps())?;
        ensure_bpffs_dir(&layout.links())?;
        remove_outdated_pins(&layout.maps())?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .override_global("AYA_LOG_LEVEL", &settings.ebpf_log_level, false)
            .load(EBPF_OBJECT)
            .map_err(CaptureError::Load)?;
        let mut capture = Self { ebpf, layout };
        capture.configure(settings)?;
        for name in PROGRAM_NAMES {
            let program = capture.program_mut(name)?;
            let loaded = match program {
                Program::CgroupSockAddr(program) => program.load(),
                Program::SockOps(program) => program.load(),
                _ => {
                    unreachable!("PROGRAM_NAMES lists only cgroup_sock_addr and sock_ops programs")
                }
            };
            loaded.map_err(program_error(name))?;
        }
        capture
            .steering_program()?
            .load()
            .map_err(program_error(STEERING_PROGRAM))?;
        capture
            .guard_program()?
            .load()
            .map_err(program_error(GUARD_PROGRAM))?;
        Ok(capture)
    }

    fn guard_program(&mut self) -> Result<&mut SchedClassifier, CaptureError> {
        let program = self.program_mut(GUARD_PROGRAM)?;
        program.try_into().map_err(program_error(GUARD_PROGRAM))
    }

    fn steering_program(&mut self) -> Result<&mut SkLookup, CaptureError> {
        let program = self.program_mut(STEERING_PROGRAM)?;
        program.try_into().map_err(program_error(STEERING_PROGRAM))
    }

    fn map_by_name(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, CaptureError> {
        self.ebpf
            .map_mut(name)
            .ok_or(MapError::InvalidName { name: name.into() })
            .map_err(map_error(name))
    }

    /// Lets covered containers' connections reach the engine: puts its listeners into the
    /// `ENGINE` sockmap and attaches the sk_lookup program to this network namespace (adopting
    /// a link an earlier daemon pinned). Listeners are marked `IP_TRANSPARENT`, which the
    /// kernel requires to answer for an address that is not the host's.
    pub fn steer_to(
        &mut self,
        listener_v4: Option<std::os::fd::BorrowedFd<'_>>,
        listener_v6: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), CaptureError> {
        let name = map_names::ENGINE_LISTENERS;
        let mut listeners: SockMap<_> =
            SockMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        for (index, listener) in [
            (ENGINE_LISTENER_V4, listener_v4),
            (ENGINE_LISTENER_V6, listener_v6),
        ] {
            let Some(listener) = listener else { continue };
            sys::set_transparent(listener).map_err(io_error(
                "setting IP_TRANSPARENT on the engine listener; it needs CAP_NET_ADMIN, at",
                Path::new(name),
            ))?;
            listeners
                .set(index, &listener.as_raw_fd(), 0)
                .map_err(map_error(name))?;
        }
        let pin = self.layout.steering_link();
        let parent = pin.parent().unwrap_or(&pin).to_path_buf();
        fs::create_dir_all(&parent).map_err(io_error("creating", &parent))?;
        let program = self.steering_program()?;
        let program_fd = program.fd().map_err(program_error(STEERING_PROGRAM))?;
        if adopt_pinned_link(&pin, program_fd.as_fd())? {
            return Ok(());
        }
        let netns_path = Path::new("/proc/self/ns/net");
        let netns = File::open(netns_path).map_err(io_error("opening", netns_path))?;
        let id = program
            .attach(netns)
            .map_err(program_error(STEERING_PROGRAM))?;
        let link = FdLink::from(
            program
                .take_link(id)
                .map_err(program_error(STEERING_PROGRAM))?,
        );
        pin_link(link, &pin)?;
        Ok(())
    }

    /// Serves the foreign namespace `netns_cookie`: its traffic in `covered` goes to the
    /// engine, then its connects are delivered as `delivery`. The order matters: until the
    /// namespace's entry exists its connects go to the engine's container address, so
    /// nothing leaves uncaptured.
    pub fn cover(
        &mut self,
        netns_cookie: u64,
        delivery: Delivery,
        covered: &[CoveredTraffic],
    ) -> Result<(), CaptureError> {
        let name = map_names::COVERED_SOURCES;
        let mut sources: HashMap<_, CoveredSource, u8> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        for traffic in covered {
            sources
                .insert(traffic.key(), 1, 0)
                .map_err(map_error(name))?;
        }
        let name = map_names::FOREIGN_NAMESPACES;
        let mut namespaces: HashMap<_, u64, u32> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        namespaces
            .insert(netns_cookie, delivery.kernel_value(), 0)
            .map_err(map_error(name))
    }

    /// Refuses the connects of the foreign namespace `netns_cookie`, which the daemon cannot
    /// serve, instead of sending them to the container address until it is served.
    pub fn refuse(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        let name = map_names::FOREIGN_NAMESPACES;
        let mut namespaces: HashMap<_, u64, u32> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        namespaces
            .insert(
                netns_cookie,
                u32::from(appliance_common::DELIVERY_REFUSED),
                0,
            )
            .map_err(map_error(name))
    }

    /// Forgets a namespace [`Capture::refuse`] refused (it is gone).
    pub fn forget_refused(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        let name = map_names::FOREIGN_NAMESPACES;
        let mut namespaces: HashMap<_, u64, u32> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        ignore_missing(namespaces.remove(&netns_cookie)).map_err(map_error(name))
    }

    /// Forgets every served namespace (a restarted daemon sets them up afresh).
    pub fn uncover_all(&mut self) -> Result<(), CaptureError> {
        let name = map_names::FOREIGN_NAMESPACES;
        let mut namespaces: HashMap<_, u64, u32> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        let cookies: Vec<u64> = namespaces.keys().filter_map(Result::ok).collect();
        for cookie in cookies {
            ignore_missing(namespaces.remove(&cookie)).map_err(map_error(name))?;
        }
        let name = map_names::COVERED_SOURCES;
        let mut sources: HashMap<_, CoveredSource, u8> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        let keys: Vec<CoveredSource> = sources.keys().filter_map(Result::ok).collect();
        for key in keys {
            ignore_missing(sources.remove(&key)).map_err(map_error(name))?;
        }
        Ok(())
    }

    /// Stops serving `netns_cookie`, in the reverse order of [`Capture::cover`]: its connects
    /// go to the container address again before its traffic stops reaching the engine.
    pub fn uncover(
        &mut self,
        netns_cookie: u64,
        covered: &[CoveredTraffic],
    ) -> Result<(), CaptureError> {
        let name = map_names::FOREIGN_NAMESPACES;
        let mut namespaces: HashMap<_, u64, u32> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        ignore_missing(namespaces.remove(&netns_cookie)).map_err(map_error(name))?;
        let name = map_names::COVERED_SOURCES;
        let mut sources: HashMap<_, CoveredSource, u8> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        for traffic in covered {
            ignore_missing(sources.remove(&traffic.key())).map_err(map_error(name))?;
        }
        Ok(())
    }

    /// Attaches the guard to the ingress of host interface `interface` (index `ifindex`, a
    /// served container's veth; adopting a link an earlier daemon pinned) and treats what
    /// `sources` send to intercepted ports through it as `selection` says. Whatever any
    /// other source sends to those ports is dropped, whatever socket wrote it.
    pub fn guard(
        &mut self,
        interface: &str,
        ifindex: u32,
        sources: &[CoveredTraffic],
        selection: ContainerSelection,
    ) -> Result<(), CaptureError> {
        let name = map_names::GUARDED_SOURCES;
        let mut guarded: HashMap<_, CoveredSource, u8> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        for traffic in sources {
            guarded
                .insert(traffic.key(), selection.guard_value(), 0)
                .map_err(map_error(name))?;
        }
        // The interface's entries are replaced, not added to: what an earlier daemon (another
        // delivery, or the container's old address) allowed must not stay allowed.
        let wanted: Vec<CoveredSource> = sources.iter().map(|traffic| traffic.key()).collect();
        let stale: Vec<CoveredSource> = guarded
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.ifindex == ifindex && !wanted.contains(key))
            .collect();
        for key in stale {
            ignore_missing(guarded.remove(&key)).map_err(map_error(name))?;
        }
        let pin = self.layout.guard_link(ifindex);
        let parent = self.layout.guard_links();
        fs::create_dir_all(&parent).map_err(io_error("creating", &parent))?;
        let program = self.guard_program()?;
        let program_fd = program.fd().map_err(program_error(GUARD_PROGRAM))?;
        if adopt_pinned_link(&pin, program_fd.as_fd())? {
            return Ok(());
        }
        let id = program
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(program_error(GUARD_PROGRAM))?;
        let link: FdLink = program
            .take_link(id)
            .map_err(program_error(GUARD_PROGRAM))?
            .try_into()
            .map_err(|error| CaptureError::Io {
                action: "taking the tcx link on",
                path: PathBuf::from(interface),
                source: io::Error::other(error),
            })?;
        pin_link(link, &pin)?;
        Ok(())
    }

    /// Host interfaces the guard is attached to (pinned by this daemon or an earlier one).
    pub fn guarded_interfaces(&self) -> Result<Vec<u32>, CaptureError> {
        let dir = self.layout.guard_links();
        match fs::read_dir(&dir) {
            Ok(entries) => Ok(entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(io_error("listing", &dir)(error)),
        }
    }

    /// Detaches the guard from `ifindex` and forgets the sources it allowed there.
    pub fn unguard(&mut self, ifindex: u32) -> Result<(), CaptureError> {
        let pin = self.layout.guard_link(ifindex);
        match fs::remove_file(&pin) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error("removing", &pin)(error)),
        }
        let name = map_names::GUARDED_SOURCES;
        let mut sources: HashMap<_, CoveredSource, u8> =
            HashMap::try_from(self.map_by_name(name)?).map_err(map_error(name))?;
        let keys: Vec<CoveredSource> = sources
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.ifindex == ifindex)
            .collect();
        for key in keys {
            ignore_missing(sources.remove(&key)).map_err(map_error(name))?;
        }
        Ok(())
    }

    fn configure(&mut self, settings: &CaptureSettings) -> Result<(), CaptureError> {
        let netns_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_error("opening a socket on", Path::new("127.0.0.1")))?;
        let netns_cookie = sys::netns_cookie(netns_socket.as_fd()).map_err(io_error(
            "reading the network namespace cookie of",
            Path::new("127.0.0.1"),
        ))?;
        let config = ProgramSettings {
            netns_cookie,
            engine_ip6: crate::addr::to_kernel_words(settings.engine_v6.into()),
            engine_ip4: u32::from_ne_bytes(settings.engine_v4.octets()),
            engine_port: u32::from(settings.engine_port.to_be()),
            own_mark: settings.own_mark,
            flags: match (
                settings.refuse_foreign_netns,
                settings.redirect_unserved_netns,
            ) {
                (true, true) => FLAG_REFUSE_FOREIGN_NETNS | FLAG_REDIRECT_UNSERVED_NETNS,
                (true, false) => FLAG_REFUSE_FOREIGN_NETNS,
                (false, _) => 0,
            },
            container_ip6: crate::addr::to_kernel_words(settings.container_v6.into()),
            container_ip4: u32::from_ne_bytes(settings.container_v4.octets()),
            container_mark: settings.container_mark,
            private_ip6: settings.private_listener.map_or([0; 4], |listener| {
                if listener.ip().is_unspecified() {
                    [0; 4]
                } else {
                    crate::addr::to_kernel_words(listener.ip())
                }
            }),
            private_port: settings
                .private_listener
                .map_or(0, |listener| u32::from(listener.port())),
            reserved: 0,
        };
        let config_map = self
            .ebpf
            .map_mut(map_names::CONFIG)
            .ok_or(MapError::InvalidName {
                name: map_names::CONFIG.into(),
            })
            .map_err(map_error(map_names::CONFIG))?;
        let mut config_map: Array<_, ProgramSettings> =
            Array::try_from(config_map).map_err(map_error(map_names::CONFIG))?;
        config_map
            .set(0, config, 0)
            .map_err(map_error(map_names::CONFIG))?;

        let ports_map = self
            .ebpf
            .map_mut(map_names::PORTS)
            .ok_or(MapError::InvalidName {
                name: map_names::PORTS.into(),
            })
            .map_err(map_error(map_names::PORTS))?;
        let mut ports: HashMap<_, u16, u8> =
            HashMap::try_from(ports_map).map_err(map_error(map_names::PORTS))?;
        // The map is pinned: drop ports an earlier configuration intercepted.
        let stale: Vec<u16> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|port| !settings.intercepted_ports.contains(port))
            .collect();
        for port in stale {
            ports.remove(&port).map_err(map_error(map_names::PORTS))?;
        }
        for port in &settings.intercepted_ports {
            ports
                .insert(port, 1, 0)
                .map_err(map_error(map_names::PORTS))?;
        }
        Ok(())
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut Program, CaptureError> {
        self.ebpf.program_mut(name).ok_or(CaptureError::Program {
            name,
            source: ProgramError::UnexpectedProgramType,
        })
    }

    /// Makes `cgroup` (and its descendants) intercepted, adopting links an earlier daemon
    /// pinned for it.
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<Attachment, CaptureError> {
        let dir = self.layout.cgroup_links(cgroup.id());
        fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        let cgroup_dir = File::open(cgroup.path()).map_err(io_error("opening", cgroup.path()))?;
        let mut outcome = Attachment::Adopted;
        for name in PROGRAM_NAMES {
            let pin = dir.join(name);
            let program = self.program_mut(name)?;
            let program_fd = match program {
                Program::CgroupSockAddr(program) => program.fd(),
                Program::SockOps(program) => program.fd(),
                _ => {
                    unreachable!("PROGRAM_NAMES lists only cgroup_sock_addr and sock_ops programs")
                }
            }
            .map_err(program_error(name))?;
            if adopt_pinned_link(&pin, program_fd.as_fd())? {
                continue;
            }
            outcome = Attachment::Attached;
            let link = attach_link(program, &cgroup_dir).map_err(program_error(name))?;
            pin_link(link, &pin)?;
        }
        Ok(outcome)
    }

    /// Cgroups that have pinned links, by id.
    pub fn attached(&self) -> Result<Vec<CgroupId>, CaptureError> {
        let links = self.layout.links();
        let entries = fs::read_dir(&links).map_err(io_error("listing", &links))?;
        let mut ids: Vec<CgroupId> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok().map(CgroupId))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Stops intercepting the cgroup with id `cgroup`.
    pub fn detach(&self, cgroup: CgroupId) -> Result<(), CaptureError> {
        let dir = self.layout.cgroup_links(cgroup);
        fs::remove_dir_all(&dir).map_err(io_error("removing", &dir))
    }

    /// The table the engine consults for accepted connections.
    pub fn original_destinations(&mut self) -> Result<KernelOriginalDestinations, CaptureError> {
        let name = map_names::ORIGINAL_DESTINATIONS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(MapError::InvalidName { name: name.into() })
            .map_err(map_error(name))?;
        let map = HashMap::try_from(map).map_err(map_error(name))?;
        Ok(KernelOriginalDestinations::new(map))
    }

    /// A reader of the programs' aya-log records; they go to the `log` facade, which the
    /// daemon routes into `tracing`.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, CaptureError> {
        aya_log::EbpfLogger::init(&mut self.ebpf).map_err(CaptureError::Log)
    }
}

/// Removes pinned maps an earlier daemon left whose layout (key size, value size, capacity)
/// differs from this build's: the kernel would let the new programs use them with the wrong
/// layout. The programs then get fresh maps; the records of connections open across the
/// upgrade are lost, so those connections are closed.
fn remove_outdated_pins(maps_dir: &Path) -> Result<(), CaptureError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(CaptureError::Object)?;
    for (name, definition) in &object.maps {
        let pin = maps_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&pin).map_err(|error| CaptureError::Io {
            action: "inspecting the pinned map",
            path: pin.clone(),
            source: io::Error::other(error),
        })?;
        let pinned = (info.key_size(), info.value_size(), info.max_entries());
        let wanted = (
            definition.key_size(),
            definition.value_size(),
            definition.max_entries(),
        );
        if pinned != wanted {
            tracing::warn!(
                map = %name,
                ?pinned,
                ?wanted,
                "replacing a pinned map of an older layout (key, value, capacity); connections open across the upgrade are closed"
            );
            fs::remove_file(&pin).map_err(io_error("removing", &pin))?;
        }
    }
    Ok(())
}

/// Pins `link` at `pin`, so it outlives the daemon.
fn pin_link(link: FdLink, pin: &Path) -> Result<(), CaptureError> {
    link.pin(pin).map(drop).map_err(|error| CaptureError::Io {
        action: "pinning link at",
        path: pin.to_path_buf(),
        source: io::Error::other(error),
    })
}

/// Makes the link pinned at `pin`, if there is one, run `program`, and says whether it did. A
/// pinned link that cannot be updated (its cgroup or device went away) is removed, so the
/// caller attaches a new one.
fn adopt_pinned_link(
    pin: &Path,
    program: std::os::fd::BorrowedFd<'_>,
) -> Result<bool, CaptureError> {
    if !pin.exists() {
        return Ok(false);
    }
    let link = sys::open_pinned(pin).map_err(io_error("opening pinned link", pin))?;
    match sys::update_link_program(link.as_fd(), program) {
        Ok(()) => Ok(true),
        Err(error) => {
            tracing::warn!(pin = %pin.display(), %error, "replacing a pinned link that cannot be updated");
            fs::remove_file(pin).map_err(io_error("removing", pin))?;
            Ok(false)
        }
    }
}

/// A removal of a key that is already gone succeeds.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn attach_link(program: &mut Program, cgroup_dir: &File) -> Result<FdLink, ProgramError> {
    let link = match program {
        Program::CgroupSockAddr(program) => {
            let id = program.attach(cgroup_dir, CgroupAttachMode::Single)?;
            FdLink::try_from(program.take_link(id)?)
        }
        Program::SockOps(program) => {
            let id = program.attach(cgroup_dir, CgroupAttachMode::Single)?;
            FdLink::try_from(program.take_link(id)?)
        }
        _ => unreachable!("PROGRAM_NAMES lists only cgroup_sock_addr and sock_ops programs"),
    };
    link.map_err(|error| ProgramError::IOError(io::Error::other(error)))
}

/// Removes every pinned link and map under `bpffs_dir`: all interception stops. Returns the
/// number of cgroups that were intercepted.
pub fn detach_all(bpffs_dir: &Path) -> Result<usize, CaptureError> {
    let layout = PinLayout {
        root: bpffs_dir.to_path_buf(),
    };
    let links = layout.links();
    let cgroups = match fs::read_dir(&links) {
        Ok(entries) => entries.filter_map(Result::ok).count(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
        Err(error) => return Err(io_error("listing", &links)(error)),
    };
    match fs::remove_dir_all(bpffs_dir) {
        Ok(()) => Ok(cgroups),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(cgroups),
        Err(error) => Err(io_error("removing", bpffs_dir)(error)),
    }
}

/// Whether the appliance's programs run for connections made in `cgroup`, attached there or
/// on an ancestor.
pub fn is_intercepted(cgroup: &Cgroup) -> Result<bool, CaptureError> {
    let dir = File::open(cgroup.path()).map_err(io_error("opening", cgroup.path()))?;
    let ids = sys::effective_program_ids(&dir, sys::ATTACH_INET4_CONNECT)
        .map_err(io_error("querying programs of", cgroup.path()))?;
    Ok(aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|info| ids.contains(&info.id()) && info.name_as_str() == Some("connect4")))
}

/// Capture plus the cgroups selected outside the API (the agents cgroup, `--cgroup`); keeps the
/// kernel's attachments equal to that selection plus the agents' cgroups, and, when containers
/// are served, their namespaces' host side equal to the namespaces of the selected processes.
pub struct CaptureControl {
    capture: Capture,
    base: Vec<Cgroup>,
    /// Cgroups this daemon has attached (or adopted) and not detached since.
    current: Vec<Cgroup>,
    containers: Option<containers::Containers>,
}

impl CaptureControl {
    /// Control over `capture`, always selecting `base`, serving containers when `containers`
    /// is set.
    pub fn new(
        mut capture: Capture,
        base: Vec<Cgroup>,
        containers: Option<containers::ContainerSettings>,
    ) -> Result<Self, containers::ContainerError> {
        let containers = containers
            .map(|settings| containers::Containers::start(settings, &mut capture))
            .transpose()?;
        Ok(Self {
            capture,
            base,
            current: Vec::new(),
            containers,
        })
    }

    /// Sets up newly appeared container namespaces of selected processes and tears down those
    /// that are gone; the daemon calls it periodically.
    pub fn refresh_containers(&mut self) -> Result<(), containers::ContainerError> {
        match &mut self.containers {
            Some(containers) => containers.reconcile(&mut self.capture, &self.current),
            None => Ok(()),
        }
    }

    /// The capture programs, for setup the daemon does once (the engine's listeners).
    pub fn capture_mut(&mut self) -> &mut Capture {
        &mut self.capture
    }

    /// Attaches to `base` and `extra` (those not attached yet), detaches every other cgroup.
    pub fn reconcile(&mut self, extra: &[Cgroup]) -> Result<(), CaptureError> {
        let mut wanted: Vec<Cgroup> = Vec::new();
        for cgroup in self.base.iter().chain(extra) {
            if !wanted.iter().any(|known| known.id() == cgroup.id()) {
                wanted.push(cgroup.clone());
            }
        }
        for cgroup in &wanted {
            if self
                .current
                .iter()
                .any(|current| current.id() == cgroup.id())
            {
                continue;
            }
            let outcome = self.capture.attach(cgroup)?;
            let action = match outcome {
                Attachment::Adopted => "adopted",
                Attachment::Attached => "attached",
            };
            tracing::info!(cgroup = %cgroup.path().display(), cgroup_id = cgroup.id().0, action, "cgroup intercepted");
        }
        for stale in self.capture.attached()? {
            if !wanted.iter().any(|cgroup| cgroup.id() == stale) {
                self.capture.detach(stale)?;
                tracing::info!(
                    cgroup_id = stale.0,
                    "detached a cgroup that is no longer selected"
                );
            }
        }
        self.current = wanted;
        Ok(())
    }

    /// How many cgroups are selected.
    pub fn selected(&self) -> usize {
        self.current.len()
    }

    /// What the eBPF programs refused or dropped since their maps were created, by reason
    /// (summed over CPUs); empty when the counters cannot be read.
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        use appliance_common::refusals;
        let pin = self.capture.layout.maps().join(map_names::REFUSED);
        let Ok(data) = aya::maps::MapData::from_pin(&pin) else {
            return Vec::new();
        };
        let Ok(counters) =
            aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(data))
        else {
            return Vec::new();
        };
        [
            ("foreign_namespace", refusals::FOREIGN_NAMESPACE),
            ("udp", refusals::UDP),
            ("unrecorded", refusals::UNRECORDED),
            ("guard", refusals::GUARD),
            ("private_listener", refusals::PRIVATE_LISTENER),
        ]
        .into_iter()
        .filter_map(|(reason, index)| {
            let per_cpu = counters.get(&index, 0).ok()?;
            Some((reason, per_cpu.iter().sum()))
        })
        .collect()
    }

    /// Entries in the capture's hash maps (records of connections, served namespaces and
    /// their sources), by map name; a map that cannot be read is left out.
    pub fn map_entries(&self) -> Vec<(&'static str, usize)> {
        use std::mem::size_of;
        [
            (map_names::SOCKETS, size_of::<u64>()),
            (
                map_names::ORIGINAL_DESTINATIONS,
                size_of::<appliance_common::ConnectionKey>(),
            ),
            (
                map_names::CLOSED_CONNECTIONS,
                size_of::<appliance_common::ConnectionKey>(),
            ),
            (map_names::FOREIGN_NAMESPACES, size_of::<u64>()),
            (map_names::COVERED_SOURCES, size_of::<CoveredSource>()),
            (map_names::GUARDED_SOURCES, size_of::<CoveredSource>()),
        ]
        .into_iter()
        .filter_map(|(name, key_size)| {
            let pin = self.capture.layout.maps().join(name);
            sys::count_keys(&pin, key_size)
                .map(|count| (name, count))
                .ok()
        })
        .collect()
    }

    /// Directories of the selected cgroups.
    pub fn selected_paths(&self) -> Vec<PathBuf> {
        self.current
            .iter()
            .map(|cgroup| cgroup.path().to_path_buf())
            .collect()
    }
}
