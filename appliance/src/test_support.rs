//! Shared fixtures of the unit tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::audit::EventLog;
use crate::injection::SecretInjector;
use crate::proxy::{Proxy, ProxySettings, Unintercepted};
use crate::tls::{CertificateAuthority, LeafCache, UpstreamTls};

/// A fresh, empty directory under the system temp dir, unique to this process and `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("appliance-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A proxy with no secrets (everything passes through), its own CA, and upstream trust in
/// that CA only.
pub fn test_proxy() -> Arc<Proxy> {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = temp_dir(&format!("proxy-{}", CALLS.fetch_add(1, Ordering::Relaxed)));
    let ca = CertificateAuthority::load_or_create(&dir.join("ca")).unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, ca.certificate_pem()).unwrap();
    let upstream_tls = UpstreamTls::new(&[ca_file]).unwrap();
    let settings = ProxySettings {
        // Marking needs CAP_NET_ADMIN, and unit tests run unprivileged.
        own_mark: 0,
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(5),
        max_header_bytes: 64 * 1024,
        limits: crate::proxy::admission::Limits {
            total: 100_000,
            per_cgroup: 20_000,
        },
        unintercepted: Unintercepted::PassThrough,
    };
    let leaves = Arc::new(LeafCache::new(ca, 16));
    let events = Arc::new(EventLog::new(16));
    let injector = Arc::new(SecretInjector::default());
    Arc::new(Proxy::new(injector, leaves, upstream_tls, events, settings).unwrap())
}
