//! Helpers for privileged end-to-end tests: a real daemon, real cgroups, real clients, and
//! upstreams on loopback addresses.
//!
//! Each test takes a distinct `slot`, which gives it its own engine port, loopback upstream
//! address (127.77.<slot>.1), cgroups and bpffs directory, so tests run in parallel.

// Each test binary uses the part it needs.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod process;
pub use process::*;

pub const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged tests need root (cgroups, eBPF): run `sudo cargo xtask test`"
    );
}

pub fn cgroup2_mount() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            after
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(before.split(' ').nth(4).unwrap()))
        })
        .expect("no cgroup2 mount")
}

/// Loopback address of a slot's upstream.
pub fn upstream_ip(slot: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 77, slot, 1)
}

/// Names a test's resources so that concurrent runs and leftovers never collide.
pub fn unique(slot: u8, what: &str) -> String {
    format!("appliance-test-{}-{slot}-{what}", std::process::id())
}

/// Creates a cgroup directory (relative to the cgroup2 mount) and returns its path and id.
pub fn make_cgroup(relative: &str) -> (PathBuf, u64) {
    let path = cgroup2_mount().join(relative);
    fs::create_dir_all(&path).unwrap();
    let id = fs::metadata(&path).unwrap().ino();
    (path, id)
}

/// Removes a cgroup subtree, deepest first, once its processes are gone.
pub fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::remove_dir(path).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command that starts inside `cgroup` (it moves itself in before exec).
pub fn command_in_cgroup(cgroup: &Path, program: &str) -> Command {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let mut command = test_command(program);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    command
}

/// Runs a Python program and returns its stdout parsed as JSON; panics with stderr on failure.
pub fn python_json(mut command: Command, program: &str) -> Value {
    let output = command
        .args(["-c", program])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "python printed no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Python that connects to `host:443`, says hello, and prints what it saw as JSON: its local address,
/// the peer address from getpeername, the upstream's report of who connected, and its pid.
pub fn python_probe(host: &str, family: &str) -> String {
    format!(
        r#"
import json, os, socket
s = socket.socket(socket.{family}, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(("{host}", 443))
s.sendall(b"hello\n")
local = s.getsockname()
peer = s.getpeername()
reply = b""
while not reply.endswith(b"\n"):
    chunk = s.recv(200)
    if not chunk:
        break
    reply += chunk
print(json.dumps({{"local": [local[0], local[1]], "peer": [peer[0], peer[1]], "reply": reply.decode(), "pid": os.getpid()}}))
"#
    )
}

/// An upstream on loopback that reads one line from each client (clients speak first, as on
/// port 443), answers with the address it saw, then closes.
pub struct Upstream {
    pub addr: SocketAddr,
}

impl Upstream {
    pub fn start(ip: IpAddr, port: u16) -> Self {
        let listener = TcpListener::bind((ip, port)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let peer = stream.peer_addr().unwrap();
                let mut line = String::new();
                if BufReader::new(&mut stream).read_line(&mut line).is_ok() {
                    let _ = writeln!(stream, "peer={peer}");
                }
            }
        });
        Self { addr }
    }
}

/// The address the upstream said it saw, from a probe's JSON.
pub fn reported_peer(probe: &Value) -> SocketAddr {
    let reply = probe["reply"].as_str().unwrap();
    reply
        .trim()
        .strip_prefix("peer=")
        .unwrap_or_else(|| panic!("unexpected upstream reply {reply:?}"))
        .parse()
        .unwrap()
}

/// The probe's own address.
pub fn probe_local(probe: &Value) -> SocketAddr {
    let ip: IpAddr = probe["local"][0].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, probe["local"][1].as_u64().unwrap() as u16)
}

/// The address getpeername reported to the probe.
pub fn probe_peer(probe: &Value) -> SocketAddr {
    let ip: IpAddr = probe["peer"][0].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, probe["peer"][1].as_u64().unwrap() as u16)
}

/// A running `appliance daemon` with its own port, agents cgroup and bpffs directory.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub port: u16,
    pub agents_cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    config: PathBuf,
    config_text: String,
    extra_args: Vec<String>,
    extra_env: Vec<(String, PathBuf)>,
    cgroup: Option<PathBuf>,
}

impl Daemon {
    /// Starts a daemon for `slot` with extra arguments.
    pub fn start(slot: u8, extra_args: &[&str]) -> Self {
        Self::start_in(slot, extra_args, None)
    }

    /// Starts a daemon for `slot` whose process lives in `cgroup`.
    pub fn start_in(slot: u8, extra_args: &[&str], cgroup: Option<&Path>) -> Self {
        Self::start_with(slot, extra_args, cgroup, &[])
    }

