//! A test network of hand-built containers: network namespaces with veths on a Linux bridge
//! and on a routed veth, and an upstream namespace holding fake external addresses chosen
//! at run time and checked unused. Used by the container tests and the container bench.

// Each user takes the part it needs.
#![allow(dead_code)]

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    appliance_ca_pem, command_in_cgroup, create_secret, make_cgroup, remove_cgroup_tree,
    require_root, test_command, unique, Daemon, Running,
};
use crate::https::{Ca, Upstream};

/// The host the test secret is for, and its real value.
pub const HOST: &str = "api.openai.com";
pub const REAL: &str = "sk-proj-REAL-CONTAINER";

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) -> String {
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
pub fn ip_quiet(args: &[&str]) {
    let _ = test_command("ip").args(args).output();
}

pub fn routes(family: &str) -> Vec<Value> {
    serde_json::from_str(&ip(&[family, "-j", "route", "show", "table", "all"])).unwrap()
}

/// Whether any route but a default one overlaps `prefix/len`: test addresses must be
/// unused, or a test packet could reach a real network.
pub fn prefix_in_use(prefix: IpAddr, len: u32) -> bool {
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
pub struct Plan {
    pub n: u8,
}

impl Plan {
    pub fn choose(slot: u8) -> Self {
        (0..50u8)
            .map(|offset| 200 + (slot + offset) % 50)
            .map(|n| Self { n })
            .find(|plan| {
                !prefix_in_use(IpAddr::V4(Ipv4Addr::new(10, plan.n, 0, 0)), 16)
                    && !prefix_in_use(plan.v6(0, 0), 48)
            })
            .expect("no unused 10.2xx.0.0/16 for the test network")
    }

    pub fn v4(self, subnet: u8, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, self.n, subnet, host))
    }

    pub fn v6(self, subnet: u16, host: u16) -> IpAddr {
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
pub struct Container {
    pub netns: String,
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
    pub host_side: Option<String>,
}

impl Container {
    /// A container with a veth to the host named `host_side`, at host `host` of subnet
    /// `subnet` in both families.
    pub fn with_veth(
        netns: String,
        plan: Plan,
        (subnet, host): (u8, u8),
        host_side: String,
    ) -> Self {
        Self {
            netns,
            v4: Some(plan.v4(subnet, host)),
            v6: Some(plan.v6(u16::from(subnet), u16::from(host))),
            host_side: Some(host_side),
        }
    }

    /// The container's address in the family of `other`.
    pub fn v4_or_v6(&self, other: IpAddr) -> IpAddr {
        if other.is_ipv4() { self.v4 } else { self.v6 }.unwrap()
    }

    /// A command run inside the container, by a process in `cgroup`.
    pub fn command(&self, cgroup: &Path, program: &str) -> Command {
        let mut command = command_in_cgroup(cgroup, "ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// The container's network namespace cookie, as its own sockets report it.
    pub fn netns_cookie(&self) -> u64 {
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
pub struct Network {
    pub plan: Plan,
    pub prefix: String,
    pub bridge: String,
    pub a: Container,
    pub b: Container,
    pub c: Container,
    pub d: Container,
    pub upstream_netns: String,
    pub upstream_link: String,
    pub external_v4: IpAddr,
    pub external_v6: IpAddr,
    routes: Vec<Vec<String>>,
}

impl Network {
    pub fn build(slot: u8) -> Self {
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
        // Unselected traffic (B, and sidecars in A and C when only cgroups are selected) is
        // forwarded by the host; only the test's own interfaces forward, and they disappear
        // with the test.
        for interface in [&self.bridge, &c_host, &self.upstream_link] {
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
    pub fn start_upstream(&self, host: &'static str, ca: &Ca) -> Vec<Upstream> {
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
                                &[(host, ca)],
                            )
                        })
                        .collect()
                })
                .join()
                .unwrap()
        })
    }

    /// Removes container A's veth, as a container runtime does when it stops one.
    pub fn stop_container_a(&self) {
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

/// A daemon serving the test network's containers, with a secret for [`HOST`] and the
/// agents cgroup `containers` selected. Removed on drop.
pub struct Setup {
    pub network: Network,
    pub upstreams: Vec<Upstream>,
    pub daemon: Daemon,
    /// The appliance CA and the upstream's test CA, for clients.
    pub trusted: PathBuf,
    pub dir: PathBuf,
    /// The selected cgroup.
    pub selected: PathBuf,
    /// A cgroup nothing selects.
    pub unselected: PathBuf,
    /// Routing table and rule preference of the daemon's policy rules.
    pub table: u32,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        remove_cgroup_tree(&self.unselected);
    }
}

/// The daemon serves containers as `mode` (`--foreign-netns`).
pub fn setup(slot: u8, mode: &str) -> Setup {
    setup_with(slot, mode, "")
}

/// [`setup`] with more `[capture]` settings.
pub fn setup_with(slot: u8, mode: &str, capture_settings: &str) -> Setup {
    require_root();
    let dir = std::env::temp_dir().join(unique(slot, "files"));
    fs::create_dir_all(&dir).unwrap();
    let test_ca = Ca::new("test upstream CA");
    let upstream_ca = dir.join("upstream-ca.pem");
    test_ca.write(&upstream_ca);
    let network = Network::build(slot);
    let upstreams = network.start_upstream(HOST, &test_ca);
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
    let mut bundle = appliance_ca_pem(&daemon);
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
    /// Waits until the daemon logged `count` events `event`.
    pub fn wait_for_event(&self, event: &str, count: usize) -> Vec<Value> {
        self.wait_for_event_within(event, count, Duration::from_secs(15))
    }

    /// [`Setup::wait_for_event`], failing after `limit`.
    pub fn wait_for_event_within(&self, event: &str, count: usize, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
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
    pub fn start_container_init(&self, container: &Container, served_before: usize) -> Running {
        let init = Running::spawn(container.command(&self.selected, "sleep").arg("600"));
        self.wait_for_event("container_served", served_before + 1);
        init
    }
}
