//! The TLS engine without the kernel side (no root needed): the real engine and proxy, a real
//! HTTPS upstream on loopback, and real clients (curl, Python). Every connection the engine
//! accepts is treated as redirected to the upstream, as capture would report.

mod common;
mod https;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use appliance::addr::{ClientAddr, EngineAddr, OrigDstAddr};
use appliance::audit::{EventLog, SecretUse};
use appliance::capture::{CgroupId, LookupError, OriginalDestinations, Redirect};
use appliance::engine::Engine;
use appliance::injection::{Injector, Verdict, Workload};
use appliance::proxy::{Proxy, ProxySettings, Unintercepted};
use appliance::tls::{CertificateAuthority, LeafCache, UpstreamTls};
use common::{test_command, Running};
use https::{Ca, Seen, Upstream, BIG_BODY};
use tokio::sync::{watch, Notify};

/// The credential the test injector adds; the upstream must see it, clients never send it.
const SECRET: &str = "Bearer sk-real-0123456789";

/// Every accepted connection was redirected to one upstream.
struct AllTo(Redirect);

impl OriginalDestinations for AllTo {
    fn take(
        &self,
        _client: ClientAddr,
        _engine: EngineAddr,
    ) -> Result<Option<Redirect>, LookupError> {
        Ok(Some(self.0.clone()))
    }
}

/// Intercepts api.test and bad.test; injects the secret, blocks /blocked.
struct TestInjector;

impl Injector for TestInjector {
    fn agent(&self, _workload: &Workload) -> Option<Arc<str>> {
        Some("tester".into())
    }

    fn intercepts(&self, host: &str, _agent: Option<&str>) -> bool {
        host == "api.test" || host == "bad.test"
    }

    fn prepare(
        &self,
        _host: &str,
        _agent: Option<&str>,
        path: &appliance::request_path::Readings,
        request: &mut http::request::Parts,
    ) -> Verdict {
        if path.normalized() == "/blocked" {
            return Verdict::Block {
                reason: "blocked by test rule".into(),
            };
        }
        request
            .headers
            .insert(http::header::AUTHORIZATION, SECRET.parse().unwrap());
        Verdict::Forward {
            injected: vec![SecretUse {
                id: "sec_test".into(),
                name: "test".into(),
            }],
            redactors: Vec::new(),
        }
    }
}

