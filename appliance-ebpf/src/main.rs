//! The appliance's eBPF programs, attached to the cgroups an operator selects.
//!
//! - `connect4`/`connect6` rewrite TCP connects to an intercepted port so they reach the engine,
//!   and record the original destination under the socket's cookie. In a container's network
//!   namespace that the daemon set up for `tproxy` delivery they only record: the host's
//!   policy routing delivers the packets locally and `steer` hands them to the engine.
//! - `steer` (sk_lookup, in the engine's namespace) gives the engine's listener the port-443
//!   connections arriving from covered containers.
//! - `sock_ops_track` re-keys that record by the connection's addresses once the kernel has
//!   chosen the source port (the engine only knows the accepted connection's two addresses),
//!   and removes both records when the socket closes, so nothing outlives its connection.
//! - `getpeername4`/`getpeername6` show the client the address it asked for, not the engine's.
//! - `sendmsg4`/`sendmsg6` and the connect hooks refuse UDP to intercepted ports (QUIC, HTTP/3),
//!   so clients fall back to TCP and nothing bypasses the engine.
//! - `guard` (tc ingress on a served container's host-side veth) drops what the cgroup hooks
//!   never see: packets written by raw or packet sockets (Docker grants `CAP_NET_RAW`). When the
//!   whole namespace is captured, UDP to an intercepted port is dropped and TCP to one passes
//!   only from the container's own addresses (its policy rules deliver exactly those to the
//!   engine); under `redirect` delivery none passes. When only some cgroups of a namespace
//!   are selected, it marks the packets of their connections for the policy rule and lets
//!   the rest of the namespace (sidecars) go its own way.
#![no_std]
#![no_main]
#![allow(
    missing_docs,
    reason = "aya's program attributes generate the exported entry points; the module docs above describe each program"
)]

use appliance_common::{
    ipv4_mapped, is_ipv4_mapped, refusals, ConnectionKey, CoveredSource, ProgramSettings,
    Redirection, CLOSED_CONNECTIONS_CAPACITY, DELIVERY_LOCAL, DELIVERY_REDIRECT, DELIVERY_TPROXY,
    ENGINE_LISTENER_V4, ENGINE_LISTENER_V6, FLAG_REDIRECT_UNSERVED_NETNS,
    FLAG_REFUSE_FOREIGN_NETNS, GUARD_SELECTED_CGROUPS, GUARD_WHOLE_NAMESPACE,
    MAX_COVERED_NAMESPACES, MAX_GUARDED_SOURCES, MAX_INTERCEPTED_PORTS, TRACKED_SOCKETS_CAPACITY,
};
use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{cgroup_sock_addr, classifier, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, TcContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, info, warn};
use core::ptr::{read_volatile, write_volatile};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u8 = 6;
/// sk_lookup return values.
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

/// Return value of a `cgroup_sock_addr` program that lets the call proceed.
const PROCEED: i32 = 1;
/// Return value that fails the call with `EPERM`.
const REFUSE: i32 = 0;

#[map(name = "CONFIG")]
static CONFIG: Array<ProgramSettings> = Array::pinned(1, 0);

#[map(name = "PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_INTERCEPTED_PORTS, 0);

#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, Redirection> = LruHashMap::pinned(TRACKED_SOCKETS_CAPACITY, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<ConnectionKey, Redirection> =
    LruHashMap::pinned(TRACKED_SOCKETS_CAPACITY, 0);

#[map(name = "FOREIGN")]
static FOREIGN: HashMap<u64, u32> = HashMap::pinned(MAX_COVERED_NAMESPACES, 0);

#[map(name = "COVERED")]
static COVERED: HashMap<CoveredSource, u8> = HashMap::pinned(MAX_COVERED_NAMESPACES, 0);

#[map(name = "ENGINE")]
static ENGINE: SockMap = SockMap::pinned(2, 0);

#[map(name = "CLOSED")]
static CLOSED: LruHashMap<ConnectionKey, u8> = LruHashMap::pinned(CLOSED_CONNECTIONS_CAPACITY, 0);

