//! Types shared by the appliance's eBPF programs and its user-space loader.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (hash-map keys are compared
//! byte for byte by the kernel, so padding bytes would make equal keys differ), and stores
//! addresses in the byte order the kernel's `bpf_sock_addr` context uses, so the eBPF
//! programs copy them without conversion.
#![no_std]

/// Names of the maps the eBPF object defines; the loader pins them under its bpffs directory.
pub mod map_names {
    /// [`ProgramSettings`](crate::ProgramSettings) at index 0.
    pub const CONFIG: &str = "CONFIG";
    /// Intercepted destination ports (host byte order) → 1.
    pub const PORTS: &str = "PORTS";
    /// Socket cookie → [`Redirection`](crate::Redirection), for `getpeername` and cleanup.
    pub const SOCKETS: &str = "SOCKETS";
    /// [`ConnectionKey`](crate::ConnectionKey) → [`Redirection`](crate::Redirection), read by
    /// the engine.
    pub const ORIGINAL_DESTINATIONS: &str = "ORIG_DST";
    /// Network namespace cookie → `DELIVERY_*`, for namespaces the daemon has set up.
    pub const FOREIGN_NAMESPACES: &str = "FOREIGN";
    /// [`CoveredSource`](crate::CoveredSource) → 1: container traffic the sk_lookup program
    /// hands to the engine.
    pub const COVERED_SOURCES: &str = "COVERED";
    /// [`ConnectionKey`](crate::ConnectionKey) → 1: connections of `tproxy` namespaces whose
    /// client socket closed recently, whose late packets the guard still carries to the
    /// engine.
    pub const CLOSED_CONNECTIONS: &str = "CLOSED";
    /// Per-CPU counters of what the programs refused, indexed by [`refusals`](crate::refusals).
    pub const REFUSED: &str = "REFUSED";
    /// SOCKMAP of the engine's listeners: [`ENGINE_LISTENER_V4`](crate::ENGINE_LISTENER_V4)
    /// and [`ENGINE_LISTENER_V6`](crate::ENGINE_LISTENER_V6).
    pub const ENGINE_LISTENERS: &str = "ENGINE";
    /// [`CoveredSource`](crate::CoveredSource) → `GUARD_*`: how the guard program treats
    /// what a source sends to intercepted ports from a served container's host-side veth
    /// (`ifindex` is the veth's; an all-zero address stands for every source). A source
    /// without an entry may send nothing there.
    pub const GUARDED_SOURCES: &str = "GUARDED";
}

/// Name of the sk_lookup program, attached to the engine's network namespace.
pub const STEERING_PROGRAM: &str = "steer";

/// Name of the tc program attached (tcx ingress) to served containers' host-side veths.
pub const GUARD_PROGRAM: &str = "guard";

/// Index of the engine's IPv4 listener in the `ENGINE` sockmap.
pub const ENGINE_LISTENER_V4: u32 = 0;
/// Index of the engine's IPv6 listener in the `ENGINE` sockmap.
pub const ENGINE_LISTENER_V6: u32 = 1;

/// Capacity of the per-namespace maps (`FOREIGN`, `COVERED`).
pub const MAX_COVERED_NAMESPACES: u32 = 4096;

/// `GUARDED` value: the whole namespace is captured; TCP from this source passes (the policy
/// rule delivers it to the engine), UDP is dropped.
pub const GUARD_WHOLE_NAMESPACE: u8 = 1;
/// `GUARDED` value: only selected cgroups are captured; TCP of their connections is marked
/// with `ProgramSettings::container_mark`, everything else from this source passes unmarked.
pub const GUARD_SELECTED_CGROUPS: u8 = 2;

/// Capacity of `GUARDED`: a few addresses per served container.
pub const MAX_GUARDED_SOURCES: u32 = 4 * MAX_COVERED_NAMESPACES;

/// How a connection reached the engine (`Redirection::delivery`, values of `FOREIGN`).
/// In the engine's own namespace: its connect was rewritten to the engine's listener.
pub const DELIVERY_LOCAL: u16 = 0;
/// From a foreign namespace, unrewritten: the host's policy routing delivers it locally and
/// the sk_lookup program hands it to the engine, which sees the original destination.
pub const DELIVERY_TPROXY: u16 = 1;
/// From a foreign namespace: its connect was rewritten to the engine's container address.
pub const DELIVERY_REDIRECT: u16 = 2;
/// `FOREIGN` value of a namespace the daemon found it cannot serve (no veth to the host, or
/// its setup failed): its connects are refused, even under `FLAG_REDIRECT_UNSERVED_NETNS`.
pub const DELIVERY_REFUSED: u16 = 3;

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

