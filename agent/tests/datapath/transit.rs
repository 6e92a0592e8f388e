//! `BPF_PROG_TEST_RUN` tests of the transit-time matching (`wirescope_tunnel_transit_seconds`,
//! `agent_common::maps::transit`): an inner packet on the tunnel interface is matched with
//! its WireGuard data message on the underlay, per (peer, direction), in order, by padded
//! length. Same approach as the whole tier (`main.rs` explains what test_run does with the
//! input) and `health.rs`: each test enters a fresh network namespace on its own thread,
//! where one end of a veth pair is the WireGuard interface (TUNNEL | L3) and one end of
//! another the underlay (UNDERLAY, Ethernet), attached through `Datapath::attach` (veth,
//! not dummy: kernels without the dummy driver are common in CI); the interfaces are
//! down, so only the test runs reach the programs. The tests compare the exact transit
//! histogram counts (summed per (ifindex, peer, direction)) and the slots left in flight.
//!
//! Needs root and BPF; without root the tests print why and pass, except with CI=true.
//! Run: `cargo test -p wirescope --test datapath -- --test-threads=1 transit::`.

use crate::common;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use agent_common::{
    fixtures::{Framing, tcp_ipv4, udp_ipv4, udp_ipv6, wg, wg_ipv4},
    maps::{
        DIR_RX, DIR_TX, log2_bucket,
        transit::{LOOKAHEAD, LOOKBEHIND, STALE_NS, Slot},
    },
};
use common::{
    Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT, TUNNEL_L3, UNDERLAY_ETH, ifindex, ip_cmd, v6,
};
use wirescope::{datapath::PeerMaps, datapath::monotonic_ns, sync::endpoint_key};

/// Peer P: allowed IPs 10.1.0.0/16, endpoint 203.0.113.10:51820.
const P: u32 = 1;
/// Peer Q: allowed IPs 10.2.0.0/16, endpoint 203.0.113.20:51820.
const Q: u32 = 2;

/// An address in P's and Q's allowed IPs.
const P_HOST: [u8; 4] = [10, 1, 0, 5];
const Q_HOST: [u8; 4] = [10, 2, 0, 5];
/// An address in nobody's allowed IPs.
const NOBODY_HOST: [u8; 4] = [10, 3, 0, 5];
/// The tunnel address of this host.
const CLIENT_V4: [u8; 4] = [10, 64, 1, 2];
/// P's allowed IPs also hold fd00:1::/32.
fn p_host_v6() -> [u8; 16] {
    v6("fd00:1::5")
}
fn client_v6() -> [u8; 16] {
    v6("fd00:40::2")
}

const P_ENDPOINT: [u8; 4] = common::RELAY_V4;
const Q_ENDPOINT: [u8; 4] = [203, 0, 113, 20];
/// The tunnel MTU the data messages are padded for.
const MTU: u32 = 1420;

/// A slot older than this at a sweep is deleted by `TransitMaps::expire` (STALE_NS plus the
/// agent's 1 s margin).
const SWEEP_AGE_NS: u64 = STALE_NS + 1_000_000_000;

/// A peer as the tests see it: a host in its allowed IPs, its endpoint.
#[derive(Clone, Copy)]
struct Peer {
    host: [u8; 4],
    endpoint: [u8; 4],
}

const PEER_P: Peer = Peer {
    host: P_HOST,
    endpoint: P_ENDPOINT,
};
const PEER_Q: Peer = Peer {
    host: Q_HOST,
    endpoint: Q_ENDPOINT,
};

/// (ifindex, peer, dir) -> (count, sum_ns).
type Hist = BTreeMap<(u32, u32, u8), (u64, u64)>;

struct Lab {
    dp: common::Lent,
    tun: u32,
    under: u32,
    /// The data-message counter, per receiver index (only for realism: transit ignores it).
    counter: u64,
}

impl Lab {
    fn new() -> Option<Lab> {
        if !common::privileged(
            "the transit tests need root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
        ) {
            return None;
        }
        // veth pairs (the kernels these tests run on may lack the dummy driver); the
        // other ends are not watched.
        let (tun, _) = common::netns_with_veth("trn-tun", "trn-tun-o");
        ip_cmd(&[
            "link",
            "add",
            "name",
            "trn-under",
            "type",
            "veth",
            "peer",
            "name",
            "trn-under-o",
        ]);
        let under = ifindex("trn-under");
        let mut dp = common::load_attached(&[
            ("trn-tun", tun, TUNNEL_L3),
            ("trn-under", under, UNDERLAY_ETH),
        ]);
        let mut maps = PeerMaps::default();
        maps.allowed_v4.insert((tun, [10, 1, 0, 0], 16), P);
        maps.allowed_v4.insert((tun, [10, 2, 0, 0], 16), Q);
        maps.allowed_v6.insert((tun, v6("fd00:1::"), 32), P);
        maps.endpoints.insert(
            endpoint_key(IpAddr::V4(Ipv4Addr::from(P_ENDPOINT)), RELAY_PORT),
            P,
        );
        maps.endpoints.insert(
            endpoint_key(IpAddr::V4(Ipv4Addr::from(Q_ENDPOINT)), RELAY_PORT),
            Q,
        );
        maps.wg_ports.insert(LISTEN_PORT, 1);
        dp.sync_peers(&maps).expect("writing the peer maps");
        Some(Lab {
            dp,
            tun,
            under,
            counter: 0,
        })
    }

