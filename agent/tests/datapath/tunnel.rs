//! The tunnel role: inner packets on the WireGuard interface, counted per peer by the
//! longest prefix of their destination (tx) or source (rx) among the peers' allowed IPs,
//! per interface; unmatched traffic as peer 0 ("unknown"), nothing on an interface the
//! agent does not watch, and GSO/GRO packets once per segment.

use std::net::IpAddr;

use agent_common::{
    fixtures::{self, Ext, Framing, Ipv4, Ipv6, tcp, udp, wg},
    maps::{PEER_UNKNOWN, kind},
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::client::{
    CLIENT_V4, Delta, ENTRY, ENTRY_RELAY_V4, EXIT, EXIT_RELAY_V4, GATEWAY_V4, Lab, REMOTE_V4,
    STRANGER_PORT, STRANGER_V4, client_v6, exit_relay_v6, ip_header, ip4, ip6, messages,
    multihop_maps, remote_v6, udp_between, udp_flow,
};
use crate::common::{Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT, TUNNEL_L3, v6};

/// Inner packets on the tunnel, per peer by longest prefix of the destination (tx) or the
/// source (rx): the exit relay's /32 (/128) beats the exit peer's 0.0.0.0/0 (::/0).
#[test]
fn longest_prefix_match_v4_v6() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    let neighbour_v6 = v6("2001:db8:7::8");
    // (what, local, remote, peer the remote address belongs to, packet builder)
    type Build = Box<dyn Fn(IpAddr, IpAddr) -> Vec<u8>>;
    let udp_of = |len: usize| -> Build {
        Box::new(move |s: IpAddr, d: IpAddr| {
            let hdr = ip_header(s, d);
            let l4 = udp(40000, 53, &fixtures::payload(len - hdr.header_len() - 8));
            hdr.build(IPPROTO_UDP, &l4)
        })
    };
    let tcp_of = |opts: usize, len: usize| -> Build {
        Box::new(move |s: IpAddr, d: IpAddr| {
            let hdr = ip_header(s, d);
            let payload = fixtures::payload(len - hdr.header_len() - 20 - opts);
            hdr.build(IPPROTO_TCP, &tcp(40000, 443, opts, &payload))
        })
    };
    let icmp_of = |len: usize| -> Build {
        Box::new(move |s: IpAddr, d: IpAddr| {
            let hdr = ip_header(s, d);
            let proto = if s.is_ipv4() {
                IPPROTO_ICMP
            } else {
                IPPROTO_ICMPV6
            };
            let mut echo = vec![if s.is_ipv4() { 8 } else { 128 }, 0, 0, 0, 0, 1, 0, 1];
            echo.extend(fixtures::payload(len - hdr.header_len() - 8));
            hdr.build(proto, &echo)
        })
    };
    let v4_options: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s.octets(), d.octets())
            .options(40)
            .build(IPPROTO_UDP, &udp(1, 2, &fixtures::payload(100))),
        _ => unreachable!(),
    });
    let v6_ext: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s.octets(), d.octets())
            .ext(Ext::HopByHop(8))
            .ext(Ext::DestOpts(24))
            .ext(Ext::Fragment {
                offset: 0,
                more: false,
                id: 9,
            })
            .build(IPPROTO_UDP, &udp(1, 2, &fixtures::payload(100))),
        _ => unreachable!(),
    });
    let v6_later_fragment: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s.octets(), d.octets())
            .ext(Ext::Fragment {
                offset: 100,
                more: false,
                id: 9,
            })
            .build(IPPROTO_UDP, &fixtures::payload(200)),
        _ => unreachable!(),
    });
    let v4_later_fragment: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s.octets(), d.octets())
            .mf(true)
            .frag_offset(100)
            .build(IPPROTO_UDP, &fixtures::payload(200)),
        _ => unreachable!(),
    });
    let cases: Vec<(&str, IpAddr, IpAddr, u32, Build)> = vec![
        (
            "v4 udp to the internet",
            ip4(CLIENT_V4),
            ip4(REMOTE_V4),
            EXIT,
            udp_of(100),
        ),
        (
            "v4 udp, Mullvad MTU",
            ip4(CLIENT_V4),
            ip4(REMOTE_V4),
            EXIT,
            udp_of(1380),
        ),
        (
            "v4 ping to the gateway",
            ip4(CLIENT_V4),
            ip4(GATEWAY_V4),
            EXIT,
            icmp_of(84),
        ),
        (
            "v4 tcp to the exit relay",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            tcp_of(12, 200),
        ),
        (
            "v4 ping to the exit relay",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            icmp_of(84),
        ),
        (
            "v4 next to the exit relay (.6)",
            ip4(CLIENT_V4),
            ip4([198, 51, 100, 6]),
            EXIT,
            udp_of(60),
        ),
        (
            "v4 next to the exit relay (.8)",
            ip4(CLIENT_V4),
            ip4([198, 51, 100, 8]),
            EXIT,
            udp_of(60),
        ),
        (
            "v4 options",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            v4_options,
        ),
        (
            "v4 later fragment",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            v4_later_fragment,
        ),
        (
            "v6 udp to the internet",
            ip6(client_v6()),
            ip6(remote_v6()),
            EXIT,
            udp_of(100),
        ),
        (
            "v6 udp, Mullvad MTU",
            ip6(client_v6()),
            ip6(remote_v6()),
            EXIT,
            udp_of(1380),
        ),
        (
            "v6 tcp to the exit relay",
            ip6(client_v6()),
            ip6(exit_relay_v6()),
            ENTRY,
            tcp_of(0, 1000),
        ),
        (
            "v6 ping to the exit relay",
            ip6(client_v6()),
            ip6(exit_relay_v6()),
            ENTRY,
            icmp_of(104),
        ),
        (
            "v6 next to the exit relay",
            ip6(client_v6()),
            ip6(neighbour_v6),
            EXIT,
            udp_of(60),
        ),
        (
            "v6 extension headers",
            ip6(client_v6()),
            ip6(exit_relay_v6()),
            ENTRY,
            v6_ext,
        ),
        (
            "v6 later fragment",
            ip6(client_v6()),
            ip6(remote_v6()),
            EXIT,
            v6_later_fragment,
        ),
    ];
    for (what, local, remote, peer, build) in &cases {
        for dir in Dir::BOTH {
            let (src, dst) = dir.flow(*local, *remote);
            let pkt = build(src, dst);
            let want = Delta::none().tunnel(tun, *peer, dir, 1, pkt.len() as u64);
            lab.expect(what, dir, tun, &pkt, want);
            lab.expect_truncations_count_nothing(what, dir, tun, &pkt);
        }
    }
    // The direction picks the address: tx looks at the destination only, rx at the source.
    // From the exit relay's address to the internet (tx) / the reverse (rx): EXIT.
    for dir in Dir::BOTH {
        for (what, local, remote) in [
            ("v4 direction", ip4(EXIT_RELAY_V4), ip4(REMOTE_V4)),
            ("v6 direction", ip6(exit_relay_v6()), ip6(remote_v6())),
        ] {
            let pkt = udp_between(dir, local, remote, 64);
            let want = Delta::none().tunnel(tun, EXIT, dir, 1, 64);
            lab.expect(what, dir, tun, &pkt, want);
        }
    }
    // Counts accumulate in one entry per (interface, peer, kind, direction).
    let pkt = fixtures::udp_ipv4(CLIENT_V4, 1, REMOTE_V4, 2, 500);
    let before = lab.snapshot();
    for _ in 0..10 {
        lab.run_once("repeat", Dir::Tx, tun, (0, 0), &pkt);
    }
    let got = Lab::delta(&before, &lab.snapshot());
    assert_eq!(got, Delta::none().tunnel(tun, EXIT, Dir::Tx, 10, 5000));
}

