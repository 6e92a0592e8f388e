//! `BPF_PROG_TEST_RUN` tests of the wire-health state the TC programs keep (handshake round
//! trips, counter gaps and late messages) and of the agent's expiry of it, with a fake
//! clock. Same approach as the whole tier (`main.rs` explains what test_run does with the
//! input): each test enters a fresh network namespace on its own thread, where one end of a
//! veth pair is the watched underlay (Ethernet) and the programs are attached through
//! `Datapath::attach`; the interfaces are down, so only the test runs reach the programs.
//!
//! Needs root and BPF; without root the tests print why and pass, except with CI=true.
//! Run: `cargo test -p wirescope --test datapath -- --test-threads=1 health::`.

use crate::common;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use agent_common::{
    fixtures::wg,
    maps::{health::HANDSHAKE_TIMEOUT_NS, health::PeerHistKey, health::seq, log2_bucket},
    wireguard::MSG_INITIATION,
};
use common::{Dir, RELAY};
use wirescope::{
    datapath::monotonic_ns,
    metrics::{self, health::HealthCollector},
    sync::inventory::Inventory,
};

const RELAY_KEY: &str = "FXUjJ9fcAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// `dp` and `under` (wh-under); no tunnel.
type Lab = common::NetnsLab<Health>;
/// This module's marker (see [`common::NetnsLab`]).
struct Health;

impl Lab {
    fn new() -> Option<Lab> {
        Lab::underlay_to_relay(
            "the wire-health tests need root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
            ("wh-under", "wh-other"),
        )
    }

    /// The WireGuard message `msg` between this side and the relay, run through the
    /// program of `dir` on the underlay.
    fn run(&mut self, dir: Dir, msg: &[u8]) {
        self.run_gso(dir, (0, 0), msg)
    }

    /// The same as an skb of `gso.0` segments of `gso.1` bytes (UDP GRO on rx).
    fn run_gso(&mut self, dir: Dir, gso: (u32, u32), msg: &[u8]) {
        self.run_relay("wire health", dir, gso, msg);
        common::assert_no_refused_updates(&self.dp, "wire health");
    }

    fn rtt(&self) -> Vec<(PeerHistKey, u64, u64)> {
        let mut v: Vec<_> = self
            .dp
            .health
            .handshake_rtt()
            .expect("HANDSHAKE_RTT")
            .into_iter()
            .map(|(k, v)| (k, v.count, v.sum_ns))
            .collect();
        v.sort_by_key(|(k, _, _)| (k.ifindex, k.peer, k.bucket));
        v
    }

    /// (gaps, late) of the relay on the underlay.
    fn seq(&self) -> (u64, u64) {
        let (gaps, late, _) = self.seq3();
        (gaps, late)
    }

    /// (gaps, late, implausible jumps) of the relay on the underlay.
    fn seq3(&self) -> (u64, u64, u64) {
        let (mut gaps, mut late, mut jumps) = (0, 0, 0);
        for (k, c) in self.dp.health.rx_seq().expect("RX_SEQ") {
            assert_eq!((k.ifindex, k.peer), (self.under, RELAY), "{k:?}");
            match k.kind {
                seq::GAPS => gaps += c.packets,
                seq::LATE => late += c.packets,
                seq::IMPLAUSIBLE => jumps += c.packets,
                other => panic!("unexpected RX_SEQ kind {other}"),
            }
        }
        (gaps, late, jumps)
    }
}

