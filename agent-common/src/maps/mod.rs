//! Keys and values of the BPF maps, as both sides see them.
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding: padding bytes with garbage make
//! hash lookups miss and the verifier reject uninitialised stack reads.

pub mod drops;
pub mod leak;
pub mod path;
pub mod transit;

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
}

/// Capacities. The agent exports them as `wirescope_bpf_map_capacity`.
pub const MAX_IFACES: u32 = 256;
pub const MAX_ALLOWED_IPS: u32 = 65_536;
pub const MAX_ENDPOINTS: u32 = 65_536;
pub const MAX_WG_PORTS: u32 = 256;
/// (ifindex, peer, kind, direction): 10k peers x 2 directions x 6 kinds would not fit on one
/// interface, but only kinds that occur get an entry (tunnel + data + keepalive + handshakes).
pub const MAX_COUNTERS: u32 = 131_072;
pub const MAX_UNKNOWN_WIRE: u32 = 4_096;
/// (interface name, public key) -> peer id, for every peer the agent numbered.
pub const MAX_PEER_IDS: u32 = 65_536;
/// Encryptions or decryptions in flight at once: one per crypto worker thread.
pub const MAX_CRYPTO_START: u32 = 4_096;
/// (interface, direction, bucket).
pub const MAX_CRYPTO_HIST: u32 = 4_096;
/// Handshake initiations sent and not yet answered: WireGuard sends at most one per peer
/// every 5 s, and the agent removes them 5 s after they left.
pub const MAX_HANDSHAKE_PENDING: u32 = 16_384;
/// (interface, peer, bucket) of handshake round trips.
pub const MAX_HANDSHAKE_RTT: u32 = 16_384;
/// Receiving sessions (one per keypair: rekeyed every 2 minutes, up to 3 alive per peer);
/// the agent removes those idle for [`RX_SESSION_IDLE_NS`].
pub const MAX_RX_SESSIONS: u32 = 65_536;
/// (interface, peer, gaps|late).
pub const MAX_RX_SEQ: u32 = 16_384;

/// An initiation without a response within this time is a timeout (WireGuard's
/// REKEY_TIMEOUT: it retries with a new initiation then).
pub const HANDSHAKE_TIMEOUT_NS: u64 = 5_000_000_000;
/// A receiving session idle this long is dropped (WireGuard's REJECT_AFTER_TIME: no keypair
/// is used for longer).
pub const RX_SESSION_IDLE_NS: u64 = 180_000_000_000;

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

/// Key of the LPM tries of allowed IPs: the interface first so one trie serves every tunnel.
/// The prefix length given to the trie is 32 (ifindex) + the allowed IP's prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedV4 {
    /// Big-endian, so that the trie's bitwise match of the first 32 bits is an exact match.
    pub ifindex_be: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AllowedV4>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedV6 {
    pub ifindex_be: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AllowedV6>() == 20);

/// A UDP endpoint. IPv4 addresses fill the first 4 bytes, the rest stays zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);

/// Peer ids are allocated by the agent, starting at 1. 0 means "no peer matched".
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

/// WireGuard traffic whose endpoint the agent has not (yet) mapped to a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnknownWireKey {
    pub ifindex: u32,
    pub endpoint: Endpoint,
    pub kind: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<UnknownWireKey>() == 28);

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

