//! The fixture of the end-to-end tests over the real redirect: a daemon on its own slot, a
//! loopback HTTPS upstream serving the providers' hosts with a test CA, and curl inside
//! `appliance exec`.

// Each test binary uses the part it needs.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use crate::common::*;
use crate::https::{self, Ca, Upstream};

/// Hosts the upstream serves (all on one loopback address), each with a test-CA certificate.
pub const HOSTS: [&str; 8] = [
    "api.anthropic.com",
    "api.openai.com",
    "api.github.com",
    "github.com",
    "api.stripe.com",
    "plain.example.com",
    "generic.example.com",
    "other.example.com",
];

pub struct Setup {
    pub daemon: Daemon,
    pub upstream: Upstream,
    pub upstream_ip: IpAddr,
    pub appliance_ca: PathBuf,
    pub upstream_ca: PathBuf,
    pub dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn setup(slot: u8, extra: &[&str]) -> Setup {
    setup_configured(slot, "", extra, &[])
}

/// [`setup`] with the daemon's configuration file holding `config` and `env` in its
/// environment.
pub fn setup_configured(slot: u8, config: &str, extra: &[&str], env: &[(&str, &Path)]) -> Setup {
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
    let daemon = Daemon::start_configured(slot, config, &args, None, env);
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
    pub fn curl(&self, ca: &Path, host: &str, path: &str, extra: &[&str]) -> Output {
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
    pub fn curl_openai_in(&self, cgroup: &Path, path: &str) -> Output {
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
    pub fn sse_client(
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
    pub fn last_request(&self, host: &str) -> https::SeenRequest {
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
pub fn tree_contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
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

pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
