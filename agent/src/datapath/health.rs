//! Expiry of the wire-health state the TC programs leave in the kernel: initiations that got
//! no response within 5 s become handshake timeouts, receiving sessions idle for 180 s are
//! dropped. Pure functions over the maps' contents and a `now`, so tests can move the clock;
//! `Datapath::expire_wire_state` applies them.

use agent_common::maps::{
    HANDSHAKE_TIMEOUT_NS, IndexKey, PendingHandshake, RX_SESSION_IDLE_NS, RxSession,
};

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

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