#[map(name = "REFUSED")]
static REFUSED: PerCpuArray<u64> = PerCpuArray::pinned(refusals::COUNT, 0);

/// Counts one refusal of kind `reason` (a `refusals` index) for the daemon's metrics.
fn count_refusal(reason: u32) {
    if let Some(counter) = REFUSED.get_ptr_mut(reason) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        unsafe { *counter += 1 };
    }
}

#[map(name = "GUARDED")]
static GUARDED: HashMap<CoveredSource, u8> = HashMap::pinned(MAX_GUARDED_SOURCES, 0);

/// Where a redirected connect goes.
#[derive(Clone, Copy)]
struct Target {
    ip4: u32,
    ip6: [u32; 4],
    port: u32,
}

/// What a socket-address hook decided for one call.
enum AddrDecision {
    /// Not ours: let it through untouched.
    Ignore,
    /// UDP to an intercepted port, or a namespace we cannot serve: fail with EPERM.
    Refuse,
    /// TCP to an intercepted port: record it and rewrite the destination to the engine.
    Redirect { target: Target, delivery: u16 },
    /// TCP to an intercepted port from a `tproxy` namespace: record it, leave it unrewritten.
    Observe,
}

/// Reads `user_ip6` one word at a time: the verifier refuses the memcpy an array copy becomes.
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: the kernel hands every cgroup_sock_addr program a valid context.
    unsafe {
        let words = &(*ctx.sock_addr).user_ip6;
        [
            read_volatile(&words[0]),
            read_volatile(&words[1]),
            read_volatile(&words[2]),
            read_volatile(&words[3]),
        ]
    }
}

/// Writes `user_ip6` one word at a time (see [`user_ip6`]).
fn set_user_ip6(ctx: &SockAddrContext, ip6: [u32; 4]) {
    // SAFETY: valid context; only called from hooks where user_ip6 is writable.
    unsafe {
        let words = &mut (*ctx.sock_addr).user_ip6;
        write_volatile(&mut words[0], ip6[0]);
        write_volatile(&mut words[1], ip6[1]);
        write_volatile(&mut words[2], ip6[2]);
        write_volatile(&mut words[3], ip6[3]);
    }
}

fn destination_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the kernel hands every cgroup_sock_addr program a valid context.
    u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16)
}

fn decide(ctx: &SockAddrContext) -> AddrDecision {
    let port = destination_port(ctx);
    // SAFETY: map lookups return pointers the kernel keeps valid for the program's run.
    if unsafe { PORTS.get(&port) }.is_none() {
        return AddrDecision::Ignore;
    }
    let Some(config) = CONFIG.get(0) else {
        return AddrDecision::Ignore;
    };
    // SAFETY: the context pointer is valid, and `sk` is always set for these hooks.
    let (socket_type, mark) = unsafe {
        let addr = &*ctx.sock_addr;
        (addr.type_, (*addr.__bindgen_anon_1.sk).mark)
    };
    // The namespace comes first: in a network namespace of its own an unprivileged agent
    // holds CAP_NET_ADMIN and can set any SO_MARK, ours included.
    // SAFETY: helper valid for cgroup_sock_addr programs since Linux 5.7.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let verdict = if netns_cookie == config.netns_cookie {
        // In the appliance's own namespace setting a mark takes CAP_NET_ADMIN there, so the
        // mark singles out the engine's upstream sockets.
        if config.own_mark != 0 && mark == config.own_mark {
            return AddrDecision::Ignore;
        }
        AddrDecision::Redirect {
            target: Target {
                ip4: config.engine_ip4,
                ip6: config.engine_ip6,
                port: config.engine_port,
            },
            delivery: DELIVERY_LOCAL,
        }
    } else {
        let container_engine = AddrDecision::Redirect {
            target: Target {
                ip4: config.container_ip4,
                ip6: config.container_ip6,
                port: config.engine_port,
            },
            delivery: DELIVERY_REDIRECT,
        };
        // SAFETY: map value copied out at once.
        match unsafe { FOREIGN.get(&netns_cookie).copied() } {
            Some(delivery) if delivery == u32::from(DELIVERY_TPROXY) => AddrDecision::Observe,
            Some(delivery) if delivery == u32::from(DELIVERY_REDIRECT) => container_engine,
            // Not set up yet: a container whose first process connects at once. Its guard
            // comes with the setup, so raw packets are no better held back by a refusal
            // meanwhile than by this.
            None if config.flags & FLAG_REDIRECT_UNSERVED_NETNS != 0 => container_engine,
            // A namespace the daemon has not set up (or is tearing down) cannot reach the
            // engine.
            _ if config.flags & FLAG_REFUSE_FOREIGN_NETNS != 0 => {
                info!(
                    ctx,
                    "refused port {} from a foreign network namespace", port
                );
                count_refusal(refusals::FOREIGN_NAMESPACE);
                return AddrDecision::Refuse;
            }
            _ => return AddrDecision::Ignore,
        }
    };
    match socket_type {
        SOCK_STREAM => verdict,
        SOCK_DGRAM => {
            info!(ctx, "refused UDP to intercepted port {}", port);
            count_refusal(refusals::UDP);
            AddrDecision::Refuse
        }
        _ => AddrDecision::Ignore,
    }
}

