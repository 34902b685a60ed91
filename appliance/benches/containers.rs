//! `cargo xtask bench` (as root): connections per second through the container path against
//! the host path, through one real daemon with its eBPF programs attached.
//!
//! Every connection is a full TLS handshake with the engine (no resumption), one HTTP/1.1
//! request whose placeholder key the engine replaces, and the upstream's answer. The upstream
//! lives in a network namespace of its own behind fake external addresses (the container
//! tests' network). Paths:
//! - `host`: a client in the selected cgroup, in the host's namespace: connect4 rewrites its
//!   connect to the engine's loopback listener;
//! - `container, tproxy`: a client in container A's namespace on a bridge: policy routing and
//!   sk_lookup deliver it to the engine unrewritten;
//! - `container, redirect`: the same client with the daemon in redirect mode: connect4
//!   rewrites it to the engine's container address;
//! - `direct`: container B, which nothing selects, straight to the upstream, for scale.
//!
//! Rounds alternate the paths, so drift on the machine hits all of them (the host path runs
//! under both daemons); each figure is the median of the rounds, printed with the spread
//! between the slowest and fastest round.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/https/mod.rs"]
mod https;
#[path = "../../tests/network/mod.rs"]
mod network;

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use network::{Setup, HOST};
use rustls_pki_types::ServerName;

/// Set in a client process the bench starts inside a cgroup and namespace: `target ca_file
/// seconds workers`.
const CLIENT_ENV: &str = "APPLIANCE_BENCH_CONTAINER_CLIENT";
const ROUNDS: usize = 5;
const WORKERS: usize = 4;

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5)
}

fn main() {
    if let Ok(spec) = std::env::var(CLIENT_ENV) {
        run_client(&spec);
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("containers bench skipped: it attaches eBPF programs and builds network namespaces, so it needs root");
        return;
    }
    let mut figures: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut record = |name: &'static str, rate: f64| match figures
        .iter_mut()
        .find(|(known, _)| *known == name)
    {
        Some((_, rates)) => rates.push(rate),
        None => figures.push((name, vec![rate])),
    };
    {
        let setup = network::setup(40, "tproxy");
        let _a_init = setup.start_container_init(&setup.network.a, 0);
        for _ in 0..ROUNDS {
            record("host", measure(&setup, Path::Host));
            record("container, tproxy", measure(&setup, Path::ContainerA));
            record("direct", measure(&setup, Path::DirectB));
        }
    }
    {
        let setup = network::setup(41, "redirect");
        let _a_init = setup.start_container_init(&setup.network.a, 0);
        for _ in 0..ROUNDS {
            record("host", measure(&setup, Path::Host));
            record("container, redirect", measure(&setup, Path::ContainerA));
        }
    }
    let median = |rates: &[f64]| {
        let mut sorted = rates.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let host = median(&figures[0].1);
    println!(
        "{:<20} {:>10} {:>8} {:>16}",
        "path", "conn/s", "vs host", "rounds min-max"
    );
    for (name, rates) in &figures {
        let rate = median(rates);
        let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let high = rates.iter().copied().fold(0.0, f64::max);
        println!(
            "{name:<20} {rate:>10.0} {:>7.0}% {:>16}",
            100.0 * rate / host,
            format!("{low:.0}-{high:.0}")
        );
    }
    let worst_container = figures
        .iter()
        .filter(|(name, _)| name.starts_with("container"))
        .map(|(_, rates)| median(rates))
        .fold(f64::INFINITY, f64::min);
    println!(
        "target: container paths within 20% of the host path: {}",
        if worst_container >= 0.8 * host {
            "met"
        } else {
            "MISSED"
        }
    );
}

#[derive(Clone, Copy)]
enum Path {
    Host,
    ContainerA,
    DirectB,
}

/// Connections per second a client on `path` gets to the upstream's IPv4 address.
fn measure(setup: &Setup, path: Path) -> f64 {
    let client = std::env::current_exe().unwrap();
    let client = client.to_str().unwrap();
    let mut command = match path {
        Path::Host => common::command_in_cgroup(&setup.selected, client),
        Path::ContainerA => setup.network.a.command(&setup.selected, client),
        Path::DirectB => setup.network.b.command(&setup.unselected, client),
    };
    let seconds = seconds();
    let spec = format!(
        "{} {} {seconds} {WORKERS}",
        SocketAddr::new(setup.network.external_v4, 443),
        setup.trusted.display()
    );
    let output = command.env(CLIENT_ENV, spec).output().unwrap();
    assert!(output.status.success(), "bench client failed: {output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let (completed, failed) = text.trim().split_once(' ').unwrap();
    let failed: u64 = failed.parse().unwrap();
    assert_eq!(failed, 0, "connections failed on a bench path");
    completed.parse::<f64>().unwrap() / seconds as f64
}

/// The client: `workers` threads, each making connections one after the other until the time
/// is up; prints how many completed and how many failed.
fn run_client(spec: &str) {
    let fields: Vec<&str> = spec.split(' ').collect();
    let target: SocketAddr = fields[0].parse().unwrap();
    let roots = std::fs::read(fields[1]).unwrap();
    let config = Arc::new(https::full_handshake_client_config(&roots));
    let deadline = Instant::now() + Duration::from_secs(fields[2].parse().unwrap());
    let workers: usize = fields[3].parse().unwrap();
    let (completed, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while Instant::now() < deadline {
                    match one_connection(target, &config) {
                        Ok(()) => completed.fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            eprintln!("{error}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
    });
    println!(
        "{} {}",
        completed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
}

/// One connection: handshake, one request, its whole answer, close.
fn one_connection(target: SocketAddr, config: &Arc<rustls::ClientConfig>) -> io::Result<()> {
    let connection =
        rustls::ClientConnection::new(Arc::clone(config), ServerName::try_from(HOST).unwrap())
            .map_err(io::Error::other)?;
    let socket = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    // As curl and the HTTP libraries do: with Nagle the request written after the handshake
    // waits for a delayed ACK, which measured 4 times fewer connections and a spread that
    // hid every difference between the paths.
    socket.set_nodelay(true)?;
    let mut tls = rustls::StreamOwned::new(connection, socket);
    write!(
        tls,
        "GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer placeholder\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let body_start = loop {
        let read = tls.read(&mut buffer)?;
        if read == 0 {
            return Err(io::Error::other("the answer ended inside its head"));
        }
        answer.extend_from_slice(&buffer[..read]);
        if let Some(end) = answer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&answer[..body_start]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(io::Error::other(format!("answer {head:?}")));
    }
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| io::Error::other("answer without content-length"))?;
    while answer.len() < body_start + length {
        let read = tls.read(&mut buffer)?;
        if read == 0 {
            return Err(io::Error::other("the answer ended inside its body"));
        }
        answer.extend_from_slice(&buffer[..read]);
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    // Close with a reset: otherwise each path piles up TIME_WAIT sockets in its own
    // namespace (the host path in the host's, shared with the engine's upstream sockets),
    // and the cost of finding a free port would differ between paths, not the paths.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized option value.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(tls.get_ref()),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
