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

/// Per-interface configuration written by the agent before it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceConfig {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceConfig>() == 4);

impl IfaceConfig {
    /// Packets start at the IP header (WireGuard, TUN): no Ethernet header.
    pub const L3: u32 = 1 << 0;
    /// A WireGuard interface: count inner IP packets per peer.
    pub const TUNNEL: u32 = 1 << 1;
    /// A carrier interface (NIC, veth).
    pub const UNDERLAY: u32 = 1 << 2;
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
    fn iface_names_round_trip() {
        assert_eq!(IfaceName::new("wg0-mullvad").as_str(), Some("wg0-mullvad"));
        // IFNAMSIZ: 15 bytes and the NUL.
        let long = IfaceName::new("a-name-of-16-byt");
        assert_eq!(long.as_str(), Some("a-name-of-16-by"));
        assert_eq!(IfaceName::new("").as_str(), None);
        assert_eq!(IfaceName::default().as_str(), None);
    }
}
