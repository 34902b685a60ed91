//! Secrets end to end on the real kernel: created with the `appliance` CLI through the admin
//! socket, injected by the daemon into requests that curl (inside `appliance exec`, with only
//! a placeholder) sends to a loopback HTTPS upstream over the real eBPF redirect.

mod common;
mod https;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::*;
use https::{Ca, Upstream};
use serde_json::Value;

/// Hosts the upstream serves (all on one loopback address), each with a test-CA certificate.
const HOSTS: [&str; 8] = [
    "api.anthropic.com",
    "api.openai.com",
    "api.github.com",
    "github.com",
    "api.stripe.com",
    "plain.example.com",
    "generic.example.com",
    "other.example.com",
];

struct Setup {
    daemon: Daemon,
    upstream: Upstream,
    upstream_ip: IpAddr,
    appliance_ca: PathBuf,
    upstream_ca: PathBuf,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(slot: u8, extra: &[&str]) -> Setup {
    require_root();
    let dir = std::env::temp_dir().join(unique(slot, "files"));
    std::fs::create_dir_all(&dir).unwrap();
    let test_ca = Ca::new("test upstream CA");
    let upstream_ca = dir.join("upstream-ca.pem");
    test_ca.write(&upstream_ca);
    let upstream_ip = IpAddr::V4(upstream_ip(slot));
    let hosts: Vec<(&str, &Ca)> = HOSTS.iter().map(|host| (*host, &test_ca)).collect();
    let upstream = Upstream::start_in_background(SocketAddr::new(upstream_ip, 443), &hosts);
    let mut args = vec!["--upstream-ca", upstream_ca.to_str().unwrap()];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(slot, &args);
    let appliance_ca = dir.join("appliance-ca.pem");
    std::fs::write(&appliance_ca, appliance_ca_pem(&daemon)).unwrap();
    Setup {
        daemon,
        upstream,
        upstream_ip,
        appliance_ca,
        upstream_ca,
        dir,
    }
}

impl Setup {
    /// curl inside `appliance exec`, to `https://<host><path>` resolved to the upstream.
    fn curl(&self, ca: &Path, host: &str, path: &str, extra: &[&str]) -> Output {
        let mut command = test_command(APPLIANCE);
        command
            .arg("exec")
            .arg("--agents-cgroup")
            .arg(&self.daemon.agents_cgroup)
            .args(["--", "curl", "-sS", "-v", "--max-time", "20", "--cacert"])
            .arg(ca)
            .arg("--resolve")
            .arg(format!("{host}:443:{}", self.upstream_ip))
            .args(extra)
            .arg(format!("https://{host}{path}"));
        command.output().unwrap()
    }

