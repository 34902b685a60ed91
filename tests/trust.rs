//! Zero-configuration trust: under `appliance exec`, with none of the trust variables set,
//! real clients of every common runtime trust the appliance CA and get their credential
//! injected over the real redirect. Each runs with a private /etc/hosts (its own mount
//! namespace) that sends api.openai.com to the loopback upstream.

mod common;
mod https;
mod redirect;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use redirect::*;

const REAL_KEY: &str = "sk-REAL-TRUST-0123456789";

/// Every variable a user might have set to trust a CA by hand: a new user has none.
const TRUST_VARIABLES: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "JAVA_TOOL_OPTIONS",
];

const GO_PROBE: &str = r#"package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	response, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(response.StatusCode)
}
"#;

const JAVA_PROBE: &str = r#"
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Probe {
    public static void main(String[] args) throws Exception {
        HttpResponse<String> response = HttpClient.newHttpClient().send(
            HttpRequest.newBuilder(URI.create(args[0])).header("authorization", "Bearer placeholder").build(),
            HttpResponse.BodyHandlers.ofString());
        System.out.println(response.statusCode());
    }
}
"#;

/// The Anthropic and OpenAI SDKs, installed by `cargo xtask setup` from PyPI.
fn sdk_python() -> PathBuf {
    let python = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/python-sdks/bin/python"
    ));
    assert!(
        python.exists(),
        "{} is missing; run cargo xtask setup",
        python.display()
    );
    python
}

struct Sandbox<'a> {
    setup: &'a Setup,
    hosts: PathBuf,
    home: PathBuf,
    /// Trust variables the caller's environment sets (none for a new user).
    preset: Vec<(&'static str, &'static str)>,
}

impl<'a> Sandbox<'a> {
    /// A sandbox for `setup`'s daemon with a secret for api.openai.com, whose /etc/hosts
    /// sends that host to the loopback upstream, and whose callers set `preset`.
    fn new(setup: &'a Setup, preset: Vec<(&'static str, &'static str)>) -> Self {
        create_secret(&setup.daemon, &["openai", "--type", "openai"], REAL_KEY);
        let hosts = setup.dir.join("hosts");
        std::fs::write(&hosts, format!("{} api.openai.com\n", setup.upstream_ip)).unwrap();
        let home = setup.dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        Self {
            setup,
            hosts,
            home,
            preset,
        }
    }

    /// `appliance trust doctor ARGS` as the sandbox's caller runs it.
    fn doctor(&self, args: &[&str]) -> Output {
        let mut command = test_command(APPLIANCE);
        command
            .arg("--socket")
            .arg(&self.setup.daemon.socket)
            .args(["trust", "doctor", "--agents-cgroup"])
            .arg(&self.setup.daemon.agents_cgroup)
            .args(args)
            .env("HOME", &self.home)
            .env("TMPDIR", &self.home);
        for variable in TRUST_VARIABLES {
            command.env_remove(variable);
        }
        command.envs(self.preset.iter().copied()).output().unwrap()
    }

