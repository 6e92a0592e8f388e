//! Wire health (agent-ebpf health.rs): the handshake initiations waiting for a response,
//! the handshake round-trip histogram, the receiving sessions and their counter gaps and
//! late messages, and the expiry of that state: initiations that got no response within 5 s
//! become handshake timeouts, receiving sessions idle for 180 s are dropped. The expiry
//! rules are pure functions over the maps' contents and a `now`, so tests can move the
//! clock; [`HealthMaps::expire`] applies them.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    sync::Arc,
};

use agent_common::maps::{
    Counter, CounterKey, HistValue, health::HANDSHAKE_TIMEOUT_NS, health::IndexKey,
    health::MAX_HANDSHAKE_PENDING, health::MAX_HANDSHAKE_RTT, health::MAX_RX_SEQ,
    health::MAX_RX_SESSIONS, health::PeerHistKey, health::PendingHandshake,
    health::RX_SESSION_IDLE_NS, health::RxSession, map_error, names,
};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap},
};

use super::{
    DatapathError,
    maps::{
        Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, all_entries, forget_keys, forget_values,
        sum_hist, sum_per_cpu, take,
    },
};

pub struct HealthMaps {
    pending: HashMap<MapData, IndexKey, PendingHandshake>,
    rtt: PerCpuHashMap<MapData, PeerHistKey, HistValue>,
    sessions: HashMap<MapData, IndexKey, RxSession>,
    seq: PerCpuHashMap<MapData, CounterKey, Counter>,
    /// Handshake timeouts counted by [`HealthMaps::expire`], per (ifindex, peer).
    timeouts: StdHashMap<(u32, u32), u64>,
    errors: Arc<ErrorSlots>,
}

impl HealthMaps {
    pub(crate) fn take(ebpf: &mut Ebpf, errors: Arc<ErrorSlots>) -> Result<Self, DatapathError> {
        Ok(Self {
            pending: take(ebpf, names::HANDSHAKE_PENDING)?,
            rtt: take(ebpf, names::HANDSHAKE_RTT)?,
            sessions: take(ebpf, names::RX_SESSIONS)?,
            seq: take(ebpf, names::RX_SEQ)?,
            timeouts: StdHashMap::new(),
            errors,
        })
    }

    /// The handshake round-trip histogram, summed over CPUs.
    pub fn handshake_rtt(&self) -> Result<Vec<(PeerHistKey, HistValue)>, DatapathError> {
        sum_hist(&self.rtt, names::HANDSHAKE_RTT)
    }

    /// Gaps and late messages (`kind` is `seq::GAPS` / `seq::LATE`, `packets` the count).
    pub fn rx_seq(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.seq, names::RX_SEQ)
    }

    /// Handshake timeouts so far, per (ifindex, peer).
    pub fn handshake_timeouts(&self) -> StdHashMap<(u32, u32), u64> {
        self.timeouts.clone()
    }

    /// The initiations waiting for a response (for tests and the status of the maps).
    pub fn pending_handshakes(&self) -> Vec<(IndexKey, PendingHandshake)> {
        all_entries(&self.pending)
    }

    /// The receiving sessions tracked.
    pub fn rx_sessions(&self) -> Vec<(IndexKey, RxSession)> {
        all_entries(&self.sessions)
    }

    /// Run on every sync tick with `now_ns` = [`super::monotonic_ns`]: initiations
    /// unanswered for 5 s become timeouts (counted only when this delete wins against the
    /// programs' own, see [`expired_handshakes`]) and sessions idle for 180 s are dropped,
    /// so both maps stay bounded. Returns (timeouts counted, sessions dropped).
    pub fn expire(&mut self, now_ns: u64) -> (u64, u64) {
        let pending = self.pending_handshakes();
        // A peer we initiate to has a timeout series from its first initiation on, at 0.
        for (k, p) in &pending {
            self.timeouts.entry((k.ifindex, p.peer)).or_default();
        }
        let mut timeouts = 0;
        for (k, p) in expired_handshakes(pending, now_ns) {
            if self.pending.remove(&k).is_ok() {
                *self.timeouts.entry((k.ifindex, p.peer)).or_default() += 1;
                timeouts += 1;
            }
        }
        let mut dropped = 0;
        for k in idle_sessions(self.rx_sessions(), now_ns) {
            if self.sessions.remove(&k).is_ok() {
                dropped += 1;
            }
        }
        (timeouts, dropped)
    }
}

impl FeatureMaps for HealthMaps {
    /// Their round-trip histograms, gap and late counts, handshakes still pending and
    /// receiving sessions (whose next message would bring the counts back at zero), and
    /// their timeout counts.
    fn forget_peers(&mut self, ids: &HashSet<u32>) -> Result<u64, DatapathError> {
        let n_rtt = forget_keys(
            &mut self.rtt,
            names::HANDSHAKE_RTT,
            ids,
            |k: &PeerHistKey| k.peer,
        )?;
        let n_seq = forget_keys(&mut self.seq, names::RX_SEQ, ids, |k: &CounterKey| k.peer)?;
        let n_pending =
            forget_values(&mut self.pending, names::HANDSHAKE_PENDING, ids, |v| v.peer)?;
        let n_sessions = forget_values(&mut self.sessions, names::RX_SESSIONS, ids, |v| v.peer)?;
        self.timeouts.retain(|(_, peer), _| !ids.contains(peer));
        Ok(n_rtt + n_seq + n_pending + n_sessions)
    }