    /// curl from a process in `cgroup` for `https://api.openai.com<path>`, trusting the
    /// appliance CA; its output ends with a line holding the status code.
    fn curl_openai_in(&self, cgroup: &Path, path: &str) -> Output {
        command_in_cgroup(cgroup, "curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(&self.appliance_ca)
            .arg("--resolve")
            .arg(format!("api.openai.com:443:{}", self.upstream_ip))
            .arg(format!("https://api.openai.com{path}"))
            .output()
            .unwrap()
    }

    /// curl reading `/sse` of api.openai.com from inside `appliance exec`, with its output
    /// as lines.
    fn sse_client(
        &self,
    ) -> (
        Running,
        std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    ) {
        let mut sse = Running::spawn(
            test_command(APPLIANCE)
                .arg("exec")
                .arg("--agents-cgroup")
                .arg(&self.daemon.agents_cgroup)
                .args(["--", "curl", "-sS", "-N", "--max-time", "30", "--cacert"])
                .arg(&self.appliance_ca)
                .arg("--resolve")
                .arg(format!("api.openai.com:443:{}", self.upstream_ip))
                .arg("https://api.openai.com/sse")
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let stdout = sse.stdout.take().unwrap();
        (
            sse,
            std::io::BufRead::lines(std::io::BufReader::new(stdout)),
        )
    }

    /// The last request the upstream received for `host`.
    fn last_request(&self, host: &str) -> https::SeenRequest {
        self.upstream
            .seen
            .requests()
            .into_iter()
            .rev()
            .find(|request| request.server_name == host)
            .unwrap_or_else(|| panic!("the upstream received nothing for {host}"))
    }
}

/// Every file under `dir`, with its contents, in order.
fn tree_contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            files.extend(tree_contents(&entry.path()));
        } else {
            files.push((entry.path(), std::fs::read(entry.path()).unwrap()));
        }
    }
    files.sort();
    files
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn provider_shortcuts_inject_the_real_credential_over_the_real_redirect() {
    let setup = setup(9, &[]);
    let daemon = &setup.daemon;
    create_secret(
        daemon,
        &["anthropic", "--type", "anthropic"],
        "sk-ant-REAL-1",
    );
    create_secret(daemon, &["openai", "--type", "openai"], "sk-proj-REAL-2");
    create_secret(daemon, &["github", "--type", "github"], "ghp_REAL3");
    create_secret(daemon, &["stripe", "--type", "stripe"], "sk_live_REAL4");

    let placeholder = [
        "-H",
        "x-api-key: placeholder",
        "-H",
        "Authorization: Bearer placeholder",
    ];
    let ca = &setup.appliance_ca;
    for (host, path, header, expected) in [
        (
            "api.anthropic.com",
            "/v1/messages",
            "x-api-key",
            "sk-ant-REAL-1",
        ),
        (
            "api.openai.com",
            "/v1/chat/completions",
            "authorization",
            "Bearer sk-proj-REAL-2",
        ),
        (
            "api.github.com",
            "/user",
            "authorization",
            "Bearer ghp_REAL3",
        ),
        // git over HTTPS: Basic x-access-token:<value>
        (
            "github.com",
            "/o/r.git/info/refs?service=git-upload-pack",
            "authorization",
            "Basic eC1hY2Nlc3MtdG9rZW46Z2hwX1JFQUwz",
        ),
        (
            "api.stripe.com",
            "/v1/charges",
            "authorization",
            "Bearer sk_live_REAL4",
        ),
    ] {
        let output = setup.curl(ca, host, path, &placeholder);
        assert_ok(&output);
        let issuer = String::from_utf8_lossy(&output.stderr)
            .lines()
            .find(|line| line.contains("issuer:"))
            .unwrap_or_default()
            .to_owned();
        assert!(issuer.contains("appliance local CA"), "{host}: {issuer}");
        let request = setup.last_request(host);
        assert_eq!(
            request.headers.get(header).map(String::as_str),
            Some(expected),
            "{host}"
        );
        assert_eq!(request.target, path, "{host}: path changed");
        // The upstream echoes what it received; the agent must still never see the value.
        let echoed = String::from_utf8_lossy(&output.stdout);
        assert!(echoed.contains("\"target\""), "{host}: no echo: {echoed}");
        assert!(
            !echoed.contains(expected),
            "{host}: the agent received the credential: {echoed}"
        );
        assert!(echoed.contains("*****"), "{host}: no mask in {echoed}");
        assert_eq!(
            request.headers.get("accept-encoding").map(String::as_str),
            Some("identity"),
            "{host}: the body could not be inspected"
        );
    }
    // Headers the secret does not own pass unchanged: the placeholder x-api-key to OpenAI.
    assert_eq!(
        setup.last_request("api.openai.com").headers["x-api-key"],
        "placeholder"
    );

    let events = cli(daemon, &["--json", "events"], None);
    assert_ok(&events);
    let lines: Vec<Value> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let used: Vec<&str> = lines
        .iter()
        .filter_map(|event| event["secrets"][0]["name"].as_str())
        .collect();
    assert_eq!(used, ["anthropic", "openai", "github", "github", "stripe"]);
    for event in &lines {
        assert_eq!(event["status"], 200);
        assert!(event["pid"].as_u64().unwrap() > 0);
    }
    let listed = cli(daemon, &["secret", "list"], None);
    assert_ok(&listed);
    let listing = String::from_utf8_lossy(&listed.stdout);
    for value in [
        "sk-ant-REAL-1",
        "sk-proj-REAL-2",
        "ghp_REAL3",
        "sk_live_REAL4",
    ] {
        assert!(!listing.contains(value), "list shows a value");
        assert!(!daemon.log_text().contains(value), "the log holds a value");
    }
}

#[test]
fn hosts_without_secrets_pass_through_with_their_own_certificate() {
    let setup = setup(10, &[]);
    create_secret(
        &setup.daemon,
        &["openai", "--type", "openai"],
        "sk-proj-REAL",
    );
    let output = setup.curl(
        &setup.upstream_ca,
        "plain.example.com",
        "/anything",
        &["-H", "Authorization: Bearer mine"],
    );
    assert_ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("test upstream CA"), "{stderr}");
    assert_eq!(
        setup.last_request("plain.example.com").headers["authorization"],
        "Bearer mine"
    );
}

#[test]
fn generic_secrets_inject_by_query_path_and_several_headers() {
    let setup = setup(11, &[]);
    let daemon = &setup.daemon;
    let definition = setup.dir.join("generic.json");
    std::fs::write(
        &definition,
        r#"{"rules": [
            {"hostPattern": "generic.example.com", "pathPattern": "/maps/*",
             "injection": {"paramName": "key"}},
            {"hostPattern": "generic.example.com", "pathPattern": "/bot*",
             "injection": {"pathTemplate": "/bot{value}/"}},
            {"hostPattern": "generic.example.com", "pathPattern": "/v1/*",
             "injection": {"pathRegex": "^/v1/([^/]+)/keys/[^/]+", "pathReplacement": "/v1/$1/keys/{value}"}},
            {"hosts": ["other.example.com"],
             "injection": {"headers": [{"headerName": "x-key"}, {"headerName": "x-auth", "valueFormat": "Token {value}"}]}}
        ]}"#,
    )
    .unwrap();
    create_secret(
        daemon,
        &["generic", "--definition", definition.to_str().unwrap()],
        "g3n:eric",
    );
    let ca = &setup.appliance_ca;
    for (host, path, expected_target) in [
        (
            "generic.example.com",
            "/maps/geo?key=PLACEHOLDER&q=1",
            "/maps/geo?q=1&key=g3n%3Aeric",
        ),
        (
            "generic.example.com",
            "/botPLACEHOLDER/send",
            "/botg3n%3Aeric/send",
        ),
        (
            "generic.example.com",
            "/v1/acme/keys/PLACEHOLDER",
            "/v1/acme/keys/g3n%3Aeric",
        ),
    ] {
        assert_ok(&setup.curl(ca, host, path, &[]));
        assert_eq!(setup.last_request(host).target, expected_target);
    }
    assert_ok(&setup.curl(ca, "other.example.com", "/", &["-H", "x-key: fake"]));
    let request = setup.last_request("other.example.com");
    assert_eq!(request.headers["x-key"], "g3n:eric");
    assert_eq!(request.headers["x-auth"], "Token g3n:eric");
}

