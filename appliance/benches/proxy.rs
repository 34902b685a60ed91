//! `cargo xtask bench`: throughput of the engine on loopback, against a direct connection to
//! the same HTTPS upstream, in one run.
//!
//! - keep-alive: requests/s over a fixed set of kept-alive HTTP/1.1 connections;
//! - new connections: TLS connections/s, each with one request, then closed.
//!
//! Modes: `direct` (client to upstream), `intercepted` (engine terminates TLS and injects a
//! header), `pass-through` (engine copies TLS bytes for a host without a secret). The eBPF
//! redirect itself is a rewrite at connect(); it is not in this loop.

#[path = "../../tests/https/mod.rs"]
mod https;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::addr::{ClientAddr, EngineAddr, OrigDstAddr};
use appliance::audit::EventLog;
use appliance::capture::{CgroupId, LookupError, OriginalDestinations, Redirect};
use appliance::engine::Engine;
use appliance::injection::{HostTable, LiveValue, LoadedSecret, SecretInjector};
use appliance::model::SecretSpec;
use appliance::proxy::{Proxy, ProxySettings, Unintercepted};
use appliance::tls::{CertificateAuthority, LeafCache, UpstreamTls};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

// The shipped binary's allocator, so that the engine here allocates as the daemon does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEEP_ALIVE_CONNECTIONS: usize = 32;
const NEW_CONNECTION_WORKERS: usize = 8;

fn seconds() -> Duration {
    Duration::from_secs(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(5),
    )
}

struct AllTo(Redirect);

impl OriginalDestinations for AllTo {
    fn take(
        &self,
        _client: ClientAddr,
        _engine: EngineAddr,
    ) -> Result<Option<Redirect>, LookupError> {
        Ok(Some(self.0.clone()))
    }
}

