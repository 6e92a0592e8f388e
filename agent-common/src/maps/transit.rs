//! Encrypt/decrypt transit time (`wirescope_tunnel_transit_seconds`): each IP packet on a
//! tunnel interface is matched with its WireGuard data message on the carrying interface,
//! per peer and direction, in order, by length. Only what TC sees is used, so it works for
//! any WireGuard implementation.
//!
//! tx: the tunnel's egress enqueues (time, inner length); the data message leaving the
//! carrier dequeues the first queued packet whose length its padded plaintext fits.
//! rx: the data message arriving enqueues (time, padded length); the inner packet arriving
//! on the tunnel dequeues the first message it fits. An skb of several (GSO on the tunnel,
//! a UDP GSO/GRO batch on the carrier, a coalesced TUN write) is one slot expecting that
//! many when it enqueues, and takes that many, in order, when it dequeues.
//!
//! Each (peer, direction) has a ring of [`RING`] numbered slots in the shared
//! `TRANSIT_SLOTS` hash map: a slot lives while its packet is in flight (the matching side
//! deletes it); a slot never matched (WireGuard dropped its packet) is deleted once stale,
//! by the matching side or the agent's sweep, or overwritten a ring later. So the map holds
//! what is in flight, not history.

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
/// session, a full queue) is skipped when the next one matches. Userspace implementations
/// encrypt and decrypt on several threads, and under load one of them falls behind by
/// dozens of packets: with 8 slots (and 4 behind), boringtun under a busy machine's load
/// lost 1 to 3 % of the tx pairs and up to a third of the rx ones (TCP acknowledgements of
/// a few lengths, reordered past the window); with 64 each way, none in the same runs.
/// Only a packet that matches nothing near the head scans further, so the usual cost is
/// the same.
pub const LOOKAHEAD: u32 = 64;
/// Slots the matching side looks at behind the head when nothing ahead fits: the
/// partners of messages reordered on the way (by up to this many places).
pub const LOOKBEHIND: u32 = 64;
/// Messages (or inner packets) of one skb the matching side matches, each with its own
/// slot or share of one: wireguard-go sends up to 64 data messages in one UDP GSO skb (the
/// kernel's UDP_MAX_SEGMENTS) and, since 0.0.20230223, writes up to 64 KiB of coalesced TCP
/// segments to its TUN in one (47 segments at a 1420 MTU). Further ones of a bigger batch
/// are passed over. The scan covers [`LOOKAHEAD`] + this - 1 slots ahead at most.
pub const MAX_BATCH: u32 = 64;
/// A slot older than this matches nothing (its packet was dropped) and is deleted.
pub const STALE_NS: u64 = 2_000_000_000;

/// (peer, direction) queues: 2 per active peer, sized for 20,000 (40,000); peers gone for
/// `--peer-grace` are removed. Not preallocated: made by a peer's first packet.
pub const MAX_TRANSIT_SEQ: u32 = 65_536;
/// Packets in flight, over all peers.
pub const MAX_TRANSIT_SLOTS: u32 = 65_536;
/// (tunnel ifindex, peer, direction, bucket): a peer's transit times spread over a few
/// log2 buckets each way (30 us to 2 ms is 6 of them), so 20,000 active peers need about
/// 240,000; peers gone for `--peer-grace` are removed. Not preallocated (a preallocated
/// per-CPU hash this size would reserve 4 MiB of values per CPU at rest).
pub const MAX_TRANSIT_HIST: u32 = 262_144;

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
