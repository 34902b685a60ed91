//! What happened, for ops, end to end: a real Prometheus scrapes the daemon while an agent's
//! requests get their secret injected, promtool checks the exposition, and the audit log and
//! every secret's `lastUsedAt` survive restarts and a SIGKILL.

mod common;
mod https;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use https::{Ca, Upstream};
use serde_json::Value;

const HOST: &str = "api.openai.com";

fn curl_exec(daemon: &Daemon, ca: &Path, upstream: SocketAddr) -> Output {
    test_command(APPLIANCE)
        .arg("exec")
        .arg("--agents-cgroup")
        .arg(&daemon.agents_cgroup)
        .args(["--", "curl", "-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{HOST}:443:{}", upstream.ip()))
        .args(["-H", "Authorization: Bearer placeholder"])
        .arg(format!("https://{HOST}/v1/models"))
        .output()
        .unwrap()
}

/// The first sample of a Prometheus instant query, as a number.
fn query(prometheus: SocketAddr, expression: &str) -> Option<f64> {
    let output = test_command("curl")
        .args(["-sS", "--max-time", "5", "--get", "--data-urlencode"])
        .arg(format!("query={expression}"))
        .arg(format!("http://{prometheus}/api/v1/query"))
        .output()
        .unwrap();
    let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
    answer["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

/// Waits until `expression` evaluates to `expected` in Prometheus.
fn wait_for(prometheus: SocketAddr, expression: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        last = query(prometheus, expression);
        if last == Some(expected) {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{expression} is {last:?} in Prometheus, not {expected}");
}

/// A daemon configured with `config`, an upstream for [`HOST`] on the slot's loopback
/// address, a secret `openai` for it, and the appliance CA in a file; removed on drop.
struct Fixture {
    daemon: Daemon,
    upstream: Upstream,
    appliance_ca: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Fixture {
    fn start(slot: u8, config: &str, value: &str) -> Self {
        require_root();
        let dir = std::env::temp_dir().join(unique(slot, "files"));
        std::fs::create_dir_all(&dir).unwrap();
        let test_ca = Ca::new("test upstream CA");
        let upstream_ca = dir.join("upstream-ca.pem");
        test_ca.write(&upstream_ca);
        let upstream = Upstream::start_in_background(
            SocketAddr::new(upstream_ip(slot).into(), 443),
            &[(HOST, &test_ca)],
        );
        let daemon = Daemon::start_configured(
            slot,
            config,
            &["--upstream-ca", upstream_ca.to_str().unwrap()],
            None,
            &[],
        );
        create_secret(&daemon, &["openai", "--type", "openai"], value);
        let appliance_ca = dir.join("appliance-ca.pem");
        std::fs::write(&appliance_ca, appliance_ca_pem(&daemon)).unwrap();
        Self {
            daemon,
            upstream,
            appliance_ca,
            dir,
        }
    }

    /// An agent's request with a placeholder key, which must succeed.
    fn request(&self) {
        let output = curl_exec(&self.daemon, &self.appliance_ca, self.upstream.addr);
        assert!(output.status.success(), "{output:?}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn prometheus_scrapes_the_requests_and_injections_an_agent_made() {
    let slot = 33;
    let metrics: SocketAddr = format!("127.0.0.1:{}", 19000 + u16::from(slot))
        .parse()
        .unwrap();
    let config = format!("[metrics]\nenabled = true\nlisten = \"{metrics}\"\n");
    let fixture = Fixture::start(slot, &config, "sk-proj-REAL-METRICS");
    for _ in 0..3 {
        fixture.request();
    }
    let dir = &fixture.dir;

    // UDP to an intercepted port is refused in the kernel, and counted there.
    let udp = test_command(APPLIANCE)
        .arg("exec")
        .arg("--agents-cgroup")
        .arg(&fixture.daemon.agents_cgroup)
        .args(["--", "python3", "-c"])
        .arg(format!(
            "import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'q', ('{}', 443))\nexcept PermissionError:\n    print('refused')",
            upstream_ip(slot)
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&udp.stdout).trim(),
        "refused",
        "{udp:?}"
    );

    // The metrics name every agent, secret and host: an agent cannot read them.
    let scraped_by_agent = test_command(APPLIANCE)
        .arg("exec")
        .arg("--agents-cgroup")
        .arg(&fixture.daemon.agents_cgroup)
        .args(["--", "curl", "-sS", "--max-time", "5"])
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .unwrap();
    assert_eq!(
        scraped_by_agent.status.code(),
        Some(7),
        "{scraped_by_agent:?}"
    );
    assert!(scraped_by_agent.stdout.is_empty(), "{scraped_by_agent:?}");

    // The exposition passes promtool's checks.
    let exposition = test_command("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .unwrap();
    assert!(exposition.status.success(), "{exposition:?}");
    let text = String::from_utf8(exposition.stdout.clone()).unwrap();
    let udp_refusals = text
        .lines()
        .find_map(|line| line.strip_prefix("appliance_capture_refusals_total{reason=\"udp\"} "))
        .and_then(|count| count.parse::<u64>().ok());
    assert!(udp_refusals >= Some(1), "{text}");
    assert!(
        text.contains("appliance_capture_refusals_total{reason=\"private_listener\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("sk-proj-REAL-METRICS"),
        "a value in the metrics"
    );
    let mut check = test_command("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(&exposition.stdout)
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A real Prometheus scrapes the daemon.
    let prometheus: SocketAddr = format!("127.0.0.1:{}", 19100 + u16::from(slot))
        .parse()
        .unwrap();
    let prometheus_config = dir.join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: appliance\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Running::spawn(
        test_command("prometheus")
            .arg(format!("--config.file={}", prometheus_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prometheus}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for(prometheus, "up{job=\"appliance\"}", 1.0);
    wait_for(
        prometheus,
        "sum(appliance_requests_total{host=\"api.openai.com\",secret=\"openai\",outcome=\"forwarded\"})",
        3.0,
    );
    wait_for(
        prometheus,
        "sum(appliance_injections_total{secret=\"openai\"})",
        3.0,
    );
    wait_for(
        prometheus,
        "sum(appliance_connections_total{kind=\"intercepted\"})",
        3.0,
    );
    wait_for(prometheus, "appliance_secrets", 1.0);
    wait_for(prometheus, "appliance_request_duration_seconds_count", 3.0);
}

/// `appliance --json events ARGS`, one event per line.
fn events(daemon: &Daemon, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json", "events"];
    all.extend_from_slice(args);
    let output = cli(daemon, &all, None);
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn last_used(daemon: &Daemon) -> Value {
    let output = cli(daemon, &["--json", "secret", "list"], None);
    assert!(output.status.success(), "{output:?}");
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let secrets = listed
        .as_array()
        .or(listed["secrets"].as_array())
        .unwrap()
        .clone();
    secrets
        .iter()
        .find(|secret| secret["name"] == "openai")
        .map(|secret| secret["lastUsedAt"].clone())
        .unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn events_and_last_used_survive_a_restart_and_a_kill_leaves_whole_lines() {
    let mut fixture = Fixture::start(34, "", "sk-proj-REAL-AUDIT");
    for _ in 0..3 {
        fixture.request();
    }
    let daemon = &mut fixture.daemon;
    let before = events(daemon, &[]);
    assert_eq!(before.len(), 3, "{before:#?}");
    let used = last_used(daemon);
    assert!(used.is_string(), "{used}");

    // A clean restart: the same events, the same lastUsedAt, and numbering goes on.
    daemon.stop();
    daemon.spawn();
    assert_eq!(events(daemon, &[]), before);
    assert_eq!(last_used(daemon), used);
    fixture.request();
    let daemon = &mut fixture.daemon;
    let after = events(daemon, &[]);
    assert_eq!(after.len(), 4);
    assert_eq!(after[3]["seq"].as_u64(), Some(4));

    // Filters.
    assert_eq!(events(daemon, &["--secret", "openai"]).len(), 4);
    assert_eq!(events(daemon, &["--host", "other.example.com"]).len(), 0);
    assert_eq!(events(daemon, &["--since", "1h"]).len(), 4);
    assert_eq!(
        events(daemon, &["--since", "2099-01-01T00:00:00Z"]).len(),
        0
    );
    let refused = cli(daemon, &["events", "--since", "yesterday"], None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("RFC 3339"),
        "{refused:?}"
    );

    // SIGKILL: the log holds every event written before it, each a whole line.
    daemon.kill_hard();
    let log = std::fs::read_to_string(daemon.state_dir.join("audit/events.jsonl")).unwrap();
    assert!(log.ends_with('\n'), "a torn last line");
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect();
    assert_eq!(lines, after);
    assert!(
        !log.contains("sk-proj-REAL-AUDIT"),
        "a value in the audit log"
    );
    daemon.spawn();
    assert_eq!(events(daemon, &[]), after);
}
