//! Containers: the network namespaces that selected cgroups' processes live in, and the host
//! side that delivers their intercepted connections to the engine.
//!
//! Every served namespace gets the guard on its host-side veths: a tc program that drops
//! what the container's raw or packet sockets send to intercepted ports around the engine
//! (UDP always, TCP from any address but the container's own, and all of it under
//! `redirect`).
//!
//! For `tproxy` delivery each served namespace also gets, on the host:
//! - a policy rule per intercepted port and family that sends TCP from the container's host
//!   interface into a routing table whose only route is `local` (so the host accepts packets
//!   for any destination), narrowed by the container's addresses when the interface is a
//!   bridge other containers share;
//! - `COVERED` entries, so the sk_lookup program gives exactly that traffic to the engine;
//! - last, its `FOREIGN` entry, which delivers its connects as set up.
//!
//! Until then a namespace's connects go to the engine's container address, as `redirect`
//! delivers them: a container's first process may connect before the daemon has seen it. A
//! namespace that cannot be set up (no veth to the host) is refused by a `FOREIGN` entry of
//! its own.
//!
//! The guard comes first and `FOREIGN` last; teardown runs in the reverse order, so a
//! namespace is refused before anything it relies on goes away. Rules and routes are added and deleted through iproute2 (`ip`), with every
//! selector spelled out: a rule is only ever deleted as exactly the rule that was added.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::{Capture, CaptureError, Cgroup, ContainerSelection, CoveredTraffic, Delivery};

/// Errors while serving a container's namespace.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// `ip` could not be started.
    #[error("starting `ip` failed; the daemon needs iproute2 to serve containers")]
    IpMissing(#[source] io::Error),
    /// `ip` refused a command.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// What `ip` said.
        stderr: String,
    },
    /// `ip -j` printed something that is not the JSON it documents.
    #[error("reading the output of `ip {args}` failed")]
    IpOutput {
        /// The arguments.
        args: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A container's namespace could not be entered or inspected.
    #[error("inspecting the network namespace of pid {pid} failed")]
    Namespace {
        /// A process in the namespace.
        pid: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The namespace has no interface whose peer is on the host (no veth: `--network none`,
    /// rootless slirp/pasta, or a bare `unshare -n`): nothing the host could deliver.
    #[error("the network namespace of pid {pid} has no veth to the host; it stays refused")]
    NoHostInterface {
        /// A process in the namespace.
        pid: u32,
    },
    /// The eBPF maps refused an update.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// How the daemon serves containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSettings {
    /// How their connections reach the engine.
    pub delivery: Delivery,
    /// Whether a namespace is captured whole or only its selected cgroups.
    pub selection: ContainerSelection,
    /// Mark bits of selected cgroups' packets under [`ContainerSelection::Cgroups`], which
    /// the policy rules match.
    pub mark: u32,
    /// Routing table holding the `local` routes of `tproxy` delivery.
    pub routing_table: u32,
    /// Preference of the policy rules (must sort before `main`, 32766).
    pub rule_preference: u32,
    /// Intercepted destination ports.
    pub ports: Vec<u16>,
    /// How often the daemon looks at the selected cgroups' namespaces without being told
    /// (link and cgroup events make it look at once): for what no event announces,
    /// such as a process joining an already populated cgroup.
    pub rescan: std::time::Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Self::V4 => "-4",
            Self::V6 => "-6",
        }
    }

    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    fn local_default(self) -> &'static str {
        match self {
            Self::V4 => "0.0.0.0/0",
            Self::V6 => "::/0",
        }
    }
}

/// One policy rule, with every selector it was added with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rule {
    family: Family,
    interface: String,
    source: Option<IpAddr>,
    /// Matched as `fwmark M/M`: only the selected cgroups' packets, which the guard marked.
    mark: Option<u32>,
    port: u16,
}

impl Rule {
    fn args(&self, action: &str, settings: &ContainerSettings) -> Vec<String> {
        let mut args = vec![
            self.family.flag().to_owned(),
            "rule".into(),
            action.into(),
            "pref".into(),
            settings.rule_preference.to_string(),
            "iif".into(),
            self.interface.clone(),
        ];
        if let Some(source) = self.source {
            // As `ip rule show` spells it, so that a rule shown compares equal to ours.
            args.extend(["from".into(), host_prefix(source)]);
        }
        if let Some(mark) = self.mark {
            args.extend(["fwmark".into(), format!("{mark:#x}/{mark:#x}")]);
        }
        args.extend([
            "ipproto".into(),
            "tcp".into(),
            "dport".into(),
            self.port.to_string(),
            "lookup".into(),
            settings.routing_table.to_string(),
        ]);
        args
    }
}

