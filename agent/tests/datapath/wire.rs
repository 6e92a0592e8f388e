//! The wire role: WireGuard messages on the underlay, counted per peer by their remote
//! endpoint and per kind, with the outer L3 length, over Ethernet, VLAN tags and bare IP;
//! messages of endpoints nobody knows through a local listen port in UNKNOWN_WIRE (an LRU
//! map) and in their total, which its evictions leave, also when more strangers come than
//! it holds; and nothing for what is not a WireGuard message (sizes, types, reserved bytes,
//! TCP, later fragments, non-IP frames), while a first fragment counts its whole datagram
//! once.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use agent_common::{
    fixtures::{self, ETH_P_ARP, Ext, Framing, Ipv4, Ipv6, arp_request, tcp, udp, wg},
    maps::{Counter, PEER_UNKNOWN, kind, names, wire::MAX_UNKNOWN_WIRE},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};
use wirescope::{
    metrics::{self, tunnel::TunnelCollector},
    sync::{inventory::Inventory, peer_label::EndpointLabeler},
};

use crate::client::{
    Delta, ENTRY, ENTRY_RELAY_V4, Lab, OTHER_PORT, base_hdr, ep, families, ip_header, ip4,
    messages, udp_flow, underlay_for,
};
use crate::common::{self, Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT};

/// UDP payloads sent to a WireGuard endpoint that are not WireGuard messages.
fn not_wireguard() -> Vec<(String, Vec<u8>)> {
    let resized = |mut m: Vec<u8>, len: usize| {
        m.resize(len, 0x55);
        m
    };
    let with = |mut m: Vec<u8>, at: usize, v: u8| {
        m[at] = v;
        m
    };
    let mut out: Vec<(String, Vec<u8>)> = [
        ("empty", vec![]),
        ("15 bytes", resized(wg::keepalive(1, 0), 15)),
        ("16-byte data header only", resized(wg::keepalive(1, 0), 16)),
        ("data of 31", resized(wg::keepalive(1, 0), 31)),
        ("data plaintext 1", wg::data_with_plaintext(1, 0, 1)),
        ("data plaintext 8", wg::data_with_plaintext(1, 0, 8)),
        ("data plaintext 17", wg::data_with_plaintext(1, 0, 17)),
        ("data plaintext 19", wg::data_with_plaintext(1, 0, 19)),
        ("initiation of 147", resized(wg::initiation(1), 147)),
        ("initiation of 149", resized(wg::initiation(1), 149)),
        ("response of 91", resized(wg::response(1, 2), 91)),
        ("response of 93", resized(wg::response(1, 2), 93)),
        ("cookie of 63", resized(wg::cookie_reply(1), 63)),
        ("cookie of 65", resized(wg::cookie_reply(1), 65)),
        ("type 0", with(wg::initiation(1), 0, 0)),
        ("type 5", with(wg::initiation(1), 0, 5)),
        ("type 255 at data size", with(wg::keepalive(1, 0), 0, 0xff)),
        ("type 2 at initiation size", with(wg::initiation(1), 0, 2)),
        ("type 1 at cookie size", with(wg::cookie_reply(1), 0, 1)),
        ("DNS-looking", fixtures::payload(40)),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_string(), p))
    .collect();
    for (name, msg) in [
        ("initiation", wg::initiation(1)),
        ("response", wg::response(1, 2)),
        ("cookie", wg::cookie_reply(1)),
        ("data", wg::data(1, 2, 100, 1420)),
        ("keepalive", wg::keepalive(1, 2)),
    ] {
        for at in 1..4 {
            out.push((
                format!("{name} reserved byte {at}"),
                with(msg.clone(), at, 1),
            ));
        }
    }
    out
}

