//! `BPF_PROG_TEST_RUN` tests that the per-handshake and per-session state of the TC programs
//! stays bounded under a long run (issue 4): initiations never answered and sessions gone
//! idle are dropped by the agent's expiry (`HealthMaps::expire`, run on every sync
//! tick), and a map that fills anyway says so in `wirescope_bpf_map_update_errors_total`.
//!
//! A long run is compressed in time: thousands of distinct initiations (tx) and sessions
//! (rx) go through the programs in a few seconds, and the expiry is then called with a clock
//! moved past the limits (`bpf_ktime_get_ns` is CLOCK_MONOTONIC, so "now" is
//! `health::monotonic_ns()` plus the time that should have passed).
//!
//! Same set-up as `health.rs` (and the whole tier: `main.rs` explains what test_run does with
//! the input): each test enters a fresh network namespace on its own thread, where
//! one end of a veth pair is the watched underlay (Ethernet) and the programs are attached
//! through `Datapath::attach`; the interfaces are down, so only the test runs reach them.
//!
//! Needs root and BPF; without root the tests print why and pass, except with CI=true.
//! Run: `cargo test -p wirescope --test datapath -- --test-threads=1 bounded::`.

use crate::common;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use agent_common::{
    fixtures::wg,
    maps::{
        health::HANDSHAKE_TIMEOUT_NS, health::MAX_HANDSHAKE_PENDING, health::MAX_RX_SESSIONS,
        health::RX_SESSION_IDLE_NS, names,
    },
};
use common::{Dir, RELAY};
use wirescope::{
    datapath::features::Features,
    datapath::monotonic_ns,
    metrics::{self, agent::AgentCollector},
    sync::inventory::Inventory,
};

/// Initiations and sessions per round of the compressed long run, and its rounds: over the
/// run, more of both pass than their maps could hold at once (16384 and 65536), and after
/// every round's expiry the maps are back to the same size.
const K: u32 = 8_000;
const M: u32 = 20_000;
const ROUNDS: u32 = 4;
const _: () = assert!(K * ROUNDS > MAX_HANDSHAKE_PENDING && K <= MAX_HANDSHAKE_PENDING);
const _: () = assert!(M * ROUNDS > MAX_RX_SESSIONS && M <= MAX_RX_SESSIONS);
/// Initiations or data messages sent into a full map.
const E: u64 = 10;

/// `dp` and `under` (bd-under); no tunnel.
type Lab = common::NetnsLab<Bounded>;
/// This module's marker (see [`common::NetnsLab`]).
struct Bounded;

impl Lab {
    fn new() -> Option<Lab> {
        Lab::underlay_to_relay(
            "the bounded-state tests need root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
            ("bd-under", "bd-other"),
        )
    }

    /// The WireGuard message `msg` between this side and the relay, run through the
    /// program of `dir` on the underlay. Refused map updates are the caller's to check.
    fn run(&mut self, dir: Dir, msg: &[u8]) {
        self.run_relay("bounded state", dir, (0, 0), msg);
    }

    /// Initiations sent with sender indexes `first..first + n`; returns how long it took.
    fn initiations(&mut self, first: u32, n: u32) -> Duration {
        let t = Instant::now();
        for i in first..first + n {
            self.run(Dir::Tx, &wg::initiation(i));
        }
        t.elapsed()
    }

    /// One data message (counter 0) received for each receiver index `first..first + n`.
    fn sessions(&mut self, first: u32, n: u32) -> Duration {
        let t = Instant::now();
        for i in first..first + n {
            self.run(Dir::Rx, &wg::data(i, 0, 100, 1420));
        }
        t.elapsed()
    }

    /// Entries of `map` as `map_usage()` reports them (what `wirescope_bpf_map_entries`
    /// exports), checked against its capacity.
    fn usage(&self, map: &str) -> u64 {
        let (_, n, cap) = self
            .dp
            .map_usage()
            .into_iter()
            .find(|(m, _, _)| *m == map)
            .unwrap_or_else(|| panic!("no map {map} in map_usage()"));
        assert!(n <= cap, "{map}: {n} entries, capacity {cap}");
        n
    }

    /// Refused updates per map, only those not zero.
    fn update_errors(&self) -> HashMap<&'static str, u64> {
        self.dp
            .map_update_errors()
            .into_iter()
            .filter(|(_, n)| *n != 0)
            .collect()
    }

    fn timeouts(&self) -> u64 {
        self.dp.health.handshake_timeouts().values().sum()
    }

    /// The agent's metrics text (`AgentCollector`, which exports the map entries, capacities
    /// and update errors), rendered as a scrape would.
    fn agent_metrics(self) -> (Lab, String) {
        let Lab {
            dp,
            tun,
            under,
            tests,
        } = self;
        let (text, dp) = dp.shared(|dp| {
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register_collector(Box::new(AgentCollector::new(
                dp,
                Arc::new(RwLock::new(Inventory::default())),
                Arc::new(RwLock::new(Features::default())),
            )));
            metrics::encode_string(&registry, metrics::Format::Prometheus).expect("encoding")
        });
        (
            Lab {
                dp,
                tun,
                under,
                tests,
            },
            text,
        )
    }
}