struct Fixture {
    engine_addr: SocketAddr,
    appliance_ca: PathBuf,
    upstream_ca: PathBuf,
    seen: Seen,
    release_sse: Arc<Notify>,
    events: Arc<EventLog>,
    dir: PathBuf,
    _stop: watch::Sender<bool>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("appliance-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let trusted = Ca::new("test upstream CA");
    let rogue = Ca::new("rogue CA");
    let upstream_ca = dir.join("upstream-ca.pem");
    trusted.write(&upstream_ca);
    let upstream = Upstream::start(
        "127.0.0.1:0".parse().unwrap(),
        &[
            ("api.test", &trusted),
            ("other.test", &trusted),
            ("bad.test", &rogue),
        ],
    )
    .await;
    let upstream_addr = upstream.addr;

    let events = Arc::new(EventLog::new(1024));
    let ca = CertificateAuthority::load_or_create(&dir.join("ca")).unwrap();
    let appliance_ca = dir.join("appliance-ca.pem");
    std::fs::write(&appliance_ca, ca.certificate_pem()).unwrap();
    let settings = ProxySettings {
        own_mark: 0,
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(5),
        max_header_bytes: 64 * 1024,
        limits: appliance::proxy::admission::Limits {
            total: 100_000,
            per_cgroup: 20_000,
        },
        unintercepted: Unintercepted::PassThrough,
    };
    let proxy = Proxy::new(
        Arc::new(TestInjector),
        Arc::new(LeafCache::new(ca, 64)),
        UpstreamTls::new(std::slice::from_ref(&upstream_ca)).unwrap(),
        Arc::clone(&events),
        settings,
    )
    .unwrap();
    let redirect = Redirect {
        original_dst: OrigDstAddr(upstream_addr),
        cgroup_id: CgroupId(1),
        pid: 1,
        netns_cookie: 1,
        from_container: false,
        container: None,
    };
    let engine = Engine::bind(
        &["127.0.0.1:0".parse().unwrap()],
        Arc::new(AllTo(redirect)),
        Arc::new(proxy),
    )
    .await
    .unwrap();
    let engine_addr = engine.local_addrs()[0];
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(engine.serve(stop_rx, Duration::from_secs(1)));
    Fixture {
        engine_addr,
        appliance_ca,
        upstream_ca,
        seen: upstream.seen,
        release_sse: upstream.release_sse,
        events,
        dir,
        _stop: stop,
    }
}

/// curl reaching `https://<host><path>` through the engine, trusting `ca`.
fn curl(fixture: &Fixture, ca: &Path, host: &str, path: &str, extra: &[&str]) -> Command {
    let mut command = test_command("curl");
    command
        .args(["-sS", "-v", "--max-time", "60", "--cacert"])
        .arg(ca)
        .arg("--connect-to")
        .arg(format!(
            "{host}:443:127.0.0.1:{}",
            fixture.engine_addr.port()
        ))
        .args(extra)
        .arg(format!("https://{host}{path}"));
    command
}

/// Runs a Python program and checks that it succeeded.
async fn python(program: &str) -> std::process::Output {
    let mut command = test_command("python3");
    command.args(["-c", program]);
    let output = run(command).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

async fn run(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn issuer_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .find(|line| line.contains("issuer:"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn curl_gets_the_injected_answer_over_http1_and_http2_with_an_appliance_leaf() {
    let fixture = start("curl").await;
    for (flag, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let output = run(curl(
            &fixture,
            &fixture.appliance_ca,
            "api.test",
            "/echo",
            &[
                flag,
                "-H",
                "Authorization: Bearer placeholder",
                "-w",
                "\n%{http_version}",
            ],
        ))
        .await;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        let (body, negotiated) = stdout.rsplit_once('\n').unwrap();
        let echoed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            echoed["authorization"], SECRET,
            "placeholder must be replaced"
        );
        assert_eq!(
            negotiated,
            version.trim_start_matches("HTTP/"),
            "client-side protocol"
        );
        assert!(
            issuer_line(&output.stderr).contains("appliance local CA"),
            "certificate not issued by the appliance CA: {}",
            issuer_line(&output.stderr)
        );
    }
    let events = fixture.events.since(0);
    assert_eq!(events.len(), 2, "{events:?}");
    for event in events {
        assert_eq!(event["outcome"], "forwarded");
        assert_eq!(event["status"], 200);
        assert_eq!(event["host"], "api.test");
        assert_eq!(event["path"], "/echo");
        assert_eq!(event["agent"], "tester");
        assert_eq!(event["secrets"][0]["name"], "test");
        assert!(
            !event.to_string().contains(SECRET),
            "an event holds the secret"
        );
    }
}

#[tokio::test]
async fn python_standard_library_trusts_the_exported_ca() {
    let fixture = start("python").await;
    let program = format!(
        r#"
import http.client, json, socket, ssl
ctx = ssl.create_default_context(cafile="{ca}")
conn = http.client.HTTPSConnection("api.test", context=ctx)
conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="api.test")
issuer = dict(x[0] for x in conn.sock.getpeercert()["issuer"])
conn.request("GET", "/echo", headers={{"Authorization": "Bearer placeholder"}})
response = conn.getresponse()
print(json.dumps({{"status": response.status, "body": json.loads(response.read()), "issuer": issuer["commonName"]}}))
"#,
        ca = fixture.appliance_ca.display(),
        port = fixture.engine_addr.port()
    );
    let output = python(&program).await;
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], 200);
    assert_eq!(result["body"]["authorization"], SECRET);
    assert!(result["issuer"]
        .as_str()
        .unwrap()
        .starts_with("appliance local CA"));
}

#[tokio::test]
async fn a_host_without_secret_is_passed_through_with_the_upstream_certificate() {
    let fixture = start("passthrough").await;
    let output = run(curl(
        &fixture,
        &fixture.upstream_ca,
        "other.test",
        "/echo",
        &["-H", "Authorization: Bearer placeholder"],
    ))
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        issuer_line(&output.stderr).contains("test upstream CA"),
        "{}",
        issuer_line(&output.stderr)
    );
    let echoed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(echoed["authorization"], "Bearer placeholder", "untouched");
}

