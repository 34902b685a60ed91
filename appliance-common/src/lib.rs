//! Types shared by the appliance's eBPF programs and its user-space loader.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (hash-map keys are compared
//! byte for byte by the kernel, so padding bytes would make equal keys differ), and stores
//! addresses in the byte order the kernel's `bpf_sock_addr` context uses, so the eBPF
//! programs copy them without conversion.
#![no_std]

/// Names of the maps the eBPF object defines; the loader pins them under its bpffs directory.
pub mod map_names {
    /// [`CaptureConfig`](crate::CaptureConfig) at index 0.
    pub const CONFIG: &str = "CONFIG";
    /// Intercepted destination ports (host byte order) → 1.
    pub const PORTS: &str = "PORTS";
    /// Socket cookie → [`Redirection`](crate::Redirection), for `getpeername` and cleanup.
    pub const SOCKETS: &str = "SOCKETS";
    /// [`ClientKey`](crate::ClientKey) → [`Redirection`](crate::Redirection), read by the engine.
    pub const ORIGINAL_DESTINATIONS: &str = "ORIG_DST";
}

/// Names of the eBPF programs in the object, in the order the loader attaches them.
pub const PROGRAM_NAMES: [&str; 7] = [
    "sock_ops_track",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "getpeername4",
    "getpeername6",
];

/// Capacity of the per-socket maps. They are LRU maps, so a burst beyond this evicts the
/// oldest entries instead of failing new connections.
pub const TRACKED_SOCKETS_CAPACITY: u32 = 65_536;

/// Maximum number of intercepted ports.
pub const MAX_INTERCEPTED_PORTS: u32 = 64;

/// `CaptureConfig::flags` bit: refuse intercepted connections from sockets in a network
/// namespace other than the engine's, which cannot reach the engine's loopback listener.
/// Without it such connections go out unredirected.
pub const FLAG_REFUSE_FOREIGN_NETNS: u32 = 1;

/// Runtime configuration of the eBPF programs, written by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Cookie of the network namespace the engine listens in (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// Engine's IPv6 listener address, network byte order per 32-bit word.
    pub engine_ip6: [u32; 4],
    /// Engine's IPv4 listener address, network byte order.
    pub engine_ip4: u32,
    /// Engine's listener port, network byte order in the low 16 bits (as in `user_port`).
    pub engine_port: u32,
    /// `SO_MARK` carried by the engine's own upstream sockets; those are never redirected.
    pub own_mark: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// The original destination of a redirected connection, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirection {
    /// cgroup v2 id (inode number of the cgroup directory) of the connecting task.
    pub cgroup_id: u64,
    /// Destination address as IPv6, network byte order per word; IPv4 is stored mapped
    /// (`::ffff:a.b.c.d`).
    pub ip6: [u32; 4],
    /// Process id (thread-group id in the initial pid namespace) of the connecting task.
    pub pid: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// Zero; makes the padding explicit.
    pub reserved: u16,
}

/// Key identifying a redirected connection as the engine sees it: the client's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Client address as IPv6, network byte order per word; IPv4 is stored mapped.
    pub ip6: [u32; 4],
    /// Client port, host byte order.
    pub port: u32,
}

/// IPv4 address (network byte order, as the kernel stores it) in its IPv4-mapped IPv6 form.
pub const fn ipv4_mapped(ip4_network_order: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4_network_order]
}

/// Whether an IPv6 address (network byte order per word) is IPv4-mapped.
pub const fn is_ipv4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_be(0x0000_ffff)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), made only of integers, and have no padding.
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::Redirection {}
    unsafe impl aya::Pod for super::ClientKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn shared_types_have_no_implicit_padding() {
        assert_eq!(size_of::<CaptureConfig>(), 8 + 16 + 4 * 4);
        assert_eq!(size_of::<Redirection>(), 8 + 16 + 4 + 2 + 2);
        assert_eq!(size_of::<ClientKey>(), 16 + 4);
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let loopback = u32::from_ne_bytes([127, 0, 0, 3]);
        let mapped = ipv4_mapped(loopback);
        assert!(is_ipv4_mapped(&mapped));
        assert_eq!(mapped[3], loopback);
        let v6_loopback = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert!(!is_ipv4_mapped(&v6_loopback));
    }
}
