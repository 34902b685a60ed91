//! Capture: the eBPF programs that redirect selected cgroups' connections to the engine, and
//! their loader.
//!
//! Everything the kernel side holds is pinned under one bpffs directory:
//!
//! ```text
//! <bpffs_dir>/maps/<MAP>                 CONFIG, PORTS, SOCKETS, ORIG_DST
//! <bpffs_dir>/links/<cgroup id>/<prog>   one link per program and selected cgroup
//! ```
//!
//! Pinned links keep redirecting while the daemon is down: an intercepted connection then
//! finds no listener and fails, instead of bypassing the engine. A restarted daemon adopts the
//! pinned links by swapping its freshly loaded programs into them, so a cgroup never runs two
//! copies and is never without one.

pub mod cgroup;
mod origdst;
pub(crate) mod sys;

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use appliance_common::{map_names, CaptureConfig, FLAG_REFUSE_FOREIGN_NETNS, PROGRAM_NAMES};
use aya::maps::{Array, HashMap, MapError};
use aya::programs::{links::FdLink, CgroupAttachMode, Program, ProgramError};
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
    /// Refuse intercepted connections from other network namespaces instead of letting them
    /// go out unredirected.
    pub refuse_foreign_netns: bool,
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
                _ => unreachable!("the object only defines cgroup_sock_addr and sock_ops programs"),
            };
            loaded.map_err(program_error(name))?;
        }
        Ok(capture)
    }

    fn configure(&mut self, settings: &CaptureSettings) -> Result<(), CaptureError> {
        let netns_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_error("opening a socket on", Path::new("127.0.0.1")))?;
        let netns_cookie = sys::netns_cookie(netns_socket.as_fd()).map_err(io_error(
            "reading the network namespace cookie of",
            Path::new("127.0.0.1"),
        ))?;
        let config = CaptureConfig {
            netns_cookie,
            engine_ip6: crate::addr::to_kernel_words(settings.engine_v6.into()),
            engine_ip4: u32::from_ne_bytes(settings.engine_v4.octets()),
            engine_port: u32::from(settings.engine_port.to_be()),
            own_mark: settings.own_mark,
            flags: if settings.refuse_foreign_netns {
                FLAG_REFUSE_FOREIGN_NETNS
            } else {
                0
            },
        };
        let config_map = self
            .ebpf
            .map_mut(map_names::CONFIG)
            .ok_or(MapError::InvalidName {
                name: map_names::CONFIG.into(),
            })
            .map_err(map_error(map_names::CONFIG))?;
        let mut config_map: Array<_, CaptureConfig> =
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
            if pin.exists() {
                let program_fd = program.fd().map_err(program_error(name))?;
                let link = sys::open_pinned(&pin).map_err(io_error("opening pinned link", &pin))?;
                match sys::update_link_program(link.as_fd(), program_fd.as_fd()) {
                    Ok(()) => continue,
                    // A link whose cgroup went away cannot be updated: replace it.
                    Err(error) => {
                        tracing::warn!(pin = %pin.display(), %error, "replacing a pinned link that cannot be updated");
                        fs::remove_file(&pin).map_err(io_error("removing", &pin))?;
                    }
                }
            }
            outcome = Attachment::Attached;
            let link = attach_link(program, &cgroup_dir).map_err(program_error(name))?;
            link.pin(&pin).map_err(|error| CaptureError::Io {
                action: "pinning link at",
                path: pin.clone(),
                source: io::Error::other(error),
            })?;
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
        _ => unreachable!("the object only defines cgroup_sock_addr and sock_ops programs"),
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
/// kernel's attachments equal to that selection plus the agents' cgroups.
pub struct CaptureControl {
    capture: Capture,
    base: Vec<Cgroup>,
    /// Cgroups this daemon has attached (or adopted) and not detached since.
    current: Vec<CgroupId>,
}

impl CaptureControl {
    /// Control over `capture`, always selecting `base`.
    pub fn new(capture: Capture, base: Vec<Cgroup>) -> Self {
        Self {
            capture,
            base,
            current: Vec::new(),
        }
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
            if self.current.contains(&cgroup.id()) {
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
        self.current = wanted.iter().map(Cgroup::id).collect();
        Ok(())
    }

    /// How many cgroups are selected.
    pub fn selected(&self) -> usize {
        self.current.len()
    }
}