fn connector(ca_pem: &str) -> TlsConnector {
    TlsConnector::from(Arc::new(https::full_handshake_client_config(
        ca_pem.as_bytes(),
    )))
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn open(target: SocketAddr, host: &'static str, tls: &TlsConnector) -> Sender {
    let tcp = TcpStream::connect(target).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let stream = tls
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn request(sender: &mut Sender, host: &str) {
    let request = http::Request::builder()
        .uri("/echo")
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert!(response.status().is_success());
    response.into_body().collect().await.unwrap();
}

async fn keep_alive_rate(target: SocketAddr, host: &'static str, tls: &TlsConnector) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + seconds();
    let mut workers = Vec::new();
    for _ in 0..KEEP_ALIVE_CONNECTIONS {
        let mut sender = open(target, host, tls).await;
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                request(&mut sender, host).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for worker in workers {
        worker.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

async fn new_connection_rate(target: SocketAddr, host: &'static str, tls: &TlsConnector) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + seconds();
    let started = Instant::now();
    let workers: Vec<_> = (0..NEW_CONNECTION_WORKERS)
        .map(|_| {
            let done = Arc::clone(&done);
            let tls = tls.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let mut sender = open(target, host, &tls).await;
                    request(&mut sender, host).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Where the parties of a run execute.
#[derive(Clone, Copy)]
enum Placement {
    /// Load generator, upstream and appliance share every core, as on a busy host.
    Shared,
    /// The appliance runs on the last core, load generator and upstream on the first: what
    /// the workload sees when the appliance has capacity of its own (the figure the engine
    /// issue's targets are about).
    Isolated,
}

impl Placement {
    fn key(self) -> &'static str {
        match self {
            Placement::Shared => "shared",
            Placement::Isolated => "isolated",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Placement::Shared => "shared cores",
            Placement::Isolated => "appliance on its own core",
        }
    }
}

/// A runtime whose worker threads run only on `cpu` (all cores when `None`).
fn runtime(workers: usize, cpu: Option<usize>) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    if let Some(cpu) = cpu {
        builder.on_thread_start(move || pin_current_thread(cpu));
    }
    builder.build().unwrap()
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let result = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(result, 0, "pinning a bench thread to cpu {cpu} failed");
    }
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "appliance bench: {} s per figure, {KEEP_ALIVE_CONNECTIONS} kept-alive connections, {NEW_CONNECTION_WORKERS} connecting workers, {cores} cores",
        seconds().as_secs(),
    );
    let mut placements = vec![Placement::Shared];
    if cores >= 2 {
        placements.push(Placement::Isolated);
    }
    // BENCH_PLACEMENT=shared or =isolated narrows a run.
    let selected = std::env::var("BENCH_PLACEMENT").ok();
    placements.retain(|placement| {
        selected
            .as_deref()
            .is_none_or(|wanted| wanted == placement.key())
    });
    for placement in placements {
        let (load, appliance) = match placement {
            Placement::Shared => (runtime(cores, None), None),
            Placement::Isolated => (runtime(1, Some(0)), Some(runtime(1, Some(cores - 1)))),
        };
        println!("\n{}:", placement.name());
        load.block_on(run(
            placement,
            appliance.as_ref().map(|rt| rt.handle().clone()),
        ));
    }
}

async fn run(placement: Placement, appliance_runtime: Option<tokio::runtime::Handle>) {
    let dir = std::env::temp_dir().join(format!("appliance-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let upstream_ca = https::Ca::new("bench upstream CA");
    let upstream_ca_file = dir.join("upstream-ca.pem");
    upstream_ca.write(&upstream_ca_file);
    let upstream = https::Upstream::start_unrecorded(
        "127.0.0.1:0".parse().unwrap(),
        &[
            ("api.bench.test", &upstream_ca),
            ("plain.bench.test", &upstream_ca),
        ],
    )
    .await;

    let ca = CertificateAuthority::load_or_create(&dir.join("ca")).unwrap();
    let appliance_ca = ca.certificate_pem().to_owned();
    let injector = SecretInjector::default();
    let (spec, value) = SecretSpec::from_json(&serde_json::json!({
        "name": "bench", "hostPattern": "api.bench.test", "value": "sk-bench-0123456789",
        "injection": {"headerName": "authorization", "valueFormat": "Bearer {value}"}
    }))
    .unwrap();
    injector.replace(HostTable::new(
        vec![Arc::new(LoadedSecret::new(
            "sec_bench".into(),
            spec.clone(),
            Arc::new(LiveValue::fixed(value.unwrap(), &spec.rules)),
        ))],
        Vec::new(),
    ));
    let settings = ProxySettings {
        own_mark: 0,
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(30),
        max_header_bytes: 64 * 1024,
        limits: appliance::proxy::admission::Limits {
            total: 100_000,
            per_cgroup: 20_000,
        },
        unintercepted: Unintercepted::PassThrough,
    };
    let proxy = Proxy::new(
        Arc::new(injector),
        Arc::new(LeafCache::new(ca, 1024)),
        UpstreamTls::new(std::slice::from_ref(&upstream_ca_file)).unwrap(),
        Arc::new(EventLog::new(1024)),
        settings,
    )
    .unwrap();
    let redirect = Redirect {
        original_dst: OrigDstAddr(upstream.addr),
        cgroup_id: CgroupId(1),
        pid: 1,
        netns_cookie: 1,
        from_container: false,
        container: None,
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // The engine's sockets belong to the runtime that binds them, so it starts there.
    let start_engine = async move {
        let engine = Engine::bind(
            &["127.0.0.1:0".parse().unwrap()],
            Arc::new(AllTo(redirect)),
            Arc::new(proxy),
        )
        .await
        .unwrap();
        let engine_addr = engine.local_addrs()[0];
        tokio::spawn(engine.serve(stop_rx, Duration::from_secs(1)));
        engine_addr
    };
    let engine_addr = match &appliance_runtime {
        Some(handle) => handle.spawn(start_engine).await.unwrap(),
        None => start_engine.await,
    };

    let trusts_upstream = connector(&upstream_ca.pem);
    let trusts_appliance = connector(&appliance_ca);
    let modes: [(&str, SocketAddr, &'static str, &TlsConnector); 3] = [
        ("direct", upstream.addr, "api.bench.test", &trusts_upstream),
        (
            "intercepted",
            engine_addr,
            "api.bench.test",
            &trusts_appliance,
        ),
        (
            "pass-through",
            engine_addr,
            "plain.bench.test",
            &trusts_upstream,
        ),
    ];
    // BENCH_MODES=intercepted (comma-separated) narrows a run, e.g. for profiling one path.
    let selected = std::env::var("BENCH_MODES").ok();
    let wanted = |name: &str| {
        selected
            .as_deref()
            .is_none_or(|list| list.split(',').any(|m| m == name))
    };
    let mut results = Vec::new();
    for (name, target, host, tls) in modes.into_iter().filter(|mode| wanted(mode.0)) {
        let keep_alive = keep_alive_rate(target, host, tls).await;
        let connections = new_connection_rate(target, host, tls).await;
        results.push((name, keep_alive, connections));
    }
    let _ = stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
    if results.len() < 3 {
        for (name, keep_alive, connections) in &results {
            println!("{name:<13} {keep_alive:>14.0} r/s {connections:>10.0} conn/s");
        }
        return;
    }
    let (_, direct_keep_alive, direct_connections) = results[0];
    println!(
        "{:<13} {:>14} {:>8} {:>16} {:>8}",
        "mode", "keep-alive r/s", "ratio", "new TLS conn/s", "ratio"
    );
    for (name, keep_alive, connections) in &results {
        println!(
            "{name:<13} {keep_alive:>14.0} {:>7.0}% {connections:>16.0} {:>7.0}%",
            100.0 * keep_alive / direct_keep_alive,
            100.0 * connections / direct_connections
        );
    }
    let verdict = |ratio: f64, target: f64| if ratio >= target { "met" } else { "MISSED" };
    let intercepted = results[1].1 / direct_keep_alive;
    let passed = results[2].1 / direct_keep_alive;
    println!(
        "targets ({}): intercepted keep-alive >= 50% of direct: {}; pass-through >= 95% of direct: {}",
        placement.name(),
        verdict(intercepted, 0.5),
        verdict(passed, 0.95)
    );
}
