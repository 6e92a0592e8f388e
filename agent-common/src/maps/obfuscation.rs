//! Obfuscation: a tunnel peer whose WireGuard a local proxy (Mullvad's udp2tcp, Shadowsocks,
//! QUIC, ...) carries to its relay in another protocol. WireGuard then talks to the proxy on
//! loopback, which no program watches, and what leaves the underlay is the proxy's flow to
//! the relay's obfuscation port: the agent writes that remote endpoint (protocol, address,
//! port) into `OBFS_ENDPOINTS` with the peer it carries, and the programs count the flow's
//! IP packets on the underlays in `OBFS_COUNTERS` per (tunnel interface, peer, kind,
//! direction) (`wirescope_obfuscation_packets_total`, `wirescope_obfuscation_bytes_total`)
//! and never as a leak.

pub const OBFS_ENDPOINTS: &str = "OBFS_ENDPOINTS";
pub const OBFS_COUNTERS: &str = "OBFS_COUNTERS";
/// One entry: how many endpoints `OBFS_ENDPOINTS` holds, so that the programs skip its
/// lookup (a hash, ~15 ns) on every other UDP and TCP packet while there are none.
pub const OBFS_CFG: &str = "OBFS_CFG";
pub const OBFS_ERRORS: &str = "OBFS_ERRORS";

/// Remote obfuscation endpoints, over every tunnel (Mullvad's multiplexer lists a few).
pub const MAX_OBFS_ENDPOINTS: u32 = 1_024;
/// (tunnel ifindex, peer, kind, direction).
pub const MAX_OBFS_COUNTERS: u32 = 4_096;

/// Indexes of the `OBFS_ERRORS` per-CPU array: updates the kernel refused.
pub mod error {
    pub const OBFS_COUNTERS: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// What carries the WireGuard: the `kind` label of the counters.
pub mod kind {
    /// An obfuscation the agent has no name for (a Mullvad release newer than it).
    pub const OTHER: u8 = 0;
    pub const UDP2TCP: u8 = 1;
    pub const SHADOWSOCKS: u8 = 2;
    pub const QUIC: u8 = 3;
    pub const LWO: u8 = 4;
    /// Given with `--obfuscation` without a kind.
    pub const MANUAL: u8 = 5;

    /// Every kind with its label.
    pub const NAMES: [(u8, &str); 6] = [
        (OTHER, "other"),
        (UDP2TCP, "udp2tcp"),
        (SHADOWSOCKS, "shadowsocks"),
        (QUIC, "quic"),
        (LWO, "lwo"),
        (MANUAL, "manual"),
    ];

    /// The label of a kind; `other` for a value no kind has.
    pub fn name(k: u8) -> &'static str {
        let mut i = 0;
        while i < NAMES.len() {
            if NAMES[i].0 == k {
                return NAMES[i].1;
            }
            i += 1;
        }
        "other"
    }

    /// The kind of a label, in any case (Mullvad prints `Shadowsocks`, `Quic`, `udp2tcp`).
    pub fn from_name(name: &str) -> Option<u8> {
        NAMES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(k, _)| *k)
    }
}

/// Key of `OBFS_ENDPOINTS`: the remote end of an obfuscation flow. IPv4 addresses fill the
/// first 4 bytes, the rest stays zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObfsEndpoint {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    /// IPPROTO_UDP or IPPROTO_TCP.
    pub proto: u8,
}
const _: () = assert!(core::mem::size_of::<ObfsEndpoint>() == 20);

/// Value of `OBFS_ENDPOINTS`: whose WireGuard the flow carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ObfsTarget {
    /// The tunnel (WireGuard) interface of the peer.
    pub ifindex: u32,
    /// The peer's id; `PEER_UNKNOWN` when the tunnel's peers cannot be read (Mullvad's
    /// in-app WireGuard has no control socket), so that its flow still counts.
    pub peer: u32,
    pub kind: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ObfsTarget>() == 12);

/// Key of `OBFS_COUNTERS`: keyed by the tunnel interface, not the underlay the flow was
/// seen on, so that `wirescope_obfuscation_bytes_total` and `wirescope_tunnel_bytes_total`
/// share their `interface` and `peer` labels and subtract into the overhead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ObfsKey {
    pub ifindex: u32,
    pub peer: u32,
    pub kind: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ObfsKey>() == 12);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ObfsEndpoint {}
    unsafe impl aya::Pod for ObfsTarget {}
    unsafe impl aya::Pod for ObfsKey {}
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn kind_names_round_trip_in_any_case() {
        for (k, n) in kind::NAMES {
            assert_eq!(kind::name(k), n);
            assert_eq!(kind::from_name(n), Some(k));
        }
        assert_eq!(kind::from_name("Shadowsocks"), Some(kind::SHADOWSOCKS));
        assert_eq!(kind::from_name("Quic"), Some(kind::QUIC));
        assert_eq!(kind::from_name("multiplexer"), None);
        assert_eq!(kind::name(200), "other");
    }
}