/// A container's host-side veth with the guard on it.
#[derive(Debug)]
struct Guarded {
    interface: String,
    ifindex: u32,
    /// What may send TCP to intercepted ports through it.
    allowed: Vec<CoveredTraffic>,
}

/// A namespace the daemon serves.
#[derive(Debug)]
struct Served {
    cookie: u64,
    /// Host-side interfaces the namespace's traffic arrives on; when one disappears the
    /// namespace is torn down (and refused) until it is set up again.
    host_interfaces: BTreeSet<u32>,
    guarded: Vec<Guarded>,
    rules: Vec<Rule>,
    covered: Vec<CoveredTraffic>,
}

/// The foreign namespaces of selected cgroups, and what the daemon set up for them.
pub struct Containers {
    settings: ContainerSettings,
    own_netns: u64,
    /// By namespace inode.
    served: HashMap<u64, Served>,
    /// Namespaces that could not be set up: they are retried (a runtime may add the veth
    /// after the first process), and logged again only when the reason changes.
    unservable: HashMap<u64, Unservable>,
    /// Whether an earlier daemon's policy rules (and routes) may still be in place: the first
    /// reconcile removes those it did not set up again.
    predecessors_rules: bool,
}

/// A namespace that could not be set up.
struct Unservable {
    /// The reason last logged.
    reason: String,
    /// Its cookie, once read: its connects are refused under it (`FOREIGN`), rather than
    /// sent to a container address it cannot reach or that leads elsewhere (slirp, pasta).
    refused: Option<u64>,
}

impl Containers {
    /// Takes over the host side: removes what an earlier daemon left (rules with our
    /// preference and table, `FOREIGN` and `COVERED` entries), so every namespace's connects
    /// go to the engine's container address until this daemon has set it up again.
    pub fn start(
        settings: ContainerSettings,
        capture: &mut Capture,
    ) -> Result<Self, ContainerError> {
        let own_netns = namespace_inode(Path::new("/proc/self/ns/net")).map_err(|source| {
            ContainerError::Namespace {
                pid: std::process::id(),
                source,
            }
        })?;
        capture.uncover_all()?;
        // An earlier daemon's policy rules stay until the first reconcile has set up the
        // namespaces again: without them a process outside the selected cgroups of a served
        // namespace would go out directly meanwhile (with them, and no COVERED entry yet, its
        // connection is refused).
        if settings.delivery == Delivery::Tproxy {
            for family in [Family::V4, Family::V6] {
                ip(&[
                    family.flag(),
                    "route",
                    "replace",
                    "local",
                    family.local_default(),
                    "dev",
                    "lo",
                    "table",
                    &settings.routing_table.to_string(),
                ])?;
            }
        }
        Ok(Self {
            settings,
            own_netns,
            served: HashMap::new(),
            unservable: HashMap::new(),
            predecessors_rules: true,
        })
    }

