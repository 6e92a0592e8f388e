//! Path-MTU signals: IP fragments per layer (`wirescope_fragments_total`) and ICMP too-big
//! messages (`wirescope_icmp_too_big_total`, `wirescope_icmp_reported_mtu_bytes`).
//!
//! The tests run the compiled TC programs on byte fixtures through `BPF_PROG_TEST_RUN`
//! (`main.rs` explains what test_run does with the input): each enters a fresh network
//! namespace on its own thread, where `lo` plays the WireGuard interface (TUNNEL | L3) and
//! one end of a veth pair the underlay (Ethernet); the interfaces are down, so only the test
//! runs reach the programs. Needs root and BPF; without root they print why and pass, except
//! with CI=true. The same signals from a real router in the lab are the lab tier's
//! `kernel::path`.
//!
//! Run: `cargo test -p wirescope --test datapath -- --test-threads=1 path::`.

use crate::common;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use agent_common::{
    fixtures::{Ext, Framing, Ipv4, Ipv6, payload, udp, wg},
    maps::{
        Counter, CounterKey, DIR_RX,
        path::{MTU_WINDOW_NS, layer},
    },
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP},
};
use common::{
    Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT, RELAY_V4, local_v6, relay_v6, stranger_v6, v6,
};
use wirescope::{
    datapath::monotonic_ns,
    metrics::{self, path::PathCollector},
    sync::inventory::Inventory,
};

const STRANGER_V4: [u8; 4] = [192, 0, 2, 99];
const ROUTER_V4: [u8; 4] = [192, 0, 2, 1];
const OTHER_PORT: u16 = 40001;

fn router_v6() -> [u8; 16] {
    v6("2001:db8:c::1")
}

type Counts = HashMap<(u32, u8, u8), u64>;

/// `dp`, `tun` (lo) and `under` (fx-under).
type TestLab = common::NetnsLab<Path>;
/// This module's marker (see [`common::NetnsLab`]).
struct Path;

impl TestLab {
    fn new() -> Option<TestLab> {
        TestLab::enter(
            "the path tests need root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
            ("fx-under", "fx-other"),
            true,
            &[(RELAY_V4.into(), 1), (relay_v6().into(), 2)],
        )
    }

    /// Runs the bare IP packet `l3` through the program of `dir` on `ifindex` (framed for
    /// the underlay when it is the underlay).
    fn run(&mut self, dir: Dir, ifindex: u32, l3: &[u8]) {
        let data = if ifindex == self.under {
            Framing::Ethernet.frame(l3)
        } else {
            l3.to_vec()
        };
        common::run_tc(&mut self.dp, "path", dir.prog(), ifindex, (0, 0), &data);
        common::assert_no_refused_updates(&self.dp, "path");
    }

    /// (ifindex, dir, layer) -> fragments.
    fn fragments(&self) -> Counts {
        collect(self.dp.path.fragments().expect("FRAGMENTS"))
    }

    /// (ifindex, dir, family) -> messages.
    fn too_big(&self) -> Counts {
        collect(self.dp.path.icmp_too_big().expect("ICMP_TOO_BIG"))
    }

    /// Runs `l3` and returns what it added to the fragment counts.
    fn frag_delta(&mut self, dir: Dir, ifindex: u32, l3: &[u8]) -> Counts {
        let before = self.fragments();
        let tb = self.too_big();
        self.run(dir, ifindex, l3);
        assert_eq!(self.too_big(), tb, "no ICMP too-big from a fragment");
        diff(&before, &self.fragments())
    }

    /// The fragments `first` and `later` each count one fragment on `ifindex`, of the layers
    /// `layers` (first's, later's).
    #[track_caller]
    fn expect_fragments(
        &mut self,
        dir: Dir,
        ifindex: u32,
        (first, later): (Vec<u8>, Vec<u8>),
        layers: (u8, u8),
    ) {
        let got = self.frag_delta(dir, ifindex, &first);
        assert_eq!(got, one(ifindex, dir, layers.0), "first fragment");
        let got = self.frag_delta(dir, ifindex, &later);
        assert_eq!(got, one(ifindex, dir, layers.1), "later fragment");
    }

