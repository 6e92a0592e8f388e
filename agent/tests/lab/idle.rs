//! Sync rounds with nothing to write (issue 15), in the lab (prefix `wsi`), the agent in the
//! client's namespace:
//!
//! - `unchanged_rounds_write_no_map`: with traffic flowing (the peer's byte counters and
//!   handshake time move), every round is counted in
//!   `wirescope_peer_sync_rounds_total{maps="unchanged"}` and none in `{maps="written"}`,
//!   while the exported transfer counters still grow by the pings' data messages; one allowed
//!   IP added with `wg set` makes exactly one round write (ALLOWED_V4 gains exactly one
//!   entry, no line is logged), and a new endpoint exactly one more, logged once. The
//!   period is 1 s (`wirescope_peer_sync_interval_seconds`) with one peer.
//!
//! Needs root and the lab's tools; with CI=true a missing prerequisite fails. Run:
//! `cargo test -p wirescope --test lab -- --test-threads=1 idle::`.

use crate::common;

use std::time::{Duration, Instant};

use common::{Names, lab_up, ping, start, stop, val, value};
use xtask::{
    agent::Agent,
    lab::{LabConfig, Role, Topology},
    scrape::Metrics,
};

const PREFIX: &str = "wsi";
const ROUNDS: &str = "wirescope_peer_sync_rounds_total";
/// Pings sent while the maps must stay unwritten.
const PINGS: u32 = 50;
/// A 56-byte ping is an 84-byte IPv4 packet: a data message of 16 (header) + 96 (padded to
/// 16) + 16 (tag) bytes.
const PING_MESSAGE: u64 = 128;

fn rounds(m: &Metrics) -> (u64, u64) {
    (
        val(m, ROUNDS, &[("maps", "written")]),
        val(m, ROUNDS, &[("maps", "unchanged")]),
    )
}

/// Scrapes until `{maps="unchanged"}` has grown by `n` over `from`'s (every round is one
/// second here), at most `n` + 5 seconds.
fn wait_unchanged(agent: &Agent, from: &Metrics, n: u64, what: &str) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(n + 5);
    loop {
        let m = agent.scrape().expect("scrape");
        if rounds(&m).1 >= rounds(from).1 + n {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n} unchanged rounds did not come (rounds before {:?}, now {:?}); log:\n{}",
            rounds(from),
            rounds(&m),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Scrapes until `{maps="written"}` has grown over `from`'s, then until 2 more rounds found
/// the maps unchanged (so that a second write, if any, had its chance).
fn wait_written(agent: &Agent, from: &Metrics, what: &str) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = agent.scrape().expect("scrape");
        if rounds(&m).0 > rounds(from).0 {
            return wait_unchanged(agent, &m, 2, what);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no round wrote the maps within 5 s (rounds before {:?}, now {:?})",
            rounds(from),
            rounds(&m),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn unchanged_rounds_write_no_map() {
    let Some(lab) = lab_up(
        "unchanged_rounds_write_no_map",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names {
        cns, tun, relay, ..
    } = Names::of(&lab);
    let agent = start(&lab, "idle");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let first = agent.scrape().expect("scrape");
    // The handshake's endpoint and counters: nothing the maps hold.
    let settled = wait_unchanged(&agent, &first, 1, "settling");
    assert_eq!(
        value(&settled, "wirescope_peer_sync_interval_seconds", &[]),
        1.0
    );
    let sent = |m: &Metrics| val(m, "wireguard_sent_bytes_total", &[("public_key", &relay)]);
    let log_len = |agent: &Agent| agent.log_text().lines().count();

    // Traffic: counters and handshake times move, the maps do not.
    let before = agent.scrape().expect("scrape");
    ping(&lab, PINGS, &[], false);
    let after = wait_unchanged(&agent, &before, 3, "traffic");
    let (written, unchanged) = rounds(&after);
    assert_eq!(
        written,
        rounds(&before).0,
        "no round wrote the maps while only counters moved (unchanged rounds {} -> \
         {unchanged}); log:\n{}",
        rounds(&before).1,
        agent.log_text()
    );
    assert!(
        sent(&after) >= sent(&before) + u64::from(PINGS) * PING_MESSAGE,
        "the transfer counters are fresh although no map was written: sent {} -> {}, at \
         least {PINGS} data messages of {PING_MESSAGE} bytes",
        sent(&before),
        sent(&after)
    );

    // One allowed IP added: one round writes it.
    let conf = lab
        .client()
        .wg()
        .peer(Role::Relay)
        .expect("relay peer")
        .clone();
    let mut allowed = conf.allowed_ips.clone();
    allowed.push("10.99.0.0/24".to_string());
    let entries = |m: &Metrics| val(m, "wirescope_bpf_map_entries", &[("map", "ALLOWED_V4")]);
    let before = agent.scrape().expect("scrape");
    let from = log_len(&agent);
    lab.exec(
        &cns,
        &[
            "wg",
            "set",
            &tun,
            "peer",
            &relay,
            "allowed-ips",
            &allowed.join(","),
        ],
    )
    .expect("wg set allowed-ips");
    let after = wait_written(&agent, &before, "allowed IP");
    assert_eq!(
        (
            rounds(&after).0 - rounds(&before).0,
            entries(&after) - entries(&before)
        ),
        (1, 1),
        "(rounds that wrote, ALLOWED_V4 entries added) for one allowed IP; log:\n{}",
        agent.log_text()
    );
    let lines: Vec<String> = agent
        .log_text()
        .lines()
        .skip(from)
        .map(String::from)
        .collect();
    assert!(
        !lines.iter().any(|l| l.contains("tunnel ")),
        "an allowed IP is no logged change: {lines:?}"
    );

    // A new endpoint (the relay's address, another port): one round writes it, and it is
    // logged once.
    let ep = conf.endpoint.expect("the relay's endpoint");
    let moved = std::net::SocketAddr::new(ep.ip(), ep.port() + 1).to_string();
    let before = agent.scrape().expect("scrape");
    let from = log_len(&agent);
    lab.exec(
        &cns,
        &["wg", "set", &tun, "peer", &relay, "endpoint", &moved],
    )
    .expect("wg set endpoint");
    let after = wait_written(&agent, &before, "endpoint");
    assert_eq!(
        rounds(&after).0 - rounds(&before).0,
        1,
        "rounds that wrote for one new endpoint; log:\n{}",
        agent.log_text()
    );
    let lines: Vec<String> = agent
        .log_text()
        .lines()
        .skip(from)
        .map(String::from)
        .collect();
    let want = format!("tunnel {tun}: peer {relay} has a new endpoint");
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(&want)).count(),
        1,
        "{want:?} once in {lines:?}"
    );
    stop(agent);
}
