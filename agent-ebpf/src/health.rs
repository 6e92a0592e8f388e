//! Wire health from the WireGuard headers alone: handshake round trips (an initiation that
//! leaves, matched to the response that comes back by index) and, per receiving session,
//! the counter (nonce) sequence: skipped numbers are gaps, numbers at or below the highest
//! are late.

use agent_common::{
    maps::{
        CounterKey, DIR_RX, DIR_TX, HistValue, PEER_UNKNOWN,
        health::{
            HANDSHAKE_TIMEOUT_NS, IndexKey, MAX_HANDSHAKE_PENDING, MAX_HANDSHAKE_RTT, MAX_RX_SEQ,
            MAX_RX_SESSIONS, PeerHistKey, PendingHandshake, RxSession, seq,
        },
        kind, log2_bucket, map_error,
    },
    wireguard::Message,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};

use crate::{count, maps::MAP_ERRORS};

/// Initiations sent, by (interface, sender index), until their response arrives or the agent
/// expires them (5 s, `wirescope_handshake_timeouts_total`).
#[map]
pub static HANDSHAKE_PENDING: HashMap<IndexKey, PendingHandshake> =
    HashMap::with_max_entries(MAX_HANDSHAKE_PENDING, 0);

#[map]
pub static HANDSHAKE_RTT: PerCpuHashMap<PeerHistKey, HistValue> =
    PerCpuHashMap::pinned(MAX_HANDSHAKE_RTT, BPF_F_NO_PREALLOC);

/// Receiving sessions by (interface, receiver index). A shared (not per-CPU) map: one
/// session's messages are normally received on one CPU, but not always (RPS, a rehashed
/// flow), and each CPU must see the same highest counter. Two CPUs updating one session at
/// the same instant can race (both read the same highest; the lower write may land last),
/// which can miscount one message as a gap or late; the agent accepts that rare error
/// rather than pay for a lock on every data message.
#[map]
pub static RX_SESSIONS: HashMap<IndexKey, RxSession> =
    HashMap::with_max_entries(MAX_RX_SESSIONS, 0);

/// Gaps and late messages per (interface, peer): `CounterKey.kind` is `seq::GAPS` or
/// `seq::LATE`, `Counter.packets` the count. Not preallocated, as `COUNTERS`: entries are
/// made once per peer and session start, and live on.
#[map]
pub static RX_SEQ: PerCpuHashMap<CounterKey, agent_common::maps::Counter> =
    PerCpuHashMap::pinned(MAX_RX_SEQ, BPF_F_NO_PREALLOC);

/// How stale a session's `last_ns` may get before a message refreshes it.
const LAST_NS_REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn bump(idx: u32) {
    if let Some(e) = MAP_ERRORS.get_ptr_mut(idx) {
        // SAFETY: this CPU's slot.
        unsafe { *e += 1 };
    }
}

/// One WireGuard message of `peer` (0: unknown) on `ifindex`. `segs` is the number of
/// messages the skb carries (UDP GRO on rx: consecutive counters from `msg.counter` on).
#[inline(always)]
pub fn observe(ifindex: u32, peer: u32, dir: u8, msg: &Message, segs: u64) {
    match (msg.kind, dir) {
        (kind::HANDSHAKE_INITIATION, DIR_TX) => initiation_sent(ifindex, peer, msg.index),
        (kind::HANDSHAKE_RESPONSE, DIR_RX) => response_received(ifindex, msg.receiver),
        (kind::DATA | kind::KEEPALIVE, DIR_RX) => {
            sequence(ifindex, peer, msg.index, msg.counter, segs)
        }
        _ => {}
    }
}

#[inline(always)]
fn initiation_sent(ifindex: u32, peer: u32, sender: u32) {
    let key = IndexKey {
        ifindex,
        index: sender,
    };
    let pending = PendingHandshake {
        // SAFETY: a plain helper call.
        start_ns: unsafe { bpf_ktime_get_ns() },
        peer,
        _pad: 0,
    };
    // The same index again (a copy of the packet seen twice) restarts the clock.
    if HANDSHAKE_PENDING.insert(&key, &pending, 0).is_err() {
        bump(map_error::HANDSHAKE_PENDING);
    }
}