    fn icmp_delta(&mut self, dir: Dir, ifindex: u32, l3: &[u8]) -> Counts {
        let before = self.too_big();
        self.run(dir, ifindex, l3);
        diff(&before, &self.too_big())
    }
}

fn collect(v: Vec<(CounterKey, Counter)>) -> Counts {
    v.into_iter()
        .map(|(k, c)| {
            assert_eq!(k.peer, 0, "{k:?}");
            ((k.ifindex, k.dir, k.kind), c.packets)
        })
        .collect()
}

fn diff(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .filter_map(|(k, a)| {
            let d = a - before.get(k).copied().unwrap_or(0);
            (d != 0).then_some((*k, d))
        })
        .collect()
}

fn one(ifindex: u32, dir: Dir, layer: u8) -> Counts {
    HashMap::from([((ifindex, dir.code(), layer), 1)])
}

/// A WireGuard data message in UDP between `local` and `remote`, split in two IPv4
/// fragments at 1000 bytes of the datagram: (first, later).
fn v4_fragments(dir: Dir, local: ([u8; 4], u16), remote: ([u8; 4], u16)) -> (Vec<u8>, Vec<u8>) {
    let ((s, sp), (d, dp)) = dir.flow(local, remote);
    let dgram = udp(sp, dp, &wg::data(0x1122_3344, 1, 1400, 1420));
    let first = Ipv4::new(s, d).mf(true).build(IPPROTO_UDP, &dgram[..1000]);
    let later = Ipv4::new(s, d)
        .frag_offset(125)
        .build(IPPROTO_UDP, &dgram[1000..]);
    (first, later)
}

fn v6_fragments(dir: Dir, local: ([u8; 16], u16), remote: ([u8; 16], u16)) -> (Vec<u8>, Vec<u8>) {
    let ((s, sp), (d, dp)) = dir.flow(local, remote);
    let dgram = udp(sp, dp, &wg::data(0x1122_3344, 1, 1400, 1420));
    let first = Ipv6::new(s, d)
        .ext(Ext::Fragment {
            offset: 0,
            more: true,
            id: 7,
        })
        .build(IPPROTO_UDP, &dgram[..1000]);
    let later = Ipv6::new(s, d)
        .ext(Ext::Fragment {
            offset: 125,
            more: false,
            id: 7,
        })
        .build(IPPROTO_UDP, &dgram[1000..]);
    (first, later)
}