/// Where the kprobes on kernel WireGuard's `encrypt_packet(skb, keypair)` and
/// `decrypt_packet(skb, keypair)` find the interface: keypair -> peer -> device -> net_device
/// -> ifindex. Rust eBPF has no CO-RE, so the agent reads these offsets from the running
/// kernel's BTF (vmlinux and the wireguard module) and writes them here before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CryptoConfig {
    /// 0 until the agent has filled the offsets in: the probes then do nothing.
    pub enabled: u32,
    /// `noise_keypair.entry.peer` (struct wg_peer *).
    pub keypair_peer: u32,
    /// `wg_peer.device` (struct wg_device *).
    pub peer_device: u32,
    /// `wg_device.dev` (struct net_device *).
    pub device_dev: u32,
    /// `net_device.ifindex` (int).
    pub netdev_ifindex: u32,
    /// `net_device.nd_net` (possible_net_t, whose first member is the struct net *).
    pub netdev_net: u32,
    /// `net.ns.inum`: the namespace's inode number, as /proc/self/ns/net shows it.
    pub net_inum: u32,
    /// The agent's own namespace: kprobes fire for every namespace, and an ifindex only
    /// means something inside one.
    pub netns_inum: u32,
}
const _: () = assert!(core::mem::size_of::<CryptoConfig>() == 32);

/// An encryption or decryption under way, keyed by the kernel thread (pid_tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CryptoStart {
    pub start_ns: u64,
    pub ifindex: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CryptoStart>() == 16);

/// A log2 bucket of crypto durations: bucket `b` holds durations in [2^b, 2^(b+1)) ns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HistKey {
    pub ifindex: u32,
    pub dir: u8,
    pub bucket: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<HistKey>() == 8);

/// Highest bucket: 2^40 ns (18 min) and above land here.
pub const HIST_MAX_BUCKET: u8 = 40;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistValue {
    pub count: u64,
    pub sum_ns: u64,
}
const _: () = assert!(core::mem::size_of::<HistValue>() == 16);

/// A WireGuard index (sender index of a handshake message, receiver index of a data
/// message) on an interface. Indexes are chosen by the local WireGuard per interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IndexKey {
    pub ifindex: u32,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<IndexKey>() == 8);

/// An initiation that left, waiting for its response (`HANDSHAKE_PENDING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingHandshake {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) when the initiation left.
    pub start_ns: u64,
    pub peer: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PendingHandshake>() == 16);

/// A log2 bucket of a per-peer duration (handshake round trips): [2^b, 2^(b+1)) ns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerHistKey {
    pub ifindex: u32,
    pub peer: u32,
    pub bucket: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PeerHistKey>() == 12);

/// A receiving session (`RX_SESSIONS`, keyed by the data messages' receiver index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxSession {
    /// Highest counter (nonce) seen.
    pub highest: u64,
    /// bpf_ktime_get_ns of the last message, for the agent's idle expiry.
    pub last_ns: u64,
    pub peer: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<RxSession>() == 24);

/// What `RX_SEQ` counts (the `kind` of its `CounterKey`; `packets` is the count).
pub mod seq {
    /// Counter values skipped: `wirescope_rx_counter_gaps_total`.
    pub const GAPS: u8 = 0;
    /// Messages with a counter not above the highest: `wirescope_rx_late_packets_total`.
    pub const LATE: u8 = 1;
}

/// floor(log2(ns)), capped at HIST_MAX_BUCKET; 0 for 0 and 1. A bounded loop, no clz
/// instruction needed on BPF.
#[inline(always)]
pub fn log2_bucket(ns: u64) -> u8 {
    let mut b: u8 = 0;
    let mut v = ns >> 1;
    while v != 0 && b < HIST_MAX_BUCKET {
        v >>= 1;
        b += 1;
    }
    b
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for IfaceConfig {}
    unsafe impl aya::Pod for AllowedV4 {}
    unsafe impl aya::Pod for AllowedV6 {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for PeerIdKey {}
    unsafe impl aya::Pod for UnknownWireKey {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for CryptoConfig {}
    unsafe impl aya::Pod for CryptoStart {}
    unsafe impl aya::Pod for HistKey {}
    unsafe impl aya::Pod for HistValue {}
    unsafe impl aya::Pod for IndexKey {}
    unsafe impl aya::Pod for PendingHandshake {}
    unsafe impl aya::Pod for PeerHistKey {}
    unsafe impl aya::Pod for RxSession {}
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
    }
}