    /// One BPF_PROG_TEST_RUN of the `dir` program on `data` as seen on `ifindex`, with the
    /// checks every run gets: the observer's verdict, the packet unchanged, no refused map
    /// update.
    fn run(&mut self, dir: Dir, ifindex: u32, gso: (u32, u32), data: &[u8]) {
        let what = "transit";
        let out = common::run_tc(&mut self.dp, what, dir.prog(), ifindex, gso, data);
        common::assert_unchanged(what, dir.prog(), data, &out);
        common::assert_no_refused_updates(&self.dp, what);
    }

    /// An inner IPv4/UDP packet of exactly `len` bytes between this host and `peer`'s host,
    /// on the tunnel in direction `dir`.
    fn inner(&mut self, dir: Dir, peer: Peer, len: usize) {
        let (src, dst) = dir.flow((CLIENT_V4, 40000), (peer.host, 443));
        let pkt = udp_ipv4(src.0, src.1, dst.0, dst.1, len);
        assert_eq!(pkt.len(), len);
        let tun = self.tun;
        self.run(dir, tun, (0, 0), &pkt);
    }

    /// The UDP payload `msg` between this host and `peer`'s endpoint on the underlay.
    fn wire(&mut self, dir: Dir, peer: Peer, gso: (u32, u32), msg: &[u8]) {
        let (src, dst) = dir.flow((LOCAL_V4, LISTEN_PORT), (peer.endpoint, RELAY_PORT));
        let frame = Framing::Ethernet.frame(&wg_ipv4(src.0, src.1, dst.0, dst.1, msg));
        let under = self.under;
        self.run(dir, under, gso, &frame);
    }

    /// A data message whose padded plaintext is `padded` bytes (UDP payload 32 + padded).
    fn data_msg(&mut self, padded: u32) -> Vec<u8> {
        self.counter += 1;
        let msg = wg::data_with_plaintext(0x5151_0000, self.counter, padded);
        assert_eq!(msg.len() as u32, 32 + padded);
        msg
    }

    /// A data message with padded plaintext `padded` to or from `peer`'s endpoint.
    fn message(&mut self, dir: Dir, peer: Peer, padded: u32) {
        let msg = self.data_msg(padded);
        self.wire(dir, peer, (0, 0), &msg);
    }

    /// The message WireGuard makes of an inner packet of `inner` bytes (tunnel MTU 1420).
    fn message_for(&mut self, dir: Dir, peer: Peer, inner: u32) {
        self.message(dir, peer, wg::padded_len(inner, MTU));
    }

    /// The transit histogram per (ifindex, peer, dir): (count, sum_ns). Checks every entry's
    /// bucket against its sum when it holds one observation.
    fn hist(&self) -> Hist {
        let mut out = Hist::new();
        for (k, v) in self.dp.transit.hist().expect("TRANSIT_HIST") {
            assert_eq!(k._pad, [0; 2]);
            if v.count == 1 {
                assert_eq!(k.bucket, log2_bucket(v.sum_ns), "{k:?}: {v:?}");
            }
            let e = out.entry((k.ifindex, k.peer, k.dir)).or_default();
            e.0 += v.count;
            e.1 += v.sum_ns;
        }
        out
    }

    /// (ifindex, peer, dir) -> count.
    fn counts(&self) -> BTreeMap<(u32, u32, u8), u64> {
        self.hist().into_iter().map(|(k, v)| (k, v.0)).collect()
    }

    /// The slots in flight, as (peer, dir, number, slot), in queue order.
    fn slots(&self) -> Vec<(u32, u8, u64, Slot)> {
        let mut v: Vec<_> = self
            .dp
            .transit
            .slots()
            .into_iter()
            .map(|(k, s)| {
                assert_eq!(
                    k.slot as u64,
                    s.number % agent_common::maps::transit::RING,
                    "{k:?} holds {s:?}"
                );
                (k.peer, k.dir, s.number, s)
            })
            .collect();
        v.sort_by_key(|(p, d, n, _)| (*p, *d, *n));
        v
    }

    /// The slots in flight as (peer, dir, len, left), in queue order.
    fn slot_lens(&self) -> Vec<(u32, u8, u32, u64)> {
        self.slots()
            .into_iter()
            .map(|(p, d, _, s)| (p, d, s.len, s.left))
            .collect()
    }

