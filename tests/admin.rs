//! The admin API and the CLI end to end: one error shape for every refusal, exit codes, and
//! state that survives restarts and a key rotation.

mod common;
mod https;
mod redirect;

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;

use common::*;
use redirect::*;
use serde_json::Value;

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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
    // The answer is the model's view, which the CLI reads too.
    let view: appliance::model::SecretView = serde_json::from_value(created.clone()).unwrap();
    assert_eq!(view.provider, appliance::model::Provider::Openai);
    assert_eq!(view.rules[0].hosts, ["api.openai.com"]);
    assert_eq!(view.record.name, "a");
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