    /// Serves the foreign namespaces of processes in `selected` (and their descendants) and
    /// stops serving namespaces that are gone or whose host interface disappeared. A
    /// namespace that cannot be set up is logged and stays refused.
    pub fn reconcile(
        &mut self,
        capture: &mut Capture,
        selected: &[Cgroup],
    ) -> Result<(), ContainerError> {
        let wanted = foreign_namespaces(selected, self.own_netns);
        let gone: Vec<u64> = self
            .unservable
            .keys()
            .filter(|inode| !wanted.contains_key(inode))
            .copied()
            .collect();
        for inode in gone {
            if let Some(cookie) = self.unservable.remove(&inode).and_then(|gone| gone.refused) {
                capture.forget_refused(cookie)?;
            }
        }
        let host_links = host_links()?;
        let stale: Vec<u64> = self
            .served
            .iter()
            .filter(|(inode, served)| {
                !wanted.contains_key(inode)
                    || served
                        .host_interfaces
                        .iter()
                        .any(|index| !host_links.iter().any(|link| link.ifindex == *index))
            })
            .map(|(inode, _)| *inode)
            .collect();
        for inode in stale {
            if let Some(served) = self.served.remove(&inode) {
                tear_down(&self.settings, capture, &served)?;
                tracing::info!(
                    event = "container_released",
                    netns_cookie = served.cookie,
                    "stopped serving a container network namespace"
                );
            }
        }
        for (inode, pid) in wanted {
            if self.served.contains_key(&inode) {
                continue;
            }
            let inside = inspect_namespace(pid);
            let cookie = inside.as_ref().ok().map(|inside| inside.cookie);
            match inside.and_then(|inside| self.set_up(capture, pid, inside, &host_links)) {
                Ok(served) => {
                    tracing::info!(
                        event = "container_served",
                        netns_cookie = served.cookie,
                        pid,
                        delivery = ?self.settings.delivery,
                        interfaces = ?served.host_interfaces,
                        "serving a container network namespace"
                    );
                    self.served.insert(inode, served);
                    self.unservable.remove(&inode);
                }
                Err(error) => {
                    let reason = error_chain(&error);
                    if let Some(cookie) = cookie {
                        capture.refuse(cookie)?;
                    }
                    if self.unservable.get(&inode).map(|known| &known.reason) != Some(&reason) {
                        tracing::warn!(
                            pid,
                            error = %reason,
                            "cannot serve a container network namespace; its intercepted connections stay refused"
                        );
                    }
                    self.unservable.insert(
                        inode,
                        Unservable {
                            reason,
                            refused: cookie,
                        },
                    );
                }
            }
        }
        if std::mem::take(&mut self.predecessors_rules) {
            let ours: Vec<Vec<String>> = self
                .served
                .values()
                .flat_map(|served| served.rules.iter())
                .map(|rule| rule.args("del", &self.settings))
                .collect();
            remove_rules_except(
                self.settings.routing_table,
                self.settings.rule_preference,
                &ours,
            )?;
            if self.settings.delivery != Delivery::Tproxy {
                remove_local_routes(self.settings.routing_table)?;
            }
        }
        // Last, so that a restarted daemon's guards stay on until it serves their containers
        // again: remove those an earlier daemon left on veths no served namespace has now.
        for ifindex in capture.guarded_interfaces()? {
            let in_use = self
                .served
                .values()
                .any(|served| served.guarded.iter().any(|guard| guard.ifindex == ifindex));
            if !in_use {
                capture.unguard(ifindex)?;
            }
        }
        Ok(())
    }

    fn set_up(
        &self,
        capture: &mut Capture,
        pid: u32,
        inside: Inside,
        host_links: &[Link],
    ) -> Result<Served, ContainerError> {
        let mut served = Served {
            cookie: inside.cookie,
            host_interfaces: BTreeSet::new(),
            guarded: Vec::new(),
            rules: Vec::new(),
            covered: Vec::new(),
        };
        for link in inside.links.iter().filter(|link| link.link_index.is_some()) {
            let Some(peer) = host_links
                .iter()
                .find(|host| Some(host.ifindex) == link.link_index)
            else {
                continue;
            };
            served.host_interfaces.insert(peer.ifindex);
            let bridge = peer
                .master
                .as_deref()
                .and_then(|master| host_links.iter().find(|host| host.ifname == master));
            let addresses: Vec<IpAddr> = link
                .addr_info
                .iter()
                .filter(|address| address.scope == "global")
                .filter_map(|address| address.local.parse().ok())
                .collect();
            let mut guard = Guarded {
                interface: peer.ifname.clone(),
                ifindex: peer.ifindex,
                allowed: Vec::new(),
            };
            match bridge {
                // Other containers share the bridge: only this one's addresses are covered.
                Some(bridge) => {
                    served.host_interfaces.insert(bridge.ifindex);
                    for &source in &addresses {
                        guard.allowed.push(CoveredTraffic {
                            ifindex: peer.ifindex,
                            source: Some(source),
                        });
                        served.covered.push(CoveredTraffic {
                            ifindex: bridge.ifindex,
                            source: Some(source),
                        });
                        for &port in &self.settings.ports {
                            served.rules.push(Rule {
                                family: Family::of(source),
                                interface: bridge.ifname.clone(),
                                source: Some(source),
                                mark: self.rule_mark(),
                                port,
                            });
                        }
                    }
                }
                // A routed veth serves this container alone: cover all of it, whatever
                // source address a raw socket writes.
                None => {
                    let whole_interface = CoveredTraffic {
                        ifindex: peer.ifindex,
                        source: None,
                    };
                    guard.allowed.push(whole_interface);
                    served.covered.push(whole_interface);
                    for family in [Family::V4, Family::V6] {
                        for &port in &self.settings.ports {
                            served.rules.push(Rule {
                                family,
                                interface: peer.ifname.clone(),
                                source: None,
                                mark: self.rule_mark(),
                                port,
                            });
                        }
                    }
                }
            }
            served.guarded.push(guard);
        }
        if served.host_interfaces.is_empty() {
            return Err(ContainerError::NoHostInterface { pid });
        }
        if self.settings.delivery == Delivery::Redirect {
            // Redirected connects go to the engine's container address; the host needs no
            // rule and the sk_lookup program no coverage. A whole namespace may send nothing
            // to an intercepted port directly.
            served.rules.clear();
            served.covered.clear();
            if self.settings.selection == ContainerSelection::Namespace {
                for guard in &mut served.guarded {
                    guard.allowed.clear();
                }
            }
        }
        let selection = self.settings.selection;
        let guarded = served.guarded.iter().try_for_each(|guard| {
            capture.guard(&guard.interface, guard.ifindex, &guard.allowed, selection)
        });
        let set_up = guarded
            .map_err(ContainerError::from)
            .and_then(|()| self.add_rules(&served.rules))
            .and_then(|()| {
                capture
                    .cover(served.cookie, self.settings.delivery, &served.covered)
                    .map_err(ContainerError::from)
            });
        if let Err(error) = set_up {
            let _ = tear_down(&self.settings, capture, &served);
            return Err(error);
        }
        Ok(served)
    }

