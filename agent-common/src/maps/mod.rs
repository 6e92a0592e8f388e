//! Keys and values of the BPF maps, as both sides see them.
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding: padding bytes with garbage make
//! hash lookups miss and the verifier reject uninitialised stack reads.

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

/// Path-MTU signals seen passively by the TC programs: IP fragments per layer
/// (`wirescope_fragments_total`) and ICMP too-big messages with the MTU they report
/// (`wirescope_icmp_too_big_total`, `wirescope_icmp_reported_mtu_bytes`).
pub mod path {
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const ICMP_TOO_BIG: &str = "ICMP_TOO_BIG";
    pub const ICMP_MTU: &str = "ICMP_MTU";
    pub const ENDPOINT_ADDRS: &str = "ENDPOINT_ADDRS";
    pub const PATH_ERRORS: &str = "PATH_ERRORS";

    /// (ifindex, direction, layer): 256 interfaces x 2 x 3 at most.
    pub const MAX_FRAGMENTS: u32 = 2_048;
    /// (ifindex, family).
    pub const MAX_ICMP_TOO_BIG: u32 = 1_024;
    /// (ifindex, reported MTU) -> time of the last report; the agent removes entries older
    /// than [`MTU_WINDOW_NS`] on every sync tick.
    pub const MAX_ICMP_MTU: u32 = 4_096;
    /// Addresses of the known WireGuard endpoints (any port), for fragments that carry no
    /// ports. One per endpoint at most.
    pub const MAX_ENDPOINT_ADDRS: u32 = super::MAX_ENDPOINTS;

    /// `wirescope_icmp_reported_mtu_bytes` is the lowest MTU reported within this window.
    pub const MTU_WINDOW_NS: u64 = 600_000_000_000;

    /// `CounterKey.kind` of `FRAGMENTS` (`peer` is 0).
    pub mod layer {
        /// Fragments of WireGuard UDP: on an underlay, to or from a known endpoint address
        /// (any port), or a first fragment of UDP to or from a local WireGuard port.
        pub const OUTER: u8 = 0;
        /// Any fragment on a tunnel interface.
        pub const INNER: u8 = 1;
        pub const OTHER: u8 = 2;
    }

    /// Indexes of the `PATH_ERRORS` per-CPU array: updates the kernel refused.
    pub mod error {
        pub const FRAGMENTS: u32 = 0;
        pub const ICMP_TOO_BIG: u32 = 1;
        pub const ICMP_MTU: u32 = 2;
        pub const COUNT: u32 = 3;
    }

    /// An MTU some ICMP too-big message reported on an interface (`ICMP_MTU`; the value is
    /// the bpf_ktime_get_ns of the latest such report).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct MtuKey {
        pub ifindex: u32,
        pub mtu: u32,
    }
    const _: () = assert!(core::mem::size_of::<MtuKey>() == 8);

    #[cfg(feature = "user")]
    unsafe impl aya::Pod for MtuKey {}
}

/// Leak detection: IP packets leaving an underlay outside every tunnel while a tunnel is up
/// (`wirescope_leaked_packets_total`, `wirescope_leaked_bytes_total`). Only counts per
/// (interface, kind) are kept: never an address.
pub mod leak {
    pub const LEAK_CFG: &str = "LEAK_CFG";
    pub const LEAK_ALLOW_V4: &str = "LEAK_ALLOW_V4";
    pub const LEAK_ALLOW_V6: &str = "LEAK_ALLOW_V6";
    pub const LEAKS: &str = "LEAKS";
    pub const LEAK_ERRORS: &str = "LEAK_ERRORS";
    /// Holds `wirescope_leak` (index 0) for wirescope_egress's tail call.
    pub const LEAK_PROG: &str = "LEAK_PROG";
    /// The leak check's own program (see agent-ebpf main.rs for why).
    pub const PROG: &str = "wirescope_leak";

    /// `--leak-allow` CIDRs, per family.
    pub const MAX_LEAK_ALLOW: u32 = 1_024;
    /// (ifindex, kind): 256 interfaces x 3 kinds.
    pub const MAX_LEAKS: u32 = 1_024;

    /// A tunnel counts as up this long after its latest handshake (WireGuard's
    /// REJECT_AFTER_TIME: no session outlives it).
    pub const TUNNEL_UP_NS: u64 = 180_000_000_000;

