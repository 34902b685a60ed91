//! Containers, end to end on the real kernel: hand-built containers (network namespaces with
//! veths, on a Linux bridge and on a routed veth) whose cgroups are selected get their
//! secrets injected by a daemon that serves their namespaces, while an unselected container
//! on the same bridge goes straight to the "internet", itself a namespace holding fake
//! external addresses chosen at run time.

mod common;
mod https;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use https::{Ca, Upstream};
use serde_json::Value;

const HOST: &str = "api.openai.com";
const REAL: &str = "sk-proj-REAL-CONTAINER";

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) -> String {
    let output = test_command("ip").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `ip ARGS` for teardown: failures are ignored, the object may be gone already.
fn ip_quiet(args: &[&str]) {
    let _ = test_command("ip").args(args).output();
}

fn routes(family: &str) -> Vec<Value> {
    serde_json::from_str(&ip(&[family, "-j", "route", "show", "table", "all"])).unwrap()
}

/// Whether any route but a default one overlaps `prefix/len`: test addresses must be
/// unused, or a test packet could reach a real network.
fn prefix_in_use(prefix: IpAddr, len: u32) -> bool {
    let family = if prefix.is_ipv4() { "-4" } else { "-6" };
    let bits = |ip: IpAddr| -> (u128, u32) {
        match ip {
            IpAddr::V4(ip) => (u128::from(u32::from(ip)) << 96, 32),
            IpAddr::V6(ip) => (u128::from(ip), 128),
        }
    };
    let (wanted, width) = bits(prefix);
    routes(family).iter().any(|route| {
        let Some(dst) = route["dst"].as_str() else {
            return false;
        };
        if dst == "default" {
            return false;
        }
        let (address, length) = dst.split_once('/').unwrap_or((dst, ""));
        let Ok(address) = address.parse::<IpAddr>() else {
            return false;
        };
        let length: u32 = length.parse().unwrap_or(width);
        let (other, _) = bits(address);
        let common = 128 - width + length.min(len);
        let mask = if common == 0 {
            0
        } else {
            u128::MAX << (128 - common)
        };
        wanted & mask == other & mask
    })
}

/// Addresses of one test network: `10.<n>.0.0/16` and `fd7a:<n>::/48`, unused on this host.
#[derive(Clone, Copy)]
struct Plan {
    n: u8,
}

impl Plan {
    fn choose(slot: u8) -> Self {
        (0..50u8)
            .map(|offset| 200 + (slot + offset) % 50)
            .map(|n| Self { n })
            .find(|plan| {
                !prefix_in_use(IpAddr::V4(Ipv4Addr::new(10, plan.n, 0, 0)), 16)
                    && !prefix_in_use(plan.v6(0, 0), 48)
            })
            .expect("no unused 10.2xx.0.0/16 for the test network")
    }

    fn v4(self, subnet: u8, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, self.n, subnet, host))
    }

    fn v6(self, subnet: u16, host: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd7a,
            u16::from(self.n),
            0,
            subnet,
            0,
            0,
            0,
            host,
        ))
    }
}

/// A network namespace with one veth to the host (or none), in a cgroup of its own.
struct Container {
    netns: String,
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
    host_side: Option<String>,
}

impl Container {
    /// A container with a veth to the host named `host_side`, at host `host` of subnet
    /// `subnet` in both families.
    fn with_veth(netns: String, plan: Plan, (subnet, host): (u8, u8), host_side: String) -> Self {
        Self {
            netns,
            v4: Some(plan.v4(subnet, host)),
            v6: Some(plan.v6(u16::from(subnet), u16::from(host))),
            host_side: Some(host_side),
        }
    }

    /// The container's address in the family of `other`.
    fn v4_or_v6(&self, other: IpAddr) -> IpAddr {
        if other.is_ipv4() { self.v4 } else { self.v6 }.unwrap()
    }