/// Every message type to and from a known endpoint: that peer, that kind, bytes = the outer
/// L3 length; over Ethernet, one and two VLAN tags, and bare IP; from the listen port or
/// any other local port.
#[test]
fn messages_of_known_endpoints() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    for framing in Framing::ALL {
        underlay_for(&mut lab, framing);
        for (fam, local, known, peer, _) in families() {
            for lport in [LISTEN_PORT, OTHER_PORT] {
                for (name, msg, k) in messages() {
                    let what = format!("{fam} {name} {framing:?} from port {lport}");
                    for dir in Dir::BOTH {
                        let l3 = udp_flow(dir, (local, lport), known, &msg);
                        let l3_len = base_hdr(local) + 8 + msg.len() as u64;
                        assert_eq!(l3.len() as u64, l3_len);
                        let frame = framing.frame(&l3);
                        let want = Delta::none().counter(under, peer, k, dir, 1, l3_len);
                        lab.expect(&what, dir, under, &frame, want);
                        lab.expect_truncations_count_nothing(&what, dir, under, &frame);
                    }
                }
            }
        }
    }
    // Ethernet padding after a short packet (a keepalive over IPv4 is 60 bytes, the
    // minimum frame; a cookie reply plus 30 bytes of padding) does not count.
    underlay_for(&mut lab, Framing::Ethernet);
    for dir in Dir::BOTH {
        let l3 = udp_flow(
            dir,
            (ip4(LOCAL_V4), LISTEN_PORT),
            (ip4(ENTRY_RELAY_V4), RELAY_PORT),
            &wg::cookie_reply(5),
        );
        let mut frame = Framing::Ethernet.frame(&l3);
        frame.extend_from_slice(&[0u8; 30]);
        let want = Delta::none().counter(under, ENTRY, kind::COOKIE_REPLY, dir, 1, 20 + 8 + 64);
        lab.expect("padded frame", dir, under, &frame, want);
    }
}

/// Not a known endpoint, but the local side is a listen port: UNKNOWN_WIRE, keyed by the
/// remote endpoint. Neither: nothing. The direction decides which side is local.
#[test]
fn unknown_endpoints_and_listen_ports() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    for framing in [Framing::Ethernet, Framing::Vlan(7), Framing::L3] {
        underlay_for(&mut lab, framing);
        for (fam, local, known, _, stranger) in families() {
            for (name, msg, k) in messages() {
                let what = format!("{fam} {name} {framing:?}");
                for dir in Dir::BOTH {
                    let l3_len = base_hdr(local) + 8 + msg.len() as u64;
                    // From/to the listen port: counted for the endpoint.
                    let l3 = udp_flow(dir, (local, LISTEN_PORT), stranger, &msg);
                    let frame = framing.frame(&l3);
                    let endpoint = ep(stranger.0, stranger.1);
                    let want = Delta::none().unknown(under, endpoint, k, dir, 1, l3_len);
                    lab.expect(&format!("{what} listen port"), dir, under, &frame, want);
                    lab.expect_truncations_count_nothing(&what, dir, under, &frame);
                    // Neither side known.
                    let l3 = udp_flow(dir, (local, OTHER_PORT), stranger, &msg);
                    lab.expect(
                        &format!("{what} neither"),
                        dir,
                        under,
                        &framing.frame(&l3),
                        Delta::none(),
                    );
                    // The listen port on the remote side is not ours.
                    let l3 = udp_flow(dir, (local, OTHER_PORT), (stranger.0, LISTEN_PORT), &msg);
                    lab.expect(
                        &format!("{what} remote listen port"),
                        dir,
                        under,
                        &framing.frame(&l3),
                        Delta::none(),
                    );
                    // A known endpoint on the local side is not the remote one.
                    let l3 = udp_flow(dir, known, (local, OTHER_PORT), &msg);
                    lab.expect(
                        &format!("{what} endpoint on the wrong side"),
                        dir,
                        under,
                        &framing.frame(&l3),
                        Delta::none(),
                    );
                }
            }
        }
    }
}

