//! `Datapath::reset`, which lets this tier load the programs once per test binary and lend
//! them to one test after the other (`common::Lent`): after a reset every map reads as after
//! a fresh load (no entry, no count, nothing refused), the interfaces are detached, and the
//! programs work as before: attached again, the same packets count exactly the same, tail
//! calls (transit timing, the leak check) included.
//!
//! Needs root and BPF; without them the test prints why and passes, except with CI=true,
//! where it fails. Run: `cargo test -p wirescope --test datapath -- --test-threads=1 reset::`.

use crate::common;

use std::net::IpAddr;

use agent_common::{
    fixtures::{Framing, Ipv4, udp, wg, wg_ipv4},
    maps::leak::LeakConfig,
    parse::{IPPROTO_ICMP, IPPROTO_UDP},
};
use aya::maps::{Map, MapData, MapType, PerCpuArray, PerCpuValues};
use common::{LISTEN_PORT, LOCAL_V4, RELAY, RELAY_PORT, RELAY_V4, TUNNEL_L3, UNDERLAY_ETH, run_tc};
use wirescope::{
    datapath::{PROG_EGRESS, PROG_INGRESS, PeerMaps, monotonic_ns},
    sync::endpoint_key,
};

type Lab = common::NetnsLab<Reset>;
/// This module's marker (see [`common::NetnsLab`]).
struct Reset;

const INNER_SRC: [u8; 4] = [10, 64, 1, 2];
const INNER_DST: [u8; 4] = [10, 7, 0, 1];
const STRANGER_V4: [u8; 4] = [192, 0, 2, 99];
const RESOLVER_V4: [u8; 4] = [9, 9, 9, 9];
const ROUTER_V4: [u8; 4] = [192, 0, 2, 1];

