//! Containers, end to end on the real kernel: hand-built containers (network namespaces with
//! veths, on a Linux bridge and on a routed veth) whose cgroups are selected get their
//! secrets injected by a daemon that serves their namespaces, while an unselected container
//! on the same bridge goes straight to the "internet", itself a namespace holding fake
//! external addresses chosen at run time.

mod common;
mod https;
mod network;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use network::{ip, setup, setup_with, Container, Setup, HOST, REAL};
use serde_json::Value;

/// Python that sends one packet to port 443 of `dst` from `src` the way a container with
/// `CAP_NET_RAW` can: `syn`, a TCP SYN written on a raw socket (so no connect hook runs),
/// with any source address; `fragments`, that SYN cut in two IP fragments (the policy rules,
/// which match ports, never match a fragment); `udp`, a datagram from an ordinary socket
/// bound to `src`.
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
if kind == "fragments":
    pieces = [(0, 1, segment[:8]), (1, 0, segment[8:])]
    if v6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 44)
        s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND
        s.bind((src, 0))
        for offset, more, piece in pieces:
            s.sendto(struct.pack("!BBHI", 6, 0, offset << 3 | more, 0x4242) + piece, (dst, 0))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for offset, more, piece in pieces:
            header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(piece), 0x4242, more << 13 | offset, 64, 6, 0, source, destination)
            header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
            s.sendto(header + piece, (dst, 0))
    sys.exit(0)
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
    table: &'static str,
}

impl<'a> Arrivals<'a> {
    fn count_in(netns: &'a str) -> Self {
        // SYNs only: a client's answer to an upstream's SYN-ACK (an RST) is no bypass.
        Self::counting(
            netns,
            "appliance_test",
            &[
                "tcp dport 443 tcp flags & (syn | ack) == syn",
                "udp dport 443",
            ],
        )
    }

    /// Counts packets that arrive inside `netns` and match any of `matches` (nftables
    /// expressions), in an nftables table `table` of their own.
    fn counting(netns: &'a str, table: &'static str, matches: &[&str]) -> Self {
        let chain =
            format!("add chain inet {table} input {{ type filter hook input priority 0; }}");
        let rules = matches
            .iter()
            .map(|expression| format!("add rule inet {table} input {expression} counter"));
        for rule in [format!("add table inet {table}"), chain]
            .into_iter()
            .chain(rules)
        {
            let output = test_command("ip")
                .args(["netns", "exec", netns, "nft"])
                .args(rule.split(' '))
                .output()
                .unwrap();
            assert!(output.status.success(), "nft {rule}: {output:?}");
        }
        Self { netns, table }
    }

    fn packets(&self) -> u64 {
        let output = test_command("ip")
            .args(["netns", "exec", self.netns, "nft", "-j", "list", "table"])
            .args(["inet", self.table])
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
    /// A request by `container`'s selected cgroup to `external` gets the secret injected.
    fn assert_injected(&self, container: &Container, external: IpAddr) {
        let before = self.authorizations(external).len();
        assert_status(&self.curl(container, &self.selected, external), "200");
        assert_eq!(
            self.authorizations(external)[before..],
            [Some(format!("Bearer {REAL}"))],
            "{}'s request to {external}",
            container.netns
        );
    }

    /// `count` connections one after the other from `container`'s selected cgroup to port
    /// 443 of `external`, each sending a byte and closing, none failing (the engine's
    /// TIME_WAIT sockets are reused on the way).
    fn assert_sequential_connections(&self, container: &Container, external: IpAddr, count: u32) {
        let program = format!(
            r#"
import socket
failures = 0
for i in range({count}):
    try:
        s = socket.create_connection(("{external}", 443), timeout=5)
        s.sendall(b"x")
        s.close()
    except OSError:
        failures += 1
print(failures)
"#
        );
        let output = container
            .command(&self.selected, "/usr/bin/python3")
            .args(["-c", &program])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "0",
            "failed connections out of {count}: {output:?}"
        );
    }