#[test]
fn fragments_by_layer() {
    let Some(mut lab) = TestLab::new() else {
        return;
    };
    let (tun, under) = (lab.tun, lab.under);
    for dir in Dir::BOTH {
        // Underlay, to or from the endpoint: first and later fragments are outer, v4 and v6.
        let outer = (layer::OUTER, layer::OUTER);
        let frags = v4_fragments(dir, (LOCAL_V4, LISTEN_PORT), (RELAY_V4, RELAY_PORT));
        lab.expect_fragments(dir, under, frags, outer);
        let frags = v6_fragments(dir, (local_v6(), LISTEN_PORT), (relay_v6(), RELAY_PORT));
        lab.expect_fragments(dir, under, frags, outer);
        // The endpoint's address on another port, from a port that is not ours: still outer
        // (fragments carry no ports, so the address decides).
        let frags = v4_fragments(dir, (LOCAL_V4, OTHER_PORT), (RELAY_V4, 9999));
        lab.expect_fragments(dir, under, frags, outer);

        // An unknown remote: other, unless a first fragment shows our listen port.
        let frags = v4_fragments(dir, (LOCAL_V4, LISTEN_PORT), (STRANGER_V4, RELAY_PORT));
        lab.expect_fragments(dir, under, frags, (layer::OUTER, layer::OTHER));
        let other = (layer::OTHER, layer::OTHER);
        let frags = v4_fragments(dir, (LOCAL_V4, OTHER_PORT), (STRANGER_V4, 9999));
        lab.expect_fragments(dir, under, frags, other);
        let frags = v6_fragments(dir, (local_v6(), OTHER_PORT), (stranger_v6(), 9999));
        lab.expect_fragments(dir, under, frags, other);

        // On the tunnel every fragment is inner, whatever the addresses.
        let inner = (layer::INNER, layer::INNER);
        for (local, remote) in [
            ((LOCAL_V4, LISTEN_PORT), (RELAY_V4, RELAY_PORT)),
            ((LOCAL_V4, OTHER_PORT), (STRANGER_V4, 9999)),
        ] {
            lab.expect_fragments(dir, tun, v4_fragments(dir, local, remote), inner);
        }
        let frags = v6_fragments(dir, (local_v6(), OTHER_PORT), (stranger_v6(), 9999));
        lab.expect_fragments(dir, tun, frags, inner);

        // Not fragments: whole packets, an IPv6 atomic fragment, DF set.
        let ((s, sp), (d, dp)) = dir.flow((LOCAL_V4, LISTEN_PORT), (RELAY_V4, RELAY_PORT));
        let msg = wg::data(1, 1, 100, 1420);
        for ifx in [tun, under] {
            let whole = Ipv4::new(s, d).build(IPPROTO_UDP, &udp(sp, dp, &msg));
            assert!(lab.frag_delta(dir, ifx, &whole).is_empty());
            let df = Ipv4::new(s, d)
                .df(true)
                .build(IPPROTO_UDP, &udp(sp, dp, &msg));
            assert!(lab.frag_delta(dir, ifx, &df).is_empty());
            let ((s6, _), (d6, _)) = dir.flow((local_v6(), 0), (relay_v6(), 0));
            let atomic = Ipv6::new(s6, d6)
                .ext(Ext::Fragment {
                    offset: 0,
                    more: false,
                    id: 9,
                })
                .build(IPPROTO_UDP, &udp(sp, dp, &msg));
            assert!(lab.frag_delta(dir, ifx, &atomic).is_empty());
        }
    }
    // Exact totals of the whole run: per direction, underlay outer 7, other 5; tunnel inner 6.
    let all = lab.fragments();
    for dir in Dir::BOTH {
        let d = dir.code();
        assert_eq!(all.get(&(under, d, layer::OUTER)), Some(&7), "{all:?}");
        assert_eq!(all.get(&(under, d, layer::OTHER)), Some(&5), "{all:?}");
        assert_eq!(all.get(&(tun, d, layer::INNER)), Some(&6), "{all:?}");
    }
    assert_eq!(all.len(), 6, "{all:?}");

    // The collector's series, labelled as docs/CONTRACT.md says.
    let mut inv = Inventory::default();
    inv.iface_names.insert(under, "fx-under".into());
    inv.iface_names.insert(tun, "lo".into());
    let text = encode(lab.dp, inv);
    for line in [
        "wirescope_fragments_total{interface=\"fx-under\",direction=\"tx\",layer=\"outer\"} 7",
        "wirescope_fragments_total{interface=\"fx-under\",direction=\"rx\",layer=\"other\"} 5",
        "wirescope_fragments_total{interface=\"lo\",direction=\"rx\",layer=\"inner\"} 6",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
}

fn encode(dp: common::Lent, inv: Inventory) -> String {
    let (text, _dp) = dp.shared(|dp| {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(PathCollector::new(dp, Arc::new(RwLock::new(inv)))));
        metrics::encode_string(&registry, metrics::Format::Prometheus).expect("encoding")
    });
    text
}

/// ICMPv4 type 3 code 4 from `router` to `to`, quoting an IPv4 + UDP packet (the invoking
/// header and 8 bytes), next-hop MTU `mtu`.
fn frag_needed(router: [u8; 4], to: [u8; 4], mtu: u16) -> Vec<u8> {
    let quoted = Ipv4::new(to, RELAY_V4)
        .df(true)
        .build(IPPROTO_UDP, &udp(LISTEN_PORT, RELAY_PORT, &payload(1400)));
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted[..28]);
    Ipv4::new(router, to).build(IPPROTO_ICMP, &icmp)
}

