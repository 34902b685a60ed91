//! Capture, end to end on the real kernel: the daemon's eBPF programs redirect connections
//! from selected cgroups to the engine, which carries them to a loopback upstream.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn redirected_events(daemon: &Daemon) -> Vec<Value> {
    daemon.lines_with("event", "redirected")
}

fn assert_event(daemon: &Daemon, original: SocketAddr, pid: u64, cgroup_id: u64) {
    let events = redirected_events(daemon);
    let found = events.iter().any(|event| {
        event["original_dst"].as_str() == Some(&original.to_string())
            && event["pid"].as_u64() == Some(pid)
            && event["cgroup_id"].as_u64() == Some(cgroup_id)
    });
    assert!(
        found,
        "no redirected event for {original} pid {pid} cgroup {cgroup_id}; events: {events:#?}"
    );
}

/// The connection went through the engine: the upstream saw another socket than the client's.
fn assert_proxied(probe: &Value) {
    assert_ne!(
        reported_peer(probe),
        probe_local(probe),
        "upstream saw the client itself: {probe}"
    );
}

fn assert_direct(probe: &Value) {
    assert_eq!(
        reported_peer(probe),
        probe_local(probe),
        "upstream did not see the client itself: {probe}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn ipv4_connections_from_a_selected_cgroup_reach_the_engine_with_their_origin() {
    require_root();
    let slot = 1;
    let upstream = Upstream::start(upstream_ip(slot).into(), 443);
    let daemon = Daemon::start(slot, &[]);
    let cgroup_id = daemon.agent_cgroup("agent");

    let host = upstream.addr.ip().to_string();
    let probe = python_json(daemon.exec_python("agent"), &python_probe(&host, "AF_INET"));
    assert_proxied(&probe);
    assert_eq!(
        probe_peer(&probe),
        upstream.addr,
        "getpeername shows the engine"
    );
    assert_event(
        &daemon,
        upstream.addr,
        probe["pid"].as_u64().unwrap(),
        cgroup_id,
    );

    // A dual-stack socket reaching an IPv4 destination through its mapped form.
    let mapped = format!("::ffff:{host}");
    let probe = python_json(
        daemon.exec_python("agent"),
        &python_probe(&mapped, "AF_INET6"),
    );
    assert_proxied(&probe);
    assert_eq!(
        probe_peer(&probe),
        SocketAddr::new(mapped.parse().unwrap(), 443),
        "getpeername shows the engine for a mapped address"
    );
    assert_event(
        &daemon,
        upstream.addr,
        probe["pid"].as_u64().unwrap(),
        cgroup_id,
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn ipv6_loopback_connections_are_redirected() {
    require_root();
    let slot = 2;
    let upstream = Upstream::start(IpAddr::V6(Ipv6Addr::LOCALHOST), 443);
    let daemon = Daemon::start(slot, &[]);
    let cgroup_id = daemon.agent_cgroup("agent6");
    let probe = python_json(
        daemon.exec_python("agent6"),
        &python_probe("::1", "AF_INET6"),
    );
    assert_proxied(&probe);
    assert_eq!(probe_peer(&probe), upstream.addr);
    assert_event(
        &daemon,
        upstream.addr,
        probe["pid"].as_u64().unwrap(),
        cgroup_id,
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn unselected_processes_and_the_appliance_itself_connect_directly() {
    require_root();
    let slot = 3;
    let upstream = Upstream::start(upstream_ip(slot).into(), 443);
    // The daemon runs inside a cgroup the operator also selects: its own upstream
    // connections must still go out directly, or every connection would loop.
    let (home, _) = make_cgroup(&unique(slot, "home"));
    let daemon = Daemon::start_in(
        slot,
        &["--cgroup", home.to_str().unwrap()],
        Some(home.as_path()),
    );
    assert!(
        daemon.log_text().contains("contains the daemon itself"),
        "no warning about selecting the daemon's own cgroup:\n{}",
        daemon.log_text()
    );
    let (neighbour, neighbour_id) = make_cgroup(&format!("{}/neighbour", unique(slot, "home")));

    let host = upstream.addr.ip().to_string();
    let probe = python_json(
        command_in_cgroup(&neighbour, "python3"),
        &python_probe(&host, "AF_INET"),
    );
    assert_proxied(&probe);
    assert_event(
        &daemon,
        upstream.addr,
        probe["pid"].as_u64().unwrap(),
        neighbour_id,
    );

    let outside = python_json(test_command("python3"), &python_probe(&host, "AF_INET"));
    assert_direct(&outside);
    let events = redirected_events(&daemon).len();
    assert_eq!(events, 1, "only the selected process was redirected");
    drop(daemon);
    remove_cgroup_tree(&home);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn descendants_are_intercepted_until_detached() {
    require_root();
    let slot = 4;
    let upstream = Upstream::start(upstream_ip(slot).into(), 443);
    let (selected, _) = make_cgroup(&unique(slot, "selected"));
    let (nested, nested_id) = make_cgroup(&format!("{}/a/b", unique(slot, "selected")));
    let daemon = Daemon::start(slot, &["--cgroup", selected.to_str().unwrap()]);
    let host = upstream.addr.ip().to_string();

    let probe = python_json(
        command_in_cgroup(&nested, "python3"),
        &python_probe(&host, "AF_INET"),
    );
    assert_proxied(&probe);
    assert_event(
        &daemon,
        upstream.addr,
        probe["pid"].as_u64().unwrap(),
        nested_id,
    );

    let detached = daemon.detach_all();
    assert!(detached.status.success(), "{detached:?}");
    assert!(attached_programs(&selected).is_empty());
    let probe = python_json(
        command_in_cgroup(&nested, "python3"),
        &python_probe(&host, "AF_INET"),
    );
    assert_direct(&probe);
    drop(daemon);
    remove_cgroup_tree(&selected);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn udp_to_intercepted_ports_is_refused_only_in_selected_cgroups() {
    require_root();
    let slot = 5;
    let daemon = Daemon::start(slot, &[]);
    let ip = upstream_ip(slot);
    let receiver_443 = UdpSocket::bind((ip, 443)).unwrap();
    let receiver_other = UdpSocket::bind((ip, 0)).unwrap();
    let other_port = receiver_other.local_addr().unwrap().port();
    for receiver in [&receiver_443, &receiver_other] {
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }
    let program = format!(
        r#"
import json, socket
result = {{}}
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for name, port in (("443", 443), ("other", {other_port})):
    try:
        u.sendto(b"from-cgroup", ("{ip}", port))
        result[name] = "sent"
    except PermissionError:
        result[name] = "refused"
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    c.connect(("{ip}", 443))
    result["connect"] = "connected"
except PermissionError:
    result["connect"] = "refused"
print(json.dumps(result))
"#
    );
    let inside = python_json(daemon.exec_python("udp"), &program);
    assert_eq!(inside["443"], "refused");
    assert_eq!(inside["connect"], "refused");
    assert_eq!(inside["other"], "sent");
    let mut buf = [0u8; 64];
    let (len, _) = receiver_other.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], b"from-cgroup");

    let outside = python_json(test_command("python3"), &program);
    assert_eq!(outside["443"], "sent");
    assert_eq!(outside["connect"], "connected");
    let (len, _) = receiver_443.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], b"from-cgroup");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn a_restarted_daemon_adopts_its_pinned_links() {
    require_root();
    let slot = 6;
    let upstream = Upstream::start(upstream_ip(slot).into(), 443);
    let mut daemon = Daemon::start(slot, &[]);
    let expected: Vec<String> = {
        let mut names = [
            "connect4",
            "connect6",
            "getpeername4",
            "getpeername6",
            "sendmsg4",
            "sendmsg6",
            "sock_ops_track",
        ]
        .map(String::from)
        .to_vec();
        names.sort();
        names
    };
    assert_eq!(attached_programs(&daemon.agents_cgroup), expected);
    let host = upstream.addr.ip().to_string();

    daemon.kill_hard();
    // Interception stays while the daemon is away: the connection fails, it never bypasses.
    let down = test_command(APPLIANCE)
        .arg("exec")
        .arg("--agents-cgroup")
        .arg(&daemon.agents_cgroup)
        .args(["--cgroup", "down", "--", "python3", "-c"])
        .arg(format!(
            "import socket; socket.create_connection(('{host}', 443), timeout=5)"
        ))
        .output()
        .unwrap();
    assert!(
        !down.status.success(),
        "connected while the daemon was down"
    );
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("ConnectionRefusedError"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );

    daemon.spawn();
    let adopted = daemon.lines_with("action", "adopted");
    assert_eq!(adopted.len(), 1, "{}", daemon.log_text());
    assert_eq!(
        attached_programs(&daemon.agents_cgroup),
        expected,
        "programs attached twice"
    );
    let probe = python_json(daemon.exec_python("after"), &python_probe(&host, "AF_INET"));
    assert_proxied(&probe);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn an_upgraded_daemon_replaces_pinned_maps_of_an_older_layout() {
    require_root();
    let slot = 31;
    let upstream = Upstream::start(upstream_ip(slot).into(), 443);
    let mut daemon = Daemon::start(slot, &[]);
    daemon.stop();
    // What an older daemon pinned: ORIG_DST keyed by the client's address alone (20 bytes).
    let pin = daemon.bpffs_dir.join("maps/ORIG_DST");
    std::fs::remove_file(&pin).unwrap();
    let pin_text = pin.to_str().unwrap();
    bpftool(&[
        "map", "create", pin_text, "type", "lru_hash", "key", "20", "value", "40", "entries",
        "65536", "name", "ORIG_DST",
    ]);

    daemon.spawn();
    let replaced = daemon.lines_with("map", "ORIG_DST");
    assert_eq!(replaced.len(), 1, "{}", daemon.log_text());
    let shown = bpftool(&["map", "show", "pinned", pin_text]);
    assert_eq!(shown["bytes_key"].as_u64(), Some(40), "{shown}");
    let host = upstream.addr.ip().to_string();
    let probe = python_json(daemon.exec_python("agent"), &python_probe(&host, "AF_INET"));
    assert_proxied(&probe);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn ten_thousand_short_connections_leave_the_maps_empty() {
    require_root();
    let slot = 7;
    let upstream = Upstream::start(upstream_ip(slot).into(), 443);
    let daemon = Daemon::start(slot, &[]);
    let host = upstream.addr.ip().to_string();
    let program = format!(
        r#"
import json, socket
ok = 0
for _ in range(10000):
    s = socket.create_connection(("{host}", 443), timeout=10)
    s.sendall(b"hello\n")
    if s.recv(100).startswith(b"peer="):
        ok += 1
    s.close()
print(json.dumps({{"ok": ok}}))
"#
    );
    let result = python_json(daemon.exec_python("many"), &program);
    assert_eq!(result["ok"], 10000);

    let maps = daemon.bpffs_dir.join("maps");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sockets = map_entries(&maps.join("SOCKETS"));
        let pending = map_entries(&maps.join("ORIG_DST"));
        if sockets == 0 && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "maps not drained: SOCKETS {sockets}, ORIG_DST {pending}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn exec_refuses_a_cgroup_no_appliance_intercepts() {
    require_root();
    let slot = 8;
    let (agents, _) = make_cgroup(&unique(slot, "unwatched"));
    let output = test_command(APPLIANCE)
        .arg("exec")
        .arg("--agents-cgroup")
        .arg(&agents)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not intercepted"), "{stderr}");
    assert!(stderr.contains("--allow-unprotected"), "{stderr}");
    let cgroup_count = std::fs::read_dir(&agents).unwrap().filter(|entry| {
        entry
            .as_ref()
            .is_ok_and(|entry| entry.file_type().unwrap().is_dir())
    });
    assert_eq!(cgroup_count.count(), 0, "exec left its cgroup behind");
    remove_cgroup_tree(&agents);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn a_foreign_namespace_never_escapes_with_the_appliances_mark() {
    require_root();
    let slot = 23;
    let daemon = Daemon::start(slot, &[]);
    // An unprivileged agent makes a network namespace of its own (where it holds
    // CAP_NET_ADMIN, so SO_MARK is allowed), listens on 443 there and connects to itself:
    // once plainly, once with the appliance's own mark (the built-in default).
    let program = r#"
import json, socket, subprocess
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("127.0.0.1", 443))
server.listen(8)
result = {}
for name, mark in (("plain", None), ("with_mark", 0x6170_6c69)):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mark is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", 443))
        result[name] = "connected"
    except PermissionError:
        result[name] = "refused"
print(json.dumps(result))
"#;
    let mut command = test_command(APPLIANCE);
    command
        .arg("exec")
        .arg("--agents-cgroup")
        .arg(&daemon.agents_cgroup)
        .args([
            "--",
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "unshare",
            "-Urn",
            // Root's own Python (pyenv) may be unreadable to an unprivileged user.
            "/usr/bin/python3",
        ]);
    let result = python_json(command, program);
    assert_eq!(result["plain"], "refused", "{result}");
    assert_eq!(
        result["with_mark"], "refused",
        "the appliance's mark let a foreign namespace out: {result}"
    );
}