#[test]
fn handshake_round_trip_is_matched_by_index() {
    let Some(mut lab) = Lab::new() else { return };
    assert_eq!(wg::initiation(1)[0], MSG_INITIATION);
    lab.run(Dir::Tx, &wg::initiation(0xA1A1));
    assert_eq!(
        lab.dp.health.pending_handshakes().len(),
        1,
        "the initiation waits"
    );
    // A response to some other initiation: nothing.
    lab.run(Dir::Rx, &wg::response(0xB2B2, 0xDEAD));
    assert!(lab.rtt().is_empty());
    assert_eq!(lab.dp.health.pending_handshakes().len(), 1);
    // The response to ours: one round trip, in a plausible bucket, and nothing pending.
    lab.run(Dir::Rx, &wg::response(0xB2B2, 0xA1A1));
    let rtt = lab.rtt();
    assert_eq!(rtt.len(), 1, "{rtt:?}");
    let (k, count, sum_ns) = rtt[0];
    assert_eq!((k.ifindex, k.peer, count), (lab.under, RELAY, 1));
    assert!(sum_ns <= HANDSHAKE_TIMEOUT_NS, "{sum_ns} ns");
    assert_eq!(
        k.bucket,
        log2_bucket(sum_ns),
        "bucket of the one observation"
    );
    assert!(lab.dp.health.pending_handshakes().is_empty());
    // The same response again (a duplicate): already matched, nothing more.
    lab.run(Dir::Rx, &wg::response(0xB2B2, 0xA1A1));
    assert_eq!(lab.rtt().iter().map(|r| r.1).sum::<u64>(), 1);
    // The relay initiates and we answer: not our round trip, nothing remembered.
    lab.run(Dir::Rx, &wg::initiation(0xC3C3));
    lab.run(Dir::Tx, &wg::response(0xD4D4, 0xC3C3));
    lab.run(Dir::Rx, &wg::response(0xE5E5, 0xC3C3));
    assert_eq!(lab.rtt().iter().map(|r| r.1).sum::<u64>(), 1);
    assert!(lab.dp.health.pending_handshakes().is_empty());
}

#[test]
fn unanswered_initiation_times_out_after_5_s() {
    let Some(mut lab) = Lab::new() else { return };
    lab.run(Dir::Tx, &wg::initiation(0x0F0F));
    let now = monotonic_ns();
    assert_eq!(lab.dp.health.expire(now).0, 0, "not yet 5 s old");
    assert_eq!(lab.dp.health.pending_handshakes().len(), 1);
    assert_eq!(
        lab.dp.health.handshake_timeouts(),
        HashMap::from([((lab.under, RELAY), 0)]),
        "a series at 0 from the first initiation on"
    );
    assert_eq!(lab.dp.health.expire(now + 6_000_000_000).0, 1);
    assert!(
        lab.dp.health.pending_handshakes().is_empty(),
        "the entry is gone"
    );
    assert_eq!(
        lab.dp.health.handshake_timeouts(),
        HashMap::from([((lab.under, RELAY), 1)])
    );
    // Its response after all: no round trip (the initiation already counted as a timeout),
    // and a second expiry counts nothing more.
    lab.run(Dir::Rx, &wg::response(0x1010, 0x0F0F));
    assert!(lab.rtt().is_empty());
    assert_eq!(lab.dp.health.expire(now + 12_000_000_000).0, 0);
    // A retried initiation (new sender index) is a timeout of its own.
    lab.run(Dir::Tx, &wg::initiation(0x1111));
    assert_eq!(lab.dp.health.expire(monotonic_ns() + 6_000_000_000).0, 1);
    assert_eq!(lab.dp.health.handshake_timeouts()[&(lab.under, RELAY)], 2);
}