/// ICMPv6 type 2 (packet too big) quoting an IPv6 + UDP packet, MTU `mtu`.
fn packet_too_big(router: [u8; 16], to: [u8; 16], mtu: u32) -> Vec<u8> {
    let quoted =
        Ipv6::new(to, relay_v6()).build(IPPROTO_UDP, &udp(LISTEN_PORT, RELAY_PORT, &payload(1400)));
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted[..48]);
    Ipv6::new(router, to).build(IPPROTO_ICMPV6, &icmp)
}

fn mtus(lab: &TestLab, now: u64) -> HashMap<u32, u32> {
    lab.dp.path.lowest_mtus(now)
}

#[test]
fn icmp_too_big_and_the_reported_mtu() {
    let Some(mut lab) = TestLab::new() else {
        return;
    };
    let (tun, under) = (lab.tun, lab.under);
    let ipv4 = |ifx| HashMap::from([((ifx, DIR_RX, 4u8), 1u64)]);
    let ipv6 = |ifx| HashMap::from([((ifx, DIR_RX, 6u8), 1u64)]);

    // Fragmentation needed, MTU 1400, arriving on the underlay.
    let msg = frag_needed(ROUTER_V4, LOCAL_V4, 1400);
    assert_eq!(lab.icmp_delta(Dir::Rx, under, &msg), ipv4(under));
    assert_eq!(mtus(&lab, monotonic_ns()), HashMap::from([(under, 1400)]));
    // Leaving, it is not ours to count.
    assert!(lab.icmp_delta(Dir::Tx, under, &msg).is_empty());
    // Packet too big, MTU 1280: the lowest in the window.
    let ptb = packet_too_big(router_v6(), local_v6(), 1280);
    assert_eq!(lab.icmp_delta(Dir::Rx, under, &ptb), ipv6(under));
    assert_eq!(mtus(&lab, monotonic_ns()), HashMap::from([(under, 1280)]));
    // A higher MTU later does not raise the lowest.
    let msg = frag_needed(ROUTER_V4, LOCAL_V4, 1450);
    assert_eq!(lab.icmp_delta(Dir::Rx, under, &msg), ipv4(under));
    assert_eq!(mtus(&lab, monotonic_ns()), HashMap::from([(under, 1280)]));
    // On the tunnel (the inner layer's path): its own series.
    let inner = frag_needed(ROUTER_V4, LOCAL_V4, 1300);
    assert_eq!(lab.icmp_delta(Dir::Rx, tun, &inner), ipv4(tun));
    assert_eq!(
        mtus(&lab, monotonic_ns()),
        HashMap::from([(under, 1280), (tun, 1300)])
    );

    // Malformed, truncated or other ICMP: nothing at all.
    let before = lab.dp.path.icmp_mtus();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let header_only = Ipv4::new(ROUTER_V4, LOCAL_V4).build(IPPROTO_ICMP, &[3, 4, 0, 0, 0, 0, 4, 0]);
    cases.push(("ICMPv4 without the quoted header", header_only));
    let mut short = frag_needed(ROUTER_V4, LOCAL_V4, 1000);
    short.truncate(short.len() - 10);
    fix_total_len(&mut short);
    cases.push(("ICMPv4 quoting 18 of 20 header bytes", short));
    let mut cut = frag_needed(ROUTER_V4, LOCAL_V4, 1000);
    cut.truncate(40);
    cases.push(("ICMPv4 cut short of its total length", cut));
    cases.push((
        "ICMPv4 port unreachable",
        with(frag_needed(ROUTER_V4, LOCAL_V4, 1000), 21, 3),
    ));
    cases.push((
        "ICMPv4 time exceeded",
        with(frag_needed(ROUTER_V4, LOCAL_V4, 1000), 20, 11),
    ));
    cases.push((
        "ICMPv4 type 2 (not ICMPv6)",
        with(frag_needed(ROUTER_V4, LOCAL_V4, 1000), 20, 2),
    ));
    let mut fragged = frag_needed(ROUTER_V4, LOCAL_V4, 1000);
    fragged[6] |= 0x20; // MF
    cases.push(("ICMPv4 in a first fragment", fragged));
    let ptb = packet_too_big(router_v6(), local_v6(), 1000);
    let mut short6 = ptb.clone();
    short6.truncate(short6.len() - 9);
    let plen = (short6.len() - 40) as u16;
    short6[4..6].copy_from_slice(&plen.to_be_bytes());
    cases.push(("ICMPv6 quoting 39 of 40 header bytes", short6));
    cases.push(("ICMPv6 destination unreachable", with(ptb.clone(), 40, 1)));
    cases.push(("ICMPv6 echo request", with(ptb.clone(), 40, 128)));
    cases.push(("ICMPv6 type 3 code 4 (not ICMPv4)", {
        let p = with(ptb.clone(), 40, 3);
        with(p, 41, 4)
    }));
    // UDP that looks like an ICMP too-big message.
    let fake = Ipv4::new(ROUTER_V4, LOCAL_V4)
        .build(IPPROTO_UDP, &frag_needed(ROUTER_V4, LOCAL_V4, 999)[20..]);
    cases.push(("UDP carrying ICMP bytes", fake));
    for (name, pkt) in &cases {
        let frags = lab.fragments();
        for ifx in [under, tun] {
            assert!(lab.icmp_delta(Dir::Rx, ifx, pkt).is_empty(), "{name}");
        }
        if !name.contains("fragment") {
            assert_eq!(lab.fragments(), frags, "{name}");
        }
    }
    assert_eq!(lab.dp.path.icmp_mtus(), before, "no MTU recorded");

    // The series.
    let now = monotonic_ns();
    let mut inv = Inventory::default();
    inv.iface_names.insert(under, "fx-under".into());
    inv.iface_names.insert(tun, "lo".into());
    // 10 minutes later without a report: no lowest MTU, and the sync tick's expiry empties
    // the map; the counters stay.
    assert!(mtus(&lab, now + MTU_WINDOW_NS + 1_000_000_000).is_empty());
    assert_eq!(
        lab.dp.path.expire(now + MTU_WINDOW_NS + 1_000_000_000),
        4,
        "1400, 1280, 1450 on the underlay and 1300 on the tunnel"
    );
    assert!(lab.dp.path.icmp_mtus().is_empty());
    // A report after that counts alone.
    let msg = frag_needed(ROUTER_V4, LOCAL_V4, 1400);
    assert_eq!(lab.icmp_delta(Dir::Rx, under, &msg), ipv4(under));
    assert_eq!(mtus(&lab, monotonic_ns()), HashMap::from([(under, 1400)]));
    let text = encode(lab.dp, inv);
    for line in [
        "wirescope_icmp_too_big_total{interface=\"fx-under\",family=\"ipv4\"} 3",
        "wirescope_icmp_too_big_total{interface=\"fx-under\",family=\"ipv6\"} 1",
        "wirescope_icmp_too_big_total{interface=\"lo\",family=\"ipv4\"} 1",
        "wirescope_icmp_reported_mtu_bytes{interface=\"fx-under\"} 1400",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert!(
        !text.contains("wirescope_icmp_reported_mtu_bytes{interface=\"lo\"}"),
        "{text}"
    );
}

fn with(mut p: Vec<u8>, at: usize, v: u8) -> Vec<u8> {
    p[at] = v;
    p
}

/// Sets an IPv4 packet's total length to its size and fixes the header checksum.
fn fix_total_len(p: &mut [u8]) {
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    agent_common::fixtures::fix_ipv4_checksum(p, 0);
}
