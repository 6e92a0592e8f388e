//! The agent in the lab, end to end: wireguard-go tunnels in network namespaces, the
//! `wirescope` binary running in the client namespace, metrics scraped over HTTP. Every
//! assertion is an exact delta derived from what the test sent.
//!
//! Needs root, wireguard-go and the lab tools (`cargo xtask setup`); with CI=true a missing
//! prerequisite fails the test. The tests share one lab prefix: run them with
//! `--test-threads=1` (`cargo xtask test` does): `cargo test -p wirescope --test lab --
//! --test-threads=1 kernel::tunnel::`.

use crate::common;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use agent_common::wireguard::data_wire_len;
use xtask::{
    agent::Agent,
    lab::{self, GATEWAY_V4, GATEWAY_V6, Lab, LabConfig, Role, Topology},
    scrape::Metrics,
};

use common::{
    Names, bin, delta, echo_via_tunnel, lab_up, late_interface_attached, start, stop, val,
    wait_tcp_listening,
};

const PREFIX: &str = "wsa";
const WG_MTU: u32 = 1420;
/// Outer IPv4 header: the lab's underlay and the exit layer's outer packets are IPv4.
const OUTER_V4: u32 = 20;

/// Sends datagrams of `payloads` bytes to an echo on `dst` in the exit namespace and waits
/// for every echo, between two scrapes. Returns (before, after).
fn echo_round(lab: &Lab, agent: &Agent, dst: SocketAddr, payloads: &[usize]) -> (Metrics, Metrics) {
    let before = echo_via_tunnel(lab, dst, payloads, || {
        agent.scrape().expect("scrape before")
    });
    (before, agent.scrape().expect("scrape after"))
}

/// Inner L3 length of a UDP datagram with this payload to `dst`.
fn inner_len(dst: &SocketAddr, payload: usize) -> u32 {
    let ip = if dst.is_ipv4() { 20 } else { 40 };
    (ip + 8 + payload) as u32
}

struct Expect {
    packets: u64,
    /// Inner L3 bytes.
    inner: u64,
    /// One WireGuard layer: data message L3 bytes for each inner packet.
    layer1: u64,
    /// Two layers (multihop entry): the exit layer's message, encrypted again.
    layer2: u64,
}

/// `mtu1` and `mtu2` are the tunnel MTUs of whoever encrypts each layer: WireGuard pads to
/// the sender's MTU, so for received traffic they are the relays'. `lab`'s implementation
/// may not pad at all (boringtun: `WgImpl::pads`).
fn expect(lab: &Lab, dst: &SocketAddr, payloads: &[usize], mtu1: u32, mtu2: u32) -> Expect {
    let pads = lab.wireguard.pads();
    let wire_len = |l: u32, mtu: u32| {
        if pads {
            data_wire_len(l, mtu, OUTER_V4)
        } else {
            OUTER_V4 + 8 + 32 + l
        }
    };
    let mut e = Expect {
        packets: payloads.len() as u64,
        inner: 0,
        layer1: 0,
        layer2: 0,
    };
    for &p in payloads {
        let l = inner_len(dst, p);
        let w1 = wire_len(l, mtu1);
        e.inner += l as u64;
        e.layer1 += w1 as u64;
        e.layer2 += wire_len(w1, mtu2) as u64;
    }
    e
}

const PAYLOADS: [usize; 6] = [0, 1, 100, 555, 1000, 1300];

