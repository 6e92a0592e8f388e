//! Wire health from the WireGuard headers: handshake round trips (`HANDSHAKE_PENDING`,
//! `HANDSHAKE_RTT`), handshake timeouts (initiations the agent expires from
//! `HANDSHAKE_PENDING`), and per receiving session (`RX_SESSIONS`) the counter sequence's
//! gaps and late messages (`RX_SEQ`).

/// Handshake initiations sent and not yet answered: WireGuard sends at most one per peer
/// every 5 s, and the agent removes them 5 s after they left.
pub const MAX_HANDSHAKE_PENDING: u32 = 16_384;
/// (interface, peer, bucket) of handshake round trips: a few buckets per peer (2 to 4 over
/// a day), 20,000 active peers ~80,000; peers gone for `--peer-grace` are removed. Not
/// preallocated.
pub const MAX_HANDSHAKE_RTT: u32 = 131_072;
/// Receiving sessions (one per keypair: rekeyed every 2 minutes, up to 3 alive per peer);
/// the agent removes those idle for [`RX_SESSION_IDLE_NS`].
pub const MAX_RX_SESSIONS: u32 = 65_536;
/// (interface, peer, gaps|late|implausible): 3 per peer (gaps and late from its first
/// session on, implausible once one occurs), sized for 20,000 active peers (60,000); peers
/// gone for `--peer-grace` are removed. Not preallocated and not LRU, as `MAX_COUNTERS`.
pub const MAX_RX_SEQ: u32 = 65_536;

/// An initiation without a response within this time is a timeout (WireGuard's
/// REKEY_TIMEOUT: it retries with a new initiation then).
pub const HANDSHAKE_TIMEOUT_NS: u64 = 5_000_000_000;
/// A receiving session idle this long is dropped (WireGuard's REJECT_AFTER_TIME: no keypair
/// is used for longer).
pub const RX_SESSION_IDLE_NS: u64 = 180_000_000_000;

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
    /// Messages whose counter is more than [`MAX_PLAUSIBLE_GAP`] past the highest:
    /// `wirescope_rx_implausible_counter_jumps_total`. The receiver index is not secret, so
    /// anyone on the path can send a data message of a live session with any counter;
    /// WireGuard drops it (it does not decrypt), and so must the sequence: such a message
    /// neither adds its jump to the gaps nor moves the highest counter.
    pub const IMPLAUSIBLE: u8 = 2;
    /// The largest jump counted as lost messages: 2^24, about a second of loss at 15 million
    /// packets per second (minimum-size packets at 10 Gbit/s).
    pub const MAX_PLAUSIBLE_GAP: u64 = 1 << 24;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for IndexKey {}
    unsafe impl aya::Pod for PendingHandshake {}
    unsafe impl aya::Pod for PeerHistKey {}
    unsafe impl aya::Pod for RxSession {}
}
