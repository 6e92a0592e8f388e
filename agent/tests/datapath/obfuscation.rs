//! Obfuscation carriers, exact: `BPF_PROG_TEST_RUN` of the compiled TC programs on byte
//! fixtures. A UDP or TCP flow to or from a known obfuscation endpoint (protocol, address,
//! port) on an underlay counts for the peer it carries, under its tunnel interface and kind,
//! with its L3 bytes (TCP GSO per segment, a fragmented datagram once at its whole size),
//! and is no leak while the tunnel is up; anything else to the same relay is counted as before
//! (a leak), and nothing counts on a tunnel interface or while no endpoint is known. The
//! agent in the lab, with a real obfuscator, is the lab tier's `obfuscation`.
//!
//! Needs root and BPF; without them the tests print why and pass, except with CI=true,
//! where they fail. Run: `cargo test -p wirescope --test datapath -- --test-threads=1
//! obfuscation::`.

use crate::common;

use std::collections::HashMap;

use agent_common::{
    fixtures::{Framing, Ipv4, Ipv6, tcp, udp},
    maps::{
        DIR_RX, DIR_TX,
        leak::{LeakKey, kind as leak_kind},
        obfuscation::{ObfsEndpoint, ObfsTarget, kind},
    },
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};
use common::{Dir, LOCAL_V4, RELAY_PORT, RELAY_V4, local_v6, relay_v6};
use wirescope::{
    datapath::{PeerMaps, monotonic_ns},
    sync::endpoint_key,
};

/// The relay's Shadowsocks (UDP) and udp2tcp (TCP) ports.
const SS_PORT: u16 = 8388;
const TCP_PORT: u16 = 443;
const EPHEMERAL: u16 = 40000;
/// The peer the flows carry, and another tunnel's peer.
const PEER: u32 = 1;
const OTHER_PEER: u32 = 7;

/// (tunnel ifindex, peer, kind, dir) -> (packets, bytes), or (underlay, leak kind).
type Counts = HashMap<(u32, u32, u8, u8), (u64, u64)>;
type Leaks = HashMap<(u32, u8), (u64, u64)>;

type Lab = common::NetnsLab<Obfuscation>;
struct Obfuscation;

fn obfs_endpoint(addr: std::net::IpAddr, port: u16, proto: u8) -> ObfsEndpoint {
    let e = endpoint_key(addr, port);
    ObfsEndpoint {
        addr: e.addr,
        port: e.port,
        family: e.family,
        proto,
    }
}

impl Lab {
    /// `lo` the tunnel, `ob-under` the underlay, the relay's WireGuard endpoint for PEER, the
    /// tunnel up; `flows` the obfuscation endpoints.
    fn new(flows: &[(ObfsEndpoint, ObfsTarget)]) -> Option<Lab> {
        let mut lab = Lab::enter(
            "the obfuscation tests need root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
            ("ob-under", "ob-other"),
            true,
            &[(RELAY_V4.into(), PEER)],
        )?;
        lab.flows(flows);
        lab.dp
            .leak
            .set_tunnel_up_until(monotonic_ns() + 60_000_000_000)
            .expect("LEAK_CFG");
        Some(lab)
    }

    /// The peer maps with exactly `flows` as obfuscation endpoints.
    fn flows(&mut self, flows: &[(ObfsEndpoint, ObfsTarget)]) {
        let mut maps = PeerMaps::default();
        maps.endpoints
            .insert(endpoint_key(RELAY_V4.into(), RELAY_PORT), PEER);
        maps.obfuscation = flows.iter().copied().collect();
        self.dp.sync_peers(&maps).expect("peer maps");
    }

    fn counts(&self) -> (Counts, Leaks) {
        let obfs = self
            .dp
            .obfuscation
            .counters()
            .expect("OBFS_COUNTERS")
            .into_iter()
            .map(|(k, c)| ((k.ifindex, k.peer, k.kind, k.dir), (c.packets, c.bytes)))
            .collect();
        let leaks = self
            .dp
            .leak
            .leaks()
            .expect("LEAKS")
            .into_iter()
            .map(|(k, c): (LeakKey, _)| ((k.ifindex, k.kind), (c.packets, c.bytes)))
            .collect();
        (obfs, leaks)
    }