/// Indices of the `REFUSED` per-CPU counters: what the programs refused or dropped.
pub mod refusals {
    /// Connects from a foreign network namespace the daemon has not served.
    pub const FOREIGN_NAMESPACE: u32 = 0;
    /// UDP to an intercepted port (connect or datagram).
    pub const UDP: u32 = 1;
    /// Connects refused because their record could not be stored.
    pub const UNRECORDED: u32 = 2;
    /// Packets the guard dropped on a served container's veth.
    pub const GUARD: u32 = 3;
    /// Connects to the daemon's private listener (metrics) from intercepted cgroups.
    pub const PRIVATE_LISTENER: u32 = 4;
    /// How many there are.
    pub const COUNT: u32 = 5;
}

/// Capacity of `CLOSED`, an LRU map: it only has to outlive a closed socket's last answers.
pub const CLOSED_CONNECTIONS_CAPACITY: u32 = 16_384;

/// Maximum number of intercepted ports.
pub const MAX_INTERCEPTED_PORTS: u32 = 64;

/// `ProgramSettings::flags` bit: refuse intercepted connections from sockets in a network
/// namespace other than the engine's that the daemon has not set up (absent from `FOREIGN`):
/// they cannot reach the engine. Without it such connections go out unredirected.
pub const FLAG_REFUSE_FOREIGN_NETNS: u32 = 1;

/// `ProgramSettings::flags` bit, beside [`FLAG_REFUSE_FOREIGN_NETNS`]: instead of refusing
/// them, redirect connections from a foreign namespace the daemon has not set up yet to the
/// engine's container address, as `DELIVERY_REDIRECT` does. A container's first process may
/// connect before the daemon has seen its namespace; this serves that connection.
pub const FLAG_REDIRECT_UNSERVED_NETNS: u32 = 2;

/// Runtime configuration of the eBPF programs, written by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramSettings {
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
    /// Engine address that containers in `DELIVERY_REDIRECT` namespaces connect to (IPv6).
    pub container_ip6: [u32; 4],
    /// Same, IPv4.
    pub container_ip4: u32,
    /// Mark bits the guard sets on packets of selected cgroups' connections in namespaces
    /// captured per cgroup; the policy rules match them.
    pub container_mark: u32,
    /// A listener of the daemon's that intercepted cgroups may not connect to (metrics,
    /// which name every agent, secret and host): its address as `engine_ip6` is spelled
    /// (all zeros: any address), and its port in host order; port 0: none.
    pub private_ip6: [u32; 4],
    /// See `private_ip6`.
    pub private_port: u32,
    /// Zero: keeps the size a multiple of eight with no implicit padding, which `Pod`
    /// forbids.
    pub reserved: u32,
}

/// The original destination of a redirected connection, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirection {
    /// cgroup v2 id (inode number of the cgroup directory) of the connecting task.
    pub cgroup_id: u64,
    /// Cookie of the connecting socket's network namespace.
    pub netns_cookie: u64,
    /// Destination address as IPv6, network byte order per word; IPv4 is stored mapped
    /// (`::ffff:a.b.c.d`).
    pub ip6: [u32; 4],
    /// Process id (thread-group id in the initial pid namespace) of the connecting task.
    pub pid: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// `DELIVERY_*`: how the connection reaches the engine.
    pub delivery: u16,
}

/// Traffic from a container that the sk_lookup program hands to the engine: packets that
/// arrived on the host through interface `ifindex` from source `ip6`. An all-zero `ip6`
/// covers every source on that interface (a routed veth serves one container).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CoveredSource {
    /// Host-side interface index: the bridge, or the routed veth.
    pub ifindex: u32,
    /// Source address as IPv6, network byte order per word; IPv4 is stored mapped.
    pub ip6: [u32; 4],
}

/// Key identifying a redirected connection as the engine sees it: the client's address and
/// the address the client's socket is connected to, which is the engine's own address of
/// the accepted connection (its listener, or under `tproxy` delivery the original
/// destination). The whole 4-tuple, so two containers with the same address on separate
/// bridges using the same source port at once still have records of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    /// Client address as IPv6, network byte order per word; IPv4 is stored mapped.
    pub client_ip6: [u32; 4],
    /// Address the client is connected to, in the same form.
    pub server_ip6: [u32; 4],
    /// Client port, host byte order.
    pub client_port: u32,
    /// Port the client is connected to, host byte order.
    pub server_port: u32,
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
    // SAFETY: all four are repr(C), made only of integers, and have no padding.
    unsafe impl aya::Pod for super::ProgramSettings {}
    unsafe impl aya::Pod for super::Redirection {}
    unsafe impl aya::Pod for super::ConnectionKey {}
    unsafe impl aya::Pod for super::CoveredSource {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn shared_types_have_no_implicit_padding() {
        assert_eq!(
            size_of::<ProgramSettings>(),
            8 + 16 + 4 * 4 + 16 + 4 + 4 + 16 + 4 + 4
        );
        assert_eq!(size_of::<Redirection>(), 8 + 8 + 16 + 4 + 2 + 2);
        assert_eq!(size_of::<CoveredSource>(), 4 + 16);
        assert_eq!(size_of::<ConnectionKey>(), 16 + 16 + 4 + 4);
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