    /// The queues as (peer, dir) -> (head, tail).
    fn queues(&self) -> BTreeMap<(u32, u8), (u64, u64)> {
        self.dp
            .transit
            .queues()
            .into_iter()
            .map(|(k, q)| ((k.peer, k.dir), (q.head, q.tail)))
            .collect()
    }
}

fn counts(entries: &[((u32, u32, u8), u64)]) -> BTreeMap<(u32, u32, u8), u64> {
    entries.iter().copied().collect()
}

#[test]
fn tx_matches_in_order_by_padded_length() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, under) = (lab.tun, lab.under);
    assert_ne!(tun, under);

    // Nothing queued: a data message leaving observes nothing and creates no queue.
    lab.message(Dir::Tx, PEER_P, 96);
    assert!(lab.counts().is_empty());
    assert!(lab.queues().is_empty(), "{:?}", lab.queues());

    lab.inner(Dir::Tx, PEER_P, 84);
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 84, 1)]);
    let (_, _, _, s) = lab.slots()[0];
    assert_eq!((s.ifindex, s.last_len, s.number), (tun, 84, 0));
    // A padded length nothing fits (too short, or past the 16-byte round-up) observes
    // nothing and leaves the queue as it was.
    for padded in [64, 80, 112] {
        lab.message(Dir::Tx, PEER_P, padded);
        assert!(lab.counts().is_empty(), "padded {padded}");
        assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 84, 1)], "padded {padded}");
        assert_eq!(lab.queues()[&(P, DIR_TX)], (0, 1), "padded {padded}");
    }
    // A keepalive (UDP payload 32) never matches.
    lab.wire(Dir::Tx, PEER_P, (0, 0), &wg::keepalive(0x5151_0000, 99));
    assert!(lab.counts().is_empty());
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 84, 1)]);

    lab.inner(Dir::Tx, PEER_P, 100);
    lab.inner(Dir::Tx, PEER_P, 1420);
    assert_eq!(
        lab.slot_lens(),
        vec![
            (P, DIR_TX, 84, 1),
            (P, DIR_TX, 100, 1),
            (P, DIR_TX, 1420, 1)
        ]
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (0, 3));
    lab.message(Dir::Tx, PEER_P, 96);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 1)]));
    assert_eq!(
        lab.slot_lens(),
        vec![(P, DIR_TX, 100, 1), (P, DIR_TX, 1420, 1)]
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (1, 3));
    lab.message(Dir::Tx, PEER_P, 112);
    lab.message(Dir::Tx, PEER_P, 1420);
    // Attributed to the tunnel the packets left (not the underlay), to P, tx.
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 3)]));
    assert!(lab.slots().is_empty(), "{:?}", lab.slots());
    assert_eq!(lab.queues()[&(P, DIR_TX)], (3, 3));
    // The queue is empty: one more message observes nothing.
    lab.message(Dir::Tx, PEER_P, 96);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 3)]));

    // In order: two packets the same message fits; the first is taken, the second waits.
    lab.inner(Dir::Tx, PEER_P, 84);
    lab.inner(Dir::Tx, PEER_P, 90);
    lab.message_for(Dir::Tx, PEER_P, 84);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 4)]));
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 90, 1)]);
    lab.message_for(Dir::Tx, PEER_P, 90);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 5)]));
    assert!(lab.slots().is_empty());

    // At the MTU, padding stops short of the next multiple of 16: 1419 -> 1420.
    lab.inner(Dir::Tx, PEER_P, 1419);
    lab.message_for(Dir::Tx, PEER_P, 1419);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 6)]));
    assert!(lab.slots().is_empty());

    // Packets to nobody's allowed IPs are not queued.
    let pkt = udp_ipv4(CLIENT_V4, 40000, NOBODY_HOST, 443, 84);
    lab.run(Dir::Tx, tun, (0, 0), &pkt);
    assert!(lab.slots().is_empty());
    assert_eq!(lab.queues().len(), 1, "{:?}", lab.queues());
}

