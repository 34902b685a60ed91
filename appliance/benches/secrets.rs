//! What administering many secrets costs: create, update and delete latency as the store
//! grows, the cost of matching a request, and a reload (what the daemon does at start). The
//! real control layer, store and injection layer; capture is left out (it is not what grows
//! with secrets), so this bench needs no root.
//!
//! Usage: cargo bench --bench secrets [-- SIZES], e.g. `-- 100 1000 10000`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::audit::EventLog;
use appliance::capture::{CaptureError, Cgroup};
use appliance::control::{Control, Interception, Parts};
use appliance::injection::{Injector as _, SecretInjector, Verdict};
use appliance::model::{from_value, SecretInput};
use appliance::store::{MasterKey, Store};
use appliance::tls::{CertificateAuthority, LeafCache};
use appliance::trust::TrustFiles;
use appliance::values::{SourceSettings, Sources};

/// Capture is not what this bench measures.
struct NoCapture;

impl Interception for NoCapture {
    fn reconcile(&mut self, _agents: &[Cgroup]) -> Result<(), CaptureError> {
        Ok(())
    }
    fn refresh_containers(&mut self) -> Result<(), appliance::capture::containers::ContainerError> {
        Ok(())
    }
    fn selected(&self) -> usize {
        0
    }
    fn selected_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    fn refusals(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    fn map_entries(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }
}

fn secret(n: usize) -> SecretInput {
    from_value(serde_json::json!({
        "name": format!("s{n}"),
        "hostPattern": format!("h{n}.bench.test"),
        "injection": {"headerName": "authorization", "valueFormat": "Bearer {value}"},
        "value": format!("sk-bench-{n:08}-0123456789"),
    }))
    .unwrap()
}

fn control(dir: &std::path::Path) -> (Control, Arc<SecretInjector>) {
    let (key, _) = MasterKey::load_or_create(None, dir).unwrap();
    let store = Store::open(&dir.join("store"), &key).unwrap();
    let injector = Arc::new(SecretInjector::default());
    let ca = CertificateAuthority::load_or_create(&dir.join("ca")).unwrap();
    let sources = Arc::new(Sources::new(SourceSettings {
        ttl: Duration::from_secs(300),
        max_stale: Duration::from_secs(3600),
        timeout: Duration::from_secs(10),
        allow_commands: false,
        file_dirs: vec![std::env::temp_dir()],
        onepassword: None,
        credentials_dir: None,
        own_mark: 0,
        tls: None,
    }));
    let control = Control::new(Parts {
        store,
        injector: Arc::clone(&injector),
        leaves: Arc::new(LeafCache::new(ca, 16)),
        ca_dir: dir.join("ca"),
        events: Arc::new(EventLog::new(16)),
        capture: Box::new(NoCapture),
        sources,
        trust: Arc::new(TrustFiles::new(dir.join("trust"))),
    });
    (control, injector)
}

fn micros(elapsed: Duration, count: usize) -> f64 {
    elapsed.as_secs_f64() * 1e6 / count as f64
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1000, 3000]
    } else {
        sizes
    };
    let dir = std::env::temp_dir().join(format!("appliance-bench-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (control, injector) = control(&dir);
    const SAMPLES: usize = 20;
    println!("| secrets | create µs | update µs | delete µs | match ns | reload ms |");
    println!("|---|---|---|---|---|---|");
    let mut count = 0;
    for size in sizes {
        runtime.block_on(async {
            while count < size {
                control.create_secret(secret(count)).await.unwrap();
                count += 1;
            }
            let started = Instant::now();
            for n in 0..SAMPLES {
                control.create_secret(secret(1_000_000 + n)).await.unwrap();
            }
            let create = micros(started.elapsed(), SAMPLES);
            let started = Instant::now();
            for n in 0..SAMPLES {
                control
                    .update_secret(&format!("s{}", 1_000_000 + n), serde_json::json!({"pathPattern": "/v1/*"}))
                    .await
                    .unwrap();
            }
            let update = micros(started.elapsed(), SAMPLES);
            let started = Instant::now();
            for n in 0..SAMPLES {
                control.delete_secret(&format!("s{}", 1_000_000 + n)).unwrap();
            }
            let delete = micros(started.elapsed(), SAMPLES);
            let host = format!("h{}.bench.test", size / 2);
            let rounds = 20_000;
            let started = Instant::now();
            for _ in 0..rounds {
                let mut parts = http::Request::builder()
                    .uri("/v1/x")
                    .body(())
                    .unwrap()
                    .into_parts()
                    .0;
                let readings = appliance::request_path::Readings::of("/v1/x").unwrap();
                assert!(matches!(
                    injector.prepare(&host, None, &readings, &mut parts),
                    Verdict::Forward { .. }
                ));
            }
            let matching = started.elapsed().as_secs_f64() * 1e9 / f64::from(rounds);
            let started = Instant::now();
            control.reload().unwrap();
            let reload = started.elapsed().as_secs_f64() * 1e3;
            println!("| {size} | {create:.0} | {update:.0} | {delete:.0} | {matching:.0} | {reload:.0} |");
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}