#[tokio::test]
async fn an_upstream_that_fails_verification_gets_502_and_no_secret() {
    let fixture = start("badcert").await;
    let output = run(curl(
        &fixture,
        &fixture.appliance_ca,
        "bad.test",
        "/echo",
        &["-w", "\n%{http_code}"],
    ))
    .await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.ends_with("\n502"), "{stdout}");
    assert!(stdout.contains("does not verify"), "{stdout}");
    assert!(
        fixture
            .seen
            .authorizations()
            .iter()
            .all(|(host, _)| host != "bad.test"),
        "the unverified upstream received a request"
    );
}

#[tokio::test]
async fn misdirected_and_blocked_requests_never_reach_the_upstream() {
    let fixture = start("421").await;
    let misdirected = run(curl(
        &fixture,
        &fixture.appliance_ca,
        "api.test",
        "/echo",
        &[
            "-H",
            "Host: other.test",
            "-w",
            "\n%{http_code}",
            "--http1.1",
        ],
    ))
    .await;
    assert!(String::from_utf8(misdirected.stdout)
        .unwrap()
        .ends_with("\n421"));
    let blocked = run(curl(
        &fixture,
        &fixture.appliance_ca,
        "api.test",
        "/blocked",
        &["-w", "\n%{http_code}"],
    ))
    .await;
    assert!(String::from_utf8(blocked.stdout)
        .unwrap()
        .ends_with("\n403"));
    assert!(fixture.seen.authorizations().is_empty());
    let outcomes: Vec<String> = fixture
        .events
        .since(0)
        .iter()
        .map(|event| event["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(outcomes, ["misdirected", "blocked"]);
}

#[tokio::test]
async fn server_sent_events_arrive_before_the_response_ends() {
    let fixture = start("sse").await;
    let mut command = curl(&fixture, &fixture.appliance_ca, "api.test", "/sse", &["-N"]);
    command.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = Running::spawn(&mut command);
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().unwrap().unwrap();
        (first, lines)
    });
    let (first, lines) = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("first event did not arrive while the upstream held the response open")
        .unwrap();
    assert_eq!(first, "data: one");
    fixture.release_sse.notify_one();
    let rest = tokio::task::spawn_blocking(move || lines.map_while(Result::ok).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(rest.contains(&"data: two".to_owned()), "{rest:?}");
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn a_second_upstream_connection_resumes_the_tls_session() {
    let fixture = start("resume").await;
    // An open event stream keeps the first HTTP/1.1 upstream connection busy, so the next
    // request needs a second one.
    let mut command = curl(
        &fixture,
        &fixture.appliance_ca,
        "api.test",
        "/sse",
        &["-N", "--http1.1"],
    );
    command.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut stream = Running::spawn(&mut command);
    let stdout = stream.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        lines.next().unwrap().unwrap();
        lines
    });
    let lines = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the event stream did not start")
        .unwrap();
    let output = run(curl(
        &fixture,
        &fixture.appliance_ca,
        "api.test",
        "/echo",
        &["--http1.1"],
    ))
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    fixture.release_sse.notify_one();
    let finished = tokio::task::spawn_blocking(move || {
        lines.for_each(drop);
        stream.wait().unwrap()
    });
    assert!(finished.await.unwrap().success());
    let resumed: Vec<(String, bool)> = fixture
        .seen
        .requests()
        .into_iter()
        .map(|request| (request.target, request.resumed))
        .collect();
    assert_eq!(
        resumed,
        [("/sse".to_owned(), false), ("/echo".to_owned(), true)],
        "the first upstream connection makes a full handshake, the second resumes it"
    );
}