/// Traffic no allowed IP covers is peer 0 ("unknown"); the tries are per interface; an
/// interface that is not in IFACES counts nothing at all.
#[test]
fn unmatched_foreign_and_unwatched_interfaces() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, other) = (lab.tun, lab.unwatched);
    // Only the in-tunnel networks, as a non-default-route client would have them (the sync
    // also removes the 0.0.0.0/0, ::/0 and /32 entries written before).
    let mut partial = multihop_maps(tun);
    partial.allowed_v4.clear();
    partial.allowed_v6.clear();
    partial.allowed_v4.insert((tun, [10, 64, 0, 0], 16), EXIT);
    partial
        .allowed_v6
        .insert((tun, v6("fc00:bbbb::"), 32), EXIT);
    lab.set_maps(partial);
    // (what, local, remote: the addresses of a UDP packet, the peer it counts for)
    let (client4, client6) = (ip4(CLIENT_V4), ip6(client_v6()));
    for dir in Dir::BOTH {
        for (what, local, remote, peer) in [
            ("v4 unmatched", client4, ip4(REMOTE_V4), PEER_UNKNOWN),
            (
                "v4 exit relay, /32 gone",
                client4,
                ip4(EXIT_RELAY_V4),
                PEER_UNKNOWN,
            ),
            ("v4 in-tunnel", client4, ip4(GATEWAY_V4), EXIT),
            ("v6 unmatched", client6, ip6(remote_v6()), PEER_UNKNOWN),
            (
                "v6 in-tunnel",
                client6,
                ip6(v6("fc00:bbbb:bbbb:bb01::1")),
                EXIT,
            ),
        ] {
            let pkt = udp_between(dir, local, remote, 120);
            let want = Delta::none().tunnel(tun, peer, dir, 1, 120);
            lab.expect(what, dir, tun, &pkt, want);
        }
    }
    lab.set_maps(multihop_maps(tun));

    // Everything that counts on the watched interfaces, offered to the unwatched one.
    let mut everything: Vec<(String, Vec<u8>)> = Vec::new();
    for dir in Dir::BOTH {
        everything.push((
            format!("{dir:?} tunnel v4"),
            udp_between(dir, client4, ip4(REMOTE_V4), 100),
        ));
        let (s, d) = dir.flow(client_v6(), remote_v6());
        everything.push((
            format!("{dir:?} tunnel v6"),
            fixtures::tcp_ipv6(s, 1, d, 2, 0, 100),
        ));
        for (name, msg, _) in messages() {
            let local = (ip4(LOCAL_V4), LISTEN_PORT);
            let known = (ip4(ENTRY_RELAY_V4), RELAY_PORT);
            let l3 = udp_flow(dir, local, known, &msg);
            everything.push((format!("{dir:?} {name} bare"), l3.clone()));
            everything.push((
                format!("{dir:?} {name} ethernet"),
                Framing::Ethernet.frame(&l3),
            ));
            let stranger = (ip4(STRANGER_V4), STRANGER_PORT);
            let l3 = udp_flow(dir, local, stranger, &msg);
            everything.push((
                format!("{dir:?} {name} listen port"),
                Framing::Ethernet.frame(&l3),
            ));
        }
    }
    for (what, pkt) in &everything {
        for dir in Dir::BOTH {
            lab.expect(what, dir, other, pkt, Delta::none());
        }
    }

    // A second tunnel: the first one's allowed IPs (0.0.0.0/0 included) do not apply to it.
    lab.set_iface("ws-unwatched", other, Some(TUNNEL_L3));
    for dir in Dir::BOTH {
        for (what, local, remote) in [
            ("second tunnel v4", client4, ip4(EXIT_RELAY_V4)),
            ("second tunnel v6", client6, ip6(remote_v6())),
        ] {
            let pkt = udp_between(dir, local, remote, 100);
            let want = Delta::none().tunnel(other, PEER_UNKNOWN, dir, 1, 100);
            lab.expect(what, dir, other, &pkt, want);
        }
    }
    // Detached again: IFACES forgets it, nothing counts.
    lab.set_iface("ws-unwatched", other, None);
    for (what, pkt) in &everything {
        for dir in Dir::BOTH {
            lab.expect(what, dir, other, pkt, Delta::none());
        }
    }
}

