//! Secrets injected end to end on the real kernel: created with the `appliance` CLI through
//! the admin socket, injected by the daemon into requests that curl (inside `appliance exec`,
//! with only a placeholder) sends to a loopback HTTPS upstream over the real eBPF redirect.

mod common;
mod https;
mod redirect;

use common::*;
use redirect::*;
use serde_json::Value;

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