    /// `LeakKey.kind`.
    pub mod kind {
        /// UDP or TCP to port 53.
        pub const DNS: u8 = 0;
        pub const IPV4: u8 = 1;
        pub const IPV6: u8 = 2;
        pub const COUNT: u8 = 3;
    }

    /// Indexes of the `LEAK_ERRORS` per-CPU array: updates the kernel refused.
    pub mod error {
        pub const LEAKS: u32 = 0;
        pub const COUNT: u32 = 1;
    }

    /// The single entry of the `LEAK_CFG` array, written by the agent on every sync tick.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LeakConfig {
        /// bpf_ktime_get_ns (CLOCK_MONOTONIC) until which a watched tunnel is up: its
        /// latest handshake + [`TUNNEL_UP_NS`]. 0: no tunnel up, nothing is a leak.
        pub tunnel_up_until_ns: u64,
    }
    const _: () = assert!(core::mem::size_of::<LeakConfig>() == 8);

    /// Key of the `LEAK_ALLOW_V4` LPM trie (prefix length = the CIDR's).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct AllowV4 {
        pub addr: [u8; 4],
    }
    const _: () = assert!(core::mem::size_of::<AllowV4>() == 4);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct AllowV6 {
        pub addr: [u8; 16],
    }
    const _: () = assert!(core::mem::size_of::<AllowV6>() == 16);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct LeakKey {
        pub ifindex: u32,
        pub kind: u8,
        pub _pad: [u8; 3],
    }
    const _: () = assert!(core::mem::size_of::<LeakKey>() == 8);

    #[cfg(feature = "user")]
    mod pod {
        use super::*;
        unsafe impl aya::Pod for LeakConfig {}
        unsafe impl aya::Pod for AllowV4 {}
        unsafe impl aya::Pod for AllowV6 {}
        unsafe impl aya::Pod for LeakKey {}
    }
}

/// Encrypt/decrypt transit time (`wirescope_tunnel_transit_seconds`): each IP packet on a
/// tunnel interface is matched with its WireGuard data message on the carrying interface,
/// per peer and direction, in order, by length. Only what TC sees is used, so it works for
/// any WireGuard implementation.
///
/// tx: the tunnel's egress enqueues (time, inner length); the data message leaving the
/// carrier dequeues the first queued packet whose length its padded plaintext fits.
/// rx: the data message arriving enqueues (time, padded length); the inner packet arriving
/// on the tunnel dequeues the first message it fits.
///
/// Each (peer, direction) has a ring of [`RING`] numbered slots in the shared
/// `TRANSIT_SLOTS` hash map: a slot lives while its packet is in flight (the matching side
/// deletes it); a slot never matched (WireGuard dropped its packet) is deleted once stale,
/// by the matching side or the agent's sweep, or overwritten a ring later. So the map holds
/// what is in flight, not history.
pub mod transit {
    pub const TRANSIT_SEQ: &str = "TRANSIT_SEQ";
    pub const TRANSIT_SLOTS: &str = "TRANSIT_SLOTS";
    pub const TRANSIT_HIST: &str = "TRANSIT_HIST";
    pub const TRANSIT_ERRORS: &str = "TRANSIT_ERRORS";
    /// The per-CPU list of queue operations a TC program leaves for `wirescope_transit`.
    pub const TRANSIT_OPS: &str = "TRANSIT_OPS";
    /// Holds `wirescope_transit` (index 0) for the TC programs' tail call.
    pub const TRANSIT_PROG: &str = "TRANSIT_PROG";
    /// The program the queue work runs in: its own program, reached by a tail call at the
    /// end of the TC programs, so the verifier checks the queue loops once, not once per
    /// path through the parsers (which took the TC programs to ~500k instructions).
    pub const PROG: &str = "wirescope_transit";

    /// Slots per (peer, direction): more packets in flight than this (a TUN queue of 500
    /// under load, kernel WireGuard's 1024-packet queues) overwrite the oldest.
    pub const RING: u64 = 1024;
    /// Slots the matching side looks at from the head: a packet WireGuard dropped (no
    /// session, a full queue) is skipped when the next one matches.
    pub const LOOKAHEAD: u32 = 8;
    /// Slots the matching side looks at behind the head when nothing ahead fits: the
    /// partners of messages reordered on the way (by up to this many places).
    pub const LOOKBEHIND: u32 = 4;
    /// A slot older than this matches nothing (its packet was dropped) and is deleted.
    pub const STALE_NS: u64 = 2_000_000_000;

