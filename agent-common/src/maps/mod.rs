//! Keys and values of the BPF maps, as both sides see them.
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding: padding bytes with garbage make
//! hash lookups miss and the verifier reject uninitialised stack reads.
//!
//! Here: what every feature shares (the interfaces, peers, directions, the `COUNTERS` key
//! and value, the `MAP_ERRORS` indexes, log2 histograms). Each feature's own keys, values,
//! limits and constants are in its module, named as its eBPF file in agent-ebpf.

pub mod crypto;
pub mod drops;
pub mod health;
pub mod leak;
pub mod obfuscation;
pub mod path;
pub mod transit;
pub mod tunnel;
pub mod wire;

/// Names of the maps in the eBPF object, so the agent never spells them twice.
pub mod names {
    pub const IFACES: &str = "IFACES";
    pub const ALLOWED_V4: &str = "ALLOWED_V4";
    pub const ALLOWED_V6: &str = "ALLOWED_V6";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const WG_PORTS: &str = "WG_PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const UNKNOWN_WIRE: &str = "UNKNOWN_WIRE";
    pub const MAP_ERRORS: &str = "MAP_ERRORS";
    pub const CRYPTO_CFG: &str = "CRYPTO_CFG";
    pub const CRYPTO_START: &str = "CRYPTO_START";
    pub const CRYPTO_HIST: &str = "CRYPTO_HIST";
    pub const HANDSHAKE_PENDING: &str = "HANDSHAKE_PENDING";
    pub const HANDSHAKE_RTT: &str = "HANDSHAKE_RTT";
    pub const RX_SESSIONS: &str = "RX_SESSIONS";
    pub const RX_SEQ: &str = "RX_SEQ";
    pub const PEER_IDS: &str = "PEER_IDS";
    pub const IFACE_NAMES: &str = "IFACE_NAMES";
}

/// Capacities. The agent exports them as `wirescope_bpf_map_capacity`.
pub const MAX_IFACES: u32 = 256;
/// (ifindex, peer, kind, direction). A peer takes at most 12: `TUNNEL` both ways on its
/// tunnel, and the five message kinds both ways on the underlay it is reached through (a
/// peer is both initiator and responder over time, so all four handshake entries appear).
/// Sized for 20,000 active peers (240,000); peers gone for `--peer-grace` are removed. Not
/// preallocated (see `agent-ebpf/src/maps.rs`), so the size costs nothing until used. Not
/// LRU: an evicted counter would come back at zero, a reset of a live series.
pub const MAX_COUNTERS: u32 = 262_144;
/// The active peers (traffic, handshakes) every per-peer map is sized for: a Mullvad relay
/// or a company gateway. Peers gone for `--peer-grace` leave the maps, so it is active
/// peers, not peers ever seen, that count.
pub const ACTIVE_PEERS: u32 = 20_000;
const _: () = assert!(MAX_COUNTERS >= 12 * ACTIVE_PEERS);
const _: () = assert!(health::MAX_RX_SEQ >= 3 * ACTIVE_PEERS);
const _: () = assert!(health::MAX_HANDSHAKE_RTT >= 4 * ACTIVE_PEERS);
const _: () = assert!(transit::MAX_TRANSIT_SEQ >= 2 * ACTIVE_PEERS);
const _: () = assert!(transit::MAX_TRANSIT_HIST >= 2 * 6 * ACTIVE_PEERS);
// Receiving sessions: up to 3 alive per peer, though most have 1 or 2 (the agent expires
// a session idle for 180 s).
const _: () = assert!(health::MAX_RX_SESSIONS >= 3 * ACTIVE_PEERS);
/// (interface name, public key) -> peer id, for every peer the agent numbered.
pub const MAX_PEER_IDS: u32 = 65_536;
/// ifindex -> interface name, for every interface the agent watched. Mullvad re-creates
/// wg0-mullvad (a new ifindex) on every connect: at one connect an hour this lasts ~2 years.
pub const MAX_IFACE_NAMES: u32 = 16_384;