    /// Runs `l3` (framed for `ifindex`: Ethernet on the underlay, bare on lo) through the
    /// program of `dir` with `gso`, and checks what it added to the obfuscation counters and
    /// to the leaks.
    #[track_caller]
    fn expect(
        &mut self,
        what: &str,
        dir: Dir,
        ifindex: u32,
        gso: (u32, u32),
        l3: &[u8],
        want: (Counts, Leaks),
    ) {
        let before = self.counts();
        let data = if ifindex == self.under {
            Framing::Ethernet.frame(l3)
        } else {
            l3.to_vec()
        };
        let out = common::run_tc(&mut self.dp, what, dir.prog(), ifindex, gso, &data);
        common::assert_unchanged(what, dir.prog(), &data, &out);
        common::assert_no_refused_updates(&self.dp, what);
        let after = self.counts();
        assert_eq!(
            (delta(&before.0, &after.0), delta(&before.1, &after.1)),
            want,
            "{what}"
        );
    }
}

fn delta<K: Copy + Eq + std::hash::Hash>(
    before: &HashMap<K, (u64, u64)>,
    after: &HashMap<K, (u64, u64)>,
) -> HashMap<K, (u64, u64)> {
    after
        .iter()
        .filter_map(|(k, &(p, b))| {
            let (p0, b0) = before.get(k).copied().unwrap_or_default();
            ((p, b) != (p0, b0)).then_some((*k, (p - p0, b - b0)))
        })
        .collect()
}

fn target(ifindex: u32, peer: u32, k: u8) -> ObfsTarget {
    ObfsTarget {
        ifindex,
        peer,
        kind: k,
        _pad: [0; 3],
    }
}

fn udp4(dir: Dir, remote_port: u16, payload: usize) -> Vec<u8> {
    let ((s, sp), (d, dp)) = dir.flow((LOCAL_V4, EPHEMERAL), (RELAY_V4, remote_port));
    Ipv4::new(s, d).build(IPPROTO_UDP, &udp(sp, dp, &vec![0x5a; payload]))
}

fn obfs(tun: u32, peer: u32, k: u8, dir: Dir, packets: u64, bytes: u64) -> (Counts, Leaks) {
    let d = if dir == Dir::Tx { DIR_TX } else { DIR_RX };
    ([((tun, peer, k, d), (packets, bytes))].into(), Leaks::new())
}

