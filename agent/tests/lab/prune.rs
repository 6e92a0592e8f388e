//! Forgetting peers gone for longer than `--peer-grace` (issue 15): the real agent, a peer
//! removed with `wg set ... remove`, its series kept with their values within the grace,
//! gone from /metrics with their map entries after it, and the peer added back counted from
//! zero.
//!
//! Host only (not `kernel::`): the bookkeeping is the agent's, the maps' entries are removed
//! with the same syscalls on every kernel. Run:
//! `cargo test -p wirescope --test lab -- --test-threads=1 prune::`.

use crate::common;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use xtask::{agent::Agent, lab::LabConfig, lab::Topology, scrape::Metrics};

use common::{COUNTER_FAMILIES, Names, bin, lab_up, log_path, ping, stop, val, wait_series};

const PREFIX: &str = "wsq";
/// Short, so the test waits seconds, not minutes; long against the agent's 1 s rounds.
const GRACE: &str = "4s";
const GRACE_S: u64 = 4;
/// An ICMP echo of ping's default 56 bytes: 20 (IPv4) + 8 (ICMP) + 56.
const ECHO_LEN: u64 = 84;
const PINGS: u32 = 10;

/// The datapath's per-peer families: what the agent keeps of a peer gone, within the grace.
const KEPT_FAMILIES: [&str; 6] = [
    COUNTER_FAMILIES[0],
    COUNTER_FAMILIES[1],
    COUNTER_FAMILIES[2],
    COUNTER_FAMILIES[3],
    "wirescope_rx_counter_gaps_total",
    "wirescope_rx_late_packets_total",
];

/// Every series of the `KEPT_FAMILIES` labelled with `peer`, with its value.
fn peer_series(m: &Metrics, peer: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for fam in KEPT_FAMILIES {
        for (labels, v) in m.select(fam, &[("peer", peer)]) {
            out.insert(format!("{fam}{labels:?}"), v);
        }
    }
    out
}

/// Every series of any family that names `key` (as `peer` or, in the exporter-compatible
/// families, `public_key`).
fn any_series(m: &Metrics, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for name in m.names() {
        for label in ["peer", "public_key"] {
            for (labels, _) in m.select(name, &[(label, key)]) {
                out.push(format!("{name}{labels:?}"));
            }
        }
    }
    out
}

fn entries(m: &Metrics, map: &str) -> u64 {
    val(m, "wirescope_bpf_map_entries", &[("map", map)])
}

/// Tunnel packets and bytes of `peer` on `tun` in both directions, as (tx packets, tx bytes,
/// rx packets, rx bytes).
fn tunnel_counts(m: &Metrics, tun: &str, peer: &str) -> (u64, u64, u64, u64) {
    let c = |fam: &str, dir: &str| {
        val(
            m,
            fam,
            &[("interface", tun), ("peer", peer), ("direction", dir)],
        )
    };
    (
        c("wirescope_tunnel_packets_total", "tx"),
        c("wirescope_tunnel_bytes_total", "tx"),
        c("wirescope_tunnel_packets_total", "rx"),
        c("wirescope_tunnel_bytes_total", "rx"),
    )
}