/// Per-interface configuration written by the agent before it attaches (the role and
/// framing), and on a tunnel, once its peers are known, the answer to "which peer" where one
/// prefix gives it (see [`SolePeer`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceConfig {
    pub flags: u32,
    /// With [`IfaceConfig::SOLE_V4`]: the peer of every IPv4 address on this tunnel.
    pub v4: SolePeer,
    /// With [`IfaceConfig::SOLE_V6`]: the same for IPv6.
    pub v6: SolePeer,
}
const _: () = assert!(core::mem::size_of::<IfaceConfig>() == 4 + 2 * 36);

impl IfaceConfig {
    /// Packets start at the IP header (WireGuard, TUN): no Ethernet header.
    pub const L3: u32 = 1 << 0;
    /// A WireGuard interface: count inner IP packets per peer.
    pub const TUNNEL: u32 = 1 << 1;
    /// A carrier interface (NIC, veth).
    pub const UNDERLAY: u32 = 1 << 2;
    /// `v4` answers the allowed-IP lookup of IPv4 packets: the trie is not read.
    pub const SOLE_V4: u32 = 1 << 3;
    /// `v6` answers it for IPv6.
    pub const SOLE_V6: u32 = 1 << 4;

    /// An interface's role and framing (`L3`, `TUNNEL`, `UNDERLAY`), no peer answer yet.
    pub const fn role(flags: u32) -> Self {
        IfaceConfig {
            flags,
            v4: SolePeer::NONE,
            v6: SolePeer::NONE,
        }
    }
}

/// The allowed-IP lookup of one address family on one tunnel, when a single prefix answers
/// it: the family's allowed IPs there are one prefix (of one peer), or one peer's prefixes
/// of which one is /0, or none. Then an address is `peer`'s when it lies in `net`/`mask` and
/// no peer's otherwise ([`PEER_UNKNOWN`]), exactly as the longest-prefix match in the trie
/// would say, for a masked compare instead of a trie walk (~25 ns at 10,000 peers). Every
/// Mullvad client's tunnel is such: one relay, 0.0.0.0/0 and ::/0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SolePeer {
    pub peer: u32,
    /// The prefix's address bytes as the packet carries them (IPv4 in the first word, the
    /// rest zero), read as native-endian words so both sides compare bytes, not numbers.
    pub net: [u32; 4],
    pub mask: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<SolePeer>() == 36);

impl SolePeer {
    pub const NONE: SolePeer = SolePeer {
        peer: PEER_UNKNOWN,
        net: [0; 4],
        mask: [0; 4],
    };