    /// A command run inside the container, by a process in `cgroup`.
    fn command(&self, cgroup: &Path, program: &str) -> Command {
        let mut command = command_in_cgroup(cgroup, "ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// The container's network namespace cookie, as its own sockets report it.
    fn netns_cookie(&self) -> u64 {
        let output = test_command("ip")
            .args(["netns", "exec", &self.netns, "/usr/bin/python3", "-c"])
            .arg("import socket; s = socket.socket(); print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

/// The test network: a bridge with containers A (selected) and B (not), a routed-veth
/// container C (selected), a namespace D without any veth (selected), and an upstream
/// namespace U holding the fake external addresses. Everything is removed on drop.
struct Network {
    plan: Plan,
    prefix: String,
    bridge: String,
    a: Container,
    b: Container,
    c: Container,
    d: Container,
    upstream_netns: String,
    upstream_link: String,
    external_v4: IpAddr,
    external_v6: IpAddr,
    routes: Vec<Vec<String>>,
}

impl Network {
    fn build(slot: u8) -> Self {
        let plan = Plan::choose(slot);
        // Interface names are limited to 15 bytes.
        let prefix = format!("ap{}s{slot}", std::process::id() % 100_000);
        let netns = |name: &str| format!("{}-{name}", unique(slot, "netns"));
        let mut network = Self {
            plan,
            bridge: format!("{prefix}br"),
            a: Container::with_veth(netns("a"), plan, (1, 2), format!("{prefix}a")),
            b: Container::with_veth(netns("b"), plan, (1, 3), format!("{prefix}b")),
            c: Container::with_veth(netns("c"), plan, (2, 2), format!("{prefix}c")),
            d: Container {
                netns: netns("d"),
                v4: None,
                v6: None,
                host_side: None,
            },
            upstream_netns: netns("u"),
            upstream_link: format!("{prefix}u"),
            external_v4: plan.v4(9, 10),
            external_v6: plan.v6(9, 10),
            routes: Vec::new(),
            prefix,
        };
        network.create();
        network
    }

    fn create(&mut self) {
        let plan = self.plan;
        ip(&["link", "add", &self.bridge, "type", "bridge"]);
        ip(&["link", "set", &self.bridge, "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", plan.v4(1, 1)),
            "dev",
            &self.bridge,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/64", plan.v6(1, 1)),
            "dev",
            &self.bridge,
            "nodad",
        ]);
        for container in [&self.a, &self.b] {
            self.add_container(container, Some(&self.bridge), plan.v4(1, 1), plan.v6(1, 1));
        }
        // C: a routed veth, the host side holds the gateway addresses.
        let c_host = self.c.host_side.clone().unwrap();
        self.add_container(&self.c, None, plan.v4(2, 1), plan.v6(2, 1));
        ip(&[
            "addr",
            "add",
            &format!("{}/30", plan.v4(2, 1)),
            "dev",
            &c_host,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/64", plan.v6(2, 1)),
            "dev",
            &c_host,
            "nodad",
        ]);
        ip(&["netns", "add", &self.d.netns]);
        ip(&["-n", &self.d.netns, "link", "set", "lo", "up"]);

        // U: the "internet", reached through its own veth.
        let u = &self.upstream_netns;
        ip(&["netns", "add", u]);
        ip(&[
            "link",
            "add",
            &self.upstream_link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            u,
        ]);
        ip(&["link", "set", &self.upstream_link, "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", plan.v4(3, 1)),
            "dev",
            &self.upstream_link,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/64", plan.v6(3, 1)),
            "dev",
            &self.upstream_link,
            "nodad",
        ]);
        ip(&["-n", u, "link", "set", "lo", "up"]);
        ip(&["-n", u, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            u,
            "addr",
            "add",
            &format!("{}/30", plan.v4(3, 2)),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            u,
            "addr",
            "add",
            &format!("{}/64", plan.v6(3, 2)),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&[
            "-n",
            u,
            "addr",
            "add",
            &format!("{}/32", self.external_v4),
            "dev",
            "lo",
        ]);
        ip(&[
            "-n",
            u,
            "addr",
            "add",
            &format!("{}/128", self.external_v6),
            "dev",
            "lo",
            "nodad",
        ]);
        ip(&[
            "-n",
            u,
            "route",
            "add",
            "default",
            "via",
            &plan.v4(3, 1).to_string(),
        ]);
        ip(&[
            "-n",
            u,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &plan.v6(3, 1).to_string(),
        ]);
        for (external, gateway) in [
            (format!("{}/32", self.external_v4), plan.v4(3, 2)),
            (format!("{}/128", self.external_v6), plan.v6(3, 2)),
        ] {
            let route: Vec<String> = [
                "route".to_owned(),
                "add".into(),
                external,
                "via".into(),
                gateway.to_string(),
                "dev".into(),
                self.upstream_link.clone(),
            ]
            .to_vec();
            ip(&route.iter().map(String::as_str).collect::<Vec<_>>());
            self.routes.push(route);
        }
        for external in [self.external_v4, self.external_v6] {
            let resolved = ip(&["route", "get", &external.to_string()]);
            assert!(
                resolved.contains(&self.upstream_link),
                "{external} does not resolve through the test's veth: {resolved}"
            );
        }
        // Unselected traffic (B) is forwarded by the host; only the test's own interfaces
        // forward, and they disappear with the test.
        for interface in [&self.bridge, &self.upstream_link] {
            for (family, key) in [("ipv4", "forwarding"), ("ipv6", "force_forwarding")] {
                let path = format!("/proc/sys/net/{family}/conf/{interface}/{key}");
                if Path::new(&path).exists() {
                    fs::write(&path, "1").unwrap();
                }
            }
        }
    }

    fn add_container(
        &self,
        container: &Container,
        bridge: Option<&str>,
        gateway_v4: IpAddr,
        gateway_v6: IpAddr,
    ) {
        let host_side = container.host_side.as_deref().unwrap();
        let netns = &container.netns;
        ip(&["netns", "add", netns]);
        ip(&[
            "link", "add", host_side, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ]);
        if let Some(bridge) = bridge {
            ip(&["link", "set", host_side, "master", bridge]);
        }
        ip(&["link", "set", host_side, "up"]);
        ip(&["-n", netns, "link", "set", "lo", "up"]);
        ip(&["-n", netns, "link", "set", "eth0", "up"]);
        let v4_len = if bridge.is_some() { 24 } else { 30 };
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{}/{v4_len}", container.v4.unwrap()),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{}/64", container.v6.unwrap()),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &gateway_v4.to_string(),
        ]);
        ip(&[
            "-n",
            netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway_v6.to_string(),
        ]);
    }

    /// Starts the TLS upstream on the fake external addresses, inside U.
    fn start_upstream(&self, ca: &Ca) -> Vec<Upstream> {
        let namespace = fs::File::open(format!("/run/netns/{}", self.upstream_netns)).unwrap();
        let addresses = [self.external_v4, self.external_v6];
        // The upstream's threads are made by a thread inside U, so its sockets live there.
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns(2) on an open namespace file changes only this thread.
                    assert_eq!(
                        unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) },
                        0,
                        "setns: {}",
                        std::io::Error::last_os_error()
                    );
                    addresses
                        .iter()
                        .map(|&address| {
                            Upstream::start_in_background(
                                SocketAddr::new(address, 443),
                                &[(HOST, ca)],
                            )
                        })
                        .collect()
                })
                .join()
                .unwrap()
        })
    }

    /// Removes container A's veth, as a container runtime does when it stops one.
    fn stop_container_a(&self) {
        ip(&["link", "del", self.a.host_side.as_deref().unwrap()]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for route in &self.routes {
            let mut delete = route.clone();
            delete[1] = "del".into();
            ip_quiet(&delete.iter().map(String::as_str).collect::<Vec<_>>());
        }
        for container in [&self.a, &self.b, &self.c, &self.d] {
            if let Some(host_side) = &container.host_side {
                ip_quiet(&["link", "del", host_side]);
            }
            ip_quiet(&["netns", "del", &container.netns]);
        }
        ip_quiet(&["link", "del", &self.upstream_link]);
        ip_quiet(&["netns", "del", &self.upstream_netns]);
        ip_quiet(&["link", "del", &self.bridge]);
        let left: Vec<String> = ip(&["-j", "link", "show"])
            .split('"')
            .filter(|name| name.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect();
        if !std::thread::panicking() {
            assert!(left.is_empty(), "links left behind: {left:?}");
        }
    }
}

/// Python that sends one packet to port 443 of `dst` from `src` the way a container with
/// `CAP_NET_RAW` can: `syn`, a TCP SYN written on a raw socket (so no connect hook runs),
/// with any source address; `udp`, a datagram from an ordinary socket bound to `src`.
const RAW_PROBE: &str = r#"
import socket, struct, sys
kind, src, dst = sys.argv[1:4]
v6 = ":" in dst
if kind == "udp":
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.sendto(b"quic?", (dst, 443))
    sys.exit(0)
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
family = socket.AF_INET6 if v6 else socket.AF_INET
source, destination = socket.inet_pton(family, src), socket.inet_pton(family, dst)
segment = struct.pack("!HHIIBBHHH", 40443, 443, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
if v6:
    pseudo = source + destination + struct.pack("!I3xB", len(segment), 6)
else:
    pseudo = source + destination + struct.pack("!xBH", 6, len(segment))
segment = segment[:16] + struct.pack("!H", checksum(pseudo + segment)) + segment[18:]
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND: any source address
    s.bind((src, 0))
    s.sendto(segment, (dst, 0))
else:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 1, 0, 64, 6, 0, source, destination)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(header + segment, (dst, 0))
"#;

/// Counts, inside the upstream namespace, the TCP SYNs and UDP datagrams that arrive for port
/// 443: what got past the host. Its nftables table goes with the namespace.
struct Arrivals<'a> {
    netns: &'a str,
}