    /// The mark the rules match: only when a namespace is captured per cgroup.
    fn rule_mark(&self) -> Option<u32> {
        (self.settings.selection == ContainerSelection::Cgroups).then_some(self.settings.mark)
    }

    fn add_rules(&self, rules: &[Rule]) -> Result<(), ContainerError> {
        for rule in rules {
            // An earlier daemon's identical rule is as good as a new one.
            ip_unless(&rule.args("add", &self.settings), &["File exists"])?;
        }
        Ok(())
    }
}

fn tear_down(
    settings: &ContainerSettings,
    capture: &mut Capture,
    served: &Served,
) -> Result<(), ContainerError> {
    capture.uncover(served.cookie, &served.covered)?;
    for rule in &served.rules {
        ip_unless(&rule.args("del", settings), &["No such file"])?;
    }
    for guard in &served.guarded {
        capture.unguard(guard.ifindex)?;
    }
    Ok(())
}

/// Removes every rule with `preference` that looks up `table`, each deleted with the full set
/// of selectors it has, then the table's `local` default routes. Used at start, at stop and
/// by `--detach-all`.
pub fn remove_host_side(table: u32, preference: u32) -> Result<(), ContainerError> {
    remove_rules_except(table, preference, &[])?;
    remove_local_routes(table)
}

/// Removes every rule with `preference` that looks up `table`, each deleted with the full set
/// of selectors it has, but those whose deletion would be one of `keep` (as
/// [`Rule::args`] spells them for `del`).
fn remove_rules_except(
    table: u32,
    preference: u32,
    keep: &[Vec<String>],
) -> Result<(), ContainerError> {
    #[derive(Deserialize)]
    struct ShownRule {
        table: Option<String>,
        iif: Option<String>,
        src: Option<String>,
        srclen: Option<u8>,
        fwmark: Option<String>,
        fwmask: Option<String>,
        ipproto: Option<String>,
        dport: Option<u16>,
    }
    let table_text = table.to_string();
    let preference_text = preference.to_string();
    for family in [Family::V4, Family::V6] {
        let shown = ip(&[
            family.flag(),
            "-j",
            "rule",
            "show",
            "pref",
            &preference_text,
        ])?;
        let rules: Vec<ShownRule> = parse_json(&shown, "rule show")?;
        for rule in rules
            .into_iter()
            .filter(|rule| rule.table.as_deref() == Some(&table_text))
        {
            let mut args: Vec<String> = [family.flag(), "rule", "del", "pref", &preference_text]
                .map(String::from)
                .to_vec();
            if let Some(iif) = rule.iif {
                args.extend(["iif".into(), iif]);
            }
            // `ip -j` leaves the length out for a single address, and shows no source as
            // `all`.
            if let Some(src) = rule.src.filter(|src| src != "all") {
                let len = rule
                    .srclen
                    .unwrap_or(if src.contains(':') { 128 } else { 32 });
                args.extend(["from".into(), format!("{src}/{len}")]);
            }
            if let Some(mark) = rule.fwmark {
                let mask = rule
                    .fwmask
                    .map(|mask| format!("/{mask}"))
                    .unwrap_or_default();
                args.extend(["fwmark".into(), format!("{mark}{mask}")]);
            }
            if let Some(proto) = rule.ipproto {
                args.extend(["ipproto".into(), proto]);
            }
            if let Some(port) = rule.dport {
                args.extend(["dport".into(), port.to_string()]);
            }
            args.extend(["lookup".into(), table_text.clone()]);
            if !keep.contains(&args) {
                ip(&args)?;
            }
        }
    }
    Ok(())
}