/// GSO super-packets (tx) and GRO packets (rx) count once per segment, with the headers every
/// segment will carry.
#[test]
fn gso_counts_segments() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    // (what, family v6?, TCP options, payload, gso_size, gso_segs)
    let cases = [
        ("v4 3 x 1000", false, 12usize, 3000usize, 1000u32, 3u32),
        ("v4 1400 + 1400 + 200", false, 0, 3000, 1400, 3),
        ("v4 2 x 1448", false, 12, 2896, 1448, 2),
        ("v6 3 x 1000", true, 0, 3000, 1000, 3),
        ("v6 2 x 1428 + 10", true, 12, 2866, 1428, 3),
    ];
    for (what, is_v6, opts, payload, size, segs) in cases {
        for dir in Dir::BOTH {
            let pkt = if is_v6 {
                let (s, d) = dir.flow(client_v6(), remote_v6());
                fixtures::tcp_ipv6(s, 40000, d, 443, opts, payload)
            } else {
                let (s, d) = dir.flow(CLIENT_V4, REMOTE_V4);
                fixtures::tcp_ipv4(s, 40000, d, 443, opts, payload)
            };
            // The segments as they will be on the wire: full ones of `size`, the rest last.
            let hdr = if is_v6 { 40 } else { 20 } + 20 + opts as u64;
            let mut left = payload as u64;
            let mut bytes = 0;
            for _ in 0..segs {
                let seg = left.min(size as u64);
                bytes += hdr + seg;
                left -= seg;
            }
            assert_eq!(left, 0, "{what}: fixture and segments disagree");
            let want = Delta::none().tunnel(tun, EXIT, dir, segs as u64, bytes);
            lab.expect_gso(what, dir, tun, (segs, size), &pkt, want);
            // Without GSO it is one packet of its own length.
            let want = Delta::none().tunnel(tun, EXIT, dir, 1, pkt.len() as u64);
            lab.expect(what, dir, tun, &pkt, want);
            // gso_segs 1 is not segmented either.
            lab.expect_gso(what, dir, tun, (1, size), &pkt, want_one(tun, dir, &pkt));
            // gso_segs 0 with a gso_size: a coalesced packet wireguard-go (>= 0.0.20230223)
            // wrote to its TUN device, not yet counted by the kernel: counted from the size.
            let want = Delta::none().tunnel(tun, EXIT, dir, segs as u64, bytes);
            lab.expect_gso(what, dir, tun, (0, size), &pkt, want);
        }
    }

    // UDP GSO of WireGuard data messages on the underlay (wireguard-go sends batches so): two
    // data messages of 1040 bytes in one skb are two messages of 20 + 8 + 1040 bytes each.
    let under = lab.under;
    for dir in Dir::BOTH {
        let msg = wg::data(0x1122_3344, 9, 1000, 1420);
        assert_eq!(msg.len(), 1040);
        let mut batch = msg.clone();
        batch.extend_from_slice(&msg);
        let (s, d) = dir.flow((LOCAL_V4, LISTEN_PORT), (ENTRY_RELAY_V4, RELAY_PORT));
        let l3 = Ipv4::new(s.0, d.0).build(IPPROTO_UDP, &udp(s.1, d.1, &batch));
        let frame = Framing::Ethernet.frame(&l3);
        let want = Delta::none().counter(under, ENTRY, kind::DATA, dir, 2, 2 * (20 + 8 + 1040));
        lab.expect_gso(
            "udp gso of 2 data messages",
            dir,
            under,
            (2, 1048),
            &frame,
            want,
        );
        // The same batch with the segment count left at 0: 2 messages from their size.
        let want = Delta::none().counter(under, ENTRY, kind::DATA, dir, 2, 2 * (20 + 8 + 1040));
        lab.expect_gso(
            "udp gso of 2 data messages, gso_segs 0",
            dir,
            under,
            (0, 1048),
            &frame,
            want,
        );
    }
}

fn want_one(tun: u32, dir: Dir, pkt: &[u8]) -> Delta {
    Delta::none().tunnel(tun, EXIT, dir, 1, pkt.len() as u64)
}