#[test]
fn a_peer_gone_longer_than_the_grace_is_forgotten_and_counts_from_zero_when_back() {
    let Some(lab) = lab_up(
        "a_peer_gone_longer_than_the_grace_is_forgotten_and_counts_from_zero_when_back",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names {
        cns,
        tun,
        veth,
        relay,
    } = Names::of(&lab);
    let agent = Agent::start(bin(), &cns, &["--peer-grace", GRACE], &log_path("prune"))
        .expect("agent starts");
    lab.handshake(Duration::from_secs(20)).expect("handshake");

    // A known number of packets through the peer.
    let before = agent.scrape().expect("scrape");
    ping(&lab, PINGS, &["-W", "5"], false);
    std::thread::sleep(Duration::from_millis(300));
    let carried = agent.scrape().expect("scrape");
    let (b, a) = (
        tunnel_counts(&before, &tun, &relay),
        tunnel_counts(&carried, &tun, &relay),
    );
    let n = u64::from(PINGS);
    assert_eq!(
        (a.0 - b.0, a.1 - b.1, a.2 - b.2, a.3 - b.3),
        (n, n * ECHO_LEN, n, n * ECHO_LEN),
        "the pings through {relay}: (tx packets, tx bytes, rx packets, rx bytes)"
    );
    let kept = peer_series(&carried, &relay);
    assert!(!kept.is_empty(), "series of {relay}");
    // Each COUNTERS entry of the peer is one series of a packets family (its bytes series
    // is the same entry), each RX_SEQ entry one series of gaps or late messages.
    let counter_entries = (carried
        .select(COUNTER_FAMILIES[0], &[("peer", &relay)])
        .count()
        + carried
            .select(COUNTER_FAMILIES[2], &[("peer", &relay)])
            .count()) as u64;
    let seq_entries = (carried
        .select("wirescope_rx_counter_gaps_total", &[("peer", &relay)])
        .count()
        + carried
            .select("wirescope_rx_late_packets_total", &[("peer", &relay)])
            .count()) as u64;
    assert!(counter_entries >= 6 && seq_entries >= 2, "{kept:#?}");
    assert_eq!(entries(&carried, "PEER_IDS"), 1, "the relay, the only peer");

    // Removed: within the grace, every series stays with its value.
    let conf = String::from_utf8_lossy(
        &lab.exec(&cns, &["wg", "showconf", &tun])
            .expect("wg showconf")
            .stdout,
    )
    .into_owned();
    let out = lab
        .exec(&cns, &["wg", "set", &tun, "peer", &relay, "remove"])
        .expect("wg set peer remove");
    assert!(out.status.success(), "removing {relay}: {out:?}");
    let removed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let within = agent.scrape().expect("scrape");
    assert!(
        removed_at.elapsed() < Duration::from_secs(GRACE_S),
        "scraped within the grace"
    );
    assert_eq!(
        peer_series(&within, &relay),
        kept,
        "within the grace, the peer's series with their values"
    );
    assert_eq!(entries(&within, "PEER_IDS"), 1);

    // After the grace (and the round that notices it): gone, series and entries.
    let deadline = removed_at + Duration::from_secs(GRACE_S + 6);
    let gone = loop {
        let m = agent.scrape().expect("scrape");
        if any_series(&m, &relay).is_empty() {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "series of {relay} still there {:?} after it was removed: {:#?}; agent log:\n{}",
            removed_at.elapsed(),
            any_series(&m, &relay),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        removed_at.elapsed() > Duration::from_secs(GRACE_S),
        "forgotten only after the grace ({:?})",
        removed_at.elapsed()
    );
    assert_eq!(
        (
            entries(&gone, "COUNTERS"),
            entries(&gone, "RX_SEQ"),
            entries(&gone, "PEER_IDS"),
            entries(&gone, "HANDSHAKE_RTT"),
            entries(&gone, "RX_SESSIONS"),
        ),
        (
            entries(&carried, "COUNTERS") - counter_entries,
            entries(&carried, "RX_SEQ") - seq_entries,
            0,
            0,
            0,
        ),
        "(COUNTERS, RX_SEQ, PEER_IDS, HANDSHAKE_RTT, RX_SESSIONS) entries once forgotten"
    );
    let log = agent.log_text();
    assert!(
        log.contains(&format!(
            "forgot 1 peer(s) gone for more than {GRACE} (1 of {tun})"
        )),
        "one line for the batch:\n{log}"
    );

    // Back: counted from zero, exactly.
    xtask::wg::setconf(&cns, &tun, &lab.client().wg().with_private_key(&conf))
        .expect("the peer back (wg setconf)");
    // Published after the round that wrote it into the maps: from here on its packets are
    // its own, not an unknown peer's.
    wait_series(
        &agent,
        "wirescope_peer_info",
        &[("peer", &relay)],
        Duration::from_secs(5),
    );
    ping(&lab, PINGS, &["-W", "5"], false);
    std::thread::sleep(Duration::from_millis(300));
    let back = agent.scrape().expect("scrape");
    assert_eq!(
        tunnel_counts(&back, &tun, &relay),
        (n, n * ECHO_LEN, n, n * ECHO_LEN),
        "the peer back: its pings alone (tx packets, tx bytes, rx packets, rx bytes)"
    );
    let wire = |dir: &str, msg: &str| {
        val(
            &back,
            "wirescope_wire_packets_total",
            &[
                ("interface", &veth),
                ("peer", &relay),
                ("direction", dir),
                ("message", msg),
            ],
        )
    };
    assert_eq!(
        (
            wire("tx", "handshake_initiation"),
            wire("rx", "handshake_response"),
            wire("tx", "data"),
            wire("rx", "data"),
        ),
        (1, 1, n, n),
        "the peer back: one handshake, then its data messages"
    );
    assert_eq!(entries(&back, "PEER_IDS"), 1, "numbered again, and pinned");
    stop(agent);
}
