//! Secret values that live elsewhere, end to end over the real redirect: in a 1Password vault
//! (a stand-in Connect server on loopback), in a file, and printed by a command. curl, with
//! only a placeholder, gets each injected; changes at the source arrive within the TTL; a
//! broken source fails closed with an error that names the secret; no fetched value reaches
//! the disk or the log.

mod common;
mod https;
mod redirect;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use redirect::*;
use serde_json::{json, Value};

const TOKEN: &str = "connect-token-for-tests";
const OP_FIRST: &str = "sk-op-FIRST-0123456789";
const OP_SECOND: &str = "sk-op-SECOND-0123456789";
const FILE_FIRST: &str = "sk-ant-FILE-FIRST-0123456789";
const FILE_SECOND: &str = "sk-ant-FILE-SECOND-0123456789";
const COMMAND_VALUE: &str = "sk_live_COMMAND_0123456789";
const VAULT_ID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaa";
const ITEM_ID: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbb";

/// The stand-in Connect server and the file its vaults are read from.
struct Connect {
    _server: Running,
    port: u16,
    data: PathBuf,
    requests: PathBuf,
}

impl Connect {
    fn start(dir: &Path) -> Self {
        let data = dir.join("vaults.json");
        let requests = dir.join("requests.jsonl");
        let connect = Self {
            _server: Running::spawn(
                test_command("python3")
                    .arg(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../tests/onepassword/connect.py"
                    ))
                    .arg(&data)
                    .arg(TOKEN)
                    .arg(&requests)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit()),
            ),
            port: 0,
            data,
            requests,
        };
        connect.set_value(OP_FIRST);
        let mut connect = connect;
        let stdout = connect._server.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        connect.port = line.trim().parse().expect("the stand-in prints its port");
        connect
    }

    /// The vault Engineering holds the item OpenAI, whose field `credential` in the section
    /// API holds `value` (beside a `password` field in no section).
    fn set_value(&self, value: &str) {
        self.write(json!({"vaults": [{
            "id": VAULT_ID, "name": "Engineering",
            "items": [{
                "id": ITEM_ID, "title": "OpenAI",
                "sections": [{"id": "sec1", "label": "API"}],
                "fields": [
                    {"id": "password", "label": "password", "value": "not-this-one"},
                    {"id": "f1", "label": "credential", "value": value, "section": {"id": "sec1"}},
                ],
            }],
        }]}));
    }

    fn fail_with(&self, status: u16, message: &str) {
        let mut data: Value = serde_json::from_slice(&std::fs::read(&self.data).unwrap()).unwrap();
        data["fail"] = json!({"status": status, "message": message});
        self.write(data);
    }

    fn write(&self, data: Value) {
        let partial = self.data.with_extension("partial");
        std::fs::write(&partial, data.to_string()).unwrap();
        std::fs::rename(partial, &self.data).unwrap();
    }

    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.requests)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