/// Whether the agent should time encryption and decryption here: kernel WireGuard on a
/// kernel with kprobes.
fn crypto_timed(lab: &Lab) -> bool {
    lab.wireguard == lab::WgImpl::Kernel
        && Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

/// Kernel WireGuard ran `encrypt_packet` (tx) or `decrypt_packet` (rx) exactly `n` times on
/// `tun` between the scrapes, as the kprobes counted; where they cannot run, the histogram
/// must be absent rather than zero.
fn assert_crypto(lab: &Lab, (b, a): (&Metrics, &Metrics), tun: &str, dir: &str, n: u64) {
    let l = [("interface", tun), ("direction", dir)];
    if crypto_timed(lab) {
        // A kretprobe has a fixed number of return instances (aya 0.14 cannot raise
        // maxactive); when parallel crypto workers exhaust them the kernel misses a return,
        // which loses that one timing. Seen once in the 6.1 VM under emulation (11 of 12).
        // Never more than counted, and at most one in ten missed.
        let got = delta(b, a, "wirescope_crypto_seconds_count", &l);
        assert!(
            got <= n && got * 10 >= n * 9,
            "{dir}: {got} crypto operations timed on {tun}, want {n} (at most 10% missed)"
        );
    } else {
        assert_eq!(a.select("wirescope_crypto_seconds_count", &l).count(), 0);
    }
}

/// One WireGuard layer of one peer in one direction, between two scrapes: `packets` inner
/// packets of `tunnel_bytes` on `tun`, carried as as many data messages of `wire_bytes` seen
/// on `wire_iface`.
#[allow(clippy::too_many_arguments)]
fn assert_layer(
    (b, a): (&Metrics, &Metrics),
    what: &str,
    tun: &str,
    wire_iface: &str,
    peer: &str,
    dir: &str,
    packets: u64,
    (tunnel_bytes, wire_bytes): (u64, u64),
) {
    let t = [("interface", tun), ("peer", peer), ("direction", dir)];
    let w = [
        ("interface", wire_iface),
        ("peer", peer),
        ("direction", dir),
        ("message", "data"),
    ];
    let got = (
        delta(b, a, "wirescope_tunnel_packets_total", &t),
        delta(b, a, "wirescope_tunnel_bytes_total", &t),
        delta(b, a, "wirescope_wire_packets_total", &w),
        delta(b, a, "wirescope_wire_bytes_total", &w),
    );
    assert_eq!(
        got,
        (packets, tunnel_bytes, packets, wire_bytes),
        "{what} {dir}: (tunnel packets, tunnel bytes, wire data packets, wire data bytes)"
    );
}

/// Peer-state metrics equal what `wg show dump` reports. The two reads are not atomic, so
/// a keepalive between them is retried, a bounded number of times. Where the dump gives the
/// handshake as an age (boringtun), the agent's UNIX time is that age before now, to the
/// second the two reads are apart.
fn assert_peer_state_matches_wg(lab: &Lab, agent: &Agent) {
    let mut last = String::new();
    for _ in 0..5 {
        let m = agent.scrape().unwrap();
        let dump = lab.wg_dump(Role::Client).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut ok = true;
        for p in &dump.peers {
            let l = [("public_key", p.public_key.as_str())];
            let mut got = (
                val(&m, "wireguard_sent_bytes_total", &l),
                val(&m, "wireguard_received_bytes_total", &l),
                val(&m, "wireguard_latest_handshake_seconds", &l),
                m.select("wireguard_sent_bytes_total", &l)
                    .next()
                    .map(|(labels, _)| labels.get("allowed_ips").cloned().unwrap_or_default()),
            );
            let mut handshake = p.latest_handshake;
            if lab.wireguard.reports_handshake_age() && handshake != 0 {
                handshake = now - handshake;
                if got.2.abs_diff(handshake) <= 1 {
                    got.2 = handshake;
                }
            }
            let want = (
                p.tx_bytes,
                p.rx_bytes,
                handshake,
                Some(p.allowed_ips.join(",")),
            );
            if got != want {
                ok = false;
                last = format!("peer {}: metrics {got:?}, wg dump {want:?}", p.public_key);
            }
        }
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("peer state differs from wg show dump: {last}");
}

#[test]
fn single_hop_counts_are_exact() {
    let Some(lab) = lab_up(
        "single_hop_counts_are_exact",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names {
        tun, veth, relay, ..
    } = Names::of(&lab);
    let agent = start(&lab, "single");

    // The agent is watching before the first packet: the handshake is counted by type.
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let m = agent.scrape().unwrap();
    let wire = |dir: &'static str, msg: &'static str| {
        val(
            &m,
            "wirescope_wire_packets_total",
            &[
                ("interface", &veth),
                ("peer", &relay),
                ("direction", dir),
                ("message", msg),
            ],
        )
    };
    assert_eq!(wire("tx", "handshake_initiation"), 1);
    assert_eq!(wire("rx", "handshake_response"), 1);
    assert_eq!(
        val(
            &m,
            "wirescope_wire_bytes_total",
            &[
                ("interface", &veth),
                ("peer", &relay),
                ("direction", "tx"),
                ("message", "handshake_initiation")
            ]
        ),
        (OUTER_V4 + 8 + 148) as u64
    );
    assert_eq!(
        val(
            &m,
            "wirescope_peer_info",
            &[
                ("interface", &tun),
                ("peer", &relay),
                ("hop", "1"),
                ("via", &veth)
            ]
        ),
        1
    );
    for iface in [&tun, &veth] {
        for dir in ["rx", "tx"] {
            assert_eq!(
                val(
                    &m,
                    "wirescope_attach_info",
                    &[
                        ("interface", iface),
                        ("direction", dir),
                        ("mode", lab::expected_attach_mode())
                    ]
                ),
                1,
                "{iface} {dir} attached with {}",
                lab::expected_attach_mode()
            );
        }
    }

    for gw in [IpAddr::from(GATEWAY_V4), IpAddr::from(GATEWAY_V6)] {
        let dst = SocketAddr::new(gw, 7000);
        let (b, a) = echo_round(&lab, &agent, dst, &PAYLOADS);
        for dir in ["tx", "rx"] {
            let mtu = if dir == "tx" {
                WG_MTU
            } else {
                lab.exit().wg().mtu
            };
            let e = expect(&lab, &dst, &PAYLOADS, mtu, mtu);
            assert_layer(
                (&b, &a),
                &gw.to_string(),
                &tun,
                &veth,
                &relay,
                dir,
                e.packets,
                (e.inner, e.layer1),
            );
            assert_crypto(&lab, (&b, &a), &tun, dir, e.packets);
            // Nothing of this traffic went unattributed.
            let u = [("peer", "unknown")];
            assert_eq!(
                a.sum("wirescope_tunnel_packets_total", &u)
                    - b.sum("wirescope_tunnel_packets_total", &u),
                0.0
            );
        }
    }
    assert_peer_state_matches_wg(&lab, &agent);

    stop(agent);
    lab.teardown().unwrap();
}

#[test]
fn multihop_counts_each_layer_exactly() {
    let Some(lab) = lab_up(
        "multihop_counts_each_layer_exactly",
        LabConfig::new(Topology::Multihop, PREFIX),
    ) else {
        return;
    };
    let Names {
        tun,
        veth,
        relay: exit,
        ..
    } = Names::of(&lab);
    let agent = start(&lab, "multihop");
    let entry = lab.entry().expect("entry relay").wg().public_key.clone();

    lab.handshake(Duration::from_secs(20)).expect("handshakes");
    let m = agent.scrape().unwrap();
    // Each layer's handshake where it travels: the entry's on the veth, the exit's inside
    // the entry's tunnel.
    for (iface, peer) in [(&veth, &entry), (&tun, &exit)] {
        for (dir, msg) in [("tx", "handshake_initiation"), ("rx", "handshake_response")] {
            assert_eq!(
                val(
                    &m,
                    "wirescope_wire_packets_total",
                    &[
                        ("interface", iface),
                        ("peer", peer),
                        ("direction", dir),
                        ("message", msg)
                    ]
                ),
                1,
                "{msg} {dir} of {peer} on {iface}"
            );
        }
    }
    assert_eq!(
        val(
            &m,
            "wirescope_peer_info",
            &[("peer", &entry), ("hop", "1"), ("via", &veth)]
        ),
        1,
        "entry is hop 1 via the veth"
    );
    assert_eq!(
        val(
            &m,
            "wirescope_peer_info",
            &[("peer", &exit), ("hop", "2"), ("via", &entry)]
        ),
        1,
        "exit is hop 2 via the entry peer"
    );

    for gw in [IpAddr::from(GATEWAY_V4), IpAddr::from(GATEWAY_V6)] {
        let dst = SocketAddr::new(gw, 7000);
        let (b, a) = echo_round(&lab, &agent, dst, &PAYLOADS);
        for dir in ["tx", "rx"] {
            let e = if dir == "tx" {
                expect(&lab, &dst, &PAYLOADS, WG_MTU, WG_MTU)
            } else {
                let entry_mtu = lab.entry().expect("entry").wg().mtu;
                expect(&lab, &dst, &PAYLOADS, lab.exit().wg().mtu, entry_mtu)
            };
            // Exit layer: inner packets on the tunnel, their messages inside the tunnel too.
            let what = format!("{gw} exit layer");
            let bytes = (e.inner, e.layer1);
            assert_layer((&b, &a), &what, &tun, &tun, &exit, dir, e.packets, bytes);
            // Entry layer: the exit layer's messages are its tunnel traffic, encrypted again
            // on the veth.
            let what = format!("{gw} entry layer");
            let bytes = (e.layer1, e.layer2);
            assert_layer((&b, &a), &what, &tun, &veth, &entry, dir, e.packets, bytes);
            // One interface, two layers: every packet is encrypted (decrypted) twice.
            assert_crypto(&lab, (&b, &a), &tun, dir, 2 * e.packets);
            // Transit: each layer's packets matched with their messages, one each; both
            // peers belong to the tunnel interface.
            for peer in [&exit, &entry] {
                let (n, sum) = transit(&b, &a, &tun, peer, dir);
                assert_eq!(n, e.packets, "{gw} transit {dir} of {peer}");
                assert!(
                    sum > 0.0 && sum < n as f64,
                    "{gw} transit {dir} of {peer}: {sum} s over {n}"
                );
            }
            // The veth never carries the exit layer in the clear.
            let x = [
                ("interface", veth.as_str()),
                ("peer", &exit),
                ("direction", dir),
            ];
            assert_eq!(delta(&b, &a, "wirescope_wire_packets_total", &x), 0);
        }
    }
    assert_peer_state_matches_wg(&lab, &agent);

    stop(agent);
    lab.teardown().unwrap();
}

/// TCP through the tunnel: each inner packet becomes one data message (GSO counted per
/// segment), and the overhead per packet stays within the formula's bounds: 20 + 8 + 32
/// bytes plus 0..15 of padding.
#[test]
fn tcp_overhead_per_packet_within_formula_bounds() {
    let Some(lab) = lab_up(
        "tcp_overhead_per_packet_within_formula_bounds",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names {
        tun, veth, relay, ..
    } = Names::of(&lab);
    let agent = start(&lab, "tcp");
    lab.handshake(Duration::from_secs(20)).expect("handshake");

    // Transit time at rest: one ping at a time, every packet matched with its message.
    const PINGS: u32 = 40;
    let b = agent.scrape().unwrap();
    ping(&lab, PINGS);
    let a = agent.scrape().unwrap();
    let mut idle_mean = [0.0; 2];
    for (i, dir) in ["tx", "rx"].into_iter().enumerate() {
        let (n, sum) = transit(&b, &a, &tun, &relay, dir);
        let w = [
            ("interface", veth.as_str()),
            ("peer", &relay),
            ("direction", dir),
            ("message", "data"),
        ];
        assert_eq!(n, PINGS as u64, "{dir}: one transit per ping");
        assert_eq!(n, delta(&b, &a, "wirescope_wire_packets_total", &w));
        idle_mean[i] = sum / n as f64;
    }

    let gw = GATEWAY_V4.to_string();
    let mut server = lab
        .spawn(&lab.exit().netns, &["iperf3", "-s", "-1", "-B", &gw])
        .expect("iperf3 server");
    wait_tcp_listening(&lab.exit().netns, 5201);
    let b = agent.scrape().unwrap();
    let out = lab
        .exec(
            &lab.client().netns,
            &["iperf3", "-c", &gw, "-t", "2", "-b", "100M", "-J"],
        )
        .expect("iperf3 client");
    assert!(out.status.success());
    let _ = server.wait();
    let a = agent.scrape().unwrap();

    for dir in ["tx", "rx"] {
        let t = [
            ("interface", tun.as_str()),
            ("peer", &relay),
            ("direction", dir),
        ];
        let w = [
            ("interface", veth.as_str()),
            ("peer", &relay),
            ("direction", dir),
            ("message", "data"),
        ];
        let (tp, tb) = (
            delta(&b, &a, "wirescope_tunnel_packets_total", &t),
            delta(&b, &a, "wirescope_tunnel_bytes_total", &t),
        );
        let (wp, wb) = (
            delta(&b, &a, "wirescope_wire_packets_total", &w),
            delta(&b, &a, "wirescope_wire_bytes_total", &w),
        );
        assert!(tp > 100, "{dir}: iperf3 moved only {tp} packets");
        // boringtun drops some of what it receives when its threads fall behind, with no
        // counter to read (7,256 messages brought 7,182 packets on a loaded CI machine; exact
        // when quiet). The dropped messages' bytes cannot be told apart from the overhead,
        // so there the overhead is checked only when nothing was dropped.
        let drops = dir == "rx" && lab.wireguard == lab::WgImpl::Boringtun;
        if drops {
            assert!(
                wp >= tp && wp - tp <= wp / 50,
                "{dir}: {wp} data messages for {tp} inner packets (boringtun may drop up to 2 %)"
            );
        } else {
            assert_eq!(wp, tp, "{dir}: one data message per inner packet");
        }
        if wp == tp {
            let overhead = wb - tb;
            let min = tp * (OUTER_V4 as u64 + 8 + 32);
            let max = min + tp * 15;
            assert!(
                (min..=max).contains(&overhead),
                "{dir}: overhead {overhead} B over {tp} packets, want {min}..={max}"
            );
        }
        // Under load, packets queue before encryption and a userspace implementation's
        // threads reorder them by dozens: matched all the same (a packet WireGuard dropped
        // is passed over; the matcher looks 64 slots either way), and tx transit takes
        // longer. With 8 ahead and 4 behind, boringtun on a busy machine fell below 99 %
        // here in 7 runs of 36 (rx down to 57 % when it also dropped messages); with 64,
        // in none of 35 under the same load.
        let (n, sum) = transit(&b, &a, &tun, &relay, dir);
        assert!(
            n <= wp && n * 100 >= tp.min(wp) * 99,
            "{dir}: {n} transits for {wp} data messages ({tp} packets)"
        );
        if dir == "tx" {
            let mean = sum / n as f64;
            eprintln!(
                "tx transit: {:.0} us at rest, {:.0} us under iperf3 ({n} messages)",
                idle_mean[0] * 1e6,
                mean * 1e6
            );
            // Longer, not a set factor: on a loaded CI machine the rest figure itself
            // swells (222 us at rest against 392 us under load in one such run).
            assert!(
                mean > idle_mean[0],
                "tx transit under load {:.0} us, at rest {:.0} us",
                mean * 1e6,
                idle_mean[0] * 1e6
            );
        }
    }
    stop(agent);
    lab.teardown().unwrap();
}

/// Transit time of `peer` (a peer of tunnel `tun`) in `dir` between two scrapes: (count,
/// sum in seconds).
fn transit(b: &Metrics, a: &Metrics, tun: &str, peer: &str, dir: &str) -> (u64, f64) {
    let l = [("interface", tun), ("peer", peer), ("direction", dir)];
    let count = delta(b, a, "wirescope_tunnel_transit_seconds_count", &l);
    let sum = a
        .get("wirescope_tunnel_transit_seconds_sum", &l)
        .expect("one series")
        - b.get("wirescope_tunnel_transit_seconds_sum", &l)
            .expect("one series");
    (count, sum)
}

/// Programs of ours attached in `ns`, as bpftool lists them.
fn attached_programs(lab: &Lab, ns: &str) -> usize {
    let out = lab
        .exec(ns, &["bpftool", "net", "show"])
        .expect("bpftool net show");
    String::from_utf8_lossy(&out.stdout)
        .matches("wirescope_")
        .count()
}

/// Datagrams of `payload` bytes to `dst` from the client, no answer expected; kernel
/// WireGuard refuses (ENOKEY) what no peer takes, after TC egress has seen it.
fn blast(lab: &Lab, dst: SocketAddr, n: usize, payload: usize) {
    xtask::udp::send_udp_to_no_peer(&lab.client().netns, dst, &vec![payload; n]).expect("send");
}

/// Changes of peers, allowed IPs and endpoints reach the maps within 2 s; an interface that
/// appears later is attached; a second agent in the same namespace refuses to start, one
/// after a crashed one works; a clean stop detaches everything.
#[test]
fn resync_reattach_and_coexistence() {
    let Some(lab) = lab_up(
        "resync_reattach_and_coexistence",
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
    let agent = start(&lab, "resync");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let tx = |peer: &str| {
        [
            ("interface", tun.clone()),
            ("peer", peer.to_string()),
            ("direction", "tx".to_string()),
        ]
    };
    let get = |m: &Metrics, peer: &str| {
        let l = tx(peer);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        val(m, "wirescope_tunnel_packets_total", &l)
    };

    // The relay's count from here to the roaming below: 5 + 3 packets. On boringtun each
    // change below removes and re-adds the peer (WgImpl::set_peer): the same public key
    // keeps its id, so its count goes on, not from zero.
    let start_count = get(&agent.scrape().unwrap(), &relay);

    // Allowed IPs narrowed: traffic to 10.200.0.5 (routed into the tunnel) matches no peer.
    lab.exec(&cns, &["ip", "route", "add", "10.200.0.0/16", "dev", &tun])
        .unwrap();
    lab.wireguard
        .set_peer(&cns, &tun, &relay, &["allowed-ips", "10.64.0.0/10"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let dst: SocketAddr = "10.200.0.5:9".parse().unwrap();
    let b = agent.scrape().unwrap();
    blast(&lab, dst, 7, 50);
    let a = agent.scrape().unwrap();
    assert_eq!(
        get(&a, "unknown") - get(&b, "unknown"),
        7,
        "no peer's allowed IPs match"
    );
    assert_eq!(get(&a, &relay) - get(&b, &relay), 0);

    // Widened again: within 2 s the same traffic is the relay's.
    lab.wireguard
        .set_peer(
            &cns,
            &tun,
            &relay,
            &["allowed-ips", "10.64.0.0/10,10.200.0.0/16"],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let b = agent.scrape().unwrap();
    blast(&lab, dst, 5, 50);
    let a = agent.scrape().unwrap();
    assert_eq!(
        get(&a, &relay) - get(&b, &relay),
        5,
        "allowed IPs re-synced within 2 s"
    );
    assert_eq!(get(&a, "unknown") - get(&b, "unknown"), 0);

    // Roaming: the relay gets a second address and the client moves its endpoint there.
    let rns = lab.exit().netns.clone();
    let rveth = lab.exit().underlay().name.clone();
    lab.exec(
        &rns,
        &["ip", "addr", "add", "198.51.100.9/24", "dev", &rveth],
    )
    .unwrap();
    // And answers from it. Kernel WireGuard and wireguard-go reply from the address a
    // message came to anyway; boringtun replies from the route's source address, and the
    // client, which roams to where authenticated messages come from, would go back to the
    // first address.
    lab.exec(
        &rns,
        &[
            "ip",
            "route",
            "change",
            "198.51.100.0/24",
            "dev",
            &rveth,
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "198.51.100.9",
        ],
    )
    .unwrap();
    lab.wireguard
        .set_peer(&cns, &tun, &relay, &["endpoint", "198.51.100.9:51820"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let (b, a) = echo_round(
        &lab,
        &agent,
        SocketAddr::new(GATEWAY_V4.into(), 7000),
        &[10, 20, 30],
    );
    let w = [
        ("interface", veth.as_str()),
        ("peer", relay.as_str()),
        ("direction", "tx"),
        ("message", "data"),
    ];
    assert_eq!(
        delta(&b, &a, "wirescope_wire_packets_total", &w),
        3,
        "new endpoint attributed to the relay"
    );
    assert_eq!(
        get(&a, &relay) - start_count,
        5 + 3,
        "the relay's count through every change of its configuration"
    );

    // An interface that appears later is attached within 2 s.
    let (late, attached) = late_interface_attached(&agent, &cns, PREFIX);
    assert!(attached, "{late} attached within 4 s of appearing");

    // A second agent in the same namespace refuses to start (exit 1), naming the running
    // one; the first is unharmed.
    let out = xtask::netns::command(&cns, &bin().display().to_string())
        .args(["run", "--web.listen-address", "127.0.0.1:9587"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "second agent: {err}");
    assert!(
        err.contains("already running in this network namespace")
            && err.contains("serving http://127.0.0.1:9586"),
        "names the running agent: {err}"
    );
    let (b1, a1) = echo_round(
        &lab,
        &agent,
        SocketAddr::new(GATEWAY_V4.into(), 7000),
        &[3, 4, 5],
    );
    assert_eq!(get(&a1, &relay) - get(&b1, &relay), 3);

    // The first crashes; a second starts fine after the crash (the claim died with it).
    agent.kill().unwrap();
    let third = start(&lab, "third");
    let b3 = third.scrape().unwrap();
    blast(&lab, dst, 4, 10);
    assert_eq!(get(&third.scrape().unwrap(), &relay) - get(&b3, &relay), 4);

    // Clean stops detach everything.
    assert!(third.stop().unwrap().success());
    assert_eq!(
        attached_programs(&lab, &cns),
        0,
        "no wirescope program left attached"
    );
    lab.teardown().unwrap();
}

/// `count` pings from the client to the relay's tunnel address, 20 ms apart: each reply is
/// one data message to the client. Losses are expected under impairment.
fn ping(lab: &Lab, count: u32) {
    common::ping(lab, count, &["-W", "1"], true);
}

/// Wire health through the impairing relay in the hop, exact against its own counters: the
/// handshake is one round trip; with every 10th data message to the client dropped, the
/// gaps equal the drops (N/10) and nothing is late; with every 5th pair swapped, late
/// messages equal the swapped pairs (N/10 pairs) and so do the gaps they add.
#[test]
fn wire_health_under_impairment() {
    use xtask::impair::{DirRules, Impairment};
    let mut cfg = LabConfig::new(Topology::Single, PREFIX);
    cfg.hop = true;
    let Some(lab) = lab_up("wire_health_under_impairment", cfg) else {
        return;
    };
    let Names { veth, relay, .. } = Names::of(&lab);
    let agent = start(&lab, "wire-health");
    let l = [("interface", veth.as_str()), ("peer", relay.as_str())];

    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let m = agent.scrape().unwrap();
    assert_eq!(val(&m, "wirescope_handshake_rtt_seconds_count", &l), 1);
    assert_eq!(val(&m, "wirescope_handshake_timeouts_total", &l), 0);

    let imp = lab
        .start_impairment(Impairment::none())
        .expect("impairing relay");
    // The client's endpoint of the relay is now the hop: let the agent sync it (< 2 s),
    // and the relay learn the client.
    std::thread::sleep(Duration::from_secs(3));
    ping(&lab, 10);
    let to_client = |d: DirRules| Impairment {
        to_client: d,
        to_relay: DirRules::default(),
    };

    const N: u32 = 100;
    imp.set(to_client(DirRules {
        drop_every: Some(10),
        ..Default::default()
    }));
    let (s0, before) = (imp.stats(), agent.scrape().unwrap());
    // 5 more than N: the last drop (the N-th) shows as a gap only when a later one arrives.
    ping(&lab, N + 5);
    let (s1, after) = (imp.stats(), agent.scrape().unwrap());
    let dropped = s1.to_client.dropped - s0.to_client.dropped;
    assert_eq!(dropped, (N / 10) as u64, "{s1:?}");
    assert_eq!(
        delta(&before, &after, "wirescope_rx_counter_gaps_total", &l),
        dropped
    );
    assert_eq!(
        delta(&before, &after, "wirescope_rx_late_packets_total", &l),
        0
    );

    imp.set(to_client(DirRules {
        reorder_every: Some(5),
        ..Default::default()
    }));
    let (s0, before) = (imp.stats(), agent.scrape().unwrap());
    ping(&lab, N);
    std::thread::sleep(Duration::from_millis(500));
    let (s1, after) = (imp.stats(), agent.scrape().unwrap());
    let swapped = s1.to_client.reordered_pairs - s0.to_client.reordered_pairs;
    assert_eq!(swapped, (N / 10) as u64, "{s1:?}");
    let late = delta(&before, &after, "wirescope_rx_late_packets_total", &l);
    assert_eq!(late, swapped);
    assert_eq!(
        delta(&before, &after, "wirescope_rx_counter_gaps_total", &l),
        late
    );
    assert_eq!(val(&after, "wirescope_handshake_timeouts_total", &l), 0);
    drop(imp);
    lab.teardown().unwrap();
}