/// A session whose first messages came from an endpoint the agent did not know yet (a
/// client that just connected to a relay, before the next peer sync): once its peer is
/// known, the peer gets its zero series and what follows, exactly; nothing is counted
/// for the session before that.
#[test]
fn a_session_started_before_its_peer_was_known_gets_its_series() {
    let Some(mut lab) = Lab::enter(
        "the wire-health tests need root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
        ("wk-under", "wk-other"),
        false,
        &[],
    ) else {
        return;
    };
    let data = |counter| wg::data(0x7171, counter, 100, 1420);
    for c in [0, 1, 3] {
        lab.run(Dir::Rx, &data(c));
    }
    let of_relay = |lab: &Lab| -> Vec<(u8, u64)> {
        let mut v: Vec<_> = lab
            .dp
            .health
            .rx_seq()
            .expect("RX_SEQ")
            .into_iter()
            .filter(|(k, _)| k.peer == RELAY)
            .map(|(k, c)| (k.kind, c.packets))
            .collect();
        v.sort();
        v
    };
    assert!(of_relay(&lab).is_empty(), "no peer known yet");
    assert_eq!(lab.dp.health.rx_sessions().len(), 1);
    let mut maps = wirescope::datapath::PeerMaps::default();
    maps.endpoints.insert(
        wirescope::sync::endpoint_key(common::RELAY_V4.into(), common::RELAY_PORT),
        RELAY,
    );
    maps.wg_ports.insert(common::LISTEN_PORT, 1);
    lab.dp.sync_peers(&maps).expect("peer maps");
    // The next message, in sequence: the zero series, and the session is the relay's.
    lab.run(Dir::Rx, &data(4));
    assert_eq!(of_relay(&lab), vec![(seq::GAPS, 0), (seq::LATE, 0)]);
    let sessions = lab.dp.health.rx_sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].1.peer, RELAY);
    // Then counted as any session's: 5 and 6 skipped, 2 late.
    lab.run(Dir::Rx, &data(7));
    lab.run(Dir::Rx, &data(2));
    assert_eq!(of_relay(&lab), vec![(seq::GAPS, 2), (seq::LATE, 1)]);
}

#[test]
fn counter_gaps_and_late_messages_per_session() {
    let Some(mut lab) = Lab::new() else { return };
    let data = |index, counter| wg::data(index, counter, 100, 1420);
    lab.run(Dir::Rx, &data(0x5151, 0));
    let zeros = lab.dp.health.rx_seq().expect("RX_SEQ");
    assert_eq!(
        zeros.len(),
        2,
        "gaps and late at 0 from the session's start: {zeros:?}"
    );
    assert!(zeros.iter().all(|(_, c)| c.packets == 0));
    for c in [1, 2, 5, 6] {
        lab.run(Dir::Rx, &data(0x5151, c));
    }
    assert_eq!(lab.seq(), (2, 0), "3 and 4 skipped");
    lab.run(Dir::Rx, &data(0x5151, 3));
    assert_eq!(
        lab.seq(),
        (2, 1),
        "3 is late; the gap it fills stays counted"
    );
    lab.run(Dir::Rx, &data(0x5151, 6));
    assert_eq!(lab.seq(), (2, 2), "a duplicate is late");
    // Keepalives are in the sequence.
    lab.run(Dir::Rx, &wg::keepalive(0x5151, 7));
    assert_eq!(lab.seq(), (2, 2));
    lab.run(Dir::Rx, &wg::keepalive(0x5151, 9));
    assert_eq!(lab.seq(), (3, 2));
    // A new receiver index (a rekey) starts a fresh session wherever its counter starts.
    lab.run(Dir::Rx, &data(0x5252, 100));
    lab.run(Dir::Rx, &data(0x5252, 101));
    lab.run(Dir::Rx, &data(0x5151, 10));
    assert_eq!(lab.seq(), (3, 2));
    assert_eq!(lab.dp.health.rx_sessions().len(), 2);
    // A GRO skb of 3 messages from counter 11 carries 11, 12 and 13 (in order, as far as
    // anyone can tell from the first header): 14 is next, no gap, and 13 is late.
    lab.run_gso(Dir::Rx, (3, 148), &data(0x5151, 11));
    lab.run(Dir::Rx, &data(0x5151, 14));
    assert_eq!(lab.seq(), (3, 2));
    lab.run(Dir::Rx, &data(0x5151, 13));
    assert_eq!(lab.seq(), (3, 3));
    // Sent data is not tracked.
    lab.run(Dir::Tx, &data(0x6161, 0));
    lab.run(Dir::Tx, &data(0x6161, 50));
    assert_eq!(lab.seq(), (3, 3));
    assert_eq!(lab.dp.health.rx_sessions().len(), 2);
    // Idle for 180 s: the agent drops the sessions; a message then starts afresh.
    let now = monotonic_ns();
    assert_eq!(lab.dp.health.expire(now).1, 0);
    assert_eq!(lab.dp.health.expire(now + 181_000_000_000).1, 2);
    assert!(lab.dp.health.rx_sessions().is_empty());
    lab.run(Dir::Rx, &data(0x5151, 4));
    assert_eq!(lab.seq(), (3, 3), "first message of a fresh session");

    // The collector's view, labelled as docs/CONTRACT.md says.
    let mut inv = Inventory::default();
    inv.iface_names.insert(lab.under, "wh-under".into());
    inv.peer_labels
        .insert(RELAY, ("wg0".into(), RELAY_KEY.to_string()));
    lab.run(Dir::Tx, &wg::initiation(0x7777));
    lab.run(Dir::Rx, &wg::response(0x8888, 0x7777));
    let encode = |dp, inv, per_peer| {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(HealthCollector::new(
            dp,
            Arc::new(RwLock::new(inv)),
            per_peer,
        )));
        metrics::encode_string(&registry, metrics::Format::Prometheus).expect("encoding")
    };
    let (text, dp) = lab.dp.shared(|dp| encode(dp, inv.clone(), true));
    // `--peer-histograms off`: the round trip per interface, the counters still per peer.
    let (per_iface, _dp) = dp.shared(|dp| encode(dp, inv.clone(), false));
    assert!(
        per_iface.contains("wirescope_handshake_rtt_seconds_count{interface=\"wh-under\"} 1")
            && !per_iface
                .contains("wirescope_handshake_rtt_seconds_count{interface=\"wh-under\",peer")
            && per_iface.contains(&format!(
                "wirescope_rx_counter_gaps_total{{interface=\"wh-under\",peer=\"{RELAY_KEY}\"}} 3"
            )),
        "{per_iface}"
    );
    let labels = format!("interface=\"wh-under\",peer=\"{RELAY_KEY}\"");
    for line in [
        format!("wirescope_rx_counter_gaps_total{{{labels}}} 3"),
        format!("wirescope_rx_late_packets_total{{{labels}}} 3"),
        format!("wirescope_rx_implausible_counter_jumps_total{{{labels}}} 0"),
        format!("wirescope_handshake_rtt_seconds_count{{{labels}}} 1"),
        format!("wirescope_handshake_timeouts_total{{{labels}}} 0"),
        format!("wirescope_handshake_rtt_seconds_bucket{{{labels},le=\"+Inf\"}} 1"),
        // Cumulative: the highest finite bound holds the one round trip once.
        format!("wirescope_handshake_rtt_seconds_bucket{{{labels},le=\"8.589934592\"}} 1"),
    ] {
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }
}