/// A packet WireGuard dropped is passed over when a later one matches; its slot is kept
/// (its message may only be late: reordered) and matched from behind the head by up to
/// LOOKBEHIND places, and swept once stale.
#[test]
fn a_dropped_packet_is_passed_over() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    let tx = |n| counts(&[((tun, P, DIR_TX), n)]);
    for len in [100, 200, 300] {
        lab.inner(Dir::Tx, PEER_P, len);
    }
    lab.message_for(Dir::Tx, PEER_P, 200);
    assert_eq!(lab.counts(), tx(1));
    assert_eq!(
        lab.slot_lens(),
        vec![(P, DIR_TX, 100, 1), (P, DIR_TX, 300, 1)],
        "the 100 was passed over and is kept"
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (2, 3));
    lab.message_for(Dir::Tx, PEER_P, 300);
    assert_eq!(lab.counts(), tx(2));
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 100, 1)]);
    assert_eq!(lab.queues()[&(P, DIR_TX)], (3, 3));
    // Its message after all (reordered): matched from behind the head, which stays.
    lab.message_for(Dir::Tx, PEER_P, 100);
    assert_eq!(lab.counts(), tx(3));
    assert!(lab.slots().is_empty(), "{:?}", lab.slots());
    assert_eq!(lab.queues()[&(P, DIR_TX)], (3, 3));

    // The lookahead is LOOKAHEAD slots: a match LOOKAHEAD - 1 slots past the head passes
    // over LOOKAHEAD - 1 (numbers 3 ..= LOOKAHEAD + 1; their padded lengths 112, 128, ..
    // are distinct, and none is the 1300's).
    let la = LOOKAHEAD as u64;
    let distinct = |n: u64| (0..n).map(|i| 100 + 16 * i as u32).collect::<Vec<u32>>();
    let dropped = distinct(la - 1);
    for &len in dropped.iter().chain(&[1300]) {
        lab.inner(Dir::Tx, PEER_P, len as usize);
    }
    lab.message_for(Dir::Tx, PEER_P, 1300);
    assert_eq!(lab.counts(), tx(4));
    assert_eq!(
        lab.slot_lens(),
        dropped
            .iter()
            .map(|&len| (P, DIR_TX, len, 1))
            .collect::<Vec<_>>(),
        "the passed-over slots are kept"
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (3 + la, 3 + la));
    // Two more in order: the head moves on by two.
    for _ in 0..2 {
        lab.inner(Dir::Tx, PEER_P, 1300);
        lab.message_for(Dir::Tx, PEER_P, 1300);
    }
    assert_eq!(lab.counts(), tx(6));
    let head = 5 + la;
    assert_eq!(lab.queues()[&(P, DIR_TX)], (head, head));
    // Behind the head, LOOKBEHIND places are in sight: the last passed over (number
    // LOOKAHEAD + 1) and the one LOOKBEHIND places back match late...
    const _: () = assert!(LOOKBEHIND <= LOOKAHEAD + 1 && LOOKBEHIND > 4);
    let in_sight = (head - LOOKBEHIND as u64 - 3) as usize;
    let (last, farthest) = (dropped[dropped.len() - 1], dropped[in_sight]);
    lab.message_for(Dir::Tx, PEER_P, last);
    lab.message_for(Dir::Tx, PEER_P, farthest);
    assert_eq!(lab.counts(), tx(8));
    // ... the first (number 3) is out of sight.
    lab.message_for(Dir::Tx, PEER_P, dropped[0]);
    assert_eq!(lab.counts(), tx(8));
    let left: Vec<u32> = dropped
        .iter()
        .copied()
        .filter(|&l| l != last && l != farthest)
        .collect();
    assert_eq!(
        lab.slot_lens(),
        left.iter()
            .map(|&len| (P, DIR_TX, len, 1))
            .collect::<Vec<_>>()
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (head, head));

    // LOOKAHEAD slots past the head is out of sight too: nothing matches, nothing moves.
    let ahead = distinct(la);
    for &len in ahead.iter().chain(&[1300]) {
        lab.inner(Dir::Tx, PEER_P, len as usize);
    }
    let after = monotonic_ns();
    lab.message_for(Dir::Tx, PEER_P, 1300);
    assert_eq!(lab.counts(), tx(8));
    assert_eq!(lab.slots().len(), left.len() + ahead.len() + 1);
    assert_eq!(lab.queues()[&(P, DIR_TX)], (head, head + la + 1));

    // The agent's sweep deletes what is left once stale.
    assert_eq!(
        lab.dp.transit.expire(after + SWEEP_AGE_NS + 1).0,
        (left.len() + ahead.len() + 1) as u64
    );
    assert!(lab.slots().is_empty(), "{:?}", lab.slots());
}