impl<'a> Arrivals<'a> {
    fn count_in(netns: &'a str) -> Self {
        for rule in [
            "add table inet appliance_test",
            "add chain inet appliance_test input { type filter hook input priority 0; }",
            // SYNs only: a client's answer to an upstream's SYN-ACK (an RST) is no bypass.
            "add rule inet appliance_test input tcp dport 443 tcp flags & (syn | ack) == syn counter",
            "add rule inet appliance_test input udp dport 443 counter",
        ] {
            let output = test_command("ip")
                .args(["netns", "exec", netns, "nft"])
                .args(rule.split(' '))
                .output()
                .unwrap();
            assert!(output.status.success(), "nft {rule}: {output:?}");
        }
        Self { netns }
    }

    fn packets(&self) -> u64 {
        let output = test_command("ip")
            .args(["netns", "exec", self.netns, "nft", "-j", "list", "table"])
            .args(["inet", "appliance_test"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let listing: Value = serde_json::from_slice(&output.stdout).unwrap();
        listing["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|item| item["rule"]["expr"].as_array())
            .flatten()
            .filter_map(|expr| expr["counter"]["packets"].as_u64())
            .sum()
    }

    /// How many packets of `send`'s reached the upstream namespace.
    fn of(&self, send: impl FnOnce()) -> u64 {
        let before = self.packets();
        send();
        // Forwarding is synchronous, but give a late packet the chance to be counted.
        std::thread::sleep(Duration::from_millis(200));
        self.packets() - before
    }
}

/// Sets a global sysctl for the test and restores it on drop.
struct Sysctl {
    path: PathBuf,
    saved: String,
}

impl Sysctl {
    fn set(path: &str, value: &str) -> Option<Self> {
        let path = PathBuf::from(path);
        let saved = fs::read_to_string(&path).ok()?;
        fs::write(&path, value).unwrap();
        Some(Self { path, saved })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(&self.path, self.saved.trim());
    }
}

struct Setup {
    network: Network,
    upstreams: Vec<Upstream>,
    daemon: Daemon,
    trusted: PathBuf,
    dir: PathBuf,
    selected: PathBuf,
    unselected: PathBuf,
    table: u32,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        remove_cgroup_tree(&self.unselected);
    }
}

fn setup(slot: u8, mode: &str) -> Setup {
    setup_with(slot, mode, "")
}

/// [`setup`] with more `[capture]` settings.
fn setup_with(slot: u8, mode: &str, capture_settings: &str) -> Setup {
    require_root();
    let dir = std::env::temp_dir().join(unique(slot, "files"));
    fs::create_dir_all(&dir).unwrap();
    let test_ca = Ca::new("test upstream CA");
    let upstream_ca = dir.join("upstream-ca.pem");
    test_ca.write(&upstream_ca);
    let network = Network::build(slot);
    let upstreams = network.start_upstream(&test_ca);
    let table = 1700 + u32::from(slot);
    let config = format!(
        "[capture]\nrouting_table = {table}\nrule_preference = {table}\n{capture_settings}"
    );
    let daemon = Daemon::start_configured(
        slot,
        &config,
        &[
            "--upstream-ca",
            upstream_ca.to_str().unwrap(),
            "--foreign-netns",
            mode,
        ],
        None,
        &[],
    );
    // Containers trust the appliance CA, and the test CA for what goes out directly.
    let trusted = dir.join("trusted.pem");
    let exported = cli(&daemon, &["ca", "export"], None);
    assert!(exported.status.success(), "{exported:?}");
    let mut bundle = exported.stdout;
    bundle.extend(fs::read(&upstream_ca).unwrap());
    fs::write(&trusted, bundle).unwrap();
    create_secret(&daemon, &["openai", "--type", "openai"], REAL);
    daemon.agent_cgroup("containers");
    let selected = daemon.agents_cgroup.join("containers");
    let (unselected, _) = make_cgroup(&unique(slot, "unselected"));
    Setup {
        network,
        upstreams,
        daemon,
        trusted,
        dir,
        selected,
        unselected,
        table,
    }
}

impl Setup {
    /// curl to `https://api.openai.com/v1/models` at `external`, from `container`, by a
    /// process in `cgroup`, with a placeholder key; stdout ends with the status code.
    fn curl(&self, container: &Container, cgroup: &Path, external: IpAddr) -> Output {
        container
            .command(cgroup, "curl")
            .args(["-sS", "--connect-timeout", "4", "--max-time", "10"])
            .args(["-w", "\n%{http_code}", "--cacert"])
            .arg(&self.trusted)
            .arg("--resolve")
            .arg(format!("{HOST}:443:{}", bracketed(external)))
            .args(["-H", "Authorization: Bearer placeholder"])
            .arg(format!("https://{HOST}/v1/models"))
            .output()
            .unwrap()
    }

    /// Authorization headers the upstream at `external` received, in order.
    fn authorizations(&self, external: IpAddr) -> Vec<Option<String>> {
        let upstream = &self.upstreams[usize::from(external.is_ipv6())];
        upstream
            .seen
            .authorizations()
            .into_iter()
            .map(|(_, authorization)| authorization)
            .collect()
    }

    /// Requests the upstream received on both addresses.
    fn requests(&self) -> usize {
        self.upstreams
            .iter()
            .map(|upstream| upstream.seen.requests().len())
            .sum()
    }

    /// Waits until the daemon logged `count` events `event`.
    fn wait_for_event(&self, event: &str, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let events = self.daemon.lines_with("event", event);
            if events.len() >= count {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "no {count} {event} events:\n{}",
                self.daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts a long-lived process into `container` and `cgroup`, as a container's init, and
    /// waits until the daemon serves the namespace.
    fn start_container_init(&self, container: &Container, served_before: usize) -> Running {
        let init = Running::spawn(container.command(&self.selected, "sleep").arg("600"));
        self.wait_for_event("container_served", served_before + 1);
        init
    }

    fn policy_rules(&self) -> Vec<String> {
        ["-4", "-6"]
            .iter()
            .flat_map(|family| {
                ip(&[family, "rule", "show", "pref", &self.table.to_string()])
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Setup {
    /// B shares A's bridge but is not selected: it goes straight out with its placeholder.
    fn assert_b_goes_direct(&self) {
        let external = self.network.external_v4;
        let before = self.authorizations(external).len();
        assert_status(
            &self.curl(&self.network.b, &self.unselected, external),
            "200",
        );
        assert_eq!(
            self.authorizations(external)[before..],
            [Some("Bearer placeholder".to_owned())],
            "B went through the engine"
        );
    }
}

fn bracketed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

fn assert_status(output: &Output, status: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.trim_end().ends_with(status),
        "expected status {status}; stdout {stdout:?}, stderr {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Setup {
    /// Sends [`RAW_PROBE`]'s packet `kind` from `container`, by a process in `cgroup`.
    fn send_raw(&self, container: &Container, cgroup: &Path, kind: &str, src: IpAddr, dst: IpAddr) {
        let output = container
            .command(cgroup, "/usr/bin/python3")
            .args(["-c", RAW_PROBE, kind, &src.to_string(), &dst.to_string()])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "raw probe {kind} from {src}: {output:?}"
        );
    }
}

/// The audit events of requests that carried the secret.
fn injected_events(setup: &Setup) -> Vec<Value> {
    setup
        .daemon
        .lines_with("event", "request")
        .into_iter()
        .filter(|event| {
            event["secrets"]
                .as_str()
                .is_some_and(|s| s.contains("openai"))
        })
        .collect()
}

#[test]
fn containers_on_a_bridge_and_a_routed_veth_get_their_secrets_by_tproxy() {
    let setup = setup(24, "tproxy");
    let network = &setup.network;
    let cgroup_id = fs::metadata(&setup.selected).map(|meta| {
        use std::os::unix::fs::MetadataExt as _;
        meta.ino()
    });
    let cgroup_id = cgroup_id.unwrap();
    let a_init = setup.start_container_init(&network.a, 0);
    let c_init = setup.start_container_init(&network.c, 1);
    let _d_init = Running::spawn(network.d.command(&setup.selected, "sleep").arg("600"));

    // A, over both families: injected, and the audit names A's namespace and cgroup.
    for external in [network.external_v4, network.external_v6] {
        let before = setup.authorizations(external).len();
        assert_status(&setup.curl(&network.a, &setup.selected, external), "200");
        assert_eq!(
            setup.authorizations(external)[before..],
            [Some(format!("Bearer {REAL}"))],
            "A's request to {external}"
        );
    }
    let a_cookie = network.a.netns_cookie();
    let events = injected_events(&setup);
    assert_eq!(events.len(), 2, "{events:#?}");
    for event in &events {
        assert_eq!(event["netns_cookie"].as_u64(), Some(a_cookie), "{event}");
        assert_eq!(event["cgroup_id"].as_u64(), Some(cgroup_id), "{event}");
    }
    let redirected = setup.daemon.lines_with("event", "redirected");
    assert!(
        redirected.iter().any(|event| event["original_dst"].as_str()
            == Some(&SocketAddr::new(network.external_v6, 443).to_string())),
        "the engine saw the original destination: {redirected:#?}"
    );

    // C, on a routed veth.
    assert_status(
        &setup.curl(&network.c, &setup.selected, network.external_v4),
        "200",
    );
    assert_eq!(
        setup
            .authorizations(network.external_v4)
            .last()
            .unwrap()
            .as_deref(),
        Some(format!("Bearer {REAL}").as_str())
    );

    setup.assert_b_goes_direct();

    // A process in A's namespace outside the selected cgroup reaches the engine with no
    // record (whole-container capture): it is closed, never let out.
    let before = setup.requests();
    let side = setup.curl(&network.a, &setup.unselected, network.external_v4);
    assert!(!side.status.success(), "{side:?}");
    assert_eq!(setup.requests(), before);

    // D has no veth: the daemon cannot serve it, so its connects are refused (curl: 7).
    let before = setup.requests();
    let refused = setup.curl(&network.d, &setup.selected, network.external_v4);
    assert_eq!(refused.status.code(), Some(7), "{refused:?}");
    assert_eq!(setup.requests(), before);
    assert!(
        setup
            .daemon
            .log_text()
            .contains("refused port 443 from a foreign network namespace"),
        "{}",
        setup.daemon.log_text()
    );

    // Bridge netfilter on and off (Docker and Kubernetes hosts have it on).
    for value in ["1", "0"] {
        let _bridge_nf = Sysctl::set("/proc/sys/net/bridge/bridge-nf-call-iptables", value);
        let _bridge_nf6 = Sysctl::set("/proc/sys/net/bridge/bridge-nf-call-ip6tables", value);
        for external in [network.external_v4, network.external_v6] {
            assert_status(&setup.curl(&network.a, &setup.selected, external), "200");
        }
    }

    // 3,000 sequential connections from A (TIME_WAIT reuse on the engine's side), then no
    // record is left in the capture maps.
    let program = format!(
        r#"
import socket
failures = 0
for i in range(3000):
    try:
        s = socket.create_connection(("{}", 443), timeout=5)
        s.sendall(b"x")
        s.close()
    except OSError as error:
        failures += 1
        last = error
print(failures)
"#,
        network.external_v4
    );
    let output = network
        .a
        .command(&setup.selected, "/usr/bin/python3")
        .args(["-c", &program])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "0",
        "failed connections out of 3,000: {output:?}"
    );
    let maps = setup.daemon.bpffs_dir.join("maps");
    let deadline = Instant::now() + Duration::from_secs(10);
    while map_entries(&maps.join("SOCKETS")) + map_entries(&maps.join("ORIG_DST")) > 0 {
        assert!(Instant::now() < deadline, "capture records left behind");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A host listener on the bridge's address keeps its own connections.
    let host_service = std::net::TcpListener::bind((network.plan.v4(1, 1), 443)).unwrap();
    std::net::TcpStream::connect_timeout(
        &host_service.local_addr().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    host_service.accept().unwrap();
    drop(host_service);

    // The container stops (its veth goes): the daemon stops serving it and removes its rules.
    let rules_before = setup.policy_rules().len();
    drop(a_init);
    network.stop_container_a();
    setup.wait_for_event("container_released", 1);
    let rules_after = setup.policy_rules();
    assert!(
        rules_after.len() < rules_before
            && !rules_after
                .iter()
                .any(|rule| rule.contains(&network.a.v4.unwrap().to_string())),
        "A's rules stayed: {rules_after:?}"
    );
    let guards = setup.daemon.bpffs_dir.join("links/guard");
    assert_eq!(
        fs::read_dir(&guards).unwrap().count(),
        1,
        "only C's veth keeps a guard"
    );
    drop(c_init);
}

#[test]
fn raw_and_udp_packets_from_a_served_container_cannot_go_around_the_engine() {
    let setup = setup(28, "tproxy");
    let network = &setup.network;
    let arrivals = Arrivals::count_in(&network.upstream_netns);
    let _a_init = setup.start_container_init(&network.a, 0);
    let _c_init = setup.start_container_init(&network.c, 1);
    let families = [
        (
            network.external_v4,
            network.plan.v4(1, 77),
            network.plan.v4(2, 77),
        ),
        (
            network.external_v6,
            network.plan.v6(1, 77),
            network.plan.v6(2, 77),
        ),
    ];
    for (external, forged_on_bridge, forged_on_routed) in families {
        let (a, b, c) = (&network.a, &network.b, &network.c);
        // The probes work: from B, which is not selected, every one of them arrives.
        let from_b = arrivals.of(|| {
            setup.send_raw(b, &setup.unselected, "syn", forged_on_bridge, external);
            setup.send_raw(b, &setup.unselected, "syn", b.v4_or_v6(external), external);
            setup.send_raw(b, &setup.unselected, "udp", b.v4_or_v6(external), external);
        });
        assert_eq!(from_b, 3, "B's packets to {external} did not all arrive");
        // From A (on the shared bridge): a SYN with another source is dropped on A's veth,
        // one with A's own source is delivered to the engine like any of A's connections,
        // and UDP to 443 is dropped, also from a process outside the selected cgroup.
        let from_a = arrivals.of(|| {
            setup.send_raw(a, &setup.selected, "syn", forged_on_bridge, external);
            setup.send_raw(a, &setup.selected, "syn", a.v4_or_v6(external), external);
            setup.send_raw(a, &setup.unselected, "udp", a.v4_or_v6(external), external);
        });
        assert_eq!(
            from_a, 0,
            "A's packets to {external} went around the engine"
        );
        // From C (a routed veth): every TCP source is delivered to the engine, UDP dropped.
        let from_c = arrivals.of(|| {
            setup.send_raw(c, &setup.selected, "syn", forged_on_routed, external);
            setup.send_raw(c, &setup.unselected, "udp", c.v4_or_v6(external), external);
        });
        assert_eq!(
            from_c, 0,
            "C's packets to {external} went around the engine"
        );
    }
    // The guard does not get in the way of A's ordinary clients.
    assert_status(
        &setup.curl(&network.a, &setup.selected, network.external_v6),
        "200",
    );
    let guards = setup.daemon.bpffs_dir.join("links/guard");
    assert_eq!(
        fs::read_dir(&guards).unwrap().count(),
        2,
        "one guard link per served container's veth"
    );
}

#[test]
fn containers_are_followed_by_events_without_waiting_for_the_rescan() {
    // The periodic rescan is out of reach: only events can make the daemon look.
    let setup = setup_with(29, "tproxy", "container_rescan_seconds = 3600\n");
    let network = &setup.network;
    setup.wait_for_event("ready", 1);
    // A starts in a cgroup of its own, as runtimes start containers: the cgroup's creation
    // and its becoming populated announce it.
    let a_cgroup = setup.selected.join("a");
    fs::create_dir(&a_cgroup).unwrap();
    let a_init = Running::spawn(network.a.command(&a_cgroup, "sleep").arg("600"));
    setup.wait_for_event("container_served", 1);
    assert_status(
        &setup.curl(&network.a, &a_cgroup, network.external_v4),
        "200",
    );
    // The runtime removes A's veth: the link announcement releases it.
    drop(a_init);
    network.stop_container_a();
    setup.wait_for_event("container_released", 1);
    assert!(
        !setup
            .policy_rules()
            .iter()
            .any(|rule| rule.contains(&network.a.v4.unwrap().to_string())),
        "A's rules stayed"
    );
}

#[test]
fn a_stopped_daemon_lets_nothing_out_and_detach_all_removes_everything() {
    let mut setup = setup(25, "tproxy");
    let network = &setup.network;
    let _a_init = setup.start_container_init(&network.a, 0);
    assert_status(
        &setup.curl(&network.a, &setup.selected, network.external_v4),
        "200",
    );

    setup.daemon.stop();
    let before = setup.requests();
    for external in [setup.network.external_v4, setup.network.external_v6] {
        let output = setup.curl(&setup.network.a, &setup.selected, external);
        assert!(!output.status.success(), "{output:?}");
    }
    assert_eq!(
        setup.requests(),
        before,
        "a request reached the upstream while the daemon was down"
    );
    // The guard outlives the daemon too.
    let network = &setup.network;
    let arrivals = Arrivals::count_in(&network.upstream_netns);
    let forged = network.plan.v4(1, 77);
    let sent = arrivals.of(|| {
        setup.send_raw(
            &network.a,
            &setup.selected,
            "syn",
            forged,
            network.external_v4,
        )
    });
    assert_eq!(sent, 0, "a forged SYN got out while the daemon was down");

    // A restarted daemon takes the namespace over again.
    setup.daemon.spawn();
    setup.wait_for_event("container_served", 2);
    let guards = setup.daemon.bpffs_dir.join("links/guard");
    assert_eq!(
        fs::read_dir(&guards).unwrap().count(),
        1,
        "the restarted daemon adopted A's guard"
    );
    assert_status(
        &setup.curl(&setup.network.a, &setup.selected, setup.network.external_v6),
        "200",
    );

    setup.daemon.stop();
    let detached = setup.daemon.detach_all();
    assert!(detached.status.success(), "{detached:?}");
    assert_eq!(setup.policy_rules(), Vec::<String>::new());
    for family in ["-4", "-6"] {
        let table = test_command("ip")
            .args([family, "route", "show", "table", &setup.table.to_string()])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&table.stdout).trim().is_empty(),
            "table {} still has routes: {table:?}",
            setup.table
        );
    }
    assert!(
        !setup.daemon.bpffs_dir.exists(),
        "the sk_lookup link and the maps are still pinned"
    );
}

#[test]
fn redirect_mode_serves_containers_without_host_routing() {
    let setup = setup(26, "redirect");
    let network = &setup.network;
    let _a_init = setup.start_container_init(&network.a, 0);
    for external in [network.external_v4, network.external_v6] {
        let before = setup.authorizations(external).len();
        assert_status(&setup.curl(&network.a, &setup.selected, external), "200");
        assert_eq!(
            setup.authorizations(external)[before..],
            [Some(format!("Bearer {REAL}"))],
            "A's request to {external}"
        );
    }
    assert!(
        setup.policy_rules().is_empty(),
        "redirect mode added policy rules"
    );
    setup.assert_b_goes_direct();
    // Under redirect nothing of A's may reach port 443 directly, not even from its own address.
    let arrivals = Arrivals::count_in(&network.upstream_netns);
    for external in [network.external_v4, network.external_v6] {
        let a = &network.a;
        let sent = arrivals
            .of(|| setup.send_raw(a, &setup.selected, "syn", a.v4_or_v6(external), external));
        assert_eq!(sent, 0, "A's raw SYN reached {external}");
    }
}

/// `podman ARGS`, which must succeed; returns stdout.
fn podman(args: &[&str]) -> String {
    let output = test_command("podman").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "podman {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// What a Podman test made: an image, a network and a container, removed on drop.
struct PodmanObjects {
    image: String,
    network: String,
    container: String,
}

impl Drop for PodmanObjects {
    fn drop(&mut self) {
        let _ = test_command("podman")
            .args(["rm", "--force", "--time", "0", &self.container])
            .output();
        let _ = test_command("podman")
            .args(["network", "rm", "--force", &self.network])
            .output();
        let _ = test_command("podman")
            .args(["rmi", "--force", &self.image])
            .output();
    }
}

/// An image made on this machine (no registry is reachable): curl, sh and sleep with the
/// libraries they link, imported as a root filesystem.
fn import_client_image(dir: &Path, image: &str) {
    let root = dir.join("rootfs");
    for program in ["/usr/bin/curl", "/bin/sh", "/bin/sleep"] {
        let linked = test_command("ldd").arg(program).output().unwrap();
        let libraries = String::from_utf8(linked.stdout).unwrap();
        let files = std::iter::once(program.to_owned()).chain(
            libraries
                .split_whitespace()
                .filter(|word| word.starts_with('/'))
                .map(str::to_owned),
        );
        for file in files {
            let target = root.join(file.trim_start_matches('/'));
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::copy(&file, &target).unwrap();
        }
    }
    fs::create_dir_all(root.join("tmp")).unwrap();
    let archive = dir.join("rootfs.tar");
    let packed = test_command("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .output()
        .unwrap();
    assert!(packed.status.success(), "{packed:?}");
    podman(&["import", archive.to_str().unwrap(), image]);
}

#[test]
fn a_podman_container_under_an_agents_cgroup_gets_its_secret() {
    let setup = setup(27, "tproxy");
    let suffix = format!("{}-27", std::process::id());
    let objects = PodmanObjects {
        image: format!("localhost/appliance-test-{suffix}"),
        network: format!("appliance-test-{suffix}"),
        container: format!("appliance-test-{suffix}"),
    };
    import_client_image(&setup.dir, &objects.image);
    let subnet = format!("{}/24", setup.network.plan.v4(5, 0));
    podman(&["network", "create", "--subnet", &subnet, &objects.network]);
    // The container's cgroup lies below the daemon's agents cgroup, so it is selected.
    let parent = Path::new("/").join(setup.selected.strip_prefix(cgroup2_mount()).unwrap());
    // runc, because crun refuses hosts with cgroup v1 and v2 side by side; limits no higher
    // than the test's own, which it may not raise.
    let id = podman(&[
        "run",
        "--detach",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
        "--name",
        &objects.container,
        "--network",
        &objects.network,
        "--cgroup-parent",
        parent.to_str().unwrap(),
        "--volume",
        &format!("{}:/trusted.pem:ro", setup.trusted.display()),
        &objects.image,
        "/bin/sleep",
        "600",
    ]);
    setup.wait_for_event("container_served", 1);

    let external = setup.network.external_v4;
    let output = test_command("podman")
        .args([
            "exec",
            &objects.container,
            "/usr/bin/curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .args([
            "-w",
            "\n%{http_code}",
            "--cacert",
            "/trusted.pem",
            "--resolve",
        ])
        .arg(format!("{HOST}:443:{external}"))
        .args(["-H", "Authorization: Bearer placeholder"])
        .arg(format!("https://{HOST}/v1/models"))
        .output()
        .unwrap();
    assert_status(&output, "200");
    assert_eq!(
        setup.authorizations(external).last().cloned().flatten(),
        Some(format!("Bearer {REAL}"))
    );
    let events = injected_events(&setup);
    assert_eq!(
        events.last().unwrap()["container"].as_str(),
        Some(format!("libpod-{id}").as_str()),
        "{events:#?}"
    );
    drop(objects);
}