#[test]
fn echoes_in_the_status_line_and_in_encoded_forms_never_reach_the_agent() {
    let setup = setup(20, &[]);
    // A value with '/' and '+', which JSON and percent-encoding spell differently.
    let value = "sk-proj-REAL/echo+0123456789abcdef";
    create_secret(&setup.daemon, &["openai", "--type", "openai"], value);
    let output = setup.curl(
        &setup.appliance_ca,
        "api.openai.com",
        "/echo-forms",
        &["--http1.1", "-H", "authorization: Bearer placeholder"],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The upstream did get the value, and answered with it in every form.
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        format!("Bearer {value}")
    );
    assert!(
        stdout.contains("b64=") && stdout.contains("slashes="),
        "{stdout}"
    );
    let status_line = stderr
        .lines()
        .find(|line| line.starts_with("< HTTP/1.1 401"))
        .unwrap_or_else(|| panic!("no status line: {stderr}"));
    assert!(
        status_line.contains("Invalid key Bearer *****"),
        "{status_line}"
    );
    let percent: String = value.bytes().map(|byte| format!("%{byte:02x}")).collect();
    let unicode: String = value.bytes().map(|byte| format!("\\u{byte:04x}")).collect();
    let escaped = value.replace('/', "\\/");
    // Pieces of the value's base64 inside the echoed blob `{"auth":"Bearer …"}`.
    let cores = ["UkVBTC9lY2hvKzAxMjM0NTY3", "LXByb2otUkVBTC9lY2hv"];
    for form in [value, &percent, &percent.to_uppercase(), &unicode, &escaped]
        .into_iter()
        .chain(cores)
    {
        assert!(
            !stdout.contains(form),
            "{form} reached the agent:\n{stdout}"
        );
        assert!(
            !stderr.contains(form),
            "{form} reached the agent:\n{stderr}"
        );
    }

    // A compressed echo is decoded and inspected; the agent gets it decoded and masked.
    let gzip = setup.curl(&setup.appliance_ca, "api.openai.com", "/echo-gzip", &[]);
    assert_ok(&gzip);
    let body = String::from_utf8_lossy(&gzip.stdout);
    assert!(body.starts_with("{\"echo\": \"Bearer *****"), "{body}");
    assert!(!body.contains(value));
    assert!(
        !String::from_utf8_lossy(&gzip.stderr)
            .to_ascii_lowercase()
            .contains("< content-encoding"),
        "the decoded body still claims to be compressed"
    );
    // One in a coding the appliance cannot decode is refused, not passed on unchecked.
    let compress = setup.curl(
        &setup.appliance_ca,
        "api.openai.com",
        "/echo-compress",
        &["-w", "\n%{http_code}"],
    );
    let body = String::from_utf8_lossy(&compress.stdout);
    assert!(body.ends_with("\n502"), "{body}");
    assert!(body.contains("cannot be inspected"), "{body}");
}