    /// (peer, direction) queues.
    pub const MAX_TRANSIT_SEQ: u32 = 16_384;
    /// Packets in flight, over all peers.
    pub const MAX_TRANSIT_SLOTS: u32 = 65_536;
    /// (tunnel ifindex, peer, direction, bucket).
    pub const MAX_TRANSIT_HIST: u32 = 16_384;

    /// Indexes of the `TRANSIT_ERRORS` per-CPU array: updates the kernel refused.
    pub mod error {
        pub const SEQ: u32 = 0;
        pub const SLOTS: u32 = 1;
        pub const HIST: u32 = 2;
        pub const COUNT: u32 = 3;
    }

    /// Key of `TRANSIT_SEQ` (peer ids are unique over all interfaces).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct QueueKey {
        pub peer: u32,
        pub dir: u8,
        pub _pad: [u8; 3],
    }
    const _: () = assert!(core::mem::size_of::<QueueKey>() == 8);

    /// A queue's numbering: slots `head .. tail` may be in flight. `tail` is taken with an
    /// atomic add, so packets enqueued on two CPUs at once get distinct numbers.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Queue {
        pub tail: u64,
        pub head: u64,
    }
    const _: () = assert!(core::mem::size_of::<Queue>() == 16);

    /// Key of `TRANSIT_SLOTS`: slot `number % RING` of a queue.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SlotKey {
        pub peer: u32,
        pub dir: u8,
        pub _pad: u8,
        pub slot: u16,
    }
    const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

    /// A packet (tx) or message (rx) waiting for its other half.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Slot {
        /// The queue number it was given (a slot key is reused every RING packets).
        pub number: u64,
        /// bpf_ktime_get_ns when it was seen.
        pub start_ns: u64,
        /// tx: the tunnel interface it left; rx: 0 (the tunnel side knows its own).
        pub ifindex: u32,
        /// tx: the inner IP length (of each full segment of a GSO packet); rx: the padded
        /// plaintext length of the message (of each but the last of a GRO batch).
        pub len: u32,
        /// The last segment's (tx GSO) or message's (rx GRO) length; else equal to `len`.
        pub last_len: u32,
        pub _pad: u32,
        /// Messages still to match (GSO segments on tx, GRO segments on rx; else 1). A u64:
        /// BPF has a 64-bit atomic add with fetch, which the matching side uses.
        pub left: u64,
    }
    const _: () = assert!(core::mem::size_of::<Slot>() == 40);

    /// `Op.kind`.
    pub const ENQUEUE: u8 = 1;
    pub const DEQUEUE: u8 = 2;
    /// Operations one packet can leave: in multihop, a packet on the tunnel interface is
    /// both an inner packet of the entry peer and a message of the exit peer.
    pub const MAX_OPS: usize = 2;

    /// One queue operation, as [`Op`]s in `TRANSIT_OPS`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Op {
        pub kind: u8,
        pub dir: u8,
        /// Dequeue: 1 when the message side matches (tx), 0 when the inner packet does.
        pub tx: u8,
        pub _pad: u8,
        pub peer: u32,
        pub ifindex: u32,
        pub len: u32,
        pub last_len: u32,
        pub left: u32,
    }
    const _: () = assert!(core::mem::size_of::<Op>() == 24);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Ops {
        pub n: u32,
        pub _pad: u32,
        pub ops: [Op; MAX_OPS],
    }
    const _: () = assert!(core::mem::size_of::<Ops>() == 56);

    /// Key of `TRANSIT_HIST` (log2 buckets of nanoseconds, as `super::log2_bucket`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct HistKey {
        /// The tunnel interface the peer belongs to.
        pub ifindex: u32,
        pub peer: u32,
        pub dir: u8,
        pub bucket: u8,
        pub _pad: [u8; 2],
    }
    const _: () = assert!(core::mem::size_of::<HistKey>() == 12);

    /// Whether an inner IP packet of `inner` bytes can be the plaintext of a data message
    /// whose plaintext, padded, is `padded` bytes: WireGuard pads to a multiple of 16, but
    /// never past the interface MTU, so `inner <= padded <= round_up(inner, 16)`.
    #[inline(always)]
    pub fn fits(inner: u32, padded: u32) -> bool {
        inner != 0 && inner <= padded && padded <= (inner + 15) & !15
    }

    /// The padded plaintext length of a data message of `udp_payload` bytes (16-byte
    /// header, 16-byte tag); 0 for a keepalive or anything shorter.
    #[inline(always)]
    pub fn padded_len(udp_payload: u32) -> u32 {
        udp_payload.saturating_sub(32)
    }

    #[cfg(feature = "user")]
    mod pod {
        use super::*;
        unsafe impl aya::Pod for QueueKey {}
        unsafe impl aya::Pod for Queue {}
        unsafe impl aya::Pod for SlotKey {}
        unsafe impl aya::Pod for Slot {}
        unsafe impl aya::Pod for HistKey {}
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn padding_fits() {
            // 84-byte ping: padded to 96.
            assert!(fits(84, 96));
            assert!(!fits(84, 80));
            assert!(!fits(84, 112));
            // At the MTU, padding stops short of the next multiple of 16.
            assert!(fits(1420, 1420));
            assert!(fits(1419, 1420));
            assert!(!fits(1421, 1420));
            // Exact multiples are not padded further.
            assert!(fits(96, 96));
            assert!(!fits(96, 112));
            // Nothing is the plaintext of a keepalive.
            assert!(!fits(0, 0));
            assert_eq!(padded_len(32), 0);
            assert_eq!(padded_len(32 + 96), 96);
            assert_eq!(padded_len(3), 0);
        }
    }
}