/// `appliance secret create NAME ARGS`, refused by the daemon: its stderr.
fn refused(daemon: &Daemon, args: &[&str]) -> String {
    let output = cli(daemon, args, None);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// curl for `https://<host>/v1/x` with a placeholder: the status and the body.
fn call(setup: &Setup, host: &str) -> (String, String) {
    let output = setup.curl(
        &setup.appliance_ca,
        host,
        "/v1/x",
        &[
            "-H",
            "authorization: Bearer placeholder",
            "-w",
            "\n%{http_code}",
        ],
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    (status.to_owned(), body.to_owned())
}

/// Calls `host` until the upstream sees `expected` in `header`, or fails after `limit`.
fn wait_for_injected(setup: &Setup, host: &str, header: &str, expected: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = call(setup, host);
        let seen = setup.last_request(host).headers.get(header).cloned();
        if status == "200" && seen.as_deref() == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} never got {expected:?} in {header} (last: {status} {body:?}, upstream saw {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every file under `dir`, read.
fn contents_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(contents_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            files.push((path, bytes));
        }
    }
    files
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn values_from_1password_a_file_and_a_command_are_injected_and_follow_their_source() {
    let dir = std::env::temp_dir().join(unique(42, "sources"));
    std::fs::create_dir_all(&dir).unwrap();
    let connect = Connect::start(&dir);
    let host = format!("http://127.0.0.1:{}", connect.port);
    let key_file = dir.join("anthropic-key");
    std::fs::write(&key_file, format!("{FILE_FIRST}\n")).unwrap();
    let script = dir.join("print-stripe-key");
    std::fs::write(&script, format!("#!/bin/sh\necho {COMMAND_VALUE}\n")).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = format!(
        "[values]\nttl_seconds = 2\nmax_stale_seconds = 2\nallow_commands = true\nfile_dirs = [{:?}]\n",
        dir.display().to_string()
    );
    let setup = setup_configured(
        42,
        &config,
        &[],
        &[
            ("OP_CONNECT_HOST", Path::new(&host)),
            ("OP_CONNECT_TOKEN", Path::new(TOKEN)),
        ],
    );
    let daemon = &setup.daemon;

    assert_ok(&cli(
        daemon,
        &[
            "secret",
            "create",
            "openai",
            "--type",
            "openai",
            "--op-ref",
            "op://Engineering/OpenAI/API/credential",
        ],
        None,
    ));
    let key_path = key_file.display().to_string();
    assert_ok(&cli(
        daemon,
        &[
            "secret",
            "create",
            "anthropic",
            "--type",
            "anthropic",
            "--value-file-ref",
            &key_path,
        ],
        None,
    ));
    let script_path = script.display().to_string();
    assert_ok(&cli(
        daemon,
        &[
            "secret",
            "create",
            "stripe",
            "--type",
            "stripe",
            "--value-command",
            &script_path,
        ],
        None,
    ));
    let not_executable = dir.join("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\necho key\n").unwrap();
    let error = refused(
        daemon,
        &[
            "secret",
            "create",
            "x",
            "--type",
            "github",
            "--value-command",
            &not_executable.display().to_string(),
        ],
    );
    assert!(
        error.contains("valueCommand: cannot be read now") && error.contains("Permission denied"),
        "{error}"
    );
    let shown = cli(daemon, &["--json", "secret", "get", "openai"], None);
    assert_ok(&shown);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["valueSource"], "onepassword");
    assert_eq!(shown["opRef"], "op://Engineering/OpenAI/API/credential");
    assert_eq!(
        shown["preview"],
        Value::Null,
        "nothing to preview: the value is not kept"
    );
    // The daemon looked the vault and the item up by name, as Connect's API allows.
    let asked: Vec<String> = connect
        .requests()
        .iter()
        .map(|request| {
            format!(
                "{}?{}",
                request["path"].as_str().unwrap(),
                request["query"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        asked
            .iter()
            .any(|asked| asked.contains("filter=name%20eq%20%22Engineering%22")),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .any(|asked| asked.contains("filter=title%20eq%20%22OpenAI%22")),
        "{asked:?}"
    );

    let (status, _) = call(&setup, "api.openai.com");
    assert_eq!(status, "200");
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        format!("Bearer {OP_FIRST}")
    );
    let (status, _) = call(&setup, "api.anthropic.com");
    assert_eq!(status, "200");
    assert_eq!(
        setup.last_request("api.anthropic.com").headers["x-api-key"],
        FILE_FIRST
    );
    let (status, _) = call(&setup, "api.stripe.com");
    assert_eq!(status, "200");
    assert_eq!(
        setup.last_request("api.stripe.com").headers["authorization"],
        format!("Bearer {COMMAND_VALUE}")
    );

    // Changed at the source: picked up within the TTL (2 s), no restart.
    let changed = Instant::now();
    connect.set_value(OP_SECOND);
    std::fs::write(&key_file, FILE_SECOND).unwrap();
    wait_for_injected(
        &setup,
        "api.openai.com",
        "authorization",
        &format!("Bearer {OP_SECOND}"),
        Duration::from_secs(4),
    );
    wait_for_injected(
        &setup,
        "api.anthropic.com",
        "x-api-key",
        FILE_SECOND,
        Duration::from_secs(4),
    );
    assert!(changed.elapsed() < Duration::from_secs(4));

    let checked = cli(daemon, &["secret", "check", "openai"], None);
    assert_ok(&checked);
    assert!(
        String::from_utf8_lossy(&checked.stdout)
            .contains("resolves from 1Password op://Engineering/OpenAI/API/credential"),
        "{checked:?}"
    );

    // Broken sources: the last good value carries on for max_stale_seconds past the TTL,
    // then requests that need it fail closed, saying which secret and why.
    connect.fail_with(503, "sync with 1Password.com failed");
    std::fs::remove_file(&key_file).unwrap();
    let (status, _) = call(&setup, "api.openai.com");
    assert_eq!(status, "200", "the last good value is still in use");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = call(&setup, "api.openai.com");
        if status != "200" || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(status, "502", "{body}");
    // A fixed text: what the source said (a server may quote its token) stays in the log
    // and `secret check`.
    assert!(
        body.contains("secret openai") && body.contains("appliance secret check openai"),
        "{body}"
    );
    assert!(!body.contains("sync with 1Password.com failed"), "{body}");
    // The file's value was fetched at its own time, so its window may end a little later.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body, before) = loop {
        let before = setup.upstream.seen.requests().len();
        let (status, body) = call(&setup, "api.anthropic.com");
        if status != "200" || Instant::now() > deadline {
            break (status, body, before);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(status, "502", "{body}");
    assert!(
        body.contains("secret anthropic") && !body.contains(&key_path),
        "{body}"
    );
    assert_eq!(
        setup.upstream.seen.requests().len(),
        before,
        "a refused request reached the upstream"
    );
    let check = cli(daemon, &["secret", "check", "openai"], None);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("sync with 1Password.com failed"),
        "{check:?}"
    );
    let events = cli(daemon, &["--json", "events", "--secret", "openai"], None);
    assert_ok(&events);
    let failed = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|event| event["outcome"] == "failed" && event["status"] == 502)
        .count();
    assert!(
        failed >= 1,
        "the refusal is audited: {}",
        String::from_utf8_lossy(&events.stdout)
    );

    // The source answers again: so does the secret.
    connect.set_value(OP_FIRST);
    wait_for_injected(
        &setup,
        "api.openai.com",
        "authorization",
        &format!("Bearer {OP_FIRST}"),
        Duration::from_secs(4),
    );

    // No fetched value on disk (the store, the audit log) or in the daemon's log.
    let fetched = [OP_FIRST, OP_SECOND, FILE_FIRST, FILE_SECOND, COMMAND_VALUE];
    for (path, bytes) in contents_under(&daemon.state_dir) {
        for value in fetched {
            assert!(
                !bytes
                    .windows(value.len())
                    .any(|window| window == value.as_bytes()),
                "{} holds a fetched value",
                path.display()
            );
        }
    }
    let log = daemon.log_text();
    for value in fetched {
        assert!(
            !log.contains(value),
            "the daemon's log holds a fetched value"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn sources_that_cannot_give_a_usable_value_are_refused_at_creation() {
    let dir = std::env::temp_dir().join(unique(43, "sources"));
    std::fs::create_dir_all(&dir).unwrap();
    let connect = Connect::start(&dir);
    // Configured in the file this time, the token as a systemd credential beside the
    // master key, as the shipped unit gives them (and the token is wrong).
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("master.key"), "ab".repeat(32)).unwrap();
    std::fs::write(credentials.join("op-connect-token"), "a-wrong-token\n").unwrap();
    std::fs::write(credentials.join("openai-key"), "sk-credential-0123456789\n").unwrap();
    let config = format!(
        "[onepassword]\nconnect_host = \"http://127.0.0.1:{}\"\n[values]\nfile_dirs = [{:?}]\n",
        connect.port,
        dir.display().to_string()
    );
    let setup = setup_configured(
        43,
        &config,
        &[],
        &[("CREDENTIALS_DIRECTORY", credentials.as_path())],
    );
    let daemon = &setup.daemon;
    let create = |extra: &[&str]| {
        let mut args = vec!["secret", "create", "s", "--type", "openai"];
        args.extend_from_slice(extra);
        refused(daemon, &args)
    };
    let error = create(&["--op-ref", "Engineering/OpenAI/credential"]);
    assert!(error.contains("opRef: must look like op://"), "{error}");
    let error = create(&["--op-ref", "op://Engineering/OpenAI/credential"]);
    assert!(
        error.contains("opRef: cannot be read now") && error.contains("Invalid token signature"),
        "{error}"
    );
    let missing = dir.join("missing-key").display().to_string();
    let error = create(&["--value-file-ref", &missing]);
    assert!(
        error.contains("valueFile: cannot be read now") && error.contains(&missing),
        "{error}"
    );
    // Whoever may create secrets chooses the path, and the daemon reads it as root: only
    // regular files in the configured directories, by their real path.
    for root_only in ["/etc/shadow", "/proc/self/environ"] {
        let error = create(&["--value-file-ref", root_only]);
        assert!(
            error.contains("valueFile: cannot be read now")
                && error.contains("outside the directories")
                && error.contains("values.file_dirs"),
            "{error}"
        );
    }
    let fifo = dir.join("fifo");
    assert!(test_command("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let error = create(&["--value-file-ref", &fifo.display().to_string()]);
    assert!(error.contains("not a regular file"), "{error}");
    let error = create(&["--value-command", "print-key"]);
    assert!(
        error.contains("valueCommand[0]: must be an absolute path"),
        "{error}"
    );
    let script = dir.join("print-key");
    std::fs::write(&script, "#!/bin/sh\necho key\n").unwrap();
    let error = create(&["--value-command", &script.display().to_string()]);
    assert!(error.contains("command sources are disabled"), "{error}");
    let broken = dir.join("broken-key");
    std::fs::write(&broken, "sk-line-one\nX-Injected: 1\n").unwrap();
    let error = create(&["--value-file-ref", &broken.display().to_string()]);
    assert!(
        error.contains("valueFile: cannot be sent in the authorization header"),
        "{error}"
    );
    assert!(!error.contains("sk-line-one"), "{error}");
    let error = create(&["--value-credential", "missing-key"]);
    assert!(
        error.contains("valueCredential: cannot be read now") && error.contains("missing-key"),
        "{error}"
    );
    let listed = cli(daemon, &["--json", "secret", "list"], None);
    assert_ok(&listed);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["secrets"], json!([]), "nothing refused was stored");

    // A credential that is there is a value like any other.
    assert_ok(&cli(
        daemon,
        &[
            "secret",
            "create",
            "openai",
            "--type",
            "openai",
            "--value-credential",
            "openai-key",
        ],
        None,
    ));
    assert_ok(&cli(daemon, &["secret", "check", "openai"], None));
    let (status, _) = call(&setup, "api.openai.com");
    assert_eq!(status, "200");
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer sk-credential-0123456789"
    );

    // A definition file that names where the value lives is enough on its own.
    let definition = dir.join("anthropic.json");
    std::fs::write(
        &definition,
        r#"{"type": "anthropic", "valueCredential": "openai-key"}"#,
    )
    .unwrap();
    assert_ok(&cli(
        daemon,
        &[
            "secret",
            "create",
            "anthropic",
            "--definition",
            &definition.display().to_string(),
        ],
        None,
    ));
    let (status, _) = call(&setup, "api.anthropic.com");
    assert_eq!(status, "200");
    assert_eq!(
        setup.last_request("api.anthropic.com").headers["x-api-key"],
        "sk-credential-0123456789"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