    /// `program args` under `appliance exec` (trusting the CA unless `no_trust`), in its own
    /// mount namespace with the private /etc/hosts, and only the preset trust variables.
    fn run(&self, no_trust: bool, program: &str, args: &[&str]) -> Output {
        let daemon = &self.setup.daemon;
        let mut command = test_command(APPLIANCE);
        command.arg("--socket").arg(&daemon.socket).arg("exec");
        if no_trust {
            command.arg("--no-trust");
        }
        command
            .arg("--agents-cgroup")
            .arg(&daemon.agents_cgroup)
            .args(["--", "unshare", "--mount", "--", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(&self.hosts)
            .arg(program)
            .args(args)
            .env("HOME", &self.home)
            // Where exec keeps the user's Java trust store: the test's own directory.
            .env("TMPDIR", &self.home)
            .env("OPENAI_API_KEY", "placeholder")
            .env("ANTHROPIC_API_KEY", "placeholder");
        for variable in TRUST_VARIABLES {
            command.env_remove(variable);
        }
        command.envs(self.preset.iter().copied());
        command.output().unwrap()
    }

    /// Runs a client and checks that the upstream got the real key for `path`.
    fn injected(&self, what: &str, program: &str, args: &[&str], path: &str) {
        let output = self.run(false, program, args);
        let arrived = self
            .setup
            .upstream
            .seen
            .requests()
            .into_iter()
            .rev()
            .find(|request| request.target.starts_with(path));
        assert!(
            arrived.as_ref().is_some_and(|request| request.headers.get("authorization")
                == Some(&format!("Bearer {REAL_KEY}"))),
            "{what}: the upstream did not get the credential for {path} ({arrived:?}); exit {:?}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Python requests calling `url` with a placeholder key.
fn requests_call(url: &str) -> String {
    format!(
        "import requests; requests.get({url:?}, headers={{'authorization': 'Bearer placeholder'}}).raise_for_status()"
    )
}

/// Node's fetch calling `url` with a placeholder key.
fn node_fetch(url: &str) -> String {
    format!(
        "fetch({url:?}, {{headers: {{authorization: 'Bearer placeholder'}}}}).then(r => process.exit(r.ok ? 0 : 1), e => {{ console.error(e.cause || e); process.exit(1) }})"
    )
}

/// The OpenAI SDK listing models at `base_url`.
fn openai_sdk_call(base_url: &str) -> String {
    format!("import openai; openai.OpenAI(base_url={base_url:?}).models.list()")
}

fn build_go_probe(dir: &Path) -> PathBuf {
    let source = dir.join("probe.go");
    std::fs::write(&source, GO_PROBE).unwrap();
    let binary = dir.join("go-probe");
    let output = test_command("go")
        .arg("build")
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("HOME", dir)
        .env("GO111MODULE", "off")
        .output()
        .unwrap();
    assert_ok(&output);
    binary
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn clients_of_every_common_runtime_trust_the_appliance_under_exec_without_configuration() {
    let setup = setup(44, &[]);
    let sandbox = Sandbox::new(&setup, Vec::new());
    let url = |path: &str| format!("https://api.openai.com{path}");

    // Without the trust files the same client fails: they are what makes it work.
    let untrusted = sandbox.run(true, "curl", &["-sS", &url("/untrusted")]);
    assert_eq!(untrusted.status.code(), Some(60), "{untrusted:?}");

    let h1 = url("/curl-h1");
    sandbox.injected(
        "curl over HTTP/1.1",
        "curl",
        &["-sSf", "--http1.1", &h1],
        "/curl-h1",
    );
    let h2 = url("/curl-h2");
    sandbox.injected(
        "curl over HTTP/2",
        "curl",
        &["-sSf", "--http2", &h2],
        "/curl-h2",
    );
    let urllib = format!(
        "import urllib.request; urllib.request.urlopen(urllib.request.Request({:?}, headers={{'authorization': 'Bearer placeholder'}}))",
        url("/urllib")
    );
    sandbox.injected(
        "Python urllib",
        "/usr/bin/python3",
        &["-c", &urllib],
        "/urllib",
    );
    let requests = requests_call(&url("/requests"));
    sandbox.injected(
        "Python requests",
        "/usr/bin/python3",
        &["-c", &requests],
        "/requests",
    );
    let httpx = format!(
        "import httpx; r = httpx.Client(http2=True).get({:?}, headers={{'authorization': 'Bearer placeholder'}}); assert r.http_version == 'HTTP/2', r.http_version; r.raise_for_status()",
        url("/httpx")
    );
    sandbox.injected(
        "httpx over HTTP/2",
        "/usr/bin/python3",
        &["-c", &httpx],
        "/httpx",
    );
    let python = sdk_python();
    let python = python.to_str().unwrap();
    let openai = openai_sdk_call("https://api.openai.com/openai-sdk");
    sandbox.injected("the OpenAI SDK", python, &["-c", &openai], "/openai-sdk");
    // Whatever the answer's shape, the request must reach the upstream with the key.
    let anthropic = "import anthropic\ntry:\n    anthropic.Anthropic(base_url='https://api.openai.com/anthropic-sdk', default_headers={'authorization': 'Bearer placeholder'}, max_retries=0).models.list()\nexcept anthropic.APIStatusError:\n    pass";
    sandbox.injected(
        "the Anthropic SDK",
        python,
        &["-c", anthropic],
        "/anthropic-sdk",
    );
    let node = node_fetch(&url("/node"));
    sandbox.injected("Node fetch", "node", &["-e", &node], "/node");
    let git = sandbox.run(false, "git", &["ls-remote", &url("/git/repo.git")]);
    assert!(
        !String::from_utf8_lossy(&git.stderr).contains("SSL certificate problem"),
        "{git:?}"
    );
    sandbox.injected(
        "git",
        "git",
        &["ls-remote", &url("/git/repo.git")],
        "/git/repo.git/info/refs",
    );
    let go = build_go_probe(&setup.dir);
    sandbox.injected("Go net/http", go.to_str().unwrap(), &[&url("/go")], "/go");
    let java = setup.dir.join("Probe.java");
    std::fs::write(&java, JAVA_PROBE).unwrap();
    sandbox.injected(
        "Java HttpClient",
        "java",
        &[java.to_str().unwrap(), &url("/java")],
        "/java",
    );

    // A new CA is in the trust files at once.
    let rotated = cli(&setup.daemon, &["ca", "rotate"], None);
    assert_ok(&rotated);
    let after = url("/after-rotation");
    sandbox.injected(
        "curl after a CA rotation",
        "curl",
        &["-sSf", &after],
        "/after-rotation",
    );

    // The doctor shakes hands with each runtime the same way and says so.
    let doctor = |args: &[&str]| sandbox.doctor(args);
    let report = doctor(&[]);
    assert_ok(&report);
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(text.contains("handshakes with api.openai.com"), "{text}");
    for runtime in [
        "curl",
        "python (urllib, ssl)",
        "python requests",
        "python httpx",
        "node",
        "git",
        "go",
        "java",
    ] {
        let line = text
            .lines()
            .find(|line| line.starts_with(runtime))
            .unwrap_or_else(|| panic!("no line for {runtime}: {text}"));
        assert!(
            line.contains("trusted") && !line.contains("NOT TRUSTED"),
            "{line}\n{text}"
        );
    }
    // A client that insists on its own CA file is one the appliance cannot fix: it says so.
    let upstream_ca = setup.upstream_ca.display().to_string();
    let pinned = doctor(&[
        "--",
        "curl",
        "-sS",
        "--cacert",
        &upstream_ca,
        "https://api.openai.com/",
    ]);
    assert_eq!(pinned.status.code(), Some(1), "{pinned:?}");
    let text = String::from_utf8_lossy(&pinned.stdout);
    assert!(
        text.contains("NOT TRUSTED") && text.contains("fix:"),
        "{text}"
    );

    // For services and containers, the same variables.
    let env = test_command(APPLIANCE)
        .arg("--socket")
        .arg(&setup.daemon.socket)
        .args(["trust", "env"])
        .output()
        .unwrap();
    assert_ok(&env);
    let env = String::from_utf8_lossy(&env.stdout);
    for variable in [
        "SSL_CERT_FILE=",
        "REQUESTS_CA_BUNDLE=",
        "NODE_EXTRA_CA_CERTS=",
    ] {
        assert!(env.contains(variable), "{env}");
    }
    // Java services take the CA from the JVM's own store (trust install), not a variable.
    assert!(!env.contains("JAVA_TOOL_OPTIONS"), "{env}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn clients_trust_the_appliance_under_exec_when_the_environment_already_names_the_system_bundle() {
    // As conda, many CI images and corporate hosts set them (this machine's shell too).
    const SYSTEM: &str = "/etc/ssl/certs/ca-certificates.crt";
    let setup = setup(46, &[]);
    let sandbox = Sandbox::new(
        &setup,
        vec![
            ("SSL_CERT_FILE", SYSTEM),
            ("SSL_CERT_DIR", "/etc/ssl/certs"),
            ("REQUESTS_CA_BUNDLE", SYSTEM),
            ("CURL_CA_BUNDLE", SYSTEM),
            ("GIT_SSL_CAINFO", SYSTEM),
            ("NODE_EXTRA_CA_CERTS", SYSTEM),
            ("AWS_CA_BUNDLE", SYSTEM),
        ],
    );
    let url = |path: &str| format!("https://api.openai.com{path}");

    let curl = url("/curl");
    sandbox.injected("curl", "curl", &["-sSf", &curl], "/curl");
    let requests = requests_call(&url("/requests"));
    sandbox.injected(
        "Python requests",
        "/usr/bin/python3",
        &["-c", &requests],
        "/requests",
    );
    let python = sdk_python();
    let openai = openai_sdk_call("https://api.openai.com/openai-sdk");
    sandbox.injected(
        "the OpenAI SDK",
        python.to_str().unwrap(),
        &["-c", &openai],
        "/openai-sdk",
    );
    let node = node_fetch(&url("/node"));
    sandbox.injected("Node fetch", "node", &["-e", &node], "/node");
    sandbox.injected(
        "git",
        "git",
        &["ls-remote", &url("/git/repo.git")],
        "/git/repo.git/info/refs",
    );
    let go = build_go_probe(&setup.dir);
    sandbox.injected("Go net/http", go.to_str().unwrap(), &[&url("/go")], "/go");

    // Each variable names a file with the user's roots, whole, and the appliance CA.
    let shown = sandbox.run(
        false,
        "sh",
        &[
            "-c",
            "echo \"$SSL_CERT_FILE $AWS_CA_BUNDLE $NODE_EXTRA_CA_CERTS\"",
        ],
    );
    assert_ok(&shown);
    let system = std::fs::read_to_string(SYSTEM).unwrap();
    let ca = std::fs::read_to_string(&setup.appliance_ca).unwrap();
    let named = String::from_utf8(shown.stdout).unwrap();
    for path in named.split_whitespace() {
        assert_ne!(path, SYSTEM);
        let merged = std::fs::read_to_string(path).unwrap();
        assert!(
            merged.starts_with(&system) && merged.contains(ca.trim()),
            "{path} lacks the user's roots or the CA"
        );
        assert_eq!(
            certificates_in(Path::new(path)),
            certificates_in(Path::new(SYSTEM)) + 1
        );
    }

    // The doctor says what it kept, and every runtime trusts the appliance.
    let report = sandbox.doctor(&[]);
    assert_ok(&report);
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        text.contains(&format!(
            "SSL_CERT_FILE={SYSTEM} is kept: commands get its roots plus the appliance CA"
        )),
        "{text}"
    );
    assert!(!text.contains("NOT TRUSTED"), "{text}");
}

/// How many certificates a PEM bundle holds.
fn certificates_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches("BEGIN CERTIFICATE")
        .count()
}

/// The entries of a Java trust store.
fn java_entries(store: &Path) -> String {
    let output = test_command("keytool")
        .args(["-list", "-storepass", "changeit", "-keystore"])
        .arg(store)
        .output()
        .unwrap();
    assert_ok(&output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn trust_install_adds_the_ca_where_hosts_keep_trust_and_uninstall_takes_only_it_away() {
    let setup = setup(45, &[]);
    // A staging copy of this host's trust layout (Debian's), so the host's own is untouched.
    let root = setup.dir.join("root");
    for dir in [
        "usr/local/share/ca-certificates",
        "etc/ssl/certs/java",
        "etc/ca-certificates/update.d",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(
        "/etc/ca-certificates.conf",
        root.join("etc/ca-certificates.conf"),
    )
    .unwrap();
    copy_tree(
        Path::new("/usr/share/ca-certificates"),
        &root.join("usr/share/ca-certificates"),
    );
    let java_store = std::fs::canonicalize(
        std::fs::canonicalize(which("java"))
            .unwrap()
            .parent()
            .unwrap()
            .join("../lib/security/cacerts"),
    )
    .unwrap();
    let staged_java = root.join(java_store.strip_prefix("/").unwrap());
    std::fs::create_dir_all(staged_java.parent().unwrap()).unwrap();
    std::fs::copy(&java_store, &staged_java).unwrap();
    let nss = setup.dir.join("nssdb");
    std::fs::create_dir_all(&nss).unwrap();
    assert_ok(
        &test_command("certutil")
            .args(["-N", "--empty-password", "-d"])
            .arg(format!("sql:{}", nss.display()))
            .output()
            .unwrap(),
    );
    let java_before = java_entries(&staged_java);
    let trust = |verb: &str| {
        let output = test_command(APPLIANCE)
            .arg("--socket")
            .arg(&setup.daemon.socket)
            .args(["trust", verb, "--root"])
            .arg(&root)
            .arg("--nss-db")
            .arg(&nss)
            .args(["--service", "agent-research"])
            .output()
            .unwrap();
        assert_ok(&output);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let ca = String::from_utf8(appliance_ca_pem(&setup.daemon)).unwrap();
    let ca_body: String = ca
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let bundle = root.join("etc/ssl/certs/ca-certificates.crt");
    let bundle_has_ca = || {
        std::fs::read_to_string(&bundle)
            .unwrap_or_default()
            .lines()
            .collect::<String>()
            .matches(&ca_body)
            .count()
    };

    let installed = trust("install");
    assert!(
        installed.contains("system store (Debian)") && installed.contains("added"),
        "{installed}"
    );
    let with_ca = certificates_in(&bundle);
    assert_eq!(
        bundle_has_ca(),
        1,
        "the system bundle holds the appliance CA"
    );
    assert!(java_entries(&staged_java).contains("appliance-ca"));
    let nss_list = test_command("certutil")
        .args(["-L", "-n", "appliance-ca", "-d"])
        .arg(format!("sql:{}", nss.display()))
        .output()
        .unwrap();
    assert_ok(&nss_list);
    let env = std::fs::read_to_string(root.join("etc/appliance/trust.env")).unwrap();
    assert!(env.contains("SSL_CERT_FILE="), "{env}");
    let drop_in = std::fs::read_to_string(
        root.join("etc/systemd/system/agent-research.service.d/appliance-trust.conf"),
    )
    .unwrap();
    assert!(
        drop_in.contains("EnvironmentFile=/etc/appliance/trust.env"),
        "{drop_in}"
    );

    // Again: nothing more.
    let again = trust("install");
    assert!(again.contains("already there"), "{again}");
    assert_eq!(certificates_in(&bundle), with_ca);
    assert_eq!(bundle_has_ca(), 1);
    assert_eq!(
        java_entries(&staged_java).matches("appliance-ca").count(),
        1
    );

    let removed = trust("uninstall");
    assert!(removed.contains("removed"), "{removed}");
    assert_eq!(bundle_has_ca(), 0);
    assert_eq!(
        certificates_in(&bundle),
        with_ca - 1,
        "only the appliance CA went"
    );
    assert_eq!(
        java_entries(&staged_java),
        java_before,
        "the JVM's own entries stay"
    );
    let nss_list = test_command("certutil")
        .args(["-L", "-n", "appliance-ca", "-d"])
        .arg(format!("sql:{}", nss.display()))
        .output()
        .unwrap();
    assert!(!nss_list.status.success(), "the NSS entry is gone");
    assert!(!root.join("etc/appliance/trust.env").exists());
    assert!(!root
        .join("etc/systemd/system/agent-research.service.d/appliance-trust.conf")
        .exists());
    let twice = trust("uninstall");
    assert!(twice.contains("not there"), "{twice}");
}

fn which(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}