    fn clear(&mut self) -> Result<(), DatapathError> {
        self.pending.clear(names::HANDSHAKE_PENDING)?;
        self.rtt.clear(names::HANDSHAKE_RTT)?;
        self.sessions.clear(names::RX_SESSIONS)?;
        self.seq.clear(names::RX_SEQ)?;
        self.timeouts.clear();
        Ok(())
    }

    fn usage(&self) -> Vec<MapUsage> {
        vec![
            (
                names::HANDSHAKE_PENDING,
                self.pending.entries(),
                MAX_HANDSHAKE_PENDING as u64,
            ),
            (
                names::HANDSHAKE_RTT,
                self.rtt.entries(),
                MAX_HANDSHAKE_RTT as u64,
            ),
            (
                names::RX_SESSIONS,
                self.sessions.entries(),
                MAX_RX_SESSIONS as u64,
            ),
            (names::RX_SEQ, self.seq.entries(), MAX_RX_SEQ as u64),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors.list(&[
            (map_error::HANDSHAKE_PENDING, names::HANDSHAKE_PENDING),
            (map_error::HANDSHAKE_RTT, names::HANDSHAKE_RTT),
            (map_error::RX_SESSIONS, names::RX_SESSIONS),
            (map_error::RX_SEQ, names::RX_SEQ),
        ])
    }
}

/// The pending initiations older than [`HANDSHAKE_TIMEOUT_NS`] at `now_ns` (the kernel's
/// CLOCK_MONOTONIC, as `bpf_ktime_get_ns` reads it).
///
/// Design: the agent counts a timeout when it deletes such an entry and the delete succeeds;
/// the TC program observes a round trip only when its own delete of the entry succeeds, and
/// leaves entries older than 5 s alone. So every initiation counts exactly once, as a round
/// trip within 5 s or as a timeout, even when a late response races with the expiry.
/// WireGuard retries an unanswered initiation after 5 s (plus up to 1/3 s of jitter) with a
/// new sender index, so each retried initiation is its own entry and its own timeout.
pub fn expired_handshakes(
    entries: impl IntoIterator<Item = (IndexKey, PendingHandshake)>,
    now_ns: u64,
) -> Vec<(IndexKey, PendingHandshake)> {
    entries
        .into_iter()
        .filter(|(_, p)| now_ns.saturating_sub(p.start_ns) > HANDSHAKE_TIMEOUT_NS)
        .collect()
}

/// The receiving sessions idle for more than [`RX_SESSION_IDLE_NS`] at `now_ns`. WireGuard
/// uses no keypair longer than that, so such a session is over; should one come back, its
/// next message starts it afresh (no gap, no late message counted for it).
pub fn idle_sessions(
    entries: impl IntoIterator<Item = (IndexKey, RxSession)>,
    now_ns: u64,
) -> Vec<IndexKey> {
    entries
        .into_iter()
        .filter(|(_, s)| now_ns.saturating_sub(s.last_ns) > RX_SESSION_IDLE_NS)
        .map(|(k, _)| k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(index: u32, start_ns: u64) -> (IndexKey, PendingHandshake) {
        (
            IndexKey { ifindex: 3, index },
            PendingHandshake {
                start_ns,
                peer: 7,
                _pad: 0,
            },
        )
    }

    #[test]
    fn handshakes_expire_after_5_s() {
        let s = 1_000_000_000;
        let entries = [
            pending(1, 100 * s),
            pending(2, 103 * s),
            pending(3, 106 * s),
        ];
        let got = expired_handshakes(entries, 105 * s + 1);
        assert_eq!(got, vec![pending(1, 100 * s)]);
        // Exactly 5 s is not yet a timeout; a start after "now" never is.
        assert!(expired_handshakes([pending(1, 100 * s)], 105 * s).is_empty());
        assert!(expired_handshakes([pending(1, 100 * s)], 10 * s).is_empty());
    }

    #[test]
    fn sessions_expire_after_180_s() {
        let s = 1_000_000_000;
        let sess = |index, last_ns| {
            (
                IndexKey { ifindex: 3, index },
                RxSession {
                    highest: 9,
                    last_ns,
                    peer: 7,
                    _pad: 0,
                },
            )
        };
        let got = idle_sessions([sess(1, 10 * s), sess(2, 100 * s)], 191 * s);
        assert_eq!(
            got,
            vec![IndexKey {
                ifindex: 3,
                index: 1
            }]
        );
    }
}