    /// Starts a daemon for `slot` with extra environment variables.
    pub fn start_with(
        slot: u8,
        extra_args: &[&str],
        cgroup: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> Self {
        Self::start_configured(slot, "", extra_args, cgroup, env)
    }

    /// Starts a daemon for `slot` whose configuration file holds `config_text`.
    pub fn start_configured(
        slot: u8,
        config_text: &str,
        extra_args: &[&str],
        cgroup: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> Self {
        let mut daemon = Self {
            child: None,
            log: std::env::temp_dir().join(format!("{}.log", unique(slot, "daemon"))),
            port: 16000 + u16::from(slot),
            agents_cgroup: cgroup2_mount().join(unique(slot, "agents")),
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(unique(slot, "pins")),
            state_dir: std::env::temp_dir().join(unique(slot, "state")),
            // In a directory of its own: the daemon keeps its trust files beside it.
            socket: std::env::temp_dir()
                .join(unique(slot, "run"))
                .join("admin.sock"),
            config: std::env::temp_dir().join(format!("{}.toml", unique(slot, "config"))),
            // Container addresses of the slot's own: a daemon removes its addresses from lo
            // when it stops, and the tests' daemons run side by side.
            config_text: format!(
                "[listen]\ncontainers_ipv4 = \"169.254.77.{slot}\"\ncontainers_ipv6 = \"fd61:7070:6c69::{slot:x}\"\n{config_text}"
            ),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_path_buf()))
                .collect(),
            cgroup: cgroup.map(Path::to_path_buf),
        };
        daemon.spawn();
        daemon
    }

    /// Starts the daemon process (again) and waits until it reports ready.
    pub fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match &self.cgroup {
            Some(cgroup) => command_in_cgroup(cgroup, APPLIANCE),
            None => test_command(APPLIANCE),
        };
        // Built-in defaults unless the test says otherwise, whatever is installed in /etc.
        fs::write(&self.config, &self.config_text).unwrap();
        command
            .arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .args(["--log-format", "json"])
            .args(["--port", &self.port.to_string()])
            .arg("--agents-cgroup")
            .arg(&self.agents_cgroup)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(name, value)| (name, value)))
            // Request events are debug lines; tests read them.
            .env("RUST_LOG", "info,appliance::audit=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(command.spawn().unwrap());
        let ready_count = self.lines_with("event", "ready").len() + 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.lines_with("event", "ready").len() < ready_count {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Kills the daemon with SIGKILL: no cleanup code runs.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Gives the next [`Daemon::spawn`] `value` after the argument `flag` instead of the one
    /// it had.
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        let index = self
            .extra_args
            .iter()
            .position(|arg| arg == flag)
            .unwrap_or_else(|| panic!("the daemon has no {flag}"));
        self.extra_args[index + 1] = value.to_owned();
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    child.kill().unwrap();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            file.read_to_string(&mut text).unwrap();
        }
        text
    }

    /// JSON log lines whose `field` equals `value`.
    pub fn lines_with(&self, field: &str, value: &str) -> Vec<Value> {
        let Ok(file) = fs::File::open(&self.log) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
            .filter(|line| line[field].as_str() == Some(value))
            .collect()
    }

    /// Creates `<agents cgroup>/<name>` ahead of `appliance exec --cgroup <name>`, so that it
    /// outlives the command, and returns its id.
    pub fn agent_cgroup(&self, name: &str) -> u64 {
        let path = self.agents_cgroup.join(name);
        fs::create_dir_all(&path).unwrap();
        fs::metadata(&path).unwrap().ino()
    }

    /// `appliance exec` of Python in a named cgroup under this daemon's agents cgroup.
    pub fn exec_python(&self, name: &str) -> Command {
        let mut command = test_command(APPLIANCE);
        command
            .arg("exec")
            .arg("--agents-cgroup")
            .arg(&self.agents_cgroup)
            .args(["--cgroup", name, "--", "python3"]);
        command
    }

    /// Runs `appliance daemon --detach-all` for this daemon's configuration and bpffs
    /// directory.
    pub fn detach_all(&self) -> Output {
        test_command(APPLIANCE)
            .args(["daemon", "--detach-all", "--config"])
            .arg(&self.config)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        let _ = self.detach_all();
        remove_cgroup_tree(&self.agents_cgroup);
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_file(&self.config);
        let _ = fs::remove_dir_all(&self.state_dir);
        if let Some(run_dir) = self.socket.parent() {
            let _ = fs::remove_dir_all(run_dir);
        }
    }
}

/// Runs the `appliance` CLI against the daemon's socket, feeding `stdin` when given.
pub fn cli(daemon: &Daemon, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = test_command(APPLIANCE);
    command
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// The daemon's CA certificate (PEM), as `appliance ca export` prints it.
pub fn appliance_ca_pem(daemon: &Daemon) -> Vec<u8> {
    let exported = cli(daemon, &["ca", "export"], None);
    assert!(exported.status.success(), "{exported:?}");
    exported.stdout
}

pub fn create_secret(daemon: &Daemon, args: &[&str], value: &str) {
    let mut full = vec!["secret", "create"];
    full.extend_from_slice(args);
    full.push("--value-stdin");
    let output = cli(daemon, &full, Some(&format!("{value}\n")));
    assert!(
        output.status.success(),
        "secret create {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `bpftool -j ARGS`, parsed.
pub fn bpftool(args: &[&str]) -> Value {
    let output = test_command("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Some listings print nothing at all when they are empty.
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Value::Array(Vec::new());
    }
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Names of the programs attached directly to a cgroup.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let mut names: Vec<String> = bpftool(&["cgroup", "show", cgroup.to_str().unwrap()])
        .as_array()
        .unwrap()
        .iter()
        .map(|program| program["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Number of entries in a pinned map.
pub fn map_entries(pin: &Path) -> usize {
    bpftool(&["map", "dump", "pinned", pin.to_str().unwrap()])
        .as_array()
        .unwrap()
        .len()
}