#[tokio::test]
async fn one_client_connection_keeps_reusing_one_upstream_connection() {
    let fixture = start("reuse").await;
    // One kept-alive client connection: answers with a body, without one (HEAD), and a POST.
    python(&format!(
        r#"
import http.client, socket, ssl
context = ssl.create_default_context(cafile="{ca}")
connection = http.client.HTTPSConnection("api.test", {port}, context=context)
opened = []
def connect(*args, **kwargs):
    opened.append(1)
    return socket.create_connection(("127.0.0.1", {port}))
connection._create_connection = connect
for method, body in [("GET", None), ("HEAD", None), ("POST", b"hello"), ("GET", None)]:
    connection.request(method, "/echo", body=body, headers={{"Host": "api.test"}})
    answer = connection.getresponse()
    answer.read()
    assert answer.status == 200, (method, answer.status)
assert len(opened) == 1, "the client had to reconnect %d times" % (len(opened) - 1)
"#,
        ca = fixture.appliance_ca.display(),
        port = fixture.engine_addr.port(),
    ))
    .await;
    let seen: Vec<(String, u64)> = fixture
        .seen
        .requests()
        .into_iter()
        .map(|request| (request.method, request.connection))
        .collect();
    assert_eq!(
        seen,
        [
            ("GET".to_owned(), 0),
            ("HEAD".to_owned(), 0),
            ("POST".to_owned(), 0),
            ("GET".to_owned(), 0)
        ],
        "each answer, with a body or without, gives the upstream connection back for the next request"
    );
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_100_mib_response_streams_through_in_bounded_memory() {
    let fixture = start("big").await;
    let before = peak_rss_kib();
    let output = run(curl(
        &fixture,
        &fixture.appliance_ca,
        "api.test",
        "/big",
        &["-o", "/dev/null", "-w", "%{size_download}"],
    ))
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        BIG_BODY.to_string()
    );
    let grown_mib = (peak_rss_kib() - before) / 1024;
    // Engine and upstream share this process; buffering the body would add 100 MiB.
    assert!(grown_mib < 48, "peak memory grew by {grown_mib} MiB");
}

#[tokio::test]
async fn a_websocket_upgrade_round_trips_after_injection() {
    let fixture = start("ws").await;
    let program = format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context(cafile="{ca}")
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="api.test")
{websocket}"#,
        ca = fixture.appliance_ca.display(),
        port = fixture.engine_addr.port(),
        websocket = https::python_websocket_echo("api.test"),
    );
    let output = python(&program).await;
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        https::WEBSOCKET_ECHO
    );
    assert_eq!(
        fixture.seen.authorizations(),
        vec![("api.test".into(), Some(SECRET.into()))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_keep_alive_clients_all_succeed() {
    let fixture = start("concurrent").await;
    let program = format!(
        r#"
import http.client, json, socket, ssl, threading
ctx = ssl.create_default_context(cafile="{ca}")
ok = []
def client():
    conn = http.client.HTTPSConnection("api.test", context=ctx, timeout=60)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="api.test")
    for _ in range(5):
        conn.request("GET", "/echo")
        response = conn.getresponse()
        body = json.loads(response.read())
        ok.append(response.status == 200 and body["authorization"] == "{secret}")
threads = [threading.Thread(target=client) for _ in range(200)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({{"ok": sum(ok), "total": len(ok)}}))
"#,
        ca = fixture.appliance_ca.display(),
        port = fixture.engine_addr.port(),
        secret = SECRET,
    );
    let output = python(&program).await;
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["ok"], 1000, "{result}");
}

#[tokio::test]
async fn silent_and_oversized_clients_are_cut_off_and_others_unaffected() {
    use tokio::io::AsyncReadExt as _;
    let fixture = start("limits").await;
    // A client that never sends a ClientHello is closed after the handshake timeout (5 s).
    let mut silent = tokio::net::TcpStream::connect(fixture.engine_addr)
        .await
        .unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buffer))
        .await
        .expect("a silent client was kept open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // A header block over the limit (64 KiB) is refused.
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let oversized = run(curl(
        &fixture,
        &fixture.appliance_ca,
        "api.test",
        "/echo",
        &["--http1.1", "-H", &big, "-w", "\n%{http_code}"],
    ))
    .await;
    let stdout = String::from_utf8_lossy(&oversized.stdout);
    assert!(
        stdout.ends_with("\n431") || !oversized.status.success(),
        "oversized headers were accepted: {stdout}"
    );
    assert!(
        fixture.seen.requests().is_empty(),
        "the oversized request reached the upstream"
    );

    // Meanwhile the engine serves everyone else.
    let normal = run(curl(
        &fixture,
        &fixture.appliance_ca,
        "api.test",
        "/echo",
        &[],
    ))
    .await;
    assert!(
        normal.status.success(),
        "{}",
        String::from_utf8_lossy(&normal.stderr)
    );
}