    /// How many of the packets `send` sends to `external` reach the upstream namespace. A
    /// marker datagram from B, which is not selected, follows them on the same bridge and
    /// uplink; once it is counted, anything of theirs that got through has been too.
    fn arrivals_of(&self, arrivals: &Arrivals, external: IpAddr, send: impl FnOnce()) -> u64 {
        let before = arrivals.packets();
        send();
        let b = &self.network.b;
        self.send_raw(b, &self.unselected, "udp", b.v4_or_v6(external), external);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counted = arrivals.packets() - before;
            if counted > 0 {
                return counted - 1;
            }
            assert!(
                Instant::now() < deadline,
                "B's marker to {external} never arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Packets the guards dropped so far, as the daemon counts them.
    fn guard_refusals(&self) -> u64 {
        let output = test_command("curl")
            .args(["-sS", "--max-time", "5", "--unix-socket"])
            .arg(&self.daemon.socket)
            .arg("http://localhost/v1/metrics")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| {
                line.strip_prefix("appliance_capture_refusals_total{reason=\"guard\"} ")
            })
            .and_then(|count| count.parse().ok())
            .unwrap_or(0)
    }

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

/// Python (ssl and http.client) that calls `https://api.openai.com/v1/models` at `external`
/// with a placeholder key, trusting `ca_file`, and prints the status and its socket's peer
/// as JSON.
fn python_https_probe(ca_file: &Path, external: IpAddr) -> String {
    format!(
        r#"
import http.client, json, socket, ssl
context = ssl.create_default_context(cafile="{ca}")
raw = socket.create_connection(("{ip}", 443), timeout=10)
peer = raw.getpeername()
connection = http.client.HTTPSConnection("{HOST}", context=context)
connection.sock = context.wrap_socket(raw, server_hostname="{HOST}")
connection.request("GET", "/v1/models", headers={{"Authorization": "Bearer placeholder"}})
status = connection.getresponse().status
host = peer[0] if ":" not in peer[0] else "[" + peer[0] + "]"
print(json.dumps({{"status": status, "peer": "%s:%d" % (host, peer[1])}}))
"#,
        ca = ca_file.display(),
        ip = external,
    )
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
        setup.assert_injected(&network.a, external);
    }
    // A Python client too, which sees the original destination as its peer.
    for external in [network.external_v4, network.external_v6] {
        let before = setup.authorizations(external).len();
        let answer = python_json(
            network.a.command(&setup.selected, "/usr/bin/python3"),
            &python_https_probe(&setup.trusted, external),
        );
        assert_eq!(answer["status"].as_u64(), Some(200), "{answer}");
        assert_eq!(
            answer["peer"].as_str(),
            Some(SocketAddr::new(external, 443).to_string().as_str()),
            "{answer}"
        );
        assert_eq!(
            setup.authorizations(external)[before..],
            [Some(format!("Bearer {REAL}"))],
            "A's Python request to {external}"
        );
    }
    let a_cookie = network.a.netns_cookie();
    let events = injected_events(&setup);
    assert_eq!(events.len(), 4, "{events:#?}");
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
        &setup.curl(&network.c, &setup.selected, network.external_v6),
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
    // The eBPF programs' log reaches the daemon's log through a ring buffer, a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !setup
        .daemon
        .log_text()
        .contains("refused port 443 from a foreign network namespace")
    {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            setup.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

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
    setup.assert_sequential_connections(&network.a, network.external_v4, 3000);
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn raw_and_udp_packets_from_a_served_container_cannot_go_around_the_engine() {
    let setup = setup(28, "tproxy");
    let network = &setup.network;
    let arrivals = Arrivals::count_in(&network.upstream_netns);
    // Fragments, whole or in part, and B's marker datagram.
    let fragment_arrivals = Arrivals::counting(
        &network.upstream_netns,
        "appliance_test_fragments",
        &[
            "ip frag-off & 0x3fff != 0",
            "exthdr frag exists",
            "udp dport 443",
        ],
    );
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
        let from_b = setup.arrivals_of(&arrivals, external, || {
            setup.send_raw(b, &setup.unselected, "syn", forged_on_bridge, external);
            setup.send_raw(b, &setup.unselected, "syn", b.v4_or_v6(external), external);
            setup.send_raw(b, &setup.unselected, "udp", b.v4_or_v6(external), external);
        });
        assert_eq!(from_b, 3, "B's packets to {external} did not all arrive");
        // From A (on the shared bridge): a SYN with another source is dropped on A's veth,
        // one with A's own source is delivered to the engine like any of A's connections,
        // and UDP to 443 is dropped, also from a process outside the selected cgroup.
        let from_a = setup.arrivals_of(&arrivals, external, || {
            setup.send_raw(a, &setup.selected, "syn", forged_on_bridge, external);
            setup.send_raw(a, &setup.selected, "syn", a.v4_or_v6(external), external);
            setup.send_raw(a, &setup.unselected, "udp", a.v4_or_v6(external), external);
        });
        assert_eq!(
            from_a, 0,
            "A's packets to {external} went around the engine"
        );
        // From C (a routed veth): every TCP source is delivered to the engine, UDP dropped.
        let from_c = setup.arrivals_of(&arrivals, external, || {
            setup.send_raw(c, &setup.selected, "syn", forged_on_routed, external);
            setup.send_raw(c, &setup.unselected, "udp", c.v4_or_v6(external), external);
        });
        assert_eq!(
            from_c, 0,
            "C's packets to {external} went around the engine"
        );
        // A SYN in fragments, from A's and C's own addresses: the policy rules cannot match
        // a fragment, so the guard drops them (a host that reassembles would deliver them).
        let dropped_before = setup.guard_refusals();
        let fragments = setup.arrivals_of(&fragment_arrivals, external, || {
            setup.send_raw(
                a,
                &setup.selected,
                "fragments",
                a.v4_or_v6(external),
                external,
            );
            setup.send_raw(
                c,
                &setup.selected,
                "fragments",
                c.v4_or_v6(external),
                external,
            );
        });
        assert_eq!(
            fragments, 0,
            "fragments to {external} went around the engine"
        );
        assert!(
            setup.guard_refusals() >= dropped_before + 4,
            "the guard did not drop the fragments to {external}"
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn a_restarting_daemon_keeps_its_containers_rules_until_it_serves_them_again() {
    let mut setup = setup(35, "tproxy");
    let _a_init = setup.start_container_init(&setup.network.a, 0);
    let _c_init = setup.start_container_init(&setup.network.c, 1);
    let served_rules = setup.policy_rules();
    assert!(!served_rules.is_empty());
    // Without its rule, a process of A outside the selected cgroups would go out directly
    // while the new daemon starts. Watch the rules all through the restart.
    let table = setup.table.to_string();
    let watching = std::sync::atomic::AtomicBool::new(true);
    let fewest = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut fewest = usize::MAX;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let shown: usize = ["-4", "-6"]
                    .iter()
                    .map(|family| {
                        ip(&[family, "rule", "show", "pref", &table])
                            .lines()
                            .count()
                    })
                    .sum();
                fewest = fewest.min(shown);
            }
            fewest
        });
        setup.daemon.stop();
        setup.daemon.spawn();
        setup.wait_for_event("container_served", 4);
        watching.store(false, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert_eq!(
        fewest,
        served_rules.len(),
        "rules went missing during the restart"
    );
    assert_eq!(setup.policy_rules(), served_rules);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn a_restart_into_redirect_keeps_nothing_that_tproxy_allowed() {
    let mut setup = setup(34, "tproxy");
    let arrivals = Arrivals::count_in(&setup.network.upstream_netns);
    let a = &setup.network.a;
    let _a_init = setup.start_container_init(a, 0);
    // Under tproxy the guard lets A's own TCP through, for the policy rule to deliver.
    setup.daemon.stop();
    setup.daemon.set_arg("--foreign-netns", "redirect");
    setup.daemon.spawn();
    setup.wait_for_event("container_served", 2);
    // Under redirect no rule delivers raw TCP: the guard must drop it, whatever the earlier
    // daemon allowed.
    for external in [setup.network.external_v4, setup.network.external_v6] {
        let a = &setup.network.a;
        let sent = setup.arrivals_of(&arrivals, external, || {
            setup.send_raw(a, &setup.selected, "syn", a.v4_or_v6(external), external)
        });
        assert_eq!(sent, 0, "A's raw SYN to {external} went around the engine");
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn a_containers_first_process_is_served_before_the_daemon_has_seen_its_namespace() {
    let setup = setup_with(31, "tproxy", "container_rescan_seconds = 3600\n");
    let network = &setup.network;
    setup.wait_for_event("ready", 1);
    // curl is the first selected process of each namespace: it connects some milliseconds
    // after it starts, while the daemon serves a namespace tens of milliseconds after its
    // cgroup is populated. A bridged container over IPv4, a routed one over IPv6.
    for (container, external, name) in [
        (&network.a, network.external_v4, "a"),
        (&network.c, network.external_v6, "c"),
    ] {
        let cgroup = setup.selected.join(name);
        fs::create_dir(&cgroup).unwrap();
        assert_status(&setup.curl(container, &cgroup, external), "200");
        assert_eq!(
            setup.authorizations(external).last().cloned().flatten(),
            Some(format!("Bearer {REAL}")),
            "{name}"
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn a_process_joining_a_new_agents_empty_cgroup_is_followed_without_the_rescan() {
    // The periodic rescan is out of reach: only events can make the daemon look.
    let setup = setup_with(33, "tproxy", "container_rescan_seconds = 3600\n");
    let network = &setup.network;
    setup.wait_for_event("ready", 1);
    // An agent's own cgroup, outside every tree the daemon watched so far, empty when the
    // agent is made (removed with the unselected tree it lies in).
    let agent_cgroup = setup.unselected.join("agent");
    fs::create_dir(&agent_cgroup).unwrap();
    // Let the daemon finish the look that the setup's own cgroups caused: a look after the
    // agent is made would watch its cgroup by chance.
    std::thread::sleep(Duration::from_millis(500));
    let created = cli(
        &setup.daemon,
        &[
            "agent",
            "create",
            "research",
            "--cgroup",
            agent_cgroup.to_str().unwrap(),
        ],
        None,
    );
    assert!(created.status.success(), "{created:?}");
    let _init = Running::spawn(network.a.command(&agent_cgroup, "sleep").arg("600"));
    // Well before the bridge's ports change state (its 15 s forward delay), whose link
    // announcements would make the daemon look anyway.
    setup.wait_for_event_within("container_served", 1, Duration::from_secs(5));
    assert_status(
        &setup.curl(&network.a, &agent_cgroup, network.external_v4),
        "200",
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn selecting_one_cgroup_of_a_shared_namespace_leaves_its_sidecars_direct() {
    let setup = setup_with(30, "tproxy", "container_selection = \"cgroup\"\n");
    let network = &setup.network;
    let (a, c) = (&network.a, &network.c);
    // Every TCP packet of A's or C's that reaches the upstream's namespace on port 443: none
    // of a selected cgroup's may, from the SYN to the last ACK.
    let from_a_or_c = Arrivals::counting(
        &network.upstream_netns,
        "appliance_test_direct",
        &[
            &format!(
                "ip saddr {{ {}, {} }} tcp dport 443",
                a.v4.unwrap(),
                c.v4.unwrap()
            ),
            &format!(
                "ip6 saddr {{ {}, {} }} tcp dport 443",
                a.v6.unwrap(),
                c.v6.unwrap()
            ),
        ],
    );
    let _a_init = setup.start_container_init(a, 0);
    let _c_init = setup.start_container_init(c, 1);
    for external in [network.external_v4, network.external_v6] {
        for container in [a, c] {
            setup.assert_injected(container, external);
        }
    }
    // 500 connections one after the other: each handshake, data and close goes to the
    // engine (TIME_WAIT reuse included).
    setup.assert_sequential_connections(a, network.external_v4, 500);
    assert_eq!(
        from_a_or_c.packets(),
        0,
        "a selected cgroup's packets reached the upstream directly"
    );

    // A process of the same namespaces outside the selected cgroups (a sidecar) goes out
    // directly with its own credentials, over both families, and so may its QUIC.
    for external in [network.external_v4, network.external_v6] {
        for container in [a, c] {
            let before = setup.authorizations(external).len();
            assert_status(&setup.curl(container, &setup.unselected, external), "200");
            assert_eq!(
                setup.authorizations(external)[before..],
                [Some("Bearer placeholder".to_owned())],
                "the sidecar's request to {external} went through the engine"
            );
        }
    }
    assert!(
        from_a_or_c.packets() > 0,
        "the sidecars' connections were not seen"
    );
    let arrivals = Arrivals::count_in(&network.upstream_netns);
    for external in [network.external_v4, network.external_v6] {
        let udp = setup.arrivals_of(&arrivals, external, || {
            setup.send_raw(a, &setup.unselected, "udp", a.v4_or_v6(external), external)
        });
        assert_eq!(udp, 1, "the sidecar's UDP to {external}");
        // A forged source is still no source of A's.
        let forged = if external.is_ipv4() {
            network.plan.v4(1, 77)
        } else {
            network.plan.v6(1, 77)
        };
        let sent = setup.arrivals_of(&arrivals, external, || {
            setup.send_raw(a, &setup.selected, "syn", forged, external)
        });
        assert_eq!(sent, 0, "a forged SYN from A reached {external}");
    }
    setup.assert_b_goes_direct();
    assert!(
        setup
            .policy_rules()
            .iter()
            .all(|rule| rule.contains("fwmark 0x8000000/0x8000000")),
        "{:?}",
        setup.policy_rules()
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
    let sent = setup.arrivals_of(&arrivals, network.external_v4, || {
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn redirect_mode_serves_containers_without_host_routing() {
    let setup = setup(26, "redirect");
    let network = &setup.network;
    let _a_init = setup.start_container_init(&network.a, 0);
    for external in [network.external_v4, network.external_v6] {
        setup.assert_injected(&network.a, external);
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
        let sent = setup.arrivals_of(&arrivals, external, || {
            setup.send_raw(a, &setup.selected, "syn", a.v4_or_v6(external), external)
        });
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
    let external = setup.network.external_v4;
    let curl_args = |name: &str| {
        vec![
            "/usr/bin/curl".to_owned(),
            "-sS".to_owned(),
            "--max-time".to_owned(),
            "10".to_owned(),
            "-w".to_owned(),
            "\n%{http_code}".to_owned(),
            "--cacert".to_owned(),
            "/trusted.pem".to_owned(),
            "--resolve".to_owned(),
            format!("{HOST}:443:{external}"),
            "-H".to_owned(),
            "Authorization: Bearer placeholder".to_owned(),
            format!("https://{HOST}/v1/{name}"),
        ]
    };
    // A container whose first act is the API call: served although its namespace is new.
    let first = test_command("podman")
        .args(["run", "--rm", "--runtime", "runc"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
        ])
        .args(["--network", &objects.network, "--cgroup-parent"])
        .arg(&parent)
        .arg("--volume")
        .arg(format!("{}:/trusted.pem:ro", setup.trusted.display()))
        .arg(&objects.image)
        .args(curl_args("first"))
        .output()
        .unwrap();
    assert_status(&first, "200");
    assert_eq!(
        setup.authorizations(external).last().cloned().flatten(),
        Some(format!("Bearer {REAL}"))
    );
    // The first container may be gone before its namespace was served, or not.
    let served_before = setup.daemon.lines_with("event", "container_served").len();

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
    setup.wait_for_event("container_served", served_before + 1);

    let output = test_command("podman")
        .args(["exec", &objects.container])
        .args(curl_args("models"))
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
