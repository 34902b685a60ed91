//! git over HTTPS with the GitHub shortcut, against `git http-backend` on loopback.

mod common;
mod https;
mod redirect;

use std::path::Path;
use std::process::{Output, Stdio};

use common::*;
use redirect::*;

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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
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