fn record(ctx: &SockAddrContext, ip6: [u32; 4], delivery: u16) -> bool {
    // SAFETY: helpers valid for cgroup_sock_addr programs.
    let (cookie, pid_tgid, cgroup_id, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
            bpf_get_current_cgroup_id(),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let redirection = Redirection {
        cgroup_id,
        netns_cookie,
        ip6,
        pid: (pid_tgid >> 32) as u32,
        port: destination_port(ctx),
        delivery,
    };
    if SOCKETS.insert(&cookie, &redirection, 0).is_err() {
        warn!(ctx, "cannot record a redirected connection; refusing it");
        count_refusal(refusals::UNRECORDED);
        return false;
    }
    debug!(
        ctx,
        "redirecting pid {} cgroup {} port {}", redirection.pid, cgroup_id, redirection.port
    );
    true
}

/// Records a connect that reaches the engine unrewritten, refusing it when the record cannot
/// be stored: without it the engine could not tell where the connection was going.
fn record_or_refuse(ctx: &SockAddrContext, original: [u32; 4], delivery: u16) -> i32 {
    if record(ctx, original, delivery) {
        PROCEED
    } else {
        REFUSE
    }
}

/// Whether a connect to `destination` is one to the daemon's private listener (metrics)
/// from the daemon's own namespace, which intercepted cgroups may not make. Other namespaces
/// cannot reach the daemon's loopback at all.
fn to_private_listener(ctx: &SockAddrContext, destination: &[u32; 4]) -> bool {
    let Some(config) = CONFIG.get(0) else {
        return false;
    };
    if config.private_port == 0 || u32::from(destination_port(ctx)) != config.private_port {
        return false;
    }
    // SAFETY: helper valid for cgroup_sock_addr programs since Linux 5.7.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != config.netns_cookie {
        return false;
    }
    let any = config.private_ip6 == [0; 4] || config.private_ip6 == ipv4_mapped(0);
    if !any && *destination != config.private_ip6 {
        return false;
    }
    info!(
        ctx,
        "refused a connect to the daemon's private port {}", config.private_port
    );
    count_refusal(refusals::PRIVATE_LISTENER);
    true
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; user_ip4 is readable in connect4.
    let original = ipv4_mapped(unsafe { (*ctx.sock_addr).user_ip4 });
    if to_private_listener(&ctx, &original) {
        return REFUSE;
    }
    match decide(&ctx) {
        AddrDecision::Ignore => PROCEED,
        AddrDecision::Refuse => REFUSE,
        AddrDecision::Observe => record_or_refuse(&ctx, original, DELIVERY_TPROXY),
        AddrDecision::Redirect { target, delivery } => {
            if !record(&ctx, original, delivery) {
                return REFUSE;
            }
            // SAFETY: valid context; user_ip4 and user_port are writable in connect4.
            unsafe {
                let addr = &mut *ctx.sock_addr;
                addr.user_ip4 = target.ip4;
                addr.user_port = target.port;
            }
            PROCEED
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let original = user_ip6(&ctx);
    if to_private_listener(&ctx, &original) {
        return REFUSE;
    }
    match decide(&ctx) {
        AddrDecision::Ignore => PROCEED,
        AddrDecision::Refuse => REFUSE,
        AddrDecision::Observe => record_or_refuse(&ctx, original, DELIVERY_TPROXY),
        AddrDecision::Redirect { target, delivery } => {
            if !record(&ctx, original, delivery) {
                return REFUSE;
            }
            // A dual-stack socket reaching an IPv4 destination must stay on IPv4: the
            // engine's IPv4 listener, in mapped form.
            set_user_ip6(
                &ctx,
                if is_ipv4_mapped(&original) {
                    ipv4_mapped(target.ip4)
                } else {
                    target.ip6
                },
            );
            // SAFETY: valid context; user_port is writable in connect6.
            unsafe { (*ctx.sock_addr).user_port = target.port };
            PROCEED
        }
    }
}

fn refuse_intercepted_datagrams(ctx: &SockAddrContext) -> i32 {
    match decide(ctx) {
        AddrDecision::Refuse => REFUSE,
        AddrDecision::Ignore | AddrDecision::Redirect { .. } | AddrDecision::Observe => PROCEED,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    refuse_intercepted_datagrams(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    refuse_intercepted_datagrams(&ctx)
}

/// The destination a rewritten socket asked for. A `tproxy` socket is really connected to its
/// original destination, so it has nothing to show differently.
fn original_peer(ctx: &SockAddrContext) -> Option<Redirection> {
    // SAFETY: helper valid for cgroup_sock_addr programs; map value copied out at once.
    let record = unsafe {
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        SOCKETS.get(&cookie).copied()
    }?;
    (record.delivery != DELIVERY_TPROXY).then_some(record)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_peer(&ctx) {
        // SAFETY: valid context; user_ip4 and user_port are writable in getpeername4.
        unsafe {
            let addr = &mut *ctx.sock_addr;
            addr.user_ip4 = original.ip6[3];
            addr.user_port = u32::from(original.port.to_be());
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_peer(&ctx) {
        set_user_ip6(&ctx, original.ip6);
        // SAFETY: valid context; user_port is writable in getpeername6.
        unsafe { (*ctx.sock_addr).user_port = u32::from(original.port.to_be()) };
    }
    PROCEED
}

fn connection_key(ctx: &SockOpsContext) -> Option<ConnectionKey> {
    // The verifier only accepts context loads at constant offsets. Loading both address
    // families unconditionally keeps the compiler from merging them into one load at a
    // computed offset.
    // SAFETY: the context pointer is valid for the program's run; all fields are readable.
    let (family, local_ip4, local_ip6, local_port, remote_ip4, remote_ip6, remote_port) = unsafe {
        let ops = ctx.ops;
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).remote_ip4),
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ],
            read_volatile(&(*ops).remote_port),
        )
    };
    let (client_ip6, server_ip6) = match family {
        AF_INET => (ipv4_mapped(local_ip4), ipv4_mapped(remote_ip4)),
        AF_INET6 => (local_ip6, remote_ip6),
        _ => return None,
    };
    Some(ConnectionKey {
        client_ip6,
        server_ip6,
        client_port: local_port,
        // `remote_port` holds the port in network byte order in its upper half (little
        // endian), unlike `local_port`, which is in host byte order.
        server_port: u32::from(u16::from_be((remote_port >> 16) as u16)),
    })
}

#[sock_ops]
pub fn sock_ops_track(ctx: SockOpsContext) -> u32 {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: map value copied out at once.
            let Some(redirection) = (unsafe { SOCKETS.get(&cookie).copied() }) else {
                return 1;
            };
            let Some(key) = connection_key(&ctx) else {
                return 1;
            };
            if ORIG_DST.insert(&key, &redirection, 0).is_err() {
                warn!(&ctx, "cannot publish a redirected connection's destination");
            }
            if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
                warn!(&ctx, "cannot track a redirected socket's close");
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: map value copied out at once.
            let delivery = unsafe { SOCKETS.get(&cookie).map(|record| record.delivery) };
            // Either may already be gone: the engine consumes ORIG_DST entries on accept.
            let _ = SOCKETS.remove(&cookie);
            if let Some(key) = connection_key(&ctx) {
                let _ = ORIG_DST.remove(&key);
                // A closed socket still answers: its RST to a segment that arrives after
                // the close leaves after this callback. The guard keeps carrying such
                // packets to the engine rather than to the real destination.
                if delivery == Some(DELIVERY_TPROXY) {
                    let _ = CLOSED.insert(&key, &1, 0);
                }
            }
        }
        _ => {}
    }
    1
}