#[test]
fn rx_matches_the_message_with_its_inner_packet() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, under) = (lab.tun, lab.under);
    // An inner packet with no message before it: nothing.
    lab.inner(Dir::Rx, PEER_P, 84);
    assert!(lab.counts().is_empty());

    lab.message(Dir::Rx, PEER_P, 96);
    assert_eq!(lab.slot_lens(), vec![(P, DIR_RX, 96, 1)]);
    let (_, _, _, s) = lab.slots()[0];
    assert_eq!(
        s.ifindex, 0,
        "rx slots leave the ifindex to the tunnel side"
    );
    // An inner packet the message cannot carry (its padding would be 112): nothing.
    lab.inner(Dir::Rx, PEER_P, 100);
    assert!(lab.counts().is_empty());
    assert_eq!(lab.slot_lens(), vec![(P, DIR_RX, 96, 1)]);
    // From nobody's allowed IPs: nothing.
    let pkt = udp_ipv4(NOBODY_HOST, 443, CLIENT_V4, 40000, 84);
    lab.run(Dir::Rx, tun, (0, 0), &pkt);
    assert!(lab.counts().is_empty());
    // The inner packet: one rx observation, on the tunnel (not the underlay).
    lab.inner(Dir::Rx, PEER_P, 84);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_RX), 1)]));
    assert!(!lab.counts().contains_key(&(under, P, DIR_RX)));
    assert!(lab.slots().is_empty(), "{:?}", lab.slots());
    assert_eq!(lab.queues()[&(P, DIR_RX)], (1, 1));

    // Keepalives arriving queue nothing.
    lab.wire(Dir::Rx, PEER_P, (0, 0), &wg::keepalive(0x5151_0000, 50));
    assert!(lab.slots().is_empty());
    // A message whose inner packet comes later than the next one's (reordered) is passed
    // over, kept, and matched from behind the head when its packet arrives.
    lab.message(Dir::Rx, PEER_P, 208);
    lab.message(Dir::Rx, PEER_P, 1420);
    lab.inner(Dir::Rx, PEER_P, 1420);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_RX), 2)]));
    assert_eq!(lab.slot_lens(), vec![(P, DIR_RX, 208, 1)]);
    assert_eq!(lab.queues()[&(P, DIR_RX)], (3, 3));
    lab.inner(Dir::Rx, PEER_P, 200);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_RX), 3)]));
    assert!(lab.slots().is_empty(), "{:?}", lab.slots());
}

#[test]
fn peers_and_directions_do_not_mix() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    lab.inner(Dir::Tx, PEER_P, 84);
    lab.inner(Dir::Tx, PEER_Q, 100);
    // Q's message of 96 fits P's packet, not Q's: nothing.
    lab.message(Dir::Tx, PEER_Q, 96);
    assert!(lab.counts().is_empty());
    // A packet arriving from P does not take P's tx slot.
    lab.inner(Dir::Rx, PEER_P, 84);
    assert!(lab.counts().is_empty());
    // A message arriving from P does not take P's tx slot either; it queues for rx.
    lab.message(Dir::Rx, PEER_P, 96);
    assert!(lab.counts().is_empty());
    lab.message(Dir::Rx, PEER_Q, 112);
    assert_eq!(
        lab.slot_lens(),
        vec![
            (P, DIR_RX, 96, 1),
            (P, DIR_TX, 84, 1),
            (Q, DIR_RX, 112, 1),
            (Q, DIR_TX, 100, 1)
        ]
    );
    lab.message(Dir::Tx, PEER_Q, 112);
    assert_eq!(lab.counts(), counts(&[((tun, Q, DIR_TX), 1)]));
    lab.inner(Dir::Rx, PEER_Q, 100);
    lab.message(Dir::Tx, PEER_P, 96);
    lab.inner(Dir::Rx, PEER_P, 84);
    assert_eq!(
        lab.counts(),
        counts(&[
            ((tun, P, DIR_TX), 1),
            ((tun, P, DIR_RX), 1),
            ((tun, Q, DIR_TX), 1),
            ((tun, Q, DIR_RX), 1),
        ])
    );
    assert!(lab.slots().is_empty(), "{:?}", lab.slots());

    // Interleaved traffic, several of each.
    for _ in 0..3 {
        lab.inner(Dir::Tx, PEER_P, 84);
        lab.message(Dir::Rx, PEER_Q, 1420);
        lab.inner(Dir::Tx, PEER_Q, 500);
        lab.message(Dir::Rx, PEER_P, 96);
    }
    for _ in 0..3 {
        lab.message_for(Dir::Tx, PEER_Q, 500);
        lab.inner(Dir::Rx, PEER_P, 90);
        lab.message_for(Dir::Tx, PEER_P, 84);
    }
    lab.inner(Dir::Rx, PEER_Q, 1420);
    assert_eq!(
        lab.counts(),
        counts(&[
            ((tun, P, DIR_TX), 4),
            ((tun, P, DIR_RX), 4),
            ((tun, Q, DIR_TX), 4),
            ((tun, Q, DIR_RX), 2),
        ])
    );
    assert_eq!(
        lab.slot_lens(),
        vec![(Q, DIR_RX, 1420, 1), (Q, DIR_RX, 1420, 1)]
    );
}