/// UDP to a known endpoint that is not WireGuard (sizes, reserved bytes, types), TCP, later
/// fragments, ARP and other non-IP frames: nothing.
#[test]
fn rejects_what_is_not_wireguard() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    underlay_for(&mut lab, Framing::Ethernet);
    for (fam, local, known, _, _) in families() {
        for (name, payload) in not_wireguard() {
            for dir in Dir::BOTH {
                for framing in [Framing::Ethernet, Framing::QinQ(1, 2)] {
                    let what = format!("{fam} {name} {framing:?}");
                    let frame =
                        framing.frame(&udp_flow(dir, (local, LISTEN_PORT), known, &payload));
                    lab.expect(&what, dir, under, &frame, Delta::none());
                }
            }
        }
        for (name, msg, _) in messages() {
            for dir in Dir::BOTH {
                let ((src, sport), (dst, dport)) = dir.flow((local, LISTEN_PORT), known);
                // The same bytes over TCP.
                let hdr = ip_header(src, dst);
                let seg = hdr.build(IPPROTO_TCP, &tcp(sport, dport, 0, &msg));
                let what = format!("{fam} {name} over tcp");
                lab.expect(
                    &what,
                    dir,
                    under,
                    &Framing::Ethernet.frame(&seg),
                    Delta::none(),
                );
                // A later fragment whose payload starts like a UDP datagram with a valid
                // message: its bytes are the middle of some other datagram.
                let dgram = udp(sport, dport, &msg);
                let later: Vec<Vec<u8>> = match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => vec![
                        Ipv4::new(s.octets(), d.octets())
                            .frag_offset(185)
                            .build(IPPROTO_UDP, &dgram),
                        Ipv4::new(s.octets(), d.octets())
                            .mf(true)
                            .frag_offset(1)
                            .build(IPPROTO_UDP, &dgram),
                    ],
                    (IpAddr::V6(s), IpAddr::V6(d)) => vec![
                        Ipv6::new(s.octets(), d.octets())
                            .ext(Ext::Fragment {
                                offset: 185,
                                more: false,
                                id: 3,
                            })
                            .build(IPPROTO_UDP, &dgram),
                        Ipv6::new(s.octets(), d.octets())
                            .ext(Ext::Fragment {
                                offset: 1,
                                more: true,
                                id: 3,
                            })
                            .build(IPPROTO_UDP, &dgram),
                    ],
                    _ => unreachable!(),
                };
                for (i, l3) in later.iter().enumerate() {
                    let what = format!("{fam} {name} as later fragment {i}");
                    lab.expect(
                        &what,
                        dir,
                        under,
                        &Framing::Ethernet.frame(l3),
                        Delta::none(),
                    );
                }
            }
        }
    }
    // Not IP at all.
    let arp = Framing::Ethernet.frame_ethertype(ETH_P_ARP, &arp_request(LOCAL_V4, ENTRY_RELAY_V4));
    let arp_vlan =
        Framing::Vlan(5).frame_ethertype(ETH_P_ARP, &arp_request(LOCAL_V4, ENTRY_RELAY_V4));
    // A valid WireGuard packet behind LLDP's ethertype, and behind three VLAN tags.
    let wg_l3 = udp_flow(
        Dir::Tx,
        (ip4(LOCAL_V4), LISTEN_PORT),
        (ip4(ENTRY_RELAY_V4), RELAY_PORT),
        &wg::initiation(1),
    );
    let lldp = Framing::Ethernet.frame_ethertype(0x88cc, &wg_l3);
    let mut three_tags = Framing::QinQ(1, 2).frame(&wg_l3);
    three_tags.splice(20..20, [0x81, 0x00, 0x00, 0x03]);
    for (what, frame) in [
        ("arp", arp),
        ("arp vlan", arp_vlan),
        ("lldp", lldp),
        ("three vlan tags", three_tags),
    ] {
        for dir in Dir::BOTH {
            lab.expect(what, dir, under, &frame, Delta::none());
        }
    }
    // The same on the tunnel interface (bare IP): ARP bytes are no IP packet.
    let arp = arp_request(LOCAL_V4, ENTRY_RELAY_V4);
    let tun = lab.tun;
    for dir in Dir::BOTH {
        lab.expect("arp bytes on the tunnel", dir, tun, &arp, Delta::none());
    }
}