/// What the maps hold, without the times they keep (those differ from run to run).
#[derive(Debug, Default, PartialEq, Eq)]
struct Snapshot {
    /// (map, entries) as `wirescope_bpf_map_entries` exports them.
    usage: Vec<(&'static str, u64)>,
    /// Refused updates, per map, only those not zero.
    refused: Vec<(&'static str, u64)>,
    /// (key, packets, bytes) of each counting map, sorted.
    counts: Vec<String>,
    /// Entries of the maps that hold times: pending handshakes, receive sessions, transit
    /// queues and slots, reported MTUs; and the transit histogram's count.
    timed: [usize; 5],
    transit_matched: u64,
    attached: usize,
}

fn snapshot(lab: &Lab) -> Snapshot {
    let dp = &lab.dp;
    let mut usage: Vec<_> = dp.map_usage().into_iter().map(|(m, n, _)| (m, n)).collect();
    usage.sort();
    let mut refused: Vec<_> = dp
        .map_update_errors()
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .collect();
    refused.sort();
    let mut counts: Vec<String> = Vec::new();
    let mut add = |what: &str, v: Vec<(String, u64, u64)>| {
        counts.extend(v.into_iter().map(|(k, p, b)| format!("{what} {k} {p} {b}")));
    };
    let c = |v: Vec<(agent_common::maps::CounterKey, agent_common::maps::Counter)>| {
        v.into_iter()
            .map(|(k, c)| (format!("{k:?}"), c.packets, c.bytes))
            .collect::<Vec<_>>()
    };
    add("counters", c(dp.tunnel.counters().expect("COUNTERS")));
    add("rx_seq", c(dp.health.rx_seq().expect("RX_SEQ")));
    add("fragments", c(dp.path.fragments().expect("FRAGMENTS")));
    add("too_big", c(dp.path.icmp_too_big().expect("ICMP_TOO_BIG")));
    add(
        "unknown_wire",
        dp.wire
            .unknown_wire()
            .expect("UNKNOWN_WIRE")
            .into_iter()
            .map(|(k, c)| (format!("{k:?}"), c.packets, c.bytes))
            .collect(),
    );
    let leaks = dp
        .leak
        .leaks()
        .expect("LEAKS")
        .into_iter()
        .chain(dp.leak.unrenewed().expect("LEAKS"));
    add(
        "leaks",
        leaks
            .map(|(k, c)| (format!("{k:?}"), c.packets, c.bytes))
            .collect(),
    );
    counts.sort();
    let transit_matched = dp
        .transit
        .hist()
        .expect("TRANSIT_HIST")
        .iter()
        .map(|(_, h)| h.count)
        .sum();
    Snapshot {
        usage,
        refused,
        counts,
        timed: [
            dp.health.pending_handshakes().len(),
            dp.health.rx_sessions().len(),
            dp.transit.queues().len(),
            dp.transit.slots().len(),
            dp.path.icmp_mtus().len(),
        ],
        transit_matched,
        attached: dp.attachments().count(),
    }
}

/// The interfaces attached and the peer maps written, as `NetnsLab::enter` does, plus an
/// allowed-IP range for the relay and a `--leak-allow` CIDR.
fn attach(lab: &mut Lab) {
    let (tun, under) = (lab.tun, lab.under);
    lab.dp.attach("lo", tun, TUNNEL_L3).expect("attach lo");
    lab.dp
        .attach("rs-under", under, UNDERLAY_ETH)
        .expect("attach rs-under");
    let mut maps = PeerMaps::default();
    maps.allowed_v4.insert((tun, [10, 7, 0, 0], 16), RELAY);
    maps.endpoints
        .insert(endpoint_key(IpAddr::from(RELAY_V4), RELAY_PORT), RELAY);
    maps.wg_ports.insert(LISTEN_PORT, 1);
    lab.dp.sync_peers(&maps).expect("peer maps");
    lab.dp
        .leak
        .set_allowed(&["198.51.100.0/24".parse().unwrap()])
        .expect("LEAK_ALLOW");
}

/// Something for every feature: an inner packet and its data message (tunnel, wire,
/// transit), a handshake initiation and a received data message (health), a message of an
/// endpoint no peer has, a first fragment and an ICMP too-big (path), a leak while the
/// tunnel is up and one after its deadline.
fn traffic(lab: &mut Lab) {
    let (tun, under) = (lab.tun, lab.under);
    let run = |lab: &mut Lab, prog: &str, ifindex: u32, data: Vec<u8>| {
        run_tc(&mut lab.dp, "reset", prog, ifindex, (0, 0), &data);
    };
    let inner = Ipv4::new(INNER_SRC, INNER_DST).build(IPPROTO_UDP, &udp(4000, 9, &[1; 72]));
    run(lab, PROG_EGRESS, tun, inner);
    let to_relay = |msg: &[u8]| {
        Framing::Ethernet.frame(&wg_ipv4(LOCAL_V4, LISTEN_PORT, RELAY_V4, RELAY_PORT, msg))
    };
    let from_relay = |msg: &[u8]| {
        Framing::Ethernet.frame(&wg_ipv4(RELAY_V4, RELAY_PORT, LOCAL_V4, LISTEN_PORT, msg))
    };
    run(
        lab,
        PROG_EGRESS,
        under,
        to_relay(&wg::data(0x11, 0, 100, 1420)),
    );
    run(lab, PROG_EGRESS, under, to_relay(&wg::initiation(0x22)));
    run(
        lab,
        PROG_INGRESS,
        under,
        from_relay(&wg::data(0x33, 5, 60, 1420)),
    );
    run(
        lab,
        PROG_EGRESS,
        under,
        Framing::Ethernet.frame(&wg_ipv4(
            LOCAL_V4,
            LISTEN_PORT,
            STRANGER_V4,
            51820,
            &wg::keepalive(0x44, 0),
        )),
    );
    let first = Ipv4::new(LOCAL_V4, STRANGER_V4)
        .mf(true)
        .build(IPPROTO_UDP, &udp(4000, 9, &[2; 64]));
    run(lab, PROG_EGRESS, under, Framing::Ethernet.frame(&first));
    let quoted = Ipv4::new(LOCAL_V4, RELAY_V4)
        .df(true)
        .build(IPPROTO_UDP, &udp(LISTEN_PORT, RELAY_PORT, &[3; 1400]));
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&1400u16.to_be_bytes());
    icmp.extend_from_slice(&quoted[..28]);
    let too_big = Ipv4::new(ROUTER_V4, LOCAL_V4).build(IPPROTO_ICMP, &icmp);
    run(lab, PROG_INGRESS, under, Framing::Ethernet.frame(&too_big));
    let dns = Ipv4::new(LOCAL_V4, RESOLVER_V4).build(IPPROTO_UDP, &udp(4000, 53, &[4; 30]));
    let mut up = LeakConfig {
        tunnel_up_until_ns: monotonic_ns() + 60_000_000_000,
        ..LeakConfig::default()
    };
    up.up_ifindexes[0] = tun;
    lab.dp.leak.set_config(up).expect("LEAK_CFG");
    run(lab, PROG_EGRESS, under, Framing::Ethernet.frame(&dns));
    lab.dp.leak.set_tunnel_up_until(1).expect("LEAK_CFG");
    run(lab, PROG_EGRESS, under, Framing::Ethernet.frame(&dns));
}

/// Every error slot of the programs' per-CPU error arrays set to `n` on every CPU, as if
/// each map had refused `n` updates per CPU.
fn set_error_slots(lab: &mut Lab, n: u64) {
    let mut ids = std::collections::BTreeSet::new();
    for name in [
        PROG_INGRESS,
        PROG_EGRESS,
        agent_common::maps::transit::PROG,
        agent_common::maps::leak::PROG,
    ] {
        let prog = lab.dp.program_mut(name).expect("TC program");
        ids.extend(
            prog.info()
                .expect("program info")
                .map_ids()
                .expect("map ids")
                .expect("the kernel lists map ids"),
        );
    }
    let cpus = aya::util::nr_cpus().expect("CPUs");
    let mut arrays = 0;
    for id in ids {
        let data = MapData::from_id(id).expect("map by id");
        let info = data.info().expect("map info");
        let is_errors = info.name_as_str().is_some_and(|s| s.ends_with("ERRORS"));
        if info.map_type().ok() != Some(MapType::PerCpuArray) || !is_errors {
            continue;
        }
        let mut a: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).expect("per-CPU array");
        for i in 0..a.len() {
            let values = PerCpuValues::try_from(vec![n; cpus]).expect("one value per CPU");
            a.set(i, values, 0).expect("set an error slot");
        }
        arrays += 1;
    }
    assert_eq!(
        arrays, 5,
        "MAP_ERRORS, PATH_, LEAK_, TRANSIT_ and OBFS_ERRORS"
    );
}

