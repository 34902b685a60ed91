//! Traffic shapes over the real redirect: large and compressed bodies, server-sent events,
//! WebSockets, many clients, and a stop that lets open requests finish.

mod common;
mod https;
mod redirect;

use common::*;
use redirect::*;
use serde_json::Value;

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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