/// A first fragment of a WireGuard datagram carries the message's type, reserved bytes and
/// the UDP length of the whole datagram: it counts as that message, once, with the size of the
/// whole datagram (the later fragments carry no ports and are not attributed).
#[test]
fn first_fragment_counts_the_message_once() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    for dir in Dir::BOTH {
        let msg = wg::data(0x1122_3344, 1, 1400, 1420);
        let ((s, sp), (d, dp)) = dir.flow((LOCAL_V4, LISTEN_PORT), (ENTRY_RELAY_V4, RELAY_PORT));
        let dgram = udp(sp, dp, &msg);
        let first = Ipv4::new(s, d).mf(true).build(IPPROTO_UDP, &dgram[..1000]);
        let rest = Ipv4::new(s, d)
            .frag_offset(125)
            .build(IPPROTO_UDP, &dgram[1000..]);
        // The whole datagram once: one outer IP header + UDP header + message.
        let whole = (20 + dgram.len()) as u64;
        let want = Delta::none().counter(under, ENTRY, kind::DATA, dir, 1, whole);
        lab.expect(
            "first fragment",
            dir,
            under,
            &Framing::Ethernet.frame(&first),
            want,
        );
        lab.expect(
            "last fragment",
            dir,
            under,
            &Framing::Ethernet.frame(&rest),
            Delta::none(),
        );
    }
}