/// Only a response to an initiation this side sent is a round trip: a response leaving
/// (we answered the peer's initiation) never matches, since only tx initiations are pending.
#[inline(always)]
fn response_received(ifindex: u32, receiver: u32) {
    let key = IndexKey {
        ifindex,
        index: receiver,
    };
    // SAFETY: copied out at once; the agent or another CPU may delete the entry.
    let Some(pending) = (unsafe { HANDSHAKE_PENDING.get(&key) }).copied() else {
        return;
    };
    let ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(pending.start_ns);
    if ns > HANDSHAKE_TIMEOUT_NS {
        // Too late: the agent's expiry counts it as a timeout (and removes it).
        return;
    }
    // Whoever deletes the entry owns it: a duplicate response, or the agent's expiry racing
    // with this one, never counts the same initiation twice.
    if HANDSHAKE_PENDING.remove(&key).is_err() {
        return;
    }
    let hkey = PeerHistKey {
        ifindex,
        peer: pending.peer,
        bucket: log2_bucket(ns),
        _pad: [0; 3],
    };
    count::observe(
        &HANDSHAKE_RTT,
        &hkey,
        ns,
        1,
        &MAP_ERRORS,
        map_error::HANDSHAKE_RTT,
    );
}

/// The counter sequence of a receiving session. The first message seen of a session only
/// sets the highest counter (the agent may have started mid-session). Then a counter above
/// highest + 1 adds the skipped numbers to the gaps, and a counter at or below the highest
/// adds 1 to the late messages. A late message does not take back the gap it fills: gaps
/// count what was missing when the jump happened, so with reordering only, gaps equal late
/// messages, and gaps minus late estimates what never arrived.
#[inline(always)]
fn sequence(ifindex: u32, peer: u32, index: u32, counter: u64, segs: u64) {
    let key = IndexKey { ifindex, index };
    // A GRO skb of n messages carries counters `counter` .. `counter + n - 1` (assumed in
    // order: only the first header is visible).
    let last = counter.saturating_add(segs.saturating_sub(1));
    let Some(s) = RX_SESSIONS.get_ptr_mut(&key) else {
        let fresh = RxSession {
            highest: last,
            // SAFETY: a plain helper call.
            last_ns: unsafe { bpf_ktime_get_ns() },
            peer,
            _pad: 0,
        };
        if RX_SESSIONS.insert(&key, &fresh, BPF_NOEXIST as u64).is_ok() {
            // Zero series from a session's start, so that rates and ratios of a peer
            // without loss are 0, not absent (once per session: cheap).
            add(ifindex, peer, seq::GAPS, 0);
            add(ifindex, peer, seq::LATE, 0);
        } else {
            // EEXIST (another CPU created it just now) is no loss; a full map is.
            if RX_SESSIONS.get_ptr_mut(&key).is_none() {
                bump(map_error::RX_SESSIONS);
            }
        }
        return;
    };
    // A session whose first messages came before the agent knew their endpoint (a client
    // that just connected to a relay, until the next peer sync) started under no peer: its
    // zero series go to the peer once it is known, so that every peer with a session has
    // them, as the peers known from the start do.
    // SAFETY: a value of a shared map; the race between CPUs is described at RX_SESSIONS.
    if peer != PEER_UNKNOWN && unsafe { (*s).peer } == PEER_UNKNOWN {
        unsafe { (*s).peer = peer };
        add(ifindex, peer, seq::GAPS, 0);
        add(ifindex, peer, seq::LATE, 0);
    }
    // SAFETY: as above.
    let highest = unsafe { (*s).highest };
    if counter > highest && counter - highest - 1 > seq::MAX_PLAUSIBLE_GAP {
        add(ifindex, peer, seq::IMPLAUSIBLE, 1);
        return;
    }
    // `last_ns` only serves the agent's idle expiry (RX_SESSION_IDLE_NS, 180 s), so it is
    // refreshed when a second old rather than on every message: the coarse clock is read
    // from memory, the precise one from the clock source (~30 ns on a VM, the largest part
    // of this function). The coarse clock lags by a tick at most, so it never refreshes
    // early, and a session's `last_ns` is at most LAST_NS_REFRESH_NS + a tick behind.
    // SAFETY: plain helper calls.
    let coarse = unsafe { bpf_ktime_get_coarse_ns() };
    if coarse.saturating_sub(unsafe { (*s).last_ns }) >= LAST_NS_REFRESH_NS {
        unsafe { (*s).last_ns = bpf_ktime_get_ns() };
    }
    if last > highest {
        unsafe { (*s).highest = last };
    }
    if counter > highest {
        let gap = counter - highest - 1;
        if gap > 0 {
            add(ifindex, peer, seq::GAPS, gap);
        }
    } else {
        // (A GRO skb that starts late but reaches past the highest still moves it on.)
        add(ifindex, peer, seq::LATE, 1);
    }
}

#[inline(always)]
fn add(ifindex: u32, peer: u32, what: u8, n: u64) {
    let key = CounterKey {
        ifindex,
        peer,
        kind: what,
        dir: DIR_RX,
        _pad: [0; 2],
    };
    count::add(&RX_SEQ, &key, n, 0, map_error::RX_SEQ);
}
