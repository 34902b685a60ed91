//! Leaf certificates per SNI name: minted on first use, cached (bounded), renewed before they
//! expire. Concurrent first connections to one host wait for a single minting.

use crate::metrics::{self, METRICS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ca::{CertificateAuthority, LEAF_VALIDITY};

/// A leaf is replaced once it is this old: a day before it expires.
const RENEW_AFTER: Duration = Duration::from_secs(LEAF_VALIDITY.as_secs() - 24 * 3600);

struct Slot {
    minted: OnceLock<Option<Arc<CertifiedKey>>>,
    created: Instant,
}

impl Slot {
    fn usable(&self) -> bool {
        // A slot still being minted is joined, not replaced.
        self.created.elapsed() < RENEW_AFTER && !matches!(self.minted.get(), Some(None))
    }
}

/// Cache of leaf certificates issued by the current CA.
pub struct LeafCache {
    ca: RwLock<Arc<CertificateAuthority>>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    capacity: usize,
    minted: AtomicU64,
}

impl LeafCache {
    /// A cache of at most `capacity` leaves signed by `ca`.
    pub fn new(ca: CertificateAuthority, capacity: usize) -> Self {
        Self {
            ca: RwLock::new(Arc::new(ca)),
            slots: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            minted: AtomicU64::new(0),
        }
    }

    /// The CA currently signing leaves.
    pub fn ca(&self) -> Arc<CertificateAuthority> {
        Arc::clone(
            &self
                .ca
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Switches to `ca` and forgets every leaf of the old one.
    pub fn replace_ca(&self, ca: CertificateAuthority) {
        *self
            .ca
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(ca);
        self.lock_slots().clear();
    }

    /// How many leaves were signed since start.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The leaf for `host`, minting it when absent or due for renewal.
    pub fn leaf(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let host = host.to_ascii_lowercase();
        let slot = {
            let mut slots = self.lock_slots();
            match slots.get(&host) {
                Some(slot) if slot.usable() => {
                    metrics::count(&METRICS.leaf_cache, &["hit"]);
                    Arc::clone(slot)
                }
                _ => {
                    metrics::count(&METRICS.leaf_cache, &["miss"]);
                    if slots.len() >= self.capacity {
                        evict_oldest(&mut slots);
                    }
                    let slot = Arc::new(Slot {
                        minted: OnceLock::new(),
                        created: Instant::now(),
                    });
                    slots.insert(host.clone(), Arc::clone(&slot));
                    slot
                }
            }
        };
        slot.minted
            .get_or_init(|| match self.ca().issue(&host) {
                Ok(leaf) => {
                    self.minted.fetch_add(1, Ordering::Relaxed);
                    Some(Arc::new(leaf))
                }
                Err(error) => {
                    tracing::warn!(%host, error = %error, "cannot mint a leaf certificate");
                    None
                }
            })
            .clone()
    }
}

fn evict_oldest(slots: &mut HashMap<String, Arc<Slot>>) {
    if let Some(oldest) = slots
        .iter()
        .min_by_key(|(_, slot)| slot.created)
        .map(|(host, _)| host.clone())
    {
        slots.remove(&oldest);
    }
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("capacity", &self.capacity)
            .field("minted", &self.minted())
            .finish()
    }
}

impl ResolvesServerCert for LeafCache {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.leaf(hello.server_name()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> (LeafCache, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("appliance-leaf-{}-{capacity}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = CertificateAuthority::load_or_create(&dir).unwrap();
        (LeafCache::new(ca, capacity), dir)
    }

    #[test]
    fn a_repeat_host_costs_no_signing_and_case_does_not_matter() {
        let (cache, dir) = cache(8);
        let first = cache.leaf("api.example.com").unwrap();
        let second = cache.leaf("API.Example.com").unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(cache.minted(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_first_requests_mint_once() {
        let (cache, dir) = cache(9);
        let cache = Arc::new(cache);
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || cache.leaf("burst.example.com").unwrap())
            })
            .collect();
        let leaves: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(leaves.iter().all(|leaf| Arc::ptr_eq(leaf, &leaves[0])));
        assert_eq!(cache.minted(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_cache_stays_within_capacity_and_rotation_forgets_old_leaves() {
        let (cache, dir) = cache(2);
        for host in ["a.example", "b.example", "c.example"] {
            cache.leaf(host).unwrap();
        }
        assert_eq!(cache.lock_slots().len(), 2);
        assert!(!cache.lock_slots().contains_key("a.example"));
        let before = cache.leaf("c.example").unwrap();
        cache.replace_ca(CertificateAuthority::rotate(&dir).unwrap());
        let after = cache.leaf("c.example").unwrap();
        assert_ne!(
            before.cert[1], after.cert[1],
            "new leaf must chain to the new CA"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