    /// `peer` for the prefix `addr`/`len` (IPv4 addresses in the first 4 bytes, `len` up
    /// to 32; IPv6 up to 128).
    pub fn new(peer: u32, addr: &[u8; 16], len: u8) -> Self {
        let mut s = SolePeer {
            peer,
            ..SolePeer::NONE
        };
        let mut i = 0;
        while i < 4 {
            let bits = (len as u32).saturating_sub(32 * i as u32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            let mask = mask.to_be_bytes();
            let word = [
                addr[4 * i],
                addr[4 * i + 1],
                addr[4 * i + 2],
                addr[4 * i + 3],
            ];
            let net = [
                word[0] & mask[0],
                word[1] & mask[1],
                word[2] & mask[2],
                word[3] & mask[3],
            ];
            s.mask[i] = u32::from_ne_bytes(mask);
            s.net[i] = u32::from_ne_bytes(net);
            i += 1;
        }
        s
    }

    /// The peer of `addr` (IPv4 in the first 4 bytes, the rest zero, as `parse::Ip` holds
    /// it).
    #[inline(always)]
    pub fn lookup(&self, addr: &[u8; 16]) -> u32 {
        let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        let miss = (w(0) & self.mask[0]) ^ self.net[0]
            | (w(4) & self.mask[1]) ^ self.net[1]
            | (w(8) & self.mask[2]) ^ self.net[2]
            | (w(12) & self.mask[3]) ^ self.net[3];
        if miss == 0 { self.peer } else { PEER_UNKNOWN }
    }
}

/// Peer ids are allocated by the agent, starting at 1. 0 means "no peer matched": in
/// `COUNTERS`, tunnel traffic outside every peer's allowed IPs (kind `TUNNEL`), and under
/// the message kinds the total of WireGuard messages of endpoints no peer has (see
/// [`wire`]).
pub const PEER_UNKNOWN: u32 = 0;

/// What a counter counts.
pub mod kind {
    /// An inner IP packet on a tunnel interface.
    pub const TUNNEL: u8 = 0;
    pub const HANDSHAKE_INITIATION: u8 = 1;
    pub const HANDSHAKE_RESPONSE: u8 = 2;
    pub const COOKIE_REPLY: u8 = 3;
    pub const DATA: u8 = 4;
    pub const KEEPALIVE: u8 = 5;
    pub const COUNT: usize = 6;
}

pub const DIR_RX: u8 = 0;
pub const DIR_TX: u8 = 1;

/// Key of `PEER_IDS`: the peer ids the agent gave, pinned beside the counters that are keyed
/// by them, so that a restarted agent gives every peer its id again (wireguard-go lists
/// peers in a different order on every read: numbering them anew would swap their counts).
/// No program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdKey {
    /// The tunnel interface's name, NUL-padded (IFNAMSIZ).
    pub ifname: [u8; 16],
    pub public_key: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<PeerIdKey>() == 48);

/// Value of `IFACE_NAMES` (keyed by ifindex): the interface's latest name, pinned beside the
/// counters keyed by its ifindex, so that a restarted agent still names the counts of an
/// interface deleted (or re-created under a new ifindex, as Mullvad does on every connect)
/// while it was down, instead of exporting them as `ifindexN`. No program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfaceName {
    /// NUL-padded (IFNAMSIZ).
    pub name: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IfaceName>() == 16);

impl IfaceName {
    /// `name` NUL-padded; Linux names are at most 15 bytes, longer ones are cut.
    pub fn new(name: &str) -> Self {
        let mut v = IfaceName::default();
        let n = name.len().min(v.name.len() - 1);
        v.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        v
    }