/// curl with the path sent exactly as written; returns the status code.
async fn status_of(fixture: &Fixture, path: &str, extra: &[&str]) -> String {
    let mut args = vec!["--path-as-is", "-o", "/dev/null", "-w", "%{http_code}"];
    args.extend_from_slice(extra);
    let output = run(curl(
        fixture,
        &fixture.appliance_ca,
        "api.test",
        path,
        &args,
    ))
    .await;
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn rules_see_every_reading_and_the_upstream_gets_the_path_as_sent_over_http1_and_http2() {
    let fixture = start("paths").await;
    for version in ["--http1.1", "--http2"] {
        // Every spelling of /blocked is blocked, and never reaches the upstream.
        for path in [
            "//blocked",
            "/./blocked",
            "/%62locked",
            "/x/../blocked",
            "/x/%2e%2e/blocked",
        ] {
            assert_eq!(
                status_of(&fixture, path, &[version]).await,
                "403",
                "{path} {version}"
            );
        }
        // What cannot be normalized without guessing is refused.
        for path in ["/a%zz", "/a%00b", "/a%5cb", "/x/..;/blocked"] {
            assert_eq!(
                status_of(&fixture, path, &[version]).await,
                "400",
                "{path} {version}"
            );
        }
        // The upstream receives the path as the client sent it: an object store's key with
        // `//`, a URL inside a path, a signature over the path all arrive unchanged.
        for path in [
            "/x/./y//../echo?a=%2e%2E",
            "/bucket/logs//2024/a",
            "/https://example.com/page",
            "/kv/app/%2e",
        ] {
            assert_eq!(status_of(&fixture, path, &[version]).await, "200", "{path}");
        }
    }
    let targets: Vec<String> = fixture
        .seen
        .requests()
        .into_iter()
        .map(|request| request.target)
        .collect();
    let sent = [
        "/x/./y//../echo?a=%2e%2E",
        "/bucket/logs//2024/a",
        "/https://example.com/page",
        "/kv/app/%2e",
    ];
    assert_eq!(targets, [sent, sent].concat());
    let outcomes: Vec<String> = fixture
        .events
        .since(0)
        .iter()
        .map(|event| event["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(outcomes.iter().filter(|o| *o == "rejected").count(), 8);
    assert_eq!(outcomes.iter().filter(|o| *o == "blocked").count(), 10);
}

#[tokio::test]
async fn connect_trace_and_h2c_never_reach_the_upstream_as_such() {
    let fixture = start("tunnels").await;
    let program = format!(
        r#"
import json, socket, ssl
ctx = ssl.create_default_context(cafile="{ca}")
ctx.set_alpn_protocols(["http/1.1"])
def exchange(head):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="api.test")
    s.sendall(head.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    s.close()
    return answer.split(b"\r\n")[0].decode()
print(json.dumps({{
    "connect": exchange("CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n"),
    "trace": exchange("TRACE /echo HTTP/1.1\r\nHost: api.test\r\n\r\n"),
    "h2c": exchange("GET /echo HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"),
}}))
"#,
        ca = fixture.appliance_ca.display(),
        port = fixture.engine_addr.port(),
    );
    let output = python(&program).await;
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["connect"], "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(result["trace"], "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(result["h2c"], "HTTP/1.1 200 OK");
    let requests = fixture.seen.requests();
    assert_eq!(requests.len(), 1, "only the h2c request is forwarded");
    assert_eq!(requests[0].method, "GET");
    for header in ["upgrade", "http2-settings"] {
        assert!(
            !requests[0].headers.contains_key(header),
            "{header} reached the upstream: {:?}",
            requests[0].headers
        );
    }
}