/// Hands connections that arrive from covered containers to the engine's listener. It runs in
/// the engine's namespace for every TCP socket lookup, so it leaves everything else alone: a
/// host service on port 443 keeps its own connections.
#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    // Every field is read at a constant offset before any branch: the verifier refuses a load
    // at an offset the compiler computed from the family.
    // SAFETY: the kernel hands every sk_lookup program a valid context.
    let (family, protocol, local_port, ingress_ifindex, remote_ip4, remote_ip6) = unsafe {
        let lookup = ctx.lookup;
        (
            read_volatile(&(*lookup).family),
            read_volatile(&(*lookup).protocol),
            read_volatile(&(*lookup).local_port),
            read_volatile(&(*lookup).ingress_ifindex),
            read_volatile(&(*lookup).remote_ip4),
            [
                read_volatile(&(*lookup).remote_ip6[0]),
                read_volatile(&(*lookup).remote_ip6[1]),
                read_volatile(&(*lookup).remote_ip6[2]),
                read_volatile(&(*lookup).remote_ip6[3]),
            ],
        )
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return SK_PASS;
    }
    let port = local_port as u16;
    // SAFETY: map lookups return pointers the kernel keeps valid for the program's run.
    if unsafe { PORTS.get(&port) }.is_none() {
        return SK_PASS;
    }
    let (source, listener) = match family {
        AF_INET => (ipv4_mapped(remote_ip4), ENGINE_LISTENER_V4),
        AF_INET6 => (remote_ip6, ENGINE_LISTENER_V6),
        _ => return SK_PASS,
    };
    let exact = CoveredSource {
        ifindex: ingress_ifindex,
        ip6: source,
    };
    let whole_interface = CoveredSource {
        ifindex: ingress_ifindex,
        ip6: [0; 4],
    };
    // SAFETY: as above.
    let covered =
        unsafe { COVERED.get(&exact).is_some() || COVERED.get(&whole_interface).is_some() };
    if !covered {
        return SK_PASS;
    }
    match ENGINE.redirect_sk_lookup(&ctx, listener, 0) {
        Ok(()) => SK_PASS,
        // No engine listener (the daemon is down): drop rather than let the host answer.
        Err(_) => SK_DROP,
    }
}