/// Removes the `local` default routes of `table`, both families.
fn remove_local_routes(table: u32) -> Result<(), ContainerError> {
    let table_text = table.to_string();
    for family in [Family::V4, Family::V6] {
        let route = [
            family.flag(),
            "route",
            "del",
            "local",
            family.local_default(),
            "dev",
            "lo",
            "table",
            &table_text,
        ];
        ip_unless(
            &route,
            &[
                "No such process",
                "No such file",
                "not found",
                "does not exist",
            ],
        )?;
    }
    Ok(())
}

/// Gives `lo` the engine's container addresses (`redirect` delivery), so the engine can listen
/// on them and containers reach them through their default route to the host.
pub fn add_engine_addresses(addresses: &[IpAddr]) -> Result<(), ContainerError> {
    let present = loopback_addresses()?;
    for address in addresses
        .iter()
        .filter(|address| !present.contains(address))
    {
        let prefix = host_prefix(*address);
        let mut args = vec![
            Family::of(*address).flag(),
            "addr",
            "add",
            &prefix,
            "dev",
            "lo",
        ];
        if address.is_ipv6() {
            // Duplicate address detection would keep the address unusable for a while.
            args.push("nodad");
        }
        ip(&args)?;
    }
    Ok(())
}

/// Removes what [`add_engine_addresses`] added.
pub fn remove_engine_addresses(addresses: &[IpAddr]) -> Result<(), ContainerError> {
    let present = loopback_addresses()?;
    for address in addresses.iter().filter(|address| present.contains(address)) {
        let prefix = host_prefix(*address);
        ip(&[
            Family::of(*address).flag(),
            "addr",
            "del",
            &prefix,
            "dev",
            "lo",
        ])?;
    }
    Ok(())
}

fn host_prefix(address: IpAddr) -> String {
    format!("{address}/{}", if address.is_ipv4() { 32 } else { 128 })
}

fn loopback_addresses() -> Result<Vec<IpAddr>, ContainerError> {
    let links: Vec<Link> = parse_json(&ip(&["-j", "addr", "show", "dev", "lo"])?, "addr show")?;
    Ok(links
        .iter()
        .flat_map(|link| &link.addr_info)
        .filter_map(|address| address.local.parse().ok())
        .collect())
}

/// The container a process runs in, named by its cgroup: the systemd scope
/// (`docker-<id>.scope`, `libpod-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `machine-<name>.scope`) or, under the cgroupfs manager, `libpod-<id>` and `docker/<id>`.
/// The deepest match wins: a pod's container lies below the pod's slice.
pub fn container_unit(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    container_unit_of(path)
}

fn container_unit_of(cgroup_path: &str) -> Option<String> {
    const RUNTIMES: [&str; 5] = ["docker-", "libpod-", "cri-containerd-", "crio-", "machine-"];
    let components: Vec<&str> = cgroup_path.split('/').collect();
    components
        .iter()
        .enumerate()
        .rev()
        .find_map(|(index, component)| {
            let runtime = RUNTIMES.iter().any(|prefix| component.starts_with(prefix))
                && !component.starts_with("libpod-conmon-");
            if runtime && (component.ends_with(".scope") || component.starts_with("libpod-")) {
                return Some((*component).to_owned());
            }
            let is_id = component.len() == 64 && component.bytes().all(|b| b.is_ascii_hexdigit());
            (is_id && index > 0 && components[index - 1] == "docker")
                .then(|| format!("docker/{component}"))
        })
}

#[derive(Debug, Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    master: Option<String>,
    /// Peer interface index (in another namespace for a veth).
    #[serde(default)]
    link_index: Option<u32>,
    #[serde(default)]
    addr_info: Vec<Address>,
}

#[derive(Debug, Deserialize)]
struct Address {
    local: String,
    scope: String,
}

struct Inside {
    cookie: u64,
    links: Vec<Link>,
}