    /// The name up to its first NUL; `None` when empty or not UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        let len = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..len])
            .ok()
            .filter(|s| !s.is_empty())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
    pub peer: u32,
    pub kind: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Indexes of the `MAP_ERRORS` per-CPU array: updates the kernel refused, per map.
pub mod map_error {
    pub const COUNTERS: u32 = 0;
    pub const UNKNOWN_WIRE: u32 = 1;
    pub const CRYPTO_START: u32 = 2;
    pub const CRYPTO_HIST: u32 = 3;
    pub const HANDSHAKE_PENDING: u32 = 4;
    pub const HANDSHAKE_RTT: u32 = 5;
    pub const RX_SESSIONS: u32 = 6;
    pub const RX_SEQ: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Highest bucket: 2^40 ns (18 min) and above land here.
pub const HIST_MAX_BUCKET: u8 = 40;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistValue {
    pub count: u64,
    pub sum_ns: u64,
}
const _: () = assert!(core::mem::size_of::<HistValue>() == 16);

/// floor(log2(ns)), capped at HIST_MAX_BUCKET; 0 for 0 and 1. Straight-line arithmetic (a
/// binary search whose steps are shifts by 0 or 1 times the step), no clz instruction
/// needed on BPF and no loop or branch: the verifier walks it once per observation, and the
/// transit scan observes inside a loop.
#[inline(always)]
pub fn log2_bucket(ns: u64) -> u8 {
    if ns >> HIST_MAX_BUCKET != 0 {
        return HIST_MAX_BUCKET;
    }
    let mut v = ns;
    let mut b = 0u64;
    // Each step: s is 1 when v has a bit at or above `step` (v < 2^(2 * step) there, so the
    // sum cannot carry past bit `step`), then v is shifted down by s * step.
    let s = ((v >> 32) + 0xffff_ffff) >> 32;
    v >>= s << 5;
    b += s << 5;
    let s = ((v >> 16) + 0xffff) >> 16;
    v >>= s << 4;
    b += s << 4;
    let s = ((v >> 8) + 0xff) >> 8;
    v >>= s << 3;
    b += s << 3;
    let s = ((v >> 4) + 0xf) >> 4;
    v >>= s << 2;
    b += s << 2;
    let s = ((v >> 2) + 0x3) >> 2;
    v >>= s << 1;
    b += s << 1;
    b += v >> 1;
    b as u8
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for IfaceConfig {}
    unsafe impl aya::Pod for SolePeer {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for PeerIdKey {}
    unsafe impl aya::Pod for IfaceName {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for HistValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(2), 1);
        assert_eq!(log2_bucket(3), 1);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
        assert_eq!(log2_bucket(u64::MAX), HIST_MAX_BUCKET);
        // Against the definition, at and around every power of two.
        let reference =
            |ns: u64| (63 - ns.max(1).leading_zeros()).min(HIST_MAX_BUCKET as u32) as u8;
        for k in 0..64 {
            let p = 1u64 << k;
            for ns in [
                p - 1,
                p,
                p + 1,
                p | (p >> 1),
                p.wrapping_mul(2).wrapping_sub(1),
            ] {
                assert_eq!(log2_bucket(ns), reference(ns), "{ns}");
            }
        }
    }

    #[test]
    fn a_sole_peer_answers_as_the_prefix_does() {
        let v4 = |a: [u8; 4]| {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&a);
            x
        };
        let s = SolePeer::new(7, &v4([10, 64, 0, 9]), 10);
        assert_eq!(s.lookup(&v4([10, 64, 0, 1])), 7);
        assert_eq!(s.lookup(&v4([10, 127, 255, 255])), 7);
        assert_eq!(s.lookup(&v4([10, 128, 0, 0])), PEER_UNKNOWN);
        assert_eq!(s.lookup(&v4([11, 64, 0, 1])), PEER_UNKNOWN);
        let all = SolePeer::new(3, &[0; 16], 0);
        assert_eq!(all.lookup(&v4([192, 0, 2, 1])), 3);
        assert_eq!(all.lookup(&[0xff; 16]), 3);
        let host = SolePeer::new(5, &v4([192, 0, 2, 1]), 32);
        assert_eq!(host.lookup(&v4([192, 0, 2, 1])), 5);
        assert_eq!(host.lookup(&v4([192, 0, 2, 2])), PEER_UNKNOWN);
        // IPv6: a /56 crosses a word.
        let mut net = [0u8; 16];
        net[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0xaa, 0xbb, 0xcc, 0xdd]);
        let s6 = SolePeer::new(9, &net, 56);
        let mut inside = net;
        inside[7] = 0x01;
        inside[15] = 0x42;
        assert_eq!(s6.lookup(&inside), 9);
        let mut outside = net;
        outside[6] ^= 0x01;
        assert_eq!(s6.lookup(&outside), PEER_UNKNOWN);
        let full = SolePeer::new(4, &inside, 128);
        assert_eq!(full.lookup(&inside), 4);
        let mut next = inside;
        next[15] ^= 1;
        assert_eq!(full.lookup(&next), PEER_UNKNOWN);
        assert_eq!(SolePeer::NONE.lookup(&inside), PEER_UNKNOWN);
    }

    #[test]
    fn iface_names_round_trip() {
        assert_eq!(IfaceName::new("wg0-mullvad").as_str(), Some("wg0-mullvad"));
        // IFNAMSIZ: 15 bytes and the NUL.
        let long = IfaceName::new("a-name-of-16-byt");
        assert_eq!(long.as_str(), Some("a-name-of-16-by"));
        assert_eq!(IfaceName::new("").as_str(), None);
        assert_eq!(IfaceName::default().as_str(), None);
    }
}