#[test]
fn stale_and_idle_state_is_swept() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;

    // A queue left empty (its packet matched): kept at the first sweep, deleted at the
    // second without traffic in between.
    lab.inner(Dir::Tx, PEER_Q, 84);
    lab.message(Dir::Tx, PEER_Q, 96);
    assert_eq!(lab.counts(), counts(&[((tun, Q, DIR_TX), 1)]));
    assert_eq!(lab.queues(), BTreeMap::from([((Q, DIR_TX), (1, 1))]));
    let now = monotonic_ns();
    assert_eq!(lab.dp.transit.expire(now), (0, 0));
    assert_eq!(lab.queues().len(), 1);
    // Traffic in between (tail moved): remembered anew, not deleted.
    lab.inner(Dir::Tx, PEER_Q, 84);
    lab.message(Dir::Tx, PEER_Q, 96);
    assert_eq!(lab.dp.transit.expire(now), (0, 0));
    assert_eq!(lab.queues(), BTreeMap::from([((Q, DIR_TX), (2, 2))]));
    assert_eq!(lab.dp.transit.expire(now), (0, 1));
    assert!(lab.queues().is_empty(), "{:?}", lab.queues());
    // The next packet makes the queue anew and matches as before.
    lab.inner(Dir::Tx, PEER_Q, 84);
    lab.message(Dir::Tx, PEER_Q, 96);
    assert_eq!(lab.counts(), counts(&[((tun, Q, DIR_TX), 3)]));
    assert_eq!(lab.queues(), BTreeMap::from([((Q, DIR_TX), (1, 1))]));
    assert_eq!(lab.dp.transit.expire(monotonic_ns()), (0, 0));
    assert_eq!(lab.dp.transit.expire(monotonic_ns()), (0, 1));

    // A packet never matched: its slot is swept once older than STALE_NS + 1 s, and not
    // before. bpf_ktime_get_ns is CLOCK_MONOTONIC, so start_ns is within [before, after].
    let before = monotonic_ns();
    lab.inner(Dir::Tx, PEER_P, 84);
    let after = monotonic_ns();
    let (_, _, _, s) = lab.slots()[0];
    assert!(
        (before..=after).contains(&s.start_ns),
        "start_ns {} not within [{before}, {after}]: not CLOCK_MONOTONIC?",
        s.start_ns
    );
    assert_eq!(lab.dp.transit.expire(before + SWEEP_AGE_NS).0, 0);
    assert_eq!(lab.slots().len(), 1);
    assert_eq!(lab.dp.transit.expire(after + SWEEP_AGE_NS + 1).0, 1);
    assert!(lab.slots().is_empty(), "{:?}", lab.slots());
    assert!(
        lab.counts().keys().all(|k| k.1 != P),
        "nothing observed for P"
    );
    // Its message after all: nothing (the slot is gone), and the queue moves past it.
    lab.message(Dir::Tx, PEER_P, 96);
    assert!(lab.counts().keys().all(|k| k.1 != P));
    assert_eq!(lab.queues()[&(P, DIR_TX)], (1, 1));
}

/// The programs pass over a slot older than STALE_NS themselves (2 s: this test sleeps).
#[test]
fn a_stale_packet_matches_nothing() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    lab.inner(Dir::Tx, PEER_P, 84);
    lab.message(Dir::Rx, PEER_P, 96);
    std::thread::sleep(Duration::from_nanos(STALE_NS) + Duration::from_millis(50));
    lab.inner(Dir::Tx, PEER_P, 100);
    lab.message(Dir::Tx, PEER_P, 96);
    lab.inner(Dir::Rx, PEER_P, 84);
    assert!(lab.counts().is_empty(), "{:?}", lab.counts());
    assert_eq!(
        lab.slot_lens(),
        vec![(P, DIR_TX, 100, 1)],
        "the stale slots are deleted, the fresh one stays"
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (1, 2));
    assert_eq!(lab.queues()[&(P, DIR_RX)], (1, 1));
    lab.message(Dir::Tx, PEER_P, 112);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 1)]));
}

#[test]
fn a_pair_matched_at_once_takes_less_than_a_second() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    let t0 = monotonic_ns();
    lab.inner(Dir::Tx, PEER_P, 84);
    lab.message(Dir::Tx, PEER_P, 96);
    let t1 = monotonic_ns();
    lab.message(Dir::Rx, PEER_P, 96);
    lab.inner(Dir::Rx, PEER_P, 84);
    let t2 = monotonic_ns();
    let hist = lab.hist();
    assert_eq!(hist.len(), 2, "{hist:?}");
    let (count, tx_ns) = hist[&(tun, P, DIR_TX)];
    assert_eq!(count, 1);
    let (count, rx_ns) = hist[&(tun, P, DIR_RX)];
    assert_eq!(count, 1);
    eprintln!(
        "transit of a pair matched at once: tx {tx_ns} ns (wall {} ns), rx {rx_ns} ns (wall {} ns)",
        t1 - t0,
        t2 - t1
    );
    for (ns, wall) in [(tx_ns, t1 - t0), (rx_ns, t2 - t1)] {
        assert!(ns > 0 && ns < 1_000_000_000, "{ns} ns");
        assert!(ns <= wall, "{ns} ns observed, {wall} ns between the runs");
    }
}