/// tc verdicts.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_HEADER_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
/// IPv6 extension headers the guard walks past to reach the transport header.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DESTINATION_OPTIONS: u8 = 60;
/// More extension headers than this and the guard cannot see the ports: it drops the packet
/// (no ordinary client sends even one).
const MAX_IPV6_EXTENSION_HEADERS: usize = 4;

/// What the guard read of a packet: its transport protocol, source, and where the transport
/// header starts. `None` for what is not IP.
struct Transport {
    protocol: u8,
    /// A fragment: its ports may be missing (a later fragment), and the policy rules, which
    /// match ports, never match it.
    fragment: bool,
    /// Whether the addresses are IPv4 (stored mapped).
    ipv4: bool,
    source: [u32; 4],
    destination: [u32; 4],
    offset: usize,
}

fn transport(ctx: &TcContext) -> Result<Option<Transport>, ()> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    match ethertype {
        ETH_P_IP => {
            let version_and_length: u8 = ctx.load(ETH_HEADER_LEN).map_err(|_| ())?;
            let fragment: u16 = u16::from_be(ctx.load(ETH_HEADER_LEN + 6).map_err(|_| ())?);
            let protocol: u8 = ctx.load(ETH_HEADER_LEN + 9).map_err(|_| ())?;
            let source: u32 = ctx.load(ETH_HEADER_LEN + 12).map_err(|_| ())?;
            let destination: u32 = ctx.load(ETH_HEADER_LEN + 16).map_err(|_| ())?;
            Ok(Some(Transport {
                protocol,
                // More fragments follow, or this is a later one.
                fragment: fragment & 0x3fff != 0,
                ipv4: true,
                source: ipv4_mapped(source),
                destination: ipv4_mapped(destination),
                offset: ETH_HEADER_LEN + usize::from(version_and_length & 0x0f) * 4,
            }))
        }
        ETH_P_IPV6 => {
            let mut next: u8 = ctx.load(ETH_HEADER_LEN + 6).map_err(|_| ())?;
            let source: [u32; 4] = ctx.load(ETH_HEADER_LEN + 8).map_err(|_| ())?;
            let destination: [u32; 4] = ctx.load(ETH_HEADER_LEN + 24).map_err(|_| ())?;
            let mut offset = ETH_HEADER_LEN + 40;
            let mut fragment = false;
            for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
                match next {
                    IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS => {
                        let header: [u8; 2] = ctx.load(offset).map_err(|_| ())?;
                        next = header[0];
                        offset += (usize::from(header[1]) + 1) * 8;
                    }
                    IPV6_FRAGMENT => {
                        let header: [u8; 4] = ctx.load(offset).map_err(|_| ())?;
                        fragment = true;
                        next = header[0];
                        offset += 8;
                        // A later fragment: what follows is data, not headers.
                        if u16::from_be_bytes([header[2], header[3]]) >> 3 != 0 {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            if !fragment
                && matches!(
                    next,
                    IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DESTINATION_OPTIONS
                )
            {
                return Err(());
            }
            Ok(Some(Transport {
                protocol: next,
                fragment,
                ipv4: false,
                source,
                destination,
                offset,
            }))
        }
        _ => Ok(None),
    }
}

/// Keeps a served container from reaching an intercepted port around the engine with packets
/// it built itself, and, where only some of its cgroups are selected, marks the packets of
/// their connections for the policy rule that delivers them. Attached only to served
/// containers' host-side veths, so it sees exactly what those containers send.
#[classifier]
pub fn guard(ctx: TcContext) -> i32 {
    let verdict = guard_verdict(&ctx);
    if verdict == TC_ACT_SHOT {
        count_refusal(refusals::GUARD);
    }
    verdict
}

fn guard_verdict(ctx: &TcContext) -> i32 {
    let packet = match transport(ctx) {
        Ok(Some(packet)) => packet,
        Ok(None) => return TC_ACT_OK,
        Err(()) => return TC_ACT_SHOT,
    };
    if packet.protocol != IPPROTO_TCP && packet.protocol != IPPROTO_UDP {
        return TC_ACT_OK;
    }
    // A TCP or UDP fragment cannot be judged: a later one has no ports, and the policy rules,
    // which match ports, let none of them through to the engine. The container's own stack
    // does not fragment TCP (path MTU discovery) and sends QUIC unfragmented; what does
    // fragment is a raw socket or a tiny locked MTU, which is what this guard is for.
    if packet.fragment {
        return TC_ACT_SHOT;
    }
    // A packet too short for its ports cannot be delivered by anyone; let the stack drop it.
    let Ok(ports) = ctx.load::<[u16; 2]>(packet.offset) else {
        return TC_ACT_OK;
    };
    let (source_port, port) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
    // TCP flags byte: SYN 0x02, ACK 0x10. Unread for UDP.
    let opens = packet.protocol == IPPROTO_TCP
        && ctx
            .load::<u8>(packet.offset + 13)
            .is_ok_and(|flags| flags & 0x12 == 0x02);
    // SAFETY: map lookups return pointers the kernel keeps valid for the program's run.
    if unsafe { PORTS.get(&port) }.is_none() {
        return TC_ACT_OK;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { read_volatile(&(*ctx.skb.skb).ifindex) };
    let exact = CoveredSource {
        ifindex,
        ip6: packet.source,
    };
    let any_source = CoveredSource {
        ifindex,
        ip6: [0; 4],
    };
    // SAFETY: as above; values copied out at once.
    let guard = unsafe {
        GUARDED
            .get(&exact)
            .or_else(|| GUARDED.get(&any_source))
            .copied()
    };
    match guard {
        // The whole namespace is captured: its TCP reaches the engine by the policy rule,
        // and nothing else may leave for these ports.
        Some(GUARD_WHOLE_NAMESPACE) if packet.protocol == IPPROTO_TCP => TC_ACT_OK,
        // Only selected cgroups are captured: their connections are marked for the policy
        // rule, everything else in the namespace (sidecars) goes its own way.
        Some(GUARD_SELECTED_CGROUPS) => {
            if packet.protocol == IPPROTO_TCP && is_captured(ctx, &packet, source_port, port, opens)
            {
                if let Some(config) = CONFIG.get(0) {
                    // SAFETY: as above.
                    let mark = unsafe { read_volatile(&(*ctx.skb.skb).mark) };
                    ctx.set_mark(mark | config.container_mark);
                }
            }
            TC_ACT_OK
        }
        // UDP to an intercepted port, a source that is not the container's, or a namespace
        // under redirect delivery, whose connects never go to these ports.
        _ => TC_ACT_SHOT,
    }
}

/// `state` of a listening socket (`TCP_LISTEN`).
const TCP_LISTEN: u32 = 10;

/// Whether a TCP packet belongs to a connection of a selected cgroup: capture recorded it
/// (from the SYN until the engine accepts), or the engine holds a socket for its 4-tuple
/// (from the handshake to the last ACK, TIME_WAIT included), or, for anything but a SYN
/// (`opens`), the client's socket closed recently (its late RSTs). A listener found by the
/// lookup is no connection. A SYN that is not captured opens another process's connection
/// on that 4-tuple, which is then no longer a closed captured one.
fn is_captured(
    ctx: &TcContext,
    packet: &Transport,
    source_port: u16,
    port: u16,
    opens: bool,
) -> bool {
    let key = ConnectionKey {
        client_ip6: packet.source,
        server_ip6: packet.destination,
        client_port: u32::from(source_port),
        server_port: u32::from(port),
    };
    // SAFETY: as in `guard`.
    if unsafe { ORIG_DST.get(&key) }.is_some() {
        return true;
    }
    if opens {
        let _ = CLOSED.remove(&key);
        return false;
    }
    // SAFETY: as in `guard`.
    if unsafe { CLOSED.get(&key) }.is_some() {
        return true;
    }
    // SAFETY: zero is a valid bit pattern for the tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let skb = ctx.skb.skb.cast();
    // Two calls, each with a constant tuple size, as the verifier requires.
    // SAFETY: the helper reads `tuple_size` bytes of `tuple`; the result is checked for null
    // and released on every path.
    let socket = unsafe {
        if packet.ipv4 {
            tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: packet.source[3],
                daddr: packet.destination[3],
                sport: source_port.to_be(),
                dport: port.to_be(),
            };
            bpf_skc_lookup_tcp(
                skb,
                &mut tuple,
                core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        } else {
            tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: packet.source,
                daddr: packet.destination,
                sport: source_port.to_be(),
                dport: port.to_be(),
            };
            bpf_skc_lookup_tcp(
                skb,
                &mut tuple,
                core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    };
    if socket.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from the lookup, released right after its state is read.
    unsafe {
        let state = read_volatile(&(*socket).state);
        bpf_sk_release(socket.cast());
        state != TCP_LISTEN
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