#[test]
fn a_reset_datapath_reads_as_freshly_loaded() {
    let Some(mut lab) = Lab::enter(
        "the reset test needs root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
        ("rs-under", "rs-other"),
        true,
        &[],
    ) else {
        return;
    };
    // Entered as every test is (attached, peer maps): from nothing, this time.
    lab.dp.reset().expect("reset");
    assert_eq!(
        snapshot(&lab),
        Snapshot {
            usage: snapshot(&lab).usage.iter().map(|(m, _)| (*m, 0)).collect(),
            ..Snapshot::default()
        },
        "reset: empty"
    );
    attach(&mut lab);
    traffic(&mut lab);
    let first = snapshot(&lab);
    // The round counted in every feature.
    for what in [
        "counters",
        "rx_seq",
        "fragments",
        "too_big",
        "unknown_wire",
        "leaks",
    ] {
        assert!(
            first.counts.iter().any(|c| c.starts_with(what)),
            "{what}: {:?}",
            first.counts
        );
    }
    assert!(
        first.timed.iter().all(|n| *n >= 1),
        "pending, sessions, queues, slots, MTUs: {:?}",
        first.timed
    );
    assert_eq!(
        first.transit_matched, 1,
        "the data message matched its packet"
    );
    assert_eq!(first.attached, 2);
    assert_eq!(first.refused, Vec::new(), "nothing refused");

    set_error_slots(&mut lab, 3);
    assert!(
        snapshot(&lab).refused.iter().all(|(_, n)| *n >= 3),
        "refused updates set"
    );
    lab.dp.reset().expect("reset");
    let empty = snapshot(&lab);
    assert_eq!(
        empty,
        Snapshot {
            usage: first.usage.iter().map(|(m, _)| (*m, 0)).collect(),
            ..Snapshot::default()
        },
        "after the reset"
    );

    // The same again, counted exactly the same.
    attach(&mut lab);
    traffic(&mut lab);
    assert_eq!(snapshot(&lab), first, "the second round");
}