/// Strangers beyond UNKNOWN_WIRE's capacity (issue 15): handshake initiations received from
/// MAX_UNKNOWN_WIRE + 500 distinct endpoints on the listen port and as many cookie replies
/// sent to them, one message each. The map never holds more than its capacity and refuses
/// nothing (it evicts), and per direction and message the exported series, one per endpoint
/// still held plus `endpoint:other`, sum to exactly every message and its bytes.
#[test]
fn strangers_beyond_capacity_are_all_counted() {
    const N: u32 = MAX_UNKNOWN_WIRE + 500;
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    let local = (ip4(LOCAL_V4), LISTEN_PORT);
    // (direction, message, its kind, its `message` label, outer L3 length)
    let runs = [
        (
            Dir::Rx,
            wg::initiation(0x0102_0304),
            kind::HANDSHAKE_INITIATION,
            "handshake_initiation",
            20 + 8 + 148,
        ),
        (
            Dir::Tx,
            wg::cookie_reply(0x0102_0304),
            kind::COOKIE_REPLY,
            "cookie_reply",
            20 + 8 + 64,
        ),
    ];
    for (dir, msg, _, _, l3_len) in &runs {
        for i in 0..N {
            // 198.18.0.0/15 (benchmarking): no peer's endpoint.
            let stranger = (ip4([198, 18, (i >> 8) as u8, i as u8]), 40_000);
            let l3 = udp_flow(*dir, local, stranger, msg);
            assert_eq!(l3.len() as u64, *l3_len);
            let frame = Framing::Ethernet.frame(&l3);
            common::run_tc(&mut lab.dp, "stranger", dir.prog(), under, (0, 0), &frame);
        }
    }

    // The entries still held: each one message of its endpoint, at most the capacity.
    let held = lab.dp.wire.unknown_wire().expect("reading UNKNOWN_WIRE");
    eprintln!("{} of {} strangers held in UNKNOWN_WIRE", held.len(), 2 * N);
    assert!(held.len() <= MAX_UNKNOWN_WIRE as usize, "{}", held.len());
    for (k, c) in &held {
        let (_, _, _, _, l3_len) = runs
            .iter()
            .find(|r| (r.0.code(), r.2) == (k.dir, k.kind))
            .unwrap_or_else(|| panic!("an entry of another kind or direction: {k:?}"));
        assert_eq!(k.ifindex, under);
        assert_eq!(
            *c,
            Counter {
                packets: 1,
                bytes: *l3_len
            },
            "{k:?}"
        );
    }
    let (_, entries, cap) = lab
        .dp
        .map_usage()
        .into_iter()
        .find(|(m, _, _)| *m == names::UNKNOWN_WIRE)
        .expect("UNKNOWN_WIRE in map_usage()");
    assert_eq!((entries, cap), (held.len() as u64, MAX_UNKNOWN_WIRE as u64));
    // The totals, in COUNTERS under no peer (checked after the export).
    let counters: BTreeMap<_, _> = lab
        .dp
        .tunnel
        .counters()
        .expect("reading COUNTERS")
        .into_iter()
        .map(|(k, c)| ((k.ifindex, k.peer, k.kind, k.dir), c))
        .collect();

    // What the agent exports, as a scrape renders it.
    let Lab { dp, .. } = lab;
    let (text, dp) = rendered(dp);
    let iface = format!("ifindex{under}");
    let mut other_sum = 0;
    for (dir, _, k, msg, l3_len) in &runs {
        let d = if *dir == Dir::Rx { "rx" } else { "tx" };
        let mut sum = Counter::default();
        let mut series = 0;
        let mut other = None;
        for (family, packets) in [
            ("wirescope_wire_packets_total", true),
            ("wirescope_wire_bytes_total", false),
        ] {
            let tail = format!("\",direction=\"{d}\",message=\"{msg}\"}}");
            for line in text.lines() {
                let Some(rest) =
                    line.strip_prefix(&format!("{family}{{interface=\"{iface}\",peer=\""))
                else {
                    continue;
                };
                let Some((peer, value)) = rest.split_once(&tail) else {
                    continue;
                };
                assert!(peer.starts_with("endpoint:"), "{line}");
                let v: u64 = value.trim().parse().expect(line);
                if packets {
                    sum.packets += v;
                    series += 1;
                } else {
                    sum.bytes += v;
                }
                if peer == "endpoint:other" && packets {
                    other = Some(v);
                }
            }
        }
        let held_here = held
            .iter()
            .filter(|(key, _)| (key.dir, key.kind) == (dir.code(), *k))
            .count() as u64;
        eprintln!("{d} {msg}: {held_here} endpoints held, other {other:?}");
        assert_eq!(
            sum,
            Counter {
                packets: N as u64,
                bytes: N as u64 * l3_len
            },
            "{d} {msg}: the endpoints' series and endpoint:other sum to every message"
        );
        assert_eq!(
            series,
            held_here + 1,
            "one series per endpoint held, and other"
        );
        let other = other.expect("an endpoint:other series");
        assert_eq!(
            other,
            N as u64 - held_here,
            "other is exactly what was evicted"
        );
        other_sum += other;
    }
    assert!(
        other_sum >= 2 * N as u64 - MAX_UNKNOWN_WIRE as u64,
        "evicted {other_sum}"
    );
    for (dir, _, k, _, l3_len) in &runs {
        assert_eq!(
            counters.get(&(under, PEER_UNKNOWN, *k, dir.code())),
            Some(&Counter {
                packets: N as u64,
                bytes: N as u64 * l3_len
            }),
            "{dir:?} total"
        );
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("wirescope_wire_") && l.contains("peer=\"unknown\"")),
        "the totals are no series of their own"
    );
    // The LRU map evicts: nothing refused.
    common::assert_no_refused_updates(&dp, "strangers beyond capacity");
}