/// curl talking raw HTTP to the admin socket; returns (status, body).
fn raw_api(socket: &Path, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, Value) {
    let mut command = test_command("curl");
    command
        .args(["-sS", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some((content_type, _)) = body {
        command.args([
            "-H",
            &format!("Content-Type: {content_type}"),
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = command
        .arg(format!("http://appliance{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let data = body.map_or("", |(_, data)| data).to_owned();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(data.as_bytes());
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (body, status) = stdout.rsplit_once('\n').unwrap();
    (
        status.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A request the API must refuse, and how.
struct ErrorCase<'a> {
    method: &'a str,
    path: &'a str,
    body: Option<(&'a str, &'a str)>,
    status: u16,
    kind: &'a str,
    field: Option<&'a str>,
}

impl<'a> ErrorCase<'a> {
    fn new(
        method: &'a str,
        path: &'a str,
        body: Option<(&'a str, &'a str)>,
        status: u16,
        kind: &'a str,
        field: Option<&'a str>,
    ) -> Self {
        Self {
            method,
            path,
            body,
            status,
            kind,
            field,
        }
    }
}

#[test]
fn the_admin_api_answers_every_error_with_one_shape() {
    let setup = setup(12, &["--admin-group", "nogroup"]);
    let socket = &setup.daemon.socket;
    let json = "application/json";
    let (status, created) = raw_api(
        socket,
        "POST",
        "/v1/secrets",
        Some((
            json,
            r#"{"name": "a", "type": "openai", "value": "sk-1234567890abcdef"}"#,
        )),
    );
    assert_eq!(status, 201, "{created}");
    assert!(created.get("value").is_none());
    assert_eq!(created["preview"], "sk-123••••def");
    let id = created["id"].as_str().unwrap().to_owned();

    let big = format!(r#"{{"name": "big", "value": "{}"}}"#, "x".repeat(300_000));
    let patch_path = format!("/v1/secrets/{id}");
    let cases = [
        ErrorCase::new(
            "POST",
            "/v1/secrets",
            Some((json, r#"{"name": "b", "type": "openai", "value": ""}"#)),
            400,
            "validation",
            Some("value"),
        ),
        ErrorCase::new(
            "POST",
            "/v1/secrets",
            Some((json, r#"{"name": "a", "type": "openai", "value": "x"}"#)),
            409,
            "conflict",
            Some("name"),
        ),
        ErrorCase::new(
            "POST",
            "/v1/secrets",
            Some(("text/plain", "{}")),
            415,
            "unsupported_media_type",
            None,
        ),
        ErrorCase::new(
            "POST",
            "/v1/secrets",
            Some((json, "{not json")),
            400,
            "validation",
            Some("body"),
        ),
        ErrorCase::new(
            "POST",
            "/v1/secrets",
            Some((json, &big)),
            413,
            "payload_too_large",
            None,
        ),
        ErrorCase::new(
            "PATCH",
            &patch_path,
            Some((json, "{}")),
            400,
            "validation",
            Some("body"),
        ),
        ErrorCase::new("GET", "/v1/secrets/missing", None, 404, "not_found", None),
        ErrorCase::new("PUT", "/v1/secrets", None, 405, "method_not_allowed", None),
        ErrorCase::new("GET", "/v1/nothing", None, 404, "not_found", None),
    ];
    for case in cases {
        let (status, answer) = raw_api(socket, case.method, case.path, case.body);
        let what = format!("{} {}", case.method, case.path);
        assert_eq!(status, case.status, "{what}: {answer}");
        assert_eq!(answer["error"]["type"], case.kind, "{what}");
        assert_eq!(answer["error"]["field"].as_str(), case.field, "{what}");
        assert!(answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    let (status, updated) = raw_api(
        socket,
        "PATCH",
        &format!("/v1/secrets/{id}"),
        Some((json, r#"{"name": "renamed"}"#)),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["name"], "renamed");
    assert_eq!(raw_api(socket, "GET", "/v1/secrets/renamed", None).0, 200);
    assert_eq!(
        raw_api(socket, "DELETE", "/v1/secrets/renamed", None).0,
        204
    );
    assert_eq!(
        raw_api(socket, "GET", &format!("/v1/secrets/{id}"), None).0,
        404
    );

    // Members of the admin group may use the socket; others cannot even connect, and a
    // caller let in by a loosened mode is still refused by SO_PEERCRED.
    let as_user = |uid: &str, gid: &str| {
        test_command("setpriv")
            .args([
                "--reuid",
                uid,
                "--regid",
                gid,
                "--clear-groups",
                "curl",
                "-sS",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
            ])
            .arg(socket)
            .arg("http://appliance/v1/health")
            .output()
            .unwrap()
    };
    let member = as_user("65534", "65534");
    assert!(
        String::from_utf8_lossy(&member.stdout).ends_with("\n200"),
        "{member:?}"
    );
    let outsider = as_user("65533", "65533");
    assert!(
        !String::from_utf8_lossy(&outsider.stdout).ends_with("\n200"),
        "{outsider:?}"
    );
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let outsider = as_user("65533", "65533");
    assert!(
        String::from_utf8_lossy(&outsider.stdout).ends_with("\n403"),
        "{outsider:?}"
    );
    assert!(setup.daemon.log_text().contains("admin_refused"));
}

#[test]
fn the_cli_reports_errors_with_distinct_exit_codes_and_survives_restarts_and_key_rotation() {
    let mut setup = setup(13, &[]);
    create_secret(
        &setup.daemon,
        &["keep", "--type", "anthropic"],
        "sk-ant-KEEP-0123456789",
    );

    let usage = cli(&setup.daemon, &["secret", "create"], None);
    assert_eq!(usage.status.code(), Some(2), "usage error");
    let refused = cli(&setup.daemon, &["secret", "get", "nope"], None);
    assert_eq!(refused.status.code(), Some(3), "API error");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("nope"));
    let no_value = cli(
        &setup.daemon,
        &["secret", "create", "x", "--type", "openai"],
        None,
    );
    assert_eq!(no_value.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_value.stderr).contains("--value-stdin"));
    // A value that would split the header it goes into is refused, naming the field; the
    // same value is fine where it is encoded (the query).
    let create_crlf = |place: [&str; 2]| {
        let mut args = vec!["secret", "create", "crlf", "--host", "h.example.com"];
        args.extend(place);
        args.push("--value-stdin");
        cli(&setup.daemon, &args, Some("x\r\nX-Evil: 1"))
    };
    let crlf = create_crlf(["--header", "x-key"]);
    assert_eq!(crlf.status.code(), Some(3), "{crlf:?}");
    let stderr = String::from_utf8_lossy(&crlf.stderr);
    assert!(
        stderr.contains("value") && stderr.contains("x-key"),
        "{stderr}"
    );
    assert!(!stderr.contains("X-Evil"), "the value was echoed: {stderr}");
    let listed = cli(&setup.daemon, &["--json", "secret", "list"], None);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("crlf"));
    assert_ok(&create_crlf(["--query", "key"]));
    let moved = cli(
        &setup.daemon,
        &["secret", "update", "crlf", "--header", "x-key"],
        None,
    );
    assert_eq!(moved.status.code(), Some(3), "{moved:?}");
    assert!(String::from_utf8_lossy(&moved.stderr).contains("x-key"));
    assert_ok(&cli(&setup.daemon, &["secret", "delete", "crlf"], None));

    // Concurrent writers: one name, many clients, exactly one wins.
    let racers: Vec<_> = (0..12)
        .map(|_| {
            let socket = setup.daemon.socket.clone();
            std::thread::spawn(move || {
                let mut child = test_command(APPLIANCE)
                    .arg("--socket")
                    .arg(socket)
                    .args([
                        "secret",
                        "create",
                        "race",
                        "--type",
                        "openai",
                        "--value-stdin",
                    ])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                child.stdin.take().unwrap().write_all(b"sk-race").unwrap();
                child.wait().unwrap().code()
            })
        })
        .collect();
    let codes: Vec<Option<i32>> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        codes.iter().filter(|code| **code == Some(0)).count(),
        1,
        "{codes:?}"
    );
    assert!(
        codes.iter().all(|code| matches!(code, Some(0) | Some(3))),
        "{codes:?}"
    );

    let state_dir = setup.daemon.state_dir.to_str().unwrap().to_owned();
    let rotate = ["key", "rotate", "--state-dir", state_dir.as_str()];
    let busy = cli(&setup.daemon, &rotate, None);
    assert_eq!(busy.status.code(), Some(1), "{busy:?}");
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop the daemon first"),
        "{busy:?}"
    );

    setup.daemon.stop();
    let down = cli(&setup.daemon, &["status"], None);
    assert_eq!(down.status.code(), Some(4), "unreachable daemon");
    assert!(String::from_utf8_lossy(&down.stderr).contains("is the service running"));

    // Master key rotation while the daemon is down: the restarted daemon opens the store
    // with the new key only, and every value survives.
    let key_file = setup.daemon.state_dir.join("master.key");
    let old_key = std::fs::read(&key_file).unwrap();
    let rotated = cli(&setup.daemon, &rotate, None);
    assert_ok(&rotated);
    assert!(
        String::from_utf8_lossy(&rotated.stdout).contains("2 secret values"),
        "{rotated:?}"
    );
    let new_key = std::fs::read(&key_file).unwrap();
    assert_ne!(new_key, old_key);

    // The old key is refused now, and trying it changes nothing, byte for byte.
    let store = setup.daemon.state_dir.join("store");
    let before = tree_contents(&store);
    std::fs::write(&key_file, &old_key).unwrap();
    let wrong = cli(&setup.daemon, &rotate, None);
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("does not match"),
        "{wrong:?}"
    );
    assert!(
        tree_contents(&store) == before,
        "a wrong master key changed the store"
    );
    std::fs::write(&key_file, &new_key).unwrap();

    setup.daemon.spawn();
    let listed = cli(&setup.daemon, &["--json", "secret", "list"], None);
    assert_ok(&listed);
    let names: Vec<String> = serde_json::from_slice::<Value>(&listed.stdout).unwrap()["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|secret| secret["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["keep", "race"]);
    let output = setup.curl(
        &setup.appliance_ca,
        "api.anthropic.com",
        "/v1/messages",
        &[],
    );
    assert_ok(&output);
    assert_eq!(
        setup.last_request("api.anthropic.com").headers["x-api-key"],
        "sk-ant-KEEP-0123456789"
    );
    // Nothing in the state directory holds a value in plaintext.
    let grep = test_command("grep")
        .args(["-r", "-l", "sk-ant-KEEP-0123456789"])
        .arg(&setup.daemon.state_dir)
        .output()
        .unwrap();
    assert_eq!(
        grep.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&grep.stdout)
    );
}

/// Creates a rule blocking `/v1/admin/*` on api.openai.com; returns its id.
fn block_openai_admin_paths(daemon: &Daemon) -> String {
    let rule = cli(
        daemon,
        &[
            "--json",
            "rule",
            "create",
            "--host",
            "api.openai.com",
            "--path",
            "/v1/admin/*",
            "--action",
            "block",
        ],
        None,
    );
    assert_ok(&rule);
    let rule: Value = serde_json::from_slice(&rule.stdout).unwrap();
    rule["id"].as_str().unwrap().to_owned()
}

#[test]
fn agents_scope_secrets_rules_block_and_deleting_an_agent_detaches_it() {
    let setup = setup(14, &[]);
    let daemon = &setup.daemon;
    let agent_cgroup = cgroup2_mount().join(unique(14, "research"));
    let created = cli(
        daemon,
        &[
            "agent",
            "create",
            "research",
            "--cgroup",
            agent_cgroup.to_str().unwrap(),
            "--create",
        ],
        None,
    );
    assert_ok(&created);
    assert_eq!(
        attached_programs(&agent_cgroup).len(),
        7,
        "capture not attached"
    );
    let missing = cli(
        daemon,
        &["agent", "create", "ghost", "--cgroup", "no/such/cgroup"],
        None,
    );
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cgroups[0]"));

    create_secret(daemon, &["global", "--type", "openai"], "sk-GLOBAL-000");
    create_secret(
        daemon,
        &["scoped", "--type", "openai", "--agent", "research"],
        "sk-RESEARCH-111",
    );
    block_openai_admin_paths(daemon);
    assert_ok(&cli(
        daemon,
        &[
            "rule",
            "create",
            "--host",
            "other.example.com",
            "--action",
            "block",
        ],
        None,
    ));

    let curl_in_agent = |path: &str| setup.curl_openai_in(&agent_cgroup, path);
    assert_ok(&curl_in_agent("/v1/models"));
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer sk-RESEARCH-111",
        "the agent's own secret wins"
    );
    assert_ok(&setup.curl(&setup.appliance_ca, "api.openai.com", "/v1/models", &[]));
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer sk-GLOBAL-000",
        "other workloads get the global secret"
    );

    let before = setup.upstream.seen.requests().len();
    let blocked = curl_in_agent("/v1/admin/keys");
    assert!(
        String::from_utf8_lossy(&blocked.stdout).ends_with("\n403"),
        "{blocked:?}"
    );
    let other = setup.curl(
        &setup.appliance_ca,
        "other.example.com",
        "/",
        &["-w", "\n%{http_code}"],
    );
    assert!(
        String::from_utf8_lossy(&other.stdout).ends_with("\n403"),
        "{other:?}"
    );
    assert_eq!(
        setup.upstream.seen.requests().len(),
        before,
        "a blocked request reached the upstream"
    );

    let events = cli(daemon, &["--json", "events"], None);
    let agents: Vec<Value> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["agent"].clone())
        .collect();
    assert!(
        agents.contains(&Value::String("research".into())),
        "{agents:?}"
    );

    assert_ok(&cli(daemon, &["agent", "delete", "research"], None));
    assert!(
        attached_programs(&agent_cgroup).is_empty(),
        "still attached"
    );
    let direct = command_in_cgroup(&agent_cgroup, "curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&setup.upstream_ca)
        .arg("--resolve")
        .arg(format!("api.openai.com:443:{}", setup.upstream_ip))
        .args([
            "-H",
            "Authorization: Bearer placeholder",
            "https://api.openai.com/v1/models",
        ])
        .output()
        .unwrap();
    assert_ok(&direct);
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer placeholder",
        "a detached cgroup must go out untouched"
    );
    remove_cgroup_tree(&agent_cgroup);
}

#[test]
fn agent_and_rule_updates_take_effect_over_the_real_redirect() {
    let setup = setup(19, &[]);
    let daemon = &setup.daemon;
    let first = cgroup2_mount().join(unique(19, "first"));
    let second = cgroup2_mount().join(unique(19, "second"));
    assert_ok(&cli(
        daemon,
        &[
            "agent",
            "create",
            "mover",
            "--cgroup",
            first.to_str().unwrap(),
            "--create",
        ],
        None,
    ));
    create_secret(
        daemon,
        &["mover-key", "--type", "openai", "--agent", "mover"],
        "sk-MOVER-222",
    );
    let rule_id = block_openai_admin_paths(daemon);
    let rule_id = rule_id.as_str();

    let moved = cli(
        daemon,
        &[
            "agent",
            "update",
            "mover",
            "--cgroup",
            second.to_str().unwrap(),
            "--create",
        ],
        None,
    );
    assert_ok(&moved);
    assert!(
        attached_programs(&first).is_empty(),
        "the old cgroup is still captured"
    );
    assert_eq!(
        attached_programs(&second).len(),
        7,
        "the new cgroup is not captured"
    );

    let curl_in_second = |path: &str| setup.curl_openai_in(&second, path);
    assert_ok(&curl_in_second("/v1/models"));
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer sk-MOVER-222",
        "the moved agent's workloads get its secret"
    );
    let blocked = curl_in_second("/v1/admin/keys");
    assert!(
        String::from_utf8_lossy(&blocked.stdout).ends_with("\n403"),
        "{blocked:?}"
    );

    let allowed = cli(
        daemon,
        &["rule", "update", rule_id, "--action", "allow"],
        None,
    );
    assert_ok(&allowed);
    let admin = curl_in_second("/v1/admin/keys");
    assert!(
        String::from_utf8_lossy(&admin.stdout).ends_with("\n200"),
        "{admin:?}"
    );
    let arrived = setup.last_request("api.openai.com");
    assert_eq!(arrived.target, "/v1/admin/keys");
    assert_eq!(arrived.headers["authorization"], "Bearer sk-MOVER-222");

    let invalid = cli(
        daemon,
        &["rule", "update", rule_id, "--action", "maybe"],
        None,
    );
    assert_eq!(invalid.status.code(), Some(3), "{invalid:?}");
    assert!(
        String::from_utf8_lossy(&invalid.stderr).contains("action"),
        "{invalid:?}"
    );
    remove_cgroup_tree(&first);
    remove_cgroup_tree(&second);
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[test]
fn large_and_compressed_bodies_pass_byte_for_byte_in_bounded_memory() {
    let setup = setup(15, &[]);
    create_secret(
        &setup.daemon,
        &["openai", "--type", "openai"],
        "sk-proj-STREAM",
    );
    let ca = &setup.appliance_ca;

    let before = peak_rss_kib(setup.daemon.pid());
    let download = setup.curl(
        ca,
        "api.openai.com",
        "/big",
        &["-o", "/dev/null", "-w", "%{size_download}"],
    );
    assert_ok(&download);
    assert_eq!(String::from_utf8_lossy(&download.stdout), "104857600");
    let grown_mib = (peak_rss_kib(setup.daemon.pid()).saturating_sub(before)) / 1024;
    assert!(
        grown_mib < 48,
        "the daemon's peak memory grew by {grown_mib} MiB for a 100 MiB body"
    );

    // A gzip-encoded upload (git sends upload-pack requests like this), large enough for curl
    // to ask for 100-continue, must arrive unchanged.
    let mut raw = Vec::new();
    let mut seed = 0x2545_f491_u32;
    for _ in 0..(3 << 20) {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        raw.push(b"abcdefgh \n"[(seed % 10) as usize]);
    }
    let plain = setup.dir.join("upload.txt");
    std::fs::write(&plain, &raw).unwrap();
    assert!(test_command("gzip")
        .arg("-kf")
        .arg(&plain)
        .status()
        .unwrap()
        .success());
    let gzipped = std::fs::read(setup.dir.join("upload.txt.gz")).unwrap();
    let upload = setup.curl(
        ca,
        "api.openai.com",
        "/upload",
        &[
            "--http1.1",
            "-H",
            "Content-Encoding: gzip",
            "-H",
            "Content-Type: application/x-git-upload-pack-request",
            "--data-binary",
            &format!("@{}", setup.dir.join("upload.txt.gz").display()),
        ],
    );
    assert_ok(&upload);
    let answer: Value = serde_json::from_slice(&upload.stdout).unwrap();
    assert_eq!(answer["length"], gzipped.len());
    assert_eq!(answer["sha256"], sha256_hex(&gzipped));
    assert_eq!(answer["content_encoding"], "gzip");
    assert!(
        String::from_utf8_lossy(&upload.stderr).contains("Expect: 100-continue"),
        "curl did not use 100-continue"
    );
}

#[test]
fn sse_websocket_and_two_hundred_clients_over_the_real_redirect() {
    let setup = setup(16, &[]);
    create_secret(
        &setup.daemon,
        &["openai", "--type", "openai"],
        "sk-proj-MANY",
    );

    // Server-sent events: the first event arrives while the upstream holds the response open.
    let (mut sse, mut lines) = setup.sse_client();
    assert_eq!(lines.next().unwrap().unwrap(), "data: one");
    setup.upstream.release_sse.notify_one();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.contains(&"data: two".to_owned()), "{rest:?}");
    assert!(sse.wait().unwrap().success());

    let python = |program: String| {
        test_command(APPLIANCE)
            .arg("exec")
            .arg("--agents-cgroup")
            .arg(&setup.daemon.agents_cgroup)
            .args(["--", "python3", "-c", &program])
            .output()
            .unwrap()
    };
    let connect = format!(
        r#"
import http.client, json, socket, ssl, threading
ctx = ssl.create_default_context(cafile="{ca}")
ctx.set_alpn_protocols(["http/1.1"])
def tls():
    return ctx.wrap_socket(socket.create_connection(("{ip}", 443), timeout=60), server_hostname="api.openai.com")
"#,
        ca = setup.appliance_ca.display(),
        ip = setup.upstream_ip
    );
    let over_one_connection = |lines: String| python(format!("{connect}\ns = tls()\n{lines}"));
    let websocket = over_one_connection(https::python_websocket_echo("api.openai.com"));
    assert_ok(&websocket);
    assert_eq!(
        String::from_utf8_lossy(&websocket.stdout).trim(),
        https::WEBSOCKET_ECHO
    );
    // An upstream that echoes the injected value in a text and a binary frame after the
    // switch: both arrive masked, with their lengths.
    let echoed = over_one_connection(https::python_websocket_secret_echo("api.openai.com"));
    assert_ok(&echoed);
    assert_eq!(
        String::from_utf8_lossy(&echoed.stdout),
        "auth=Bearer ************\nBearer ************\n"
    );
    assert!(
        !setup
            .last_request("api.openai.com")
            .headers
            .contains_key("sec-websocket-extensions"),
        "compression was offered to the upstream"
    );

    let before = setup.upstream.seen.requests().len();
    let many = python(format!(
        r#"{connect}
ok = []
def client():
    conn = http.client.HTTPSConnection("api.openai.com", context=ctx, timeout=60)
    conn.sock = tls()
    for _ in range(5):
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        response.read()
        ok.append(response.status == 200)
threads = [threading.Thread(target=client) for _ in range(200)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({{"ok": sum(ok)}}))
"#
    ));
    assert_ok(&many);
    let result: Value = serde_json::from_slice(&many.stdout).unwrap();
    assert_eq!(result["ok"], 1000);
    let requests = setup.upstream.seen.requests();
    let injected = requests[before..]
        .iter()
        .filter(|request| {
            request.headers.get("authorization").map(String::as_str) == Some("Bearer sk-proj-MANY")
        })
        .count();
    assert_eq!(injected, 1000, "every request carried the real key");
}

#[test]
fn a_stopping_daemon_lets_open_requests_finish() {
    let mut setup = setup(17, &[]);
    create_secret(
        &setup.daemon,
        &["openai", "--type", "openai"],
        "sk-proj-DRAIN",
    );
    let (mut sse, mut lines) = setup.sse_client();
    assert_eq!(lines.next().unwrap().unwrap(), "data: one");
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(setup.daemon.pid() as i32, libc::SIGTERM) };
    std::thread::sleep(std::time::Duration::from_millis(500));
    setup.upstream.release_sse.notify_one();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.contains(&"data: two".to_owned()),
        "the open response was cut: {rest:?}"
    );
    assert!(sse.wait().unwrap().success());
    setup.daemon.stop();
    assert!(
        setup.daemon.log_text().contains("draining"),
        "{}",
        setup.daemon.log_text()
    );
}

/// A stand-in for github.com's smart HTTP: `git http-backend` behind HTTPS, accepting only
/// Basic `x-access-token:<token>`.
const GIT_SERVER: &str = r#"
import base64, http.server, json, os, ssl, subprocess, sys
root, ip, cert, key, token = sys.argv[1:6]
expected = "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_lfs(self, path, body):
        store = os.path.join(root, "lfs")
        os.makedirs(store, exist_ok=True)
        if path.endswith("/info/lfs/objects/batch"):
            request = json.loads(body)
            base = "https://github.com" + path[: -len("/batch")]
            objects = []
            for item in request["objects"]:
                stored = os.path.exists(os.path.join(store, item["oid"]))
                entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
                if request["operation"] == "download" or not stored:
                    entry["actions"] = {request["operation"]: {"href": f"{base}/{item['oid']}"}}
                objects.append(entry)
            return 200, "application/vnd.git-lfs+json", json.dumps({"transfer": "basic", "objects": objects}).encode()
        oid = path.rsplit("/", 1)[1]
        if self.command == "PUT":
            with open(os.path.join(store, oid), "wb") as f:
                f.write(body)
            return 200, "text/plain", b""
        with open(os.path.join(store, oid), "rb") as f:
            return 200, "application/octet-stream", f.read()
    def handle_git(self):
        if self.headers.get("authorization") != expected:
            self.send_response(401)
            self.send_header("www-authenticate", 'Basic realm="GitHub"')
            self.send_header("content-length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("content-length") or 0)
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(length)
        if "/info/lfs/" in path:
            status, kind, payload = self.handle_lfs(path, body)
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   REQUEST_METHOD=self.command, QUERY_STRING=query, REMOTE_USER="x-access-token",
                   REMOTE_ADDR="127.0.0.1", CONTENT_TYPE=self.headers.get("content-type", ""),
                   CONTENT_LENGTH=str(len(body)),
                   HTTP_CONTENT_ENCODING=self.headers.get("content-encoding", ""),
                   GIT_PROTOCOL=self.headers.get("git-protocol", ""))
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(": ")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
    do_GET = handle_git
    do_POST = handle_git
    do_PUT = handle_git
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((ip, 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"#;

fn git(args: &[&str], dir: &Path) -> Output {
    test_command("git")
        .args([
            "-c",
            "user.email=agent@example.com",
            "-c",
            "user.name=agent",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn git_clone_and_push_over_https_with_the_github_shortcut() {
    require_root();
    let slot = 18;
    let dir = std::env::temp_dir().join(unique(slot, "git"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("repos/o")).unwrap();
    // A bare repository with one commit, served as github.com/o/r.git.
    assert_ok(&git(&["init", "--bare", "repos/o/r.git"], &dir));
    assert_ok(&git(&["init", "seed"], &dir));
    std::fs::write(dir.join("seed/README"), "hello\n").unwrap();
    assert_ok(&git(&["add", "README"], &dir.join("seed")));
    assert_ok(&git(&["commit", "-m", "first"], &dir.join("seed")));
    assert_ok(&git(
        &["push", "../repos/o/r.git", "main"],
        &dir.join("seed"),
    ));

    // The server's certificate for github.com, from a test CA the appliance trusts.
    let ca = https::Ca::new("git test CA");
    let (cert, key) = ca.server_pem("github.com");
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    let upstream_ca = dir.join("upstream-ca.pem");
    ca.write(&upstream_ca);
    let ip = upstream_ip(slot).to_string();
    let token = "ghp_REALtoken0123456789";
    let mut server = Running::spawn(
        test_command("python3")
            .args(["-c", GIT_SERVER])
            .arg(dir.join("repos"))
            .arg(&ip)
            .arg(dir.join("server.pem"))
            .arg(dir.join("server.key"))
            .arg(token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    server.wait_ready();

    let daemon = Daemon::start(slot, &["--upstream-ca", upstream_ca.to_str().unwrap()]);
    create_secret(&daemon, &["github", "--type", "github"], token);
    let appliance_ca = dir.join("appliance-ca.pem");
    std::fs::write(&appliance_ca, appliance_ca_pem(&daemon)).unwrap();

    // The agent: plain git, no credentials at all, inside an intercepted cgroup.
    // The agent resolves github.com to the stand-in through a private /etc/hosts (its own
    // mount namespace, same network): git-lfs, written in Go, ignores curl's resolve option.
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, format!("{ip} github.com\n")).unwrap();
    let agent_git = |args: &[&str], cwd: &Path| {
        test_command(APPLIANCE)
            .arg("exec")
            .arg("--agents-cgroup")
            .arg(&daemon.agents_cgroup)
            .args([
                "--",
                "unshare",
                "--mount",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
            ])
            .arg(&hosts)
            .args([
                "git",
                "-c",
                "user.email=agent@example.com",
                "-c",
                "user.name=agent",
                "-c",
                "lfs.locksverify=false",
            ])
            .args(args)
            .current_dir(cwd)
            .env("GIT_TERMINAL_PROMPT", "0")
            // The variable outranks http.sslCAInfo; a machine-wide one must not win.
            .env("GIT_SSL_CAINFO", &appliance_ca)
            .output()
            .unwrap()
    };
    assert_ok(&agent_git(
        &["clone", "https://github.com/o/r.git", "clone"],
        &dir,
    ));
    assert_eq!(
        std::fs::read_to_string(dir.join("clone/README")).unwrap(),
        "hello\n"
    );
    std::fs::write(dir.join("clone/CHANGE"), "from the agent\n").unwrap();
    assert_ok(&git(&["add", "CHANGE"], &dir.join("clone")));
    assert_ok(&git(&["commit", "-m", "agent change"], &dir.join("clone")));
    assert_ok(&agent_git(&["push", "origin", "main"], &dir.join("clone")));
    let log = git(
        &["--git-dir", "repos/o/r.git", "log", "--format=%s", "main"],
        &dir,
    );
    assert_eq!(
        String::from_utf8_lossy(&log.stdout),
        "agent change\nfirst\n"
    );
    let config = std::fs::read_to_string(dir.join("clone/.git/config")).unwrap();
    assert!(
        !config.contains(token),
        "the token reached the agent's repository"
    );

    // git-lfs: push a large file to the LFS store, then fetch it into a fresh clone.
    let blob: Vec<u8> = (0..200_000u32)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    assert_ok(&git(&["lfs", "install", "--local"], &dir.join("clone")));
    assert_ok(&git(&["lfs", "track", "*.bin"], &dir.join("clone")));
    std::fs::write(dir.join("clone/big.bin"), &blob).unwrap();
    assert_ok(&git(
        &["add", ".gitattributes", "big.bin"],
        &dir.join("clone"),
    ));
    assert_ok(&git(&["commit", "-m", "large file"], &dir.join("clone")));
    assert_ok(&agent_git(&["push", "origin", "main"], &dir.join("clone")));
    let stored = std::fs::read_dir(dir.join("repos/lfs")).unwrap().count();
    assert_eq!(stored, 1, "the LFS object did not reach the server");
    assert_ok(&agent_git(
        &["clone", "https://github.com/o/r.git", "clone2"],
        &dir,
    ));
    assert_ok(&git(&["lfs", "install", "--local"], &dir.join("clone2")));
    assert_ok(&agent_git(&["lfs", "pull"], &dir.join("clone2")));
    assert_eq!(std::fs::read(dir.join("clone2/big.bin")).unwrap(), blob);

    drop(server);
    drop(daemon);
    std::fs::remove_dir_all(&dir).unwrap();
}