/// A TCP GSO super-packet on the tunnel is one slot expecting one message per segment: full
/// segments of gso_size, then the last one's length.
#[test]
fn a_gso_packet_matches_one_message_per_segment() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    // 20 + 20 + 2600 bytes: segments of 40 + 1000, 40 + 1000 and 40 + 600.
    let pkt = tcp_ipv4(CLIENT_V4, 40000, P_HOST, 443, 0, 2600);
    lab.run(Dir::Tx, tun, (3, 1000), &pkt);
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 1040, 3)]);
    assert_eq!(lab.slots()[0].3.last_len, 640);
    // A later packet waits behind it.
    lab.inner(Dir::Tx, PEER_P, 84);
    lab.message_for(Dir::Tx, PEER_P, 1040);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 1)]));
    assert_eq!(
        lab.slot_lens(),
        vec![(P, DIR_TX, 1040, 2), (P, DIR_TX, 84, 1)]
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (0, 2), "the head stays on it");
    lab.message_for(Dir::Tx, PEER_P, 1040);
    assert_eq!(
        lab.slot_lens(),
        vec![(P, DIR_TX, 1040, 1), (P, DIR_TX, 84, 1)]
    );
    lab.message_for(Dir::Tx, PEER_P, 640);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 3)]));
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 84, 1)]);
    assert_eq!(lab.queues()[&(P, DIR_TX)], (1, 2));
    lab.message_for(Dir::Tx, PEER_P, 84);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 4)]));
    assert!(lab.slots().is_empty());

    // With TCP options (12 bytes) and equal segments: 3 x (52 + 1000).
    let pkt = tcp_ipv4(CLIENT_V4, 40000, P_HOST, 443, 12, 3000);
    lab.run(Dir::Tx, tun, (3, 1000), &pkt);
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 1052, 3)]);
    assert_eq!(lab.slots()[0].3.last_len, 1052);
    for _ in 0..3 {
        lab.message_for(Dir::Tx, PEER_P, 1052);
    }
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_TX), 7)]));
    assert!(lab.slots().is_empty());
    // gso_segs 1 is one packet of its own length.
    let pkt = tcp_ipv4(CLIENT_V4, 40000, P_HOST, 443, 0, 1000);
    lab.run(Dir::Tx, tun, (1, 1000), &pkt);
    assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, 1040, 1)]);
}

/// UDP GSO on the underlay (wireguard-go sends batches of data messages in one skb; the UDP
/// length then covers the whole batch, gso_size is one message) and UDP GRO on rx: each
/// message of the batch is one message to match, of gso_size bytes, leaving and arriving.
#[test]
fn udp_gso_batches_match_each_message_both_ways() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    // tx: two inner packets of 1000 bytes, then one skb carrying both messages.
    lab.inner(Dir::Tx, PEER_P, 1000);
    lab.inner(Dir::Tx, PEER_P, 1000);
    let msg = wg::data(0x5151_0000, 1, 1000, MTU);
    assert_eq!(msg.len(), 32 + 1008);
    let batch = [msg.clone(), msg.clone()].concat();
    lab.wire(Dir::Tx, PEER_P, (2, msg.len() as u32), &batch);
    let tx = lab.counts();
    // rx: one GRO skb of two messages, then their two inner packets.
    lab.wire(Dir::Rx, PEER_P, (2, msg.len() as u32), &batch);
    lab.inner(Dir::Rx, PEER_P, 1000);
    lab.inner(Dir::Rx, PEER_P, 1000);
    let all = lab.counts();
    assert_eq!(
        (tx, all, lab.slot_lens()),
        (
            counts(&[((tun, P, DIR_TX), 2)]),
            counts(&[((tun, P, DIR_TX), 2), ((tun, P, DIR_RX), 2)]),
            vec![]
        ),
        "(tx counts after the GSO batch, all counts, slots left)"
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (2, 2));

    // A TCP GSO packet of 3 segments of 40 + 100 bytes (one slot expecting 3) and a packet
    // of 140 after it, then one UDP GSO batch of all 4 messages: 4 matches, nothing left.
    let pkt = tcp_ipv4(CLIENT_V4, 40000, P_HOST, 443, 0, 300);
    lab.run(Dir::Tx, tun, (3, 100), &pkt);
    lab.inner(Dir::Tx, PEER_P, 140);
    assert_eq!(
        lab.slot_lens(),
        vec![(P, DIR_TX, 140, 3), (P, DIR_TX, 140, 1)]
    );
    let m = wg::data(0x5151_0000, 2, 140, MTU);
    assert_eq!(m.len(), 32 + 144);
    let batch = [m.clone(), m.clone(), m.clone(), m.clone()].concat();
    lab.wire(Dir::Tx, PEER_P, (4, m.len() as u32), &batch);
    assert_eq!(
        (lab.counts()[&(tun, P, DIR_TX)], lab.slot_lens()),
        (6, vec![]),
        "(tx matches, slots left)"
    );
    assert_eq!(lab.queues()[&(P, DIR_TX)], (4, 4));
}