/// Enters the network namespace of `pid` on a thread of its own (the namespace is per
/// thread, and the thread ends with it) and reads its cookie and interfaces there.
fn inspect_namespace(pid: u32) -> Result<Inside, ContainerError> {
    let namespace_error = move |source| ContainerError::Namespace { pid, source };
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let namespace = fs::File::open(&path).map_err(namespace_error)?;
    std::thread::spawn(move || {
        // SAFETY: setns(2) on an open namespace file; it changes only this thread.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(namespace_error(io::Error::last_os_error()));
        }
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let socket =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if socket < 0 {
            return Err(namespace_error(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(socket) };
        let cookie = super::sys::netns_cookie(socket.as_fd()).map_err(namespace_error)?;
        // A child started from this thread inherits its namespace.
        let shown = ip(&["-j", "addr", "show"])?;
        Ok(Inside {
            cookie,
            links: parse_json(&shown, "addr show")?,
        })
    })
    .join()
    .unwrap_or_else(|_| {
        Err(namespace_error(io::Error::other(
            "the namespace inspection thread panicked",
        )))
    })
}

fn host_links() -> Result<Vec<Link>, ContainerError> {
    parse_json(&ip(&["-j", "link", "show"])?, "link show")
}

fn namespace_inode(path: &Path) -> io::Result<u64> {
    fs::metadata(path).map(|meta| meta.ino())
}

/// Foreign namespaces of processes in `selected` and below: namespace inode → one pid in it.
fn foreign_namespaces(selected: &[Cgroup], own_netns: u64) -> HashMap<u64, u32> {
    let mut found = HashMap::new();
    let mut pending: Vec<PathBuf> = selected.iter().map(|cgroup| cgroup.path().into()).collect();
    while let Some(dir) = pending.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|line| line.parse::<u32>().ok()) {
                let Ok(inode) = namespace_inode(Path::new(&format!("/proc/{pid}/ns/net"))) else {
                    continue;
                };
                if inode != own_netns {
                    found.entry(inode).or_insert(pid);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            pending.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    found
}

fn ip<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<String, ContainerError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(ContainerError::IpMissing)?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        Err(ContainerError::Ip {
            args: args
                .iter()
                .map(|arg| arg.as_ref().to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            stderr: text(&output.stderr),
        })
    }
}

/// Runs `ip`, taking a failure whose message contains one of `harmless` as success: the state
/// the command asked for is already there.
fn ip_unless<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    harmless: &[&str],
) -> Result<(), ContainerError> {
    match ip(args) {
        Ok(_) => Ok(()),
        Err(ContainerError::Ip { stderr, .. })
            if harmless.iter().any(|message| stderr.contains(message)) =>
        {
            Ok(())
        }
        Err(error) => Err(error),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &str,
) -> Result<Vec<T>, ContainerError> {
    // Some `ip -j` listings print nothing at all when they are empty.
    if text.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|source| ContainerError::IpOutput {
        args: format!("-j {what}"),
        source,
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_units_are_recognised_from_their_cgroup_path() {
        assert_eq!(
            container_unit_of("/system.slice/docker-4f3a.scope").as_deref(),
            Some("docker-4f3a.scope")
        );
        assert_eq!(
            container_unit_of("/machine.slice/libpod-9b1c.scope/container").as_deref(),
            Some("libpod-9b1c.scope")
        );
        assert_eq!(
            container_unit_of(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-77aa.scope"
            )
            .as_deref(),
            Some("cri-containerd-77aa.scope")
        );
        assert_eq!(
            container_unit_of("/machine.slice/libpod-conmon-9b1c.scope"),
            None
        );
        assert_eq!(container_unit_of("/user.slice/session-3.scope"), None);
    }

    #[test]
    fn rules_are_spelled_with_every_selector() {
        let settings = ContainerSettings {
            delivery: Delivery::Tproxy,
            selection: ContainerSelection::Cgroups,
            mark: 0x0100_0000,
            routing_table: 1500,
            rule_preference: 1501,
            ports: vec![443],
            rescan: std::time::Duration::from_secs(5),
        };
        let rule = Rule {
            family: Family::V6,
            interface: "br0".into(),
            source: Some("fd00::2".parse().unwrap()),
            mark: Some(0x0100_0000),
            port: 443,
        };
        assert_eq!(
            rule.args("del", &settings).join(" "),
            "-6 rule del pref 1501 iif br0 from fd00::2/128 fwmark 0x1000000/0x1000000 ipproto tcp dport 443 lookup 1500"
        );
    }
}
