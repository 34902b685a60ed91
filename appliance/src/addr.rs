//! One type per address role, so that a client's address can never be passed where an
//! upstream is expected.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The address of a client as the engine saw it on `accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The engine's own address of an accepted connection (`getsockname`): its listener's, or,
/// for a container's connection delivered by `tproxy`, the original destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EngineAddr(pub SocketAddr);

/// The address a client asked to connect to before capture redirected it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// The address the engine connects to on behalf of a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamAddr(pub SocketAddr);

macro_rules! display_inner {
    ($($role:ty),*) => {$(
        impl fmt::Display for $role {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_inner!(ClientAddr, EngineAddr, OrigDstAddr, UpstreamAddr);

impl From<OrigDstAddr> for UpstreamAddr {
    /// The engine goes to the address the client chose, never to a fresh DNS answer.
    fn from(original: OrigDstAddr) -> Self {
        Self(original.0)
    }
}

/// An address in the form the eBPF maps use: IPv6 with IPv4 mapped (`::ffff:a.b.c.d`),
/// each 32-bit word in network byte order.
pub(crate) fn to_kernel_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let octets = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// The inverse of [`to_kernel_words`]; mapped IPv4 comes back as IPv4.
pub(crate) fn from_kernel_words(words: [u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn kernel_words_round_trip_both_families() {
        for ip in [
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6("2001:db8::1".parse().unwrap()),
        ] {
            assert_eq!(from_kernel_words(to_kernel_words(ip)), ip);
        }
    }

    #[test]
    fn ipv4_uses_the_same_words_as_the_ebpf_side() {
        let ip = Ipv4Addr::new(127, 0, 0, 3);
        let words = to_kernel_words(IpAddr::V4(ip));
        assert_eq!(
            words,
            appliance_common::ipv4_mapped(u32::from_ne_bytes(ip.octets()))
        );
    }
}