/// The relay's entries among `counts` (its `CounterKey`s: COUNTERS and RX_SEQ).
fn of_relay(counts: &[String]) -> Vec<String> {
    let mark = format!("peer: {RELAY},");
    counts
        .iter()
        .filter(|c| c.contains(&mark))
        .cloned()
        .collect()
}

fn entries(s: &Snapshot) -> u64 {
    s.usage.iter().map(|(_, n)| n).sum()
}

/// `Datapath::forget_peers` (issue 15, `--peer-grace`): a forgotten peer leaves no entry in
/// any map (its counters, gaps and late messages, pending handshake, receiving session,
/// transit queue, slots and histogram, pinned id), what is no peer's stays as it was,
/// `PEER_UNKNOWN` is never forgotten, and the same traffic afterwards counts from zero,
/// exactly as the first time.
#[test]
fn a_forgotten_peer_leaves_no_entry_and_counts_from_zero_again() {
    let Some(mut lab) = Lab::enter(
        "the forget test needs root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
        ("rs-under", "rs-other"),
        true,
        &[],
    ) else {
        return;
    };
    lab.dp.reset().expect("reset");
    attach(&mut lab);
    traffic(&mut lab);
    let key = [7u8; 32];
    lab.dp
        .tunnel
        .save_peer_ids(&[("lo".to_string(), key, RELAY)])
        .expect("PEER_IDS");
    let first = snapshot(&lab);
    let relay = of_relay(&first.counts);
    assert!(
        relay.iter().any(|c| c.starts_with("counters"))
            && relay.iter().any(|c| c.starts_with("rx_seq")),
        "the relay counted: {relay:?}"
    );
    assert!(
        first.timed[..4].iter().all(|n| *n >= 1),
        "{:?}",
        first.timed
    );

    // Id 0 is "no peer": nothing of it goes, whatever is asked.
    let unknown = [("lo".to_string(), key, agent_common::maps::PEER_UNKNOWN)];
    assert_eq!(
        lab.dp
            .forget_peers(&[agent_common::maps::PEER_UNKNOWN].into(), &unknown)
            .expect("forget 0"),
        0
    );
    assert_eq!(snapshot(&lab), first, "PEER_UNKNOWN is never forgotten");

    let removed = lab
        .dp
        .forget_peers(&[RELAY].into(), &[("lo".to_string(), key, RELAY)])
        .expect("forget the relay");
    let after = snapshot(&lab);
    assert_eq!(
        removed,
        entries(&first) - entries(&after),
        "every entry removed is counted"
    );
    let mut rest = first.counts.clone();
    rest.retain(|c| !relay.contains(c));
    assert_eq!(after.counts, rest, "what is no peer's stays");
    assert_eq!(
        after.timed,
        [0, 0, 0, 0, first.timed[4]],
        "pending, sessions, queues, slots gone; the reported MTU (an address's) stays"
    );
    assert_eq!(after.transit_matched, 0, "the transit histogram");
    let usage = |s: &Snapshot, map: &str| s.usage.iter().find(|(m, _)| *m == map).map(|u| u.1);
    assert_eq!(
        (usage(&first, "PEER_IDS"), usage(&after, "PEER_IDS")),
        (Some(1), Some(0))
    );
    assert!(
        lab.dp.tunnel.saved_peer_ids().is_empty(),
        "no pinned id left for a restarted agent"
    );
    // Forgotten again: nothing left to remove.
    assert_eq!(
        lab.dp
            .forget_peers(&[RELAY].into(), &[("lo".to_string(), key, RELAY)])
            .expect("forget again"),
        0
    );

    // The same traffic again: the relay's entries as the first time, from zero.
    traffic(&mut lab);
    let again = snapshot(&lab);
    assert_eq!(of_relay(&again.counts), relay, "counted from zero");
    assert_eq!(again.timed[..4], first.timed[..4]);
    assert_eq!(again.transit_matched, 1);
    assert_eq!(again.refused, Vec::new(), "nothing refused");
}
