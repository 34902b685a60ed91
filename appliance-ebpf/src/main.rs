//! The appliance's eBPF programs, attached to the cgroups an operator selects.
//!
//! - `connect4`/`connect6` rewrite TCP connects to an intercepted port so they reach the engine,
//!   and record the original destination under the socket's cookie.
//! - `sock_ops_track` re-keys that record by the client's address once the kernel has chosen the
//!   source port (the engine only knows the accepted peer address), and removes both records when
//!   the socket closes, so nothing outlives its connection.
//! - `getpeername4`/`getpeername6` show the client the address it asked for, not the engine's.
//! - `sendmsg4`/`sendmsg6` and the connect hooks refuse UDP to intercepted ports (QUIC, HTTP/3),
//!   so clients fall back to TCP and nothing bypasses the engine.
#![no_std]
#![no_main]

use appliance_common::{
    ipv4_mapped, is_ipv4_mapped, CaptureConfig, ClientKey, Redirection, FLAG_REFUSE_FOREIGN_NETNS,
    MAX_INTERCEPTED_PORTS, TRACKED_SOCKETS_CAPACITY,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, info, warn};
use core::ptr::{read_volatile, write_volatile};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Return value of a `cgroup_sock_addr` program that lets the call proceed.
const PROCEED: i32 = 1;
/// Return value that fails the call with `EPERM`.
const REFUSE: i32 = 0;

#[map(name = "CONFIG")]
static CONFIG: Array<CaptureConfig> = Array::pinned(1, 0);

#[map(name = "PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_INTERCEPTED_PORTS, 0);

#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, Redirection> = LruHashMap::pinned(TRACKED_SOCKETS_CAPACITY, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<ClientKey, Redirection> =
    LruHashMap::pinned(TRACKED_SOCKETS_CAPACITY, 0);

/// What a socket-address hook decided for one call.
enum Verdict {
    /// Not ours: let it through untouched.
    Ignore,
    /// UDP to an intercepted port, or a namespace we cannot serve: fail with EPERM.
    Refuse,
    /// TCP to an intercepted port: redirect to the engine.
    Redirect(&'static CaptureConfig),
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

fn decide(ctx: &SockAddrContext) -> Verdict {
    let port = destination_port(ctx);
    // SAFETY: map lookups return pointers the kernel keeps valid for the program's run.
    if unsafe { PORTS.get(&port) }.is_none() {
        return Verdict::Ignore;
    }
    let Some(config) = CONFIG.get(0) else {
        return Verdict::Ignore;
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
    if netns_cookie != config.netns_cookie {
        if config.flags & FLAG_REFUSE_FOREIGN_NETNS != 0 {
            info!(
                ctx,
                "refused port {} from a foreign network namespace", port
            );
            return Verdict::Refuse;
        }
        return Verdict::Ignore;
    }
    // In the appliance's own namespace setting a mark takes CAP_NET_ADMIN there, so the mark
    // singles out the engine's upstream sockets.
    if config.own_mark != 0 && mark == config.own_mark {
        return Verdict::Ignore;
    }
    match socket_type {
        SOCK_STREAM => Verdict::Redirect(config),
        SOCK_DGRAM => {
            info!(ctx, "refused UDP to intercepted port {}", port);
            Verdict::Refuse
        }
        _ => Verdict::Ignore,
    }
}

fn record(ctx: &SockAddrContext, ip6: [u32; 4]) -> bool {
    // SAFETY: helpers valid for cgroup_sock_addr programs.
    let (cookie, pid_tgid, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
            bpf_get_current_cgroup_id(),
        )
    };
    let redirection = Redirection {
        cgroup_id,
        ip6,
        pid: (pid_tgid >> 32) as u32,
        port: destination_port(ctx),
        reserved: 0,
    };
    if SOCKETS.insert(&cookie, &redirection, 0).is_err() {
        warn!(ctx, "cannot record a redirected connection; refusing it");
        return false;
    }
    debug!(
        ctx,
        "redirecting pid {} cgroup {} port {}", redirection.pid, cgroup_id, redirection.port
    );
    true
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match decide(&ctx) {
        Verdict::Ignore => PROCEED,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect(config) => {
            // SAFETY: valid context; user_ip4 and user_port are writable in connect4.
            unsafe {
                let addr = &mut *ctx.sock_addr;
                if !record(&ctx, ipv4_mapped(addr.user_ip4)) {
                    return REFUSE;
                }
                addr.user_ip4 = config.engine_ip4;
                addr.user_port = config.engine_port;
            }
            PROCEED
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match decide(&ctx) {
        Verdict::Ignore => PROCEED,
        Verdict::Refuse => REFUSE,
        Verdict::Redirect(config) => {
            let original = user_ip6(&ctx);
            if !record(&ctx, original) {
                return REFUSE;
            }
            // A dual-stack socket reaching an IPv4 destination must stay on IPv4: the
            // engine's IPv4 listener, in mapped form.
            set_user_ip6(
                &ctx,
                if is_ipv4_mapped(&original) {
                    ipv4_mapped(config.engine_ip4)
                } else {
                    config.engine_ip6
                },
            );
            // SAFETY: valid context; user_port is writable in connect6.
            unsafe { (*ctx.sock_addr).user_port = config.engine_port };
            PROCEED
        }
    }
}

fn refuse_intercepted_datagrams(ctx: &SockAddrContext) -> i32 {
    match decide(ctx) {
        Verdict::Refuse => REFUSE,
        Verdict::Ignore | Verdict::Redirect(_) => PROCEED,
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

fn original_peer(ctx: &SockAddrContext) -> Option<Redirection> {
    // SAFETY: helper valid for cgroup_sock_addr programs; map value copied out at once.
    unsafe {
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        SOCKETS.get(&cookie).copied()
    }
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

fn client_key(ctx: &SockOpsContext) -> Option<ClientKey> {
    // The verifier only accepts context loads at constant offsets. Loading both address
    // families unconditionally keeps the compiler from merging them into one load at a
    // computed offset.
    // SAFETY: the context pointer is valid for the program's run; all fields are readable.
    let (family, ip4, ip6, port) = unsafe {
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
        )
    };
    let ip6 = match family {
        AF_INET => ipv4_mapped(ip4),
        AF_INET6 => ip6,
        _ => return None,
    };
    Some(ClientKey { ip6, port })
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
            let Some(key) = client_key(&ctx) else {
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
            // Either may already be gone: the engine consumes ORIG_DST entries on accept.
            let _ = SOCKETS.remove(&cookie);
            if let Some(key) = client_key(&ctx) {
                let _ = ORIG_DST.remove(&key);
            }
        }
        _ => {}
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