/// Unknown endpoints that fall silent leave their series once silent for the given time
/// (the agent: `--peer-grace`), as a gone peer does, and what they counted moves to
/// `endpoint:other` exactly: ten strangers send three initiations each, five of them one
/// more later; the silent five go at the second look, the other five at the third, and the
/// series always sum to every message.
#[test]
fn silent_strangers_leave_their_series_and_keep_their_counts() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    let local = (ip4(LOCAL_V4), LISTEN_PORT);
    let msg = wg::initiation(0x0a0b_0c0d);
    const L3: u64 = 20 + 8 + 148;
    let send = |lab: &mut Lab, i: u8, n: u32| {
        let l3 = udp_flow(Dir::Rx, local, (ip4([198, 18, 9, i]), 40_000), &msg);
        assert_eq!(l3.len() as u64, L3);
        let frame = Framing::Ethernet.frame(&l3);
        for _ in 0..n {
            common::run_tc(
                &mut lab.dp,
                "stranger",
                Dir::Rx.prog(),
                under,
                (0, 0),
                &frame,
            );
        }
    };
    // The exported initiation series of the underlay: endpoint label -> packets, bytes.
    let scrape = |mut lab: Lab| -> (Lab, BTreeMap<String, (u64, u64)>) {
        let (text, dp) = rendered(lab.dp);
        lab.dp = dp;
        let mut series: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let tail = "\",direction=\"rx\",message=\"handshake_initiation\"}";
        for (family, packets) in [
            ("wirescope_wire_packets_total", true),
            ("wirescope_wire_bytes_total", false),
        ] {
            let head = format!("{family}{{interface=\"ifindex{under}\",peer=\"");
            for line in text.lines() {
                let Some((peer, value)) = line
                    .strip_prefix(&head)
                    .and_then(|rest| rest.split_once(tail))
                else {
                    continue;
                };
                let v: u64 = value.trim().parse().expect(line);
                let e = series.entry(peer.to_string()).or_default();
                if packets {
                    e.0 = v;
                } else {
                    e.1 = v;
                }
            }
        }
        (lab, series)
    };
    for i in 0..10 {
        send(&mut lab, i, 3);
    }
    let idle = Duration::from_secs(60);
    let t0 = Instant::now();
    // First look: everything is new, nothing goes.
    assert_eq!(lab.dp.wire.expire_strangers(t0, idle).expect("expiring"), 0);
    for i in 0..5 {
        send(&mut lab, i, 1);
    }
    // Half a minute on: nobody silent long enough.
    let t = t0 + Duration::from_secs(30);
    assert_eq!(lab.dp.wire.expire_strangers(t, idle).expect("expiring"), 0);
    // A minute on: the five that said nothing more go.
    let t = t0 + Duration::from_secs(61);
    assert_eq!(lab.dp.wire.expire_strangers(t, idle).expect("expiring"), 5);
    let held = lab.dp.wire.unknown_wire().expect("reading UNKNOWN_WIRE");
    assert_eq!(held.len(), 5);
    assert!(held.iter().all(|(k, c)| k.endpoint.addr[3] < 5
        && *c
            == Counter {
                packets: 4,
                bytes: 4 * L3
            }));
    let (lab, series) = scrape(lab);
    assert_eq!(series.len(), 6, "five endpoints and other: {series:?}");
    assert_eq!(series["endpoint:other"], (15, 15 * L3));
    let sum = series.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    assert_eq!(sum, (35, 35 * L3), "every message, once");
    // Another minute on, the other five have been silent since the last look too.
    let mut lab = lab;
    let t = t0 + Duration::from_secs(122);
    assert_eq!(lab.dp.wire.expire_strangers(t, idle).expect("expiring"), 5);
    assert!(lab.dp.wire.unknown_wire().expect("reading").is_empty());
    let (_lab, series) = scrape(lab);
    assert_eq!(
        series.into_iter().collect::<Vec<_>>(),
        vec![("endpoint:other".to_string(), (35, 35 * L3))]
    );
}

/// What the agent exports of the counters, as a scrape renders it (endpoints hashed with a
/// fixed salt), and the datapath lent back.
fn rendered(dp: common::Lent) -> (String, common::Lent) {
    dp.shared(|dp| {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(TunnelCollector::new(
            dp,
            Arc::new(RwLock::new(Inventory::default())),
            EndpointLabeler::with_salt([7; 32], true),
        )));
        metrics::encode_string(&registry, metrics::Format::Prometheus).expect("encoding")
    })
}