/// The flows of a Shadowsocks (UDP) and a udp2tcp (TCP) obfuscator, both ways, IPv4 and
/// IPv6: counted for their peer with their L3 bytes, never as leaks; the relay's other ports
/// and protocols still leak.
#[test]
fn carriers_count_for_their_peer_and_never_leak() {
    let tun = 1; // lo
    let flows = [
        (
            obfs_endpoint(RELAY_V4.into(), SS_PORT, IPPROTO_UDP),
            target(tun, PEER, kind::SHADOWSOCKS),
        ),
        (
            obfs_endpoint(RELAY_V4.into(), TCP_PORT, IPPROTO_TCP),
            target(tun, PEER, kind::UDP2TCP),
        ),
        (
            obfs_endpoint(relay_v6().into(), SS_PORT, IPPROTO_UDP),
            target(42, OTHER_PEER, kind::QUIC),
        ),
    ];
    let Some(mut lab) = Lab::new(&flows) else {
        return;
    };
    assert_eq!(lab.tun, tun, "lo is ifindex 1 in every network namespace");
    let under = lab.under;
    for dir in Dir::BOTH {
        // A WireGuard keepalive of 32 bytes in Shadowsocks: 32 + 55 of UDP payload.
        let pkt = udp4(dir, SS_PORT, 87);
        lab.expect(
            "shadowsocks datagram",
            dir,
            under,
            (0, 0),
            &pkt,
            obfs(tun, PEER, kind::SHADOWSOCKS, dir, 1, 20 + 8 + 87),
        );
        let ((s, sp), (d, dp)) = dir.flow((LOCAL_V4, EPHEMERAL), (RELAY_V4, TCP_PORT));
        let seg = Ipv4::new(s, d).build(IPPROTO_TCP, &tcp(sp, dp, 12, &[1; 100]));
        lab.expect(
            "udp2tcp segment",
            dir,
            under,
            (0, 0),
            &seg,
            obfs(tun, PEER, kind::UDP2TCP, dir, 1, 20 + 32 + 100),
        );
        let ((s6, sp), (d6, dp)) = dir.flow((local_v6(), EPHEMERAL), (relay_v6(), SS_PORT));
        let v6 = Ipv6::new(s6, d6).build(IPPROTO_UDP, &udp(sp, dp, &[2; 60]));
        lab.expect(
            "IPv6 flow of another tunnel's peer",
            dir,
            under,
            (0, 0),
            &v6,
            obfs(42, OTHER_PEER, kind::QUIC, dir, 1, 40 + 8 + 60),
        );
    }
    // TSO: one skb of 3 TCP segments counts 3 packets, each with its own headers.
    let seg =
        Ipv4::new(LOCAL_V4, RELAY_V4).build(IPPROTO_TCP, &tcp(EPHEMERAL, TCP_PORT, 0, &[3; 3000]));
    lab.expect(
        "udp2tcp TSO batch",
        Dir::Tx,
        under,
        (3, 1000),
        &seg,
        obfs(tun, PEER, kind::UDP2TCP, Dir::Tx, 3, 3040 + 2 * 40),
    );
    // A Shadowsocks datagram split by IP counts once, at its whole size; its later
    // fragment not at all (and is no leak either).
    let dgram = udp(EPHEMERAL, SS_PORT, &[4; 1600]);
    let first = Ipv4::new(LOCAL_V4, RELAY_V4)
        .mf(true)
        .build(IPPROTO_UDP, &dgram[..1000]);
    let rest = Ipv4::new(LOCAL_V4, RELAY_V4)
        .frag_offset(125)
        .build(IPPROTO_UDP, &dgram[1000..]);
    lab.expect(
        "first fragment",
        Dir::Tx,
        under,
        (0, 0),
        &first,
        obfs(tun, PEER, kind::SHADOWSOCKS, Dir::Tx, 1, 20 + 8 + 1600),
    );
    lab.expect(
        "later fragment",
        Dir::Tx,
        under,
        (0, 0),
        &rest,
        (Counts::new(), Leaks::new()),
    );
    // The relay, but another port or the other protocol: no flow, a leak as before.
    let leak = |bytes| {
        (
            Counts::new(),
            [((under, leak_kind::IPV4), (1, bytes))].into(),
        )
    };
    lab.expect(
        "UDP to the udp2tcp port",
        Dir::Tx,
        under,
        (0, 0),
        &udp4(Dir::Tx, TCP_PORT, 87),
        leak(115),
    );
    lab.expect(
        "UDP to another port",
        Dir::Tx,
        under,
        (0, 0),
        &udp4(Dir::Tx, SS_PORT + 1, 87),
        leak(115),
    );
    // On the tunnel interface the same bytes are inner traffic, never a carrier.
    let tun_ifindex = lab.tun;
    lab.expect(
        "on the tunnel",
        Dir::Tx,
        tun_ifindex,
        (0, 0),
        &udp4(Dir::Tx, SS_PORT, 87),
        (Counts::new(), Leaks::new()),
    );
}

