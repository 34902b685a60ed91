//! Finding the original destination of an accepted connection.
//!
//! The engine only asks this small interface, so its tests can run without root against
//! [`FixedOriginalDestinations`] while privileged tests cover [`KernelOriginalDestinations`].

use std::net::SocketAddr;
use std::sync::Mutex;

use appliance_common::{ConnectionKey, Redirection};
use aya::maps::{HashMap, MapData, MapError};

use super::cgroup::CgroupId;
use crate::addr::{from_kernel_words, to_kernel_words, ClientAddr, EngineAddr, OrigDstAddr};

/// What capture recorded about a redirected connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Where the client meant to go.
    pub original_dst: OrigDstAddr,
    /// cgroup v2 id of the process that connected.
    pub cgroup_id: CgroupId,
    /// Process id of the process that connected.
    pub pid: u32,
    /// Cookie of the network namespace the connection came from.
    pub netns_cookie: u64,
    /// Whether it came from a container's namespace rather than the engine's own.
    pub from_container: bool,
    /// The container's unit (`docker-<id>.scope`, …), when the engine could tell.
    pub container: Option<std::sync::Arc<str>>,
}

/// Failure to read the kernel's record of a connection.
#[derive(Debug, thiserror::Error)]
#[error("reading the original destination of {client} from the eBPF map failed")]
pub struct LookupError {
    client: ClientAddr,
    #[source]
    source: MapError,
}

/// Source of original destinations for accepted connections.
pub trait OriginalDestinations: Send + Sync + 'static {
    /// Returns the record of the connection accepted from `client` on the engine's address
    /// `engine` and forgets it, so each record is used once and the table does not grow.
    /// `None` means the connection was not redirected by capture (or its record was already
    /// taken).
    fn take(&self, client: ClientAddr, engine: EngineAddr)
        -> Result<Option<Redirect>, LookupError>;
}

/// Original destinations recorded by the eBPF programs in the pinned `ORIG_DST` map.
pub struct KernelOriginalDestinations {
    map: Mutex<HashMap<MapData, ConnectionKey, Redirection>>,
}

impl KernelOriginalDestinations {
    pub(super) fn new(map: HashMap<MapData, ConnectionKey, Redirection>) -> Self {
        Self {
            map: Mutex::new(map),
        }
    }
}

fn connection_key(client: ClientAddr, engine: EngineAddr) -> ConnectionKey {
    ConnectionKey {
        client_ip6: to_kernel_words(client.0.ip()),
        server_ip6: to_kernel_words(engine.0.ip()),
        client_port: u32::from(client.0.port()),
        server_port: u32::from(engine.0.port()),
    }
}

impl From<Redirection> for Redirect {
    fn from(record: Redirection) -> Self {
        Self {
            original_dst: OrigDstAddr(SocketAddr::new(from_kernel_words(record.ip6), record.port)),
            cgroup_id: CgroupId(record.cgroup_id),
            pid: record.pid,
            netns_cookie: record.netns_cookie,
            from_container: record.delivery != appliance_common::DELIVERY_LOCAL,
            container: None,
        }
    }
}

impl OriginalDestinations for KernelOriginalDestinations {
    fn take(
        &self,
        client: ClientAddr,
        engine: EngineAddr,
    ) -> Result<Option<Redirect>, LookupError> {
        let key = connection_key(client, engine);
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let record = match map.get(&key, 0) {
            Ok(record) => record,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => return Err(LookupError { client, source }),
        };
        match map.remove(&key) {
            // The socket may have closed in between, and sock_ops removed the entry.
            Ok(()) | Err(MapError::KeyNotFound) => Ok(Some(record.into())),
            Err(source) => Err(LookupError { client, source }),
        }
    }
}

/// A fixed table of redirections, for running the engine without the kernel side.
#[cfg(test)]
#[derive(Default)]
pub struct FixedOriginalDestinations {
    entries: Mutex<std::collections::HashMap<(ClientAddr, EngineAddr), Redirect>>,
}

#[cfg(test)]
impl FixedOriginalDestinations {
    /// Records that the connection from `client` to the engine's `engine` was redirected.
    pub fn insert(&self, client: ClientAddr, engine: EngineAddr, redirect: Redirect) {
        self.entries
            .lock()
            .unwrap()
            .insert((client, engine), redirect);
    }
}

#[cfg(test)]
impl OriginalDestinations for FixedOriginalDestinations {
    fn take(
        &self,
        client: ClientAddr,
        engine: EngineAddr,
    ) -> Result<Option<Redirect>, LookupError> {
        Ok(self.entries.lock().unwrap().remove(&(client, engine)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_record_converts_to_typed_addresses() {
        let record = Redirection {
            cgroup_id: 42,
            netns_cookie: 5,
            ip6: appliance_common::ipv4_mapped(u32::from_ne_bytes([127, 0, 0, 9])),
            pid: 7,
            port: 443,
            delivery: appliance_common::DELIVERY_TPROXY,
        };
        let redirect = Redirect::from(record);
        assert_eq!(redirect.original_dst.0, "127.0.0.9:443".parse().unwrap());
        assert_eq!(redirect.cgroup_id, CgroupId(42));
        assert_eq!(redirect.pid, 7);
        assert_eq!(redirect.netns_cookie, 5);
        assert!(redirect.from_container);
    }

    #[test]
    fn connection_keys_match_for_both_families() {
        let v4 = connection_key(
            ClientAddr("127.0.0.1:40000".parse().unwrap()),
            EngineAddr("10.0.0.1:443".parse().unwrap()),
        );
        assert_eq!((v4.client_port, v4.server_port), (40000, 443));
        assert!(appliance_common::is_ipv4_mapped(&v4.client_ip6));
        assert!(appliance_common::is_ipv4_mapped(&v4.server_ip6));
        let v6 = connection_key(
            ClientAddr("[::1]:40000".parse().unwrap()),
            EngineAddr("[::1]:15443".parse().unwrap()),
        );
        assert!(!appliance_common::is_ipv4_mapped(&v6.client_ip6));
        assert_eq!(v6.server_port, 15443);
    }
}