/// Kernel drops (`skb:kfree_skb`, `wirescope_drops_total`) and UDP receive errors
/// (`udp:udp_fail_queue_rcv_skb`, `wirescope_udp_receive_errors_total`), counted only in the
/// agent's own network namespace.
pub mod drops {
    pub const DROPS_CFG: &str = "DROPS_CFG";
    pub const DROPS: &str = "DROPS";
    pub const UDP_ERRORS: &str = "UDP_ERRORS";
    pub const DROPS_ERRORS: &str = "DROPS_ERRORS";

    /// (ifindex, reason): 256 interfaces x the ~20 reasons that occur on one.
    pub const MAX_DROPS: u32 = 8_192;
    /// Local UDP ports with failed receives.
    pub const MAX_UDP_ERRORS: u32 = 4_096;

    /// `DropKey.ifindex` of a drop whose skb had no device (attributed to the namespace by
    /// its socket).
    pub const NO_DEVICE: u32 = 0;
    /// `DropsConfig.reason_off` when the tracepoint has no reason field (before 5.17): such
    /// drops count with reason [`NOT_SPECIFIED`].
    pub const NO_REASON_FIELD: u32 = u32::MAX;
    /// SKB_DROP_REASON_NOT_SPECIFIED, used when the kernel gives no reason. (2 on every
    /// kernel with reasons; the agent names values from the running kernel's BTF.)
    pub const NOT_SPECIFIED: u32 = 2;

    /// Indexes of the `DROPS_ERRORS` per-CPU array: updates the kernel refused.
    pub mod error {
        pub const DROPS: u32 = 0;
        pub const UDP_ERRORS: u32 = 1;
        pub const COUNT: u32 = 2;
    }

    /// Offsets the programs follow, from the tracepoint's format file and the running
    /// kernel's BTF, written by the agent once before it attaches (no CO-RE in Rust eBPF).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DropsConfig {
        /// 0: the programs do nothing.
        pub enabled: u32,
        /// skb:kfree_skb's `skbaddr` and `reason` fields in the tracepoint record.
        pub skbaddr_off: u32,
        pub reason_off: u32,
        /// Reasons that are not drops (SKB_NOT_DROPPED_YET, SKB_CONSUMED), from BTF.
        pub not_dropped: u32,
        pub consumed: u32,
        /// sk_buff.dev and sk_buff.sk.
        pub skb_dev: u32,
        pub skb_sk: u32,
        /// net_device.ifindex and net_device.nd_net.
        pub netdev_ifindex: u32,
        pub netdev_net: u32,
        /// sock.__sk_common.skc_net and .skc_num (the local port, host order).
        pub sk_net: u32,
        pub sk_num: u32,
        /// net.ns.inum.
        pub net_inum: u32,
        /// The agent's network namespace (inode number of /proc/self/ns/net).
        pub netns_inum: u32,
        pub _pad: u32,
    }
    const _: () = assert!(core::mem::size_of::<DropsConfig>() == 56);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct DropKey {
        pub ifindex: u32,
        /// The kernel's `enum skb_drop_reason` value.
        pub reason: u32,
    }
    const _: () = assert!(core::mem::size_of::<DropKey>() == 8);

    #[cfg(feature = "user")]
    mod pod {
        use super::*;
        unsafe impl aya::Pod for DropsConfig {}
        unsafe impl aya::Pod for DropKey {}
    }
}