fn contains_all(text: &str, lines: &[String]) {
    for line in lines {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

/// Every map except the two under test, with its entry count.
fn other_maps(lab: &Lab) -> Vec<(&'static str, u64)> {
    lab.dp
        .map_usage()
        .into_iter()
        .filter(|(m, _, _)| ![names::HANDSHAKE_PENDING, names::RX_SESSIONS].contains(m))
        .map(|(m, n, _)| (m, n))
        .collect()
}

#[test]
fn expired_state_is_dropped() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    let mut after_first_round = None;
    for round in 0..ROUNDS {
        // WireGuard picks fresh random indexes for every handshake: distinct ones per round.
        let tx_first = 0x1000_0000 + round * K;
        let rx_first = 0x2000_0000 + round * M;
        let t0 = monotonic_ns();
        let t_tx = lab.initiations(tx_first, K);
        let t_rx = lab.sessions(rx_first, M);
        eprintln!("round {round}: {K} initiations in {t_tx:?}, {M} sessions in {t_rx:?}");
        assert_eq!(lab.update_errors(), HashMap::new(), "nothing refused");

        // Exactly one entry per initiation and per session, each of this interface and peer.
        assert_eq!(lab.usage(names::HANDSHAKE_PENDING), K as u64);
        assert_eq!(lab.usage(names::RX_SESSIONS), M as u64);
        let pending = lab.dp.health.pending_handshakes();
        let idx: HashSet<u32> = pending.iter().map(|(k, _)| k.index).collect();
        assert_eq!(idx, (tx_first..tx_first + K).collect());
        assert!(
            pending
                .iter()
                .all(|(k, p)| (k.ifindex, p.peer) == (under, RELAY) && p.start_ns >= t0),
            "every initiation of the relay on the underlay, started during this round"
        );
        let sessions = lab.dp.health.rx_sessions();
        let idx: HashSet<u32> = sessions.iter().map(|(k, _)| k.index).collect();
        assert_eq!(idx, (rx_first..rx_first + M).collect());
        assert!(
            sessions.iter().all(
                |(k, s)| (k.ifindex, s.peer, s.highest) == (under, RELAY, 0) && s.last_ns >= t0
            )
        );

        // Nothing started before t0, so at t0 + 5 s no initiation is over the limit yet
        // (the limit is strict: a timeout is older than 5 s).
        let timeouts = lab.timeouts();
        assert_eq!(lab.dp.health.expire(t0 + HANDSHAKE_TIMEOUT_NS), (0, 0));
        assert_eq!(lab.usage(names::HANDSHAKE_PENDING), K as u64);
        assert_eq!(
            lab.dp.health.handshake_timeouts(),
            HashMap::from([((under, RELAY), timeouts)]),
            "one series, for the relay on the underlay"
        );

        // 5 s + 1 ns after the last initiation: every one is a timeout, counted once, and
        // gone; the sessions are not idle long enough.
        let now = monotonic_ns();
        assert_eq!(
            lab.dp.health.expire(now + HANDSHAKE_TIMEOUT_NS + 1),
            (K as u64, 0)
        );
        assert_eq!(lab.usage(names::HANDSHAKE_PENDING), 0);
        assert!(lab.dp.health.pending_handshakes().is_empty());
        assert_eq!(lab.timeouts(), timeouts + K as u64);
        assert_eq!(lab.timeouts(), (round + 1) as u64 * K as u64);
        assert_eq!(lab.usage(names::RX_SESSIONS), M as u64);

        // Sessions: not at t0 + 180 s (idle for more than 180 s is the limit), but at
        // now + 180 s + 1 ns every one; no timeout is counted twice.
        assert_eq!(lab.dp.health.expire(t0 + RX_SESSION_IDLE_NS), (0, 0));
        assert_eq!(lab.usage(names::RX_SESSIONS), M as u64);
        assert_eq!(
            lab.dp.health.expire(now + RX_SESSION_IDLE_NS + 1),
            (0, M as u64)
        );
        assert_eq!(lab.usage(names::RX_SESSIONS), 0);
        assert!(lab.dp.health.rx_sessions().is_empty());
        assert_eq!(lab.timeouts(), (round + 1) as u64 * K as u64);
        assert_eq!(lab.update_errors(), HashMap::new());

        // The other maps hold per-(interface, peer) state only: the same after every round.
        let others = other_maps(&lab);
        match &after_first_round {
            None => after_first_round = Some(others),
            Some(first) => assert_eq!(&others, first, "round {round}: a map grew"),
        }
    }
    eprintln!("other maps after {ROUNDS} rounds: {after_first_round:?}");
}

/// The update-error lines (and entries, capacity) of `map` in the agent's metrics.
fn map_lines(map: &str, entries: u64, cap: u32, errors: u64) -> Vec<String> {
    vec![
        format!("wirescope_bpf_map_entries{{map=\"{map}\"}} {entries}"),
        format!("wirescope_bpf_map_capacity{{map=\"{map}\"}} {cap}"),
        format!("wirescope_bpf_map_update_errors_total{{map=\"{map}\"}} {errors}"),
    ]
}

/// Fills `map`, of capacity `cap`, with `add(lab, first, cap)` (`what` it adds): all fit.
/// Then E more: the map stays full, and exactly those E are refused and counted, only in
/// that map.
fn overfill(
    lab: &mut Lab,
    map: &'static str,
    what: &str,
    add: fn(&mut Lab, u32, u32) -> Duration,
    first: u32,
    cap: u32,
) {
    let took = add(lab, first, cap);
    eprintln!("{cap} {what} in {took:?}");
    assert_eq!(lab.update_errors(), HashMap::new(), "all fitted");
    assert_eq!(lab.usage(map), cap as u64);

    add(lab, first + cap, E as u32);
    assert_eq!(lab.usage(map), cap as u64);
    assert_eq!(
        lab.update_errors(),
        HashMap::from([(map, E)]),
        "exactly the refused {what}, and only in that map"
    );
}

#[test]
fn a_full_map_is_reported() {
    let Some(mut lab) = Lab::new() else { return };
    let cap = MAX_HANDSHAKE_PENDING;
    let first = 0x3000_0000;
    // E more distinct initiations than fit: the map is full, each one is refused and counted.
    overfill(
        &mut lab,
        names::HANDSHAKE_PENDING,
        "initiations",
        Lab::initiations,
        first,
        cap,
    );
    let idx: HashSet<u32> = lab
        .dp
        .health
        .pending_handshakes()
        .iter()
        .map(|(k, _)| k.index)
        .collect();
    assert_eq!(idx, (first..first + cap).collect(), "the first ones stay");
    // An initiation already pending (the same packet seen again) replaces its entry in
    // place, which a full hash map still allows: not an error.
    lab.initiations(first, 1);
    assert_eq!(lab.update_errors()[names::HANDSHAKE_PENDING], E);

    let (back, text) = lab.agent_metrics();
    lab = back;
    contains_all(
        &text,
        &map_lines(names::HANDSHAKE_PENDING, cap as u64, cap, E),
    );
    contains_all(&text, &map_lines(names::RX_SESSIONS, 0, MAX_RX_SESSIONS, 0));

    // The expiry empties it: every entry a timeout, and the map takes initiations again.
    let now = monotonic_ns();
    let t = Instant::now();
    assert_eq!(
        lab.dp.health.expire(now + HANDSHAKE_TIMEOUT_NS + 1),
        (cap as u64, 0)
    );
    eprintln!("expiring {cap} initiations took {:?}", t.elapsed());
    assert_eq!(lab.timeouts(), cap as u64);
    assert_eq!(lab.usage(names::HANDSHAKE_PENDING), 0);
    lab.initiations(first + cap + E as u32, 1);
    assert_eq!(lab.usage(names::HANDSHAKE_PENDING), 1);
    assert_eq!(
        lab.update_errors(),
        HashMap::from([(names::HANDSHAKE_PENDING, E)]),
        "a counter: the refusals stay counted, no new ones"
    );
    let (_, text) = lab.agent_metrics();
    contains_all(&text, &map_lines(names::HANDSHAKE_PENDING, 1, cap, E));
}

#[test]
fn a_full_rx_sessions_map_is_reported() {
    let Some(mut lab) = Lab::new() else { return };
    let cap = MAX_RX_SESSIONS;
    let first = 0x4000_0000;
    overfill(
        &mut lab,
        names::RX_SESSIONS,
        "sessions",
        Lab::sessions,
        first,
        cap,
    );
    // A session already tracked goes on in a full map: its next message is no error.
    lab.run(Dir::Rx, &wg::data(first, 1, 100, 1420));
    assert_eq!(lab.update_errors()[names::RX_SESSIONS], E);

    let (back, text) = lab.agent_metrics();
    lab = back;
    contains_all(&text, &map_lines(names::RX_SESSIONS, cap as u64, cap, E));

    let now = monotonic_ns();
    let t = Instant::now();
    assert_eq!(
        lab.dp.health.expire(now + RX_SESSION_IDLE_NS + 1),
        (0, cap as u64)
    );
    eprintln!("expiring {cap} sessions took {:?}", t.elapsed());
    assert_eq!(lab.usage(names::RX_SESSIONS), 0);
    lab.sessions(first + cap + E as u32, 1);
    assert_eq!(lab.usage(names::RX_SESSIONS), 1);
    assert_eq!(
        lab.update_errors(),
        HashMap::from([(names::RX_SESSIONS, E)])
    );
    let (_, text) = lab.agent_metrics();
    contains_all(&text, &map_lines(names::RX_SESSIONS, 1, cap, E));
}