/// A relay known only as an obfuscation flow's remote end is a WireGuard relay for the path
/// signals too: fragments to and from it are `outer` (a tunnel MTU too big for the
/// obfuscated path shows), and ICMP to it is no leak, as for an endpoint's address; without
/// the flow they are `other` and a leak.
#[test]
fn the_flows_relay_is_an_endpoint_address() {
    use agent_common::{maps::path::layer, parse::IPPROTO_ICMP};
    const OBFS_RELAY_V4: [u8; 4] = [203, 0, 113, 77];
    let flow = (
        obfs_endpoint(OBFS_RELAY_V4.into(), SS_PORT, IPPROTO_UDP),
        target(1, PEER, kind::SHADOWSOCKS),
    );
    let Some(mut lab) = Lab::new(&[flow]) else {
        return;
    };
    let under = lab.under;
    let fragments = |lab: &Lab| -> HashMap<(u32, u8, u8), u64> {
        lab.dp
            .path
            .fragments()
            .expect("FRAGMENTS")
            .into_iter()
            .map(|(k, c)| ((k.ifindex, k.kind, k.dir), c.packets))
            .collect()
    };
    let later = Ipv4::new(LOCAL_V4, OBFS_RELAY_V4)
        .frag_offset(125)
        .build(IPPROTO_UDP, &[4; 600]);
    let ping = Ipv4::new(LOCAL_V4, OBFS_RELAY_V4).build(IPPROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]);
    for (known, want_layer, want_leak) in [
        (true, layer::OUTER, Leaks::new()),
        (
            false,
            layer::OTHER,
            [((under, leak_kind::IPV4), (1, 28))].into(),
        ),
    ] {
        let flows = [flow];
        lab.flows(if known { &flows[..] } else { &[] });
        let before = fragments(&lab);
        lab.expect(
            "a later fragment of the flow",
            Dir::Tx,
            under,
            (0, 0),
            &later,
            (Counts::new(), Leaks::new()),
        );
        let after = fragments(&lab);
        assert_eq!(
            delta_n(&before, &after),
            [((under, want_layer, DIR_TX), 1)].into(),
            "flow known: {known}"
        );
        lab.expect(
            "ICMP echo to the flow's relay",
            Dir::Tx,
            under,
            (0, 0),
            &ping,
            (Counts::new(), want_leak),
        );
    }
}

fn delta_n<K: Copy + Eq + std::hash::Hash>(
    before: &HashMap<K, u64>,
    after: &HashMap<K, u64>,
) -> HashMap<K, u64> {
    after
        .iter()
        .filter_map(|(k, &n)| {
            let n0 = before.get(k).copied().unwrap_or_default();
            (n != n0).then_some((*k, n - n0))
        })
        .collect()
}

/// Without endpoints (none written, or all removed again) the flow is what it was before:
/// a leak while the tunnel is up, and nothing is counted as obfuscation.
#[test]
fn without_endpoints_the_flow_is_a_leak_again() {
    let flow = (
        obfs_endpoint(RELAY_V4.into(), SS_PORT, IPPROTO_UDP),
        target(1, PEER, kind::SHADOWSOCKS),
    );
    let Some(mut lab) = Lab::new(&[flow]) else {
        return;
    };
    let under = lab.under;
    let pkt = udp4(Dir::Tx, SS_PORT, 87);
    lab.expect(
        "known",
        Dir::Tx,
        under,
        (0, 0),
        &pkt,
        obfs(1, PEER, kind::SHADOWSOCKS, Dir::Tx, 1, 115),
    );
    lab.flows(&[]);
    lab.expect(
        "removed",
        Dir::Tx,
        under,
        (0, 0),
        &pkt,
        (Counts::new(), [((under, leak_kind::IPV4), (1, 115))].into()),
    );
    lab.flows(&[flow]);
    lab.expect(
        "written again",
        Dir::Tx,
        under,
        (0, 0),
        &pkt,
        obfs(1, PEER, kind::SHADOWSOCKS, Dir::Tx, 1, 115),
    );
    let usage: HashMap<&str, u64> = lab
        .dp
        .map_usage()
        .into_iter()
        .map(|(n, used, _)| (n, used))
        .collect();
    assert_eq!(usage.get("OBFS_ENDPOINTS"), Some(&1));
    assert_eq!(usage.get("OBFS_COUNTERS"), Some(&1));
}