/// A data message of a live session whose counter is far past the highest (anyone on the
/// path can forge one: the receiver index is not secret) is counted apart and ignored: the
/// u64 jump is not added to the gaps, and the session's real messages go on counting as
/// before. A jump of exactly MAX_PLAUSIBLE_GAP is still a gap.
#[test]
fn forged_counter_jumps_are_counted_apart_and_not_followed() {
    let Some(mut lab) = Lab::new() else { return };
    let data = |counter| wg::data(0x5151, counter, 100, 1420);
    lab.run(Dir::Rx, &data(10));
    lab.run(Dir::Rx, &data(11));
    assert_eq!(lab.seq3(), (0, 0, 0));
    lab.run(Dir::Rx, &data(u64::MAX - 5));
    lab.run(Dir::Rx, &data(11 + seq::MAX_PLAUSIBLE_GAP + 2));
    assert_eq!(lab.seq3(), (0, 0, 2), "two forged jumps, no gap");
    lab.run(Dir::Rx, &data(12));
    lab.run(Dir::Rx, &data(14));
    assert_eq!(
        lab.seq3(),
        (1, 0, 2),
        "13 skipped: the session was not moved on"
    );
    lab.run(Dir::Rx, &data(14 + seq::MAX_PLAUSIBLE_GAP + 1));
    assert_eq!(
        lab.seq3(),
        (1 + seq::MAX_PLAUSIBLE_GAP, 0, 2),
        "the largest plausible jump is a gap"
    );
}