/// wireguard-go since 0.0.20230223 writes the TCP segments it decrypted to its TUN as one
/// coalesced skb (gso_size set, gso_segs 0): each segment is the inner packet of its own
/// message, matched in order; a message whose packet was lost is passed over; of a batch of
/// more than MAX_BATCH (64), the first 64 are matched. (Small segments: BPF_PROG_TEST_RUN
/// takes at most about a page of packet; the lab sends real 64 KiB writes.)
#[test]
fn a_coalesced_tun_write_matches_each_segments_message() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    // Three messages, and a lost packet's message between the first two: segments of
    // 40 + 100, 40 + 100 and 40 + 60 in one write.
    lab.message_for(Dir::Rx, PEER_P, 140);
    lab.message_for(Dir::Rx, PEER_P, 84);
    lab.message_for(Dir::Rx, PEER_P, 140);
    lab.message_for(Dir::Rx, PEER_P, 100);
    let pkt = tcp_ipv4(P_HOST, 443, CLIENT_V4, 40000, 0, 260);
    lab.run(Dir::Rx, tun, (0, 100), &pkt);
    assert_eq!(
        (lab.counts(), lab.slot_lens()),
        (counts(&[((tun, P, DIR_RX), 3)]), vec![(P, DIR_RX, 96, 1)]),
        "(rx matches, slots left: the lost packet's message)"
    );
    assert_eq!(lab.queues()[&(P, DIR_RX)], (4, 4));

    // 47 segments (as many as a 64 KiB write holds at a 1420 MTU) of 40 + 20 bytes, each
    // the plaintext of a message of 64 padded bytes.
    for _ in 0..47 {
        lab.message_for(Dir::Rx, PEER_P, 60);
    }
    let pkt = tcp_ipv4(P_HOST, 443, CLIENT_V4, 40000, 0, 47 * 20);
    lab.run(Dir::Rx, tun, (0, 20), &pkt);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_RX), 3 + 47)]));
    assert_eq!(lab.slot_lens(), vec![(P, DIR_RX, 96, 1)]);
    assert_eq!(lab.queues()[&(P, DIR_RX)], (51, 51));

    // 70 segments of 40 + 10: the first 64 are matched, 6 are left.
    for _ in 0..70 {
        lab.message_for(Dir::Rx, PEER_P, 50);
    }
    let pkt = tcp_ipv4(P_HOST, 443, CLIENT_V4, 40000, 0, 70 * 10);
    lab.run(Dir::Rx, tun, (0, 10), &pkt);
    assert_eq!(lab.counts(), counts(&[((tun, P, DIR_RX), 3 + 47 + 64)]));
    let mut left = vec![(P, DIR_RX, 96, 1)];
    left.extend(std::iter::repeat_n((P, DIR_RX, 64, 1), 6));
    assert_eq!(lab.slot_lens(), left);
    assert_eq!(lab.queues()[&(P, DIR_RX)], (51 + 64, 51 + 70));
}

/// IPv6 inner packets: the length is the whole packet, its 40-byte header included.
#[test]
fn ipv6_inner_packets_match_by_their_whole_length() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    for len in [100usize, 1280] {
        let pkt = udp_ipv6(client_v6(), 40000, p_host_v6(), 443, len);
        lab.run(Dir::Tx, tun, (0, 0), &pkt);
        assert_eq!(lab.slot_lens(), vec![(P, DIR_TX, len as u32, 1)]);
        lab.message_for(Dir::Tx, PEER_P, len as u32);
        lab.message_for(Dir::Rx, PEER_P, len as u32);
        let pkt = udp_ipv6(p_host_v6(), 443, client_v6(), 40000, len);
        lab.run(Dir::Rx, tun, (0, 0), &pkt);
        assert!(lab.slots().is_empty(), "{len}: {:?}", lab.slots());
    }
    assert_eq!(
        lab.counts(),
        counts(&[((tun, P, DIR_TX), 2), ((tun, P, DIR_RX), 2)])
    );
}

/// A queue whose only packets were lost (a peer that never completes a handshake, or is
/// removed right after a drop) is left with head < tail once the sweep has deleted its
/// stale slots: nothing is in flight, so it is idle and must go like an empty one, or
/// TRANSIT_SEQ keeps an entry per such (peer, direction) forever.
#[test]
fn a_queue_whose_packets_were_all_lost_is_swept() {
    let Some(mut lab) = Lab::new() else { return };
    lab.inner(Dir::Tx, PEER_P, 84);
    let now = monotonic_ns() + SWEEP_AGE_NS + 1;
    assert_eq!(lab.dp.transit.expire(now).0, 1, "the stale slot is swept");
    assert!(lab.slots().is_empty());
    let mut queues_deleted = 0;
    for _ in 0..3 {
        queues_deleted += lab.dp.transit.expire(now).1;
    }
    assert_eq!(
        (queues_deleted, lab.queues()),
        (1, BTreeMap::new()),
        "(queues deleted by 3 more sweeps without traffic, queues left as (peer, dir) -> \
         (head, tail)): nothing is in flight, yet the queue stays"
    );
}
