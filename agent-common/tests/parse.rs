//! Host tests of `agent_common::parse` on exact byte fixtures.

mod common;

use agent_common::{
    fixtures::{
        self, ETH_P_8021Q, ETH_P_ARP, Ext, Framing, IpHeader, Ipv4, Ipv6, arp_request,
        fix_ipv4_checksum, payload, tcp, udp,
    },
    parse::{
        IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, L4, Packet, ParseError, frag, gso_segments,
        l3_offset, parse_ip, parse_l4, segmented,
    },
};
use common::*;

fn v4() -> Ipv4 {
    Ipv4::new(A4, B4)
}
fn v6() -> Ipv6 {
    Ipv6::new(A6, B6)
}
fn both() -> [IpHeader; 2] {
    [v4().into(), v6().into()]
}

// ---------------------------------------------------------------------------------------
// IPv4 / IPv6 over every framing
// ---------------------------------------------------------------------------------------

#[test]
fn udp_over_every_framing_and_family() {
    for framing in Framing::ALL {
        for hdr in both() {
            let l3 = hdr.build(IPPROTO_UDP, &udp(40000, 51820, &payload(100)));
            let pkt = framing.frame(&l3);
            let p = parse_all(&pkt, framing.is_l3()).unwrap();
            let off = framing.l3_offset();
            let hlen = hdr.header_len() as u32;
            assert_eq!(p.ip.family, hdr.family(), "{framing:?}");
            assert_eq!(p.ip.l3_off, off, "{framing:?}");
            assert_eq!(p.ip.l3_len, hlen + 108, "{framing:?}");
            assert_eq!(p.ip.l3_len as usize, l3.len());
            assert_eq!(p.ip.proto, IPPROTO_UDP);
            assert_eq!(p.ip.l4_off, off + hlen);
            assert_eq!(p.ip.src, hdr.src16());
            assert_eq!(p.ip.dst, hdr.dst16());
            assert_eq!(p.ip.frag, frag::NONE);
            assert_eq!(
                p.l4,
                Some(L4 {
                    sport: 40000,
                    dport: 51820,
                    hdr_len: 8,
                    udp_payload_len: 100
                })
            );
            // 100 bytes of filler are not a WireGuard message.
            assert_eq!(p.msg, None);
            assert_eq!(l3_offset(&pkt.as_slice(), framing.is_l3()), Ok(off));
        }
    }
}

#[test]
fn exact_addresses_v4_and_v6() {
    let p = fixtures::udp_ipv4([10, 64, 0, 1], 1, [10, 64, 0, 2], 2, 28);
    let ip = parse_ip(&p.as_slice(), true).unwrap();
    assert_eq!(&ip.src[..4], &[10, 64, 0, 1]);
    assert_eq!(&ip.dst[..4], &[10, 64, 0, 2]);
    assert_eq!(ip.src[4..], [0; 12]);
    let p = fixtures::udp_ipv6(A6, 1, B6, 2, 48);
    let ip = parse_ip(&p.as_slice(), true).unwrap();
    assert_eq!((ip.src, ip.dst), (A6, B6));
    assert_eq!(ip.l3_len, 48);
    assert_eq!(
        parse_l4(&p.as_slice(), &ip)
            .unwrap()
            .unwrap()
            .udp_payload_len,
        0
    );
}

#[test]
fn ethernet_padding_does_not_change_lengths() {
    // A 28-byte IPv4/UDP packet padded to the 60-byte Ethernet minimum.
    let mut pkt = Framing::Ethernet.frame(&fixtures::udp_ipv4(A4, 1, B4, 2, 28));
    pkt.resize(60, 0xee);
    let p = parse_all(&pkt, false).unwrap();
    assert_eq!(p.ip.l3_len, 28);
    assert_eq!(p.l4.unwrap().udp_payload_len, 0);
    let (packets, bytes) = segmented(&p.ip, 8, pkt.len() as u32, 1);
    assert_eq!((packets, bytes), (1, 28));
}

#[test]
fn other_transport_protocols_have_no_ports() {
    for hdr in both() {
        let l3 = hdr.build(IPPROTO_ICMP, &payload(64));
        let ip = parse_ip(&l3.as_slice(), true).unwrap();
        assert_eq!(ip.proto, IPPROTO_ICMP);
        assert_eq!(parse_l4(&l3.as_slice(), &ip), Ok(None));
    }
}

// ---------------------------------------------------------------------------------------
// Link layer
// ---------------------------------------------------------------------------------------

#[test]
fn non_ip_ethertypes_are_not_ip() {
    let arp = arp_request(A4, B4);
    for framing in [Framing::Ethernet, Framing::Vlan(5), Framing::QinQ(6, 7)] {
        let pkt = framing.frame_ethertype(ETH_P_ARP, &arp);
        assert_eq!(
            parse_ip(&pkt.as_slice(), false),
            Err(ParseError::NotIp),
            "{framing:?}"
        );
    }
    // LLDP, and an IPv4 packet announced with a wrong ethertype.
    let l3 = fixtures::udp_ipv4(A4, 1, B4, 2, 40);
    for et in [0x88cc, 0x0000, 0xffff, 0x0801] {
        let pkt = Framing::Ethernet.frame_ethertype(et, &l3);
        assert_eq!(
            parse_ip(&pkt.as_slice(), false),
            Err(ParseError::NotIp),
            "{et:#x}"
        );
    }
}

#[test]
fn three_vlan_tags_are_not_followed() {
    let l3 = fixtures::udp_ipv4(A4, 1, B4, 2, 40);
    // QinQ plus one more 802.1Q tag.
    let mut pkt = Framing::QinQ(1, 2).frame(&l3);
    pkt.splice(20..20, [0x81, 0x00, 0x00, 0x03]);
    assert_eq!(parse_ip(&pkt.as_slice(), false), Err(ParseError::NotIp));
    // Two 802.1Q tags (not 802.1ad) are followed like QinQ.
    let mut pkt = Framing::Vlan(1).frame(&l3);
    pkt.splice(
        16..16,
        ETH_P_8021Q.to_be_bytes().into_iter().chain([0x00, 0x02]),
    );
    let ip = parse_ip(&pkt.as_slice(), false).unwrap();
    assert_eq!(ip.l3_off, 22);
}

#[test]
fn l3_interface_version_nibble_decides() {
    let mut l3 = fixtures::udp_ipv4(A4, 1, B4, 2, 40);
    for version in [0u8, 1, 5, 7, 15] {
        l3[0] = version << 4 | 5;
        assert_eq!(
            parse_ip(&l3.as_slice(), true),
            Err(ParseError::NotIp),
            "v{version}"
        );
    }
    assert_eq!(parse_ip(&[].as_slice(), true), Err(ParseError::Truncated));
}

// ---------------------------------------------------------------------------------------
// IPv4 options and lying lengths
// ---------------------------------------------------------------------------------------

#[test]
fn ipv4_options_ihl_6_to_15() {
    for framing in Framing::ALL {
        for ihl in 5..=15usize {
            let hdr = v4().options((ihl - 5) * 4);
            let l3 = hdr.build(IPPROTO_UDP, &udp(1234, 4321, &payload(10)));
            assert_eq!(l3[0], 0x40 | ihl as u8);
            let pkt = framing.frame(&l3);
            let p = parse_all(&pkt, framing.is_l3()).unwrap();
            let off = framing.l3_offset();
            assert_eq!(p.ip.l4_off, off + ihl as u32 * 4, "ihl {ihl}");
            assert_eq!(p.ip.l3_len, ihl as u32 * 4 + 18);
            let l4 = p.l4.unwrap();
            assert_eq!((l4.sport, l4.dport, l4.udp_payload_len), (1234, 4321, 10));
        }
    }
}

#[test]
fn ipv4_ihl_below_5_is_malformed() {
    for ihl in 0..5u8 {
        let mut l3 = fixtures::udp_ipv4(A4, 1, B4, 2, 60);
        l3[0] = 0x40 | ihl;
        fix_ipv4_checksum(&mut l3, 0);
        assert_eq!(
            parse_ip(&l3.as_slice(), true),
            Err(ParseError::Malformed),
            "ihl {ihl}"
        );
    }
}

#[test]
fn ipv4_total_length_below_header_is_malformed() {
    // Plain header: total length 0..19.
    for total in 0..20u16 {
        let mut l3 = fixtures::udp_ipv4(A4, 1, B4, 2, 60);
        l3[2..4].copy_from_slice(&total.to_be_bytes());
        fix_ipv4_checksum(&mut l3, 0);
        assert_eq!(
            parse_ip(&l3.as_slice(), true),
            Err(ParseError::Malformed),
            "{total}"
        );
    }
    // IHL 15 (60 bytes) with a total length of 59 in a 100-byte packet.
    let mut l3 = v4()
        .options(40)
        .build(IPPROTO_UDP, &udp(1, 2, &payload(32)));
    l3[2..4].copy_from_slice(&59u16.to_be_bytes());
    fix_ipv4_checksum(&mut l3, 0);
    assert_eq!(parse_ip(&l3.as_slice(), true), Err(ParseError::Malformed));
    // Exactly the header: valid, no room for UDP.
    l3[2..4].copy_from_slice(&60u16.to_be_bytes());
    fix_ipv4_checksum(&mut l3, 0);
    let ip = parse_ip(&l3.as_slice(), true).unwrap();
    assert_eq!((ip.l3_len, ip.l4_off), (60, 60));
    assert_eq!(parse_l4(&l3.as_slice(), &ip), Err(ParseError::Truncated));
}

#[test]
fn ipv4_total_length_past_the_packet_is_truncated() {
    let mut l3 = fixtures::udp_ipv4(A4, 1, B4, 2, 60);
    l3[2..4].copy_from_slice(&61u16.to_be_bytes());
    fix_ipv4_checksum(&mut l3, 0);
    assert_eq!(parse_ip(&l3.as_slice(), true), Err(ParseError::Truncated));
    // Options announced by IHL 15 but the packet ends after 40 bytes.
    let mut l3 = fixtures::udp_ipv4(A4, 1, B4, 2, 40);
    l3[0] = 0x4f;
    fix_ipv4_checksum(&mut l3, 0);
    assert!(parse_ip(&l3.as_slice(), true).is_err());
}

#[test]
fn ipv4_total_length_zero_is_big_tcp_only_past_64k() {
    // Linux BIG TCP: a GSO packet over 64 KiB carries total length 0.
    let mut l3 = fixtures::tcp_ipv4(A4, 1, B4, 2, 12, 1000);
    l3.resize(100_000, 0x5a);
    l3[2..4].copy_from_slice(&0u16.to_be_bytes());
    fix_ipv4_checksum(&mut l3, 0);
    let big = Framing::Ethernet.frame(&l3);
    let ip = parse_ip(&big.as_slice(), false).unwrap();
    assert_eq!(ip.l3_len, 100_000);
    let l4 = parse_l4(&big.as_slice(), &ip).unwrap().unwrap();
    assert_eq!(l4.hdr_len, 32);
    // The same total length 0 on a small packet is a lie.
    let mut small = fixtures::udp_ipv4(A4, 1, B4, 2, 1000);
    small[2..4].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        parse_ip(&small.as_slice(), true),
        Err(ParseError::Malformed)
    );
}

// ---------------------------------------------------------------------------------------
// UDP and TCP headers
// ---------------------------------------------------------------------------------------

#[test]
fn udp_length_below_8_is_malformed() {
    for hdr in both() {
        for len in 0..8u16 {
            let mut l3 = hdr.build(IPPROTO_UDP, &udp(1, 2, &payload(20)));
            let at = hdr.header_len() + 4;
            l3[at..at + 2].copy_from_slice(&len.to_be_bytes());
            let ip = parse_ip(&l3.as_slice(), true).unwrap();
            assert_eq!(
                parse_l4(&l3.as_slice(), &ip),
                Err(ParseError::Malformed),
                "{len}"
            );
        }
    }
}

#[test]
fn udp_length_past_the_ip_payload_is_malformed() {
    for hdr in both() {
        let mut l3 = hdr.build(IPPROTO_UDP, &udp(1, 2, &payload(20)));
        let at = hdr.header_len() + 4;
        l3[at..at + 2].copy_from_slice(&29u16.to_be_bytes());
        let ip = parse_ip(&l3.as_slice(), true).unwrap();
        assert_eq!(parse_l4(&l3.as_slice(), &ip), Err(ParseError::Malformed));
        // Shorter than the IP payload (trailing bytes) is accepted: the UDP length rules.
        l3[at..at + 2].copy_from_slice(&20u16.to_be_bytes());
        let l4 = parse_l4(&l3.as_slice(), &ip).unwrap().unwrap();
        assert_eq!(l4.udp_payload_len, 12);
    }
}

#[test]
fn transport_header_cut_by_the_ip_length() {
    for hdr in both() {
        // UDP: 7 bytes of IP payload.
        let full = hdr.build(IPPROTO_UDP, &udp(1, 2, &[]));
        let mut l3 = full[..full.len() - 1].to_vec();
        shrink_ip_len(&mut l3, hdr.family(), 1);
        let ip = parse_ip(&l3.as_slice(), true).unwrap();
        assert_eq!(parse_l4(&l3.as_slice(), &ip), Err(ParseError::Truncated));
        // TCP: 19 bytes of IP payload, then a 32-byte header in a 31-byte payload.
        let full = hdr.build(IPPROTO_TCP, &tcp(1, 2, 0, &[]));
        let mut l3 = full[..full.len() - 1].to_vec();
        shrink_ip_len(&mut l3, hdr.family(), 1);
        let ip = parse_ip(&l3.as_slice(), true).unwrap();
        assert_eq!(parse_l4(&l3.as_slice(), &ip), Err(ParseError::Truncated));
        let full = hdr.build(IPPROTO_TCP, &tcp(1, 2, 12, &[]));
        let mut l3 = full[..full.len() - 1].to_vec();
        shrink_ip_len(&mut l3, hdr.family(), 1);
        let ip = parse_ip(&l3.as_slice(), true).unwrap();
        assert_eq!(parse_l4(&l3.as_slice(), &ip), Err(ParseError::Truncated));
    }
}

/// Lower the IP length field of the bare IP packet `l3` by `by` bytes.
fn shrink_ip_len(l3: &mut [u8], family: u8, by: u16) {
    let at = if family == 4 { 2 } else { 4 };
    let v = u16::from_be_bytes([l3[at], l3[at + 1]]) - by;
    l3[at..at + 2].copy_from_slice(&v.to_be_bytes());
    if family == 4 {
        fix_ipv4_checksum(l3, 0);
    }
}

#[test]
fn tcp_data_offset() {
    for framing in Framing::ALL {
        for hdr in both() {
            for opt in (0..=40).step_by(4) {
                let l3 = hdr.build(IPPROTO_TCP, &tcp(443, 50000, opt, &payload(7)));
                let pkt = framing.frame(&l3);
                let p = parse_all(&pkt, framing.is_l3()).unwrap();
                assert_eq!(p.ip.proto, IPPROTO_TCP);
                assert_eq!(
                    p.l4,
                    Some(L4 {
                        sport: 443,
                        dport: 50000,
                        hdr_len: 20 + opt as u32,
                        udp_payload_len: 0
                    }),
                    "{framing:?} opt {opt}"
                );
            }
        }
    }
}

#[test]
fn tcp_data_offset_below_5_is_malformed() {
    for doff in 0..5u8 {
        let mut l3 = fixtures::tcp_ipv4(A4, 1, B4, 2, 0, 40);
        l3[20 + 12] = doff << 4;
        let ip = parse_ip(&l3.as_slice(), true).unwrap();
        assert_eq!(
            parse_l4(&l3.as_slice(), &ip),
            Err(ParseError::Malformed),
            "{doff}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------------------

/// A 1008-byte UDP datagram (ports 5000 -> 6000) to be split into fragments.
fn datagram() -> Vec<u8> {
    udp(5000, 6000, &payload(1000))
}

#[test]
fn ipv4_first_fragment_gives_ports() {
    let d = datagram();
    for framing in Framing::ALL {
        let l3 = v4().mf(true).build(IPPROTO_UDP, &d[..512]);
        let pkt = framing.frame(&l3);
        let p = parse_all(&pkt, framing.is_l3()).unwrap();
        assert_eq!(p.ip.frag, frag::FIRST);
        assert_eq!(p.ip.l3_len, 532);
        // The UDP length describes the whole datagram, longer than this fragment.
        assert_eq!(
            p.l4,
            Some(L4 {
                sport: 5000,
                dport: 6000,
                hdr_len: 8,
                udp_payload_len: 1000
            })
        );
    }
}

#[test]
fn ipv4_later_fragments_never_give_ports() {
    let d = datagram();
    // A middle fragment (MF, offset 64 * 8 = 512) and the last one (offset 64, no MF) whose
    // payload happens to start with a plausible UDP header.
    let middle = v4().mf(true).frag_offset(64).build(IPPROTO_UDP, &d[..256]);
    let last = v4().frag_offset(96).build(IPPROTO_UDP, &d[..8]);
    let tcp_later = v4().frag_offset(1).build(IPPROTO_TCP, &tcp(1, 2, 0, &[]));
    for (l3, proto) in [
        (middle, IPPROTO_UDP),
        (last, IPPROTO_UDP),
        (tcp_later, IPPROTO_TCP),
    ] {
        for framing in Framing::ALL {
            let pkt = framing.frame(&l3);
            let ip = parse_ip(&pkt.as_slice(), framing.is_l3()).unwrap();
            assert_eq!(ip.frag, frag::LATER);
            assert_eq!(ip.proto, proto);
            assert_eq!(ip.l3_len as usize, l3.len());
            assert_eq!(parse_l4(&pkt.as_slice(), &ip), Ok(None));
        }
    }
    // Even a later fragment too short for any transport header is fine.
    let tiny = v4().frag_offset(10).build(IPPROTO_UDP, &[]);
    let ip = parse_ip(&tiny.as_slice(), true).unwrap();
    assert_eq!(parse_l4(&tiny.as_slice(), &ip), Ok(None));
}

#[test]
fn ipv4_df_is_not_a_fragment() {
    let l3 = v4().df(true).build(IPPROTO_UDP, &datagram());
    let ip = parse_ip(&l3.as_slice(), true).unwrap();
    assert_eq!(ip.frag, frag::NONE);
    assert!(parse_l4(&l3.as_slice(), &ip).unwrap().is_some());
}

#[test]
fn ipv6_fragment_header() {
    let d = datagram();
    let first = v6().ext(Ext::Fragment {
        offset: 0,
        more: true,
        id: 9,
    });
    let later = v6().ext(Ext::Fragment {
        offset: 64,
        more: true,
        id: 9,
    });
    let last = v6().ext(Ext::Fragment {
        offset: 96,
        more: false,
        id: 9,
    });
    let atomic = v6().ext(Ext::Fragment {
        offset: 0,
        more: false,
        id: 9,
    });
    for framing in Framing::ALL {
        let off = framing.l3_offset();
        let l3 = first.build(IPPROTO_UDP, &d[..512]);
        let p = parse_all(&framing.frame(&l3), framing.is_l3()).unwrap();
        assert_eq!(
            (p.ip.frag, p.ip.proto, p.ip.l4_off),
            (frag::FIRST, IPPROTO_UDP, off + 48)
        );
        assert_eq!(p.ip.l3_len, 48 + 512);
        let l4 = p.l4.unwrap();
        assert_eq!((l4.sport, l4.dport, l4.udp_payload_len), (5000, 6000, 1000));

        for h in [&later, &last] {
            let l3 = h.build(IPPROTO_UDP, &d[..256]);
            let pkt = framing.frame(&l3);
            let ip = parse_ip(&pkt.as_slice(), framing.is_l3()).unwrap();
            assert_eq!(
                (ip.frag, ip.proto, ip.l4_off),
                (frag::LATER, IPPROTO_UDP, off + 48)
            );
            assert_eq!(parse_l4(&pkt.as_slice(), &ip), Ok(None));
        }

        let l3 = atomic.build(IPPROTO_UDP, &d);
        let p = parse_all(&framing.frame(&l3), framing.is_l3()).unwrap();
        assert_eq!(p.ip.frag, frag::NONE);
        assert_eq!(p.l4.unwrap().udp_payload_len, 1000);
    }
}

#[test]
fn ipv6_later_fragment_stops_at_the_fragment_header() {
    // Bytes after a later fragment's header are payload, even if they look like an
    // extension header (60 = destination options): the parser must not walk into them.
    let h = v6().ext(Ext::DestOpts(8)).ext(Ext::Fragment {
        offset: 3,
        more: false,
        id: 1,
    });
    let l3 = h.build(
        60,
        &[17, 0, 0, 0, 0, 0, 0, 0, 0x13, 0x88, 0x17, 0x70, 0, 16, 0, 0],
    );
    let ip = parse_ip(&l3.as_slice(), true).unwrap();
    assert_eq!((ip.frag, ip.proto, ip.l4_off), (frag::LATER, 60, 56));
    assert_eq!(parse_l4(&l3.as_slice(), &ip), Ok(None));
}

// ---------------------------------------------------------------------------------------
// IPv6 extension headers
// ---------------------------------------------------------------------------------------

#[test]
fn ipv6_extension_headers_are_skipped() {
    let cases: [&[Ext]; 5] = [
        &[Ext::HopByHop(8)],
        &[Ext::Routing(24)],
        &[Ext::DestOpts(16)],
        &[
            Ext::HopByHop(8),
            Ext::DestOpts(8),
            Ext::Routing(40),
            Ext::DestOpts(2048),
        ],
        &[
            Ext::HopByHop(16),
            Ext::Fragment {
                offset: 0,
                more: false,
                id: 3,
            },
        ],
    ];
    for exts in cases {
        let mut h = v6();
        for e in exts {
            h = h.ext(*e);
        }
        let ext_len: usize = exts.iter().map(|e| e.len()).sum();
        for framing in Framing::ALL {
            let l3 = h.build(IPPROTO_UDP, &udp(7, 8, &payload(33)));
            let pkt = framing.frame(&l3);
            let p = parse_all(&pkt, framing.is_l3()).unwrap();
            assert_eq!(
                p.ip.l4_off,
                framing.l3_offset() + 40 + ext_len as u32,
                "{exts:?}"
            );
            assert_eq!(p.ip.l3_len as usize, 40 + ext_len + 41);
            assert_eq!(p.ip.proto, IPPROTO_UDP);
            let l4 = p.l4.unwrap();
            assert_eq!((l4.sport, l4.dport, l4.udp_payload_len), (7, 8, 33));
        }
    }
}

#[test]
fn ipv6_too_many_extension_headers() {
    for n in 0..=10 {
        let mut h = v6();
        for _ in 0..n {
            h = h.ext(Ext::DestOpts(8));
        }
        let l3 = h.build(IPPROTO_UDP, &udp(1, 2, &[]));
        let r = parse_ip(&l3.as_slice(), true);
        if n <= 6 {
            assert_eq!(r.unwrap().l4_off, 40 + 8 * n as u32, "{n} headers");
        } else {
            assert_eq!(r, Err(ParseError::TooManyExtensions), "{n} headers");
        }
    }
}

#[test]
fn ipv6_payload_length_lies() {
    // Payload length shorter than the extension headers.
    let mut l3 = v6()
        .ext(Ext::HopByHop(8))
        .ext(Ext::Routing(64))
        .build(IPPROTO_UDP, &udp(1, 2, &[]));
    l3[4..6].copy_from_slice(&16u16.to_be_bytes());
    assert_eq!(parse_ip(&l3.as_slice(), true), Err(ParseError::Malformed));
    // Payload length 0 with an extension header (and a small packet: not BIG TCP).
    l3[4..6].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(parse_ip(&l3.as_slice(), true), Err(ParseError::Malformed));
    // Payload length past the packet.
    let mut l3 = fixtures::udp_ipv6(A6, 1, B6, 2, 100);
    l3[4..6].copy_from_slice(&61u16.to_be_bytes());
    assert_eq!(parse_ip(&l3.as_slice(), true), Err(ParseError::Truncated));
    // An extension header whose own length runs past the packet.
    let mut l3 = v6()
        .ext(Ext::DestOpts(8))
        .build(IPPROTO_UDP, &udp(1, 2, &[]));
    l3[41] = 200;
    assert!(parse_ip(&l3.as_slice(), true).is_err());
}

#[test]
fn ipv6_payload_length_zero_is_big_tcp_only_past_64k() {
    let mut l3 = fixtures::tcp_ipv6(A6, 1, B6, 2, 0, 1000);
    l3.resize(70_000, 0);
    l3[4..6].copy_from_slice(&0u16.to_be_bytes());
    let ip = parse_ip(&l3.as_slice(), true).unwrap();
    assert_eq!(ip.l3_len, 70_000);
    assert_eq!(parse_l4(&l3.as_slice(), &ip).unwrap().unwrap().hdr_len, 20);
    // Small packet with payload length 0: just a header, the rest is padding.
    let mut l3 = fixtures::udp_ipv6(A6, 1, B6, 2, 100);
    l3[4..6].copy_from_slice(&0u16.to_be_bytes());
    let ip = parse_ip(&l3.as_slice(), true).unwrap();
    assert_eq!((ip.l3_len, ip.l4_off), (40, 40));
    assert_eq!(parse_l4(&l3.as_slice(), &ip), Err(ParseError::Truncated));
}

// ---------------------------------------------------------------------------------------
// Truncation at every offset
// ---------------------------------------------------------------------------------------

/// Bare IP packets of every shape the parser handles.
fn shapes() -> Vec<Vec<u8>> {
    let d = datagram();
    let wg = fixtures::wg::initiation(5);
    vec![
        fixtures::udp_ipv4(A4, 1, B4, 2, 60),
        fixtures::udp_ipv6(A6, 1, B6, 2, 80),
        v4().options(40).build(IPPROTO_UDP, &udp(1, 2, &payload(4))),
        v4().options(12)
            .build(IPPROTO_TCP, &tcp(1, 2, 40, &payload(3))),
        fixtures::tcp_ipv6(A6, 1, B6, 2, 20, 5),
        v4().mf(true).build(IPPROTO_UDP, &d[..64]),
        v4().frag_offset(8).build(IPPROTO_UDP, &d[..64]),
        v6().ext(Ext::HopByHop(8))
            .ext(Ext::Routing(24))
            .ext(Ext::DestOpts(16))
            .build(IPPROTO_TCP, &tcp(1, 2, 4, &[])),
        v6().ext(Ext::Fragment {
            offset: 0,
            more: true,
            id: 1,
        })
        .build(IPPROTO_UDP, &d[..64]),
        v6().ext(Ext::Fragment {
            offset: 8,
            more: true,
            id: 1,
        })
        .build(IPPROTO_UDP, &d[..64]),
        fixtures::wg_ipv4(A4, 51820, B4, 51820, &wg),
        fixtures::wg_ipv6(A6, 51820, B6, 51820, &fixtures::wg::keepalive(1, 2)),
        fixtures::wg_data_ipv4(A4, 1, B4, 2, 1419, 1420),
        v4().build(IPPROTO_ICMP, &payload(8)),
    ]
}

#[test]
fn truncated_at_every_offset_is_an_error() {
    for l3 in shapes() {
        for framing in Framing::ALL {
            let pkt = framing.frame(&l3);
            let full = parse_all(&pkt, framing.is_l3()).expect("the full packet parses");
            check_consistent(&pkt, framing.is_l3()).unwrap();
            assert!(full.ip.l3_len as usize == l3.len());
            for cut in 0..pkt.len() {
                let short = &pkt[..cut];
                // The packet is shorter than its IP length: always Truncated, never fields.
                assert_eq!(
                    parse_ip(&short, framing.is_l3()),
                    Err(ParseError::Truncated),
                    "{framing:?} cut at {cut} of {}",
                    pkt.len()
                );
                // The transport parser on the full packet's IP result, over the cut bytes,
                // must not panic and must not return fields it could not read.
                if let Ok(Some(l4)) = parse_l4(&short, &full.ip) {
                    assert!(cut as u32 >= full.ip.l4_off + 8);
                    assert_eq!(Some(l4), full.l4);
                }
                check_consistent(short, framing.is_l3());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// GSO
// ---------------------------------------------------------------------------------------

#[test]
fn segmented_tcp_super_packet() {
    // Three segments of 1448 bytes behind IPv4 (20) + TCP with timestamps (32).
    for framing in Framing::ALL {
        let l3 = fixtures::tcp_ipv4(A4, 1, B4, 2, 12, 3 * 1448);
        let pkt = framing.frame(&l3);
        let ip = parse_ip(&pkt.as_slice(), framing.is_l3()).unwrap();
        let l4 = parse_l4(&pkt.as_slice(), &ip).unwrap().unwrap();
        assert_eq!(l4.hdr_len, 32);
        let skb_len = pkt.len() as u32;
        let (packets, bytes) = segmented(&ip, l4.hdr_len, skb_len, 3);
        assert_eq!(packets, 3);
        // skb payload from the IP header on + 2 x (IP + TCP header)
        assert_eq!(bytes, (20 + 32 + 3 * 1448) + 2 * (20 + 32));
        assert_eq!(bytes, 3 * (20 + 32 + 1448));
        // Not GSO: the IP length.
        assert_eq!(segmented(&ip, l4.hdr_len, skb_len, 0), (1, l3.len() as u64));
        assert_eq!(segmented(&ip, l4.hdr_len, skb_len, 1), (1, l3.len() as u64));
    }
}

#[test]
fn segmented_ipv6_with_extension_headers() {
    // Extension headers are replicated in every segment.
    let l3 = v6()
        .ext(Ext::HopByHop(8))
        .build(IPPROTO_TCP, &tcp(1, 2, 0, &payload(4 * 1000)));
    let ip = parse_ip(&l3.as_slice(), true).unwrap();
    let l4 = parse_l4(&l3.as_slice(), &ip).unwrap().unwrap();
    let (packets, bytes) = segmented(&ip, l4.hdr_len, l3.len() as u32, 4);
    assert_eq!((packets, bytes), (4, 4 * (40 + 8 + 20 + 1000)));
}

#[test]
fn segmented_udp_gso_of_wireguard_messages() {
    // wireguard-go sends several data messages in one UDP GSO skb: 3 x 1452-byte messages.
    let msg = fixtures::wg::data(1, 0, 1420, 1420);
    let mut payload = msg.clone();
    payload.extend_from_slice(&msg);
    payload.extend_from_slice(&msg);
    let l3 = v4().build(IPPROTO_UDP, &udp(51820, 51820, &payload));
    let pkt = Framing::Ethernet.frame(&l3);
    let ip = parse_ip(&pkt.as_slice(), false).unwrap();
    let (packets, bytes) = segmented(&ip, 8, pkt.len() as u32, 3);
    assert_eq!((packets, bytes), (3, 3 * (20 + 8 + 1452)));
    assert_eq!(
        bytes,
        3 * agent_common::wireguard::data_wire_len(1420, 1420, 20) as u64
    );
}

#[test]
fn gso_segments_counted_when_the_kernel_left_them_at_0() {
    // wireguard-go >= 0.0.20230223 writes coalesced TCP to its TUN device with a virtio-net
    // header: gso_size set, gso_segs 0 until the kernel segments. 2 x 1448 + 1000 bytes
    // behind IPv4 (20) + TCP with timestamps (32) are 3 segments.
    for framing in Framing::ALL {
        let l3 = fixtures::tcp_ipv4(A4, 1, B4, 2, 12, 2 * 1448 + 1000);
        let pkt = framing.frame(&l3);
        let ip = parse_ip(&pkt.as_slice(), framing.is_l3()).unwrap();
        let l4 = parse_l4(&pkt.as_slice(), &ip).unwrap().unwrap();
        let len = pkt.len() as u32;
        assert_eq!(gso_segments(&ip, l4.hdr_len, len, 0, 1448), 3);
        let (packets, bytes) = segmented(&ip, l4.hdr_len, len, 3);
        assert_eq!((packets, bytes), (3, 3 * (20 + 32) + 2 * 1448 + 1000));
        // Exactly full segments: no extra one.
        let l3 = fixtures::tcp_ipv4(A4, 1, B4, 2, 12, 2 * 1448);
        let ip = parse_ip(&l3.as_slice(), true).unwrap();
        assert_eq!(gso_segments(&ip, 32, l3.len() as u32, 0, 1448), 2);
        // A count the kernel gave is kept; no gso_size is no GSO.
        assert_eq!(gso_segments(&ip, 32, l3.len() as u32, 5, 1448), 5);
        assert_eq!(gso_segments(&ip, 32, l3.len() as u32, 0, 0), 0);
        assert_eq!(gso_segments(&ip, 32, l3.len() as u32, 1, 0), 1);
    }
    // IPv6 with an extension header: 4 x 1000 of UDP payload in 1000-byte pieces.
    let l3 = v6()
        .ext(Ext::HopByHop(8))
        .build(IPPROTO_UDP, &udp(1, 2, &payload(4 * 1000)));
    let ip = parse_ip(&l3.as_slice(), true).unwrap();
    assert_eq!(gso_segments(&ip, 8, l3.len() as u32, 0, 1000), 4);
    // A truncated skb (shorter than its headers) is no segment, never an underflow.
    assert_eq!(gso_segments(&ip, 8, 10, 0, 1000), 0);
}

// ---------------------------------------------------------------------------------------
// The slice implementation of Packet
// ---------------------------------------------------------------------------------------

#[test]
fn slice_loads_are_bounds_checked() {
    let bytes = [1u8, 2, 3, 4];
    let p = &bytes[..];
    assert_eq!(Packet::len(&p), 4);
    assert_eq!(p.load::<4>(0), Some([1, 2, 3, 4]));
    assert_eq!(p.load::<2>(2), Some([3, 4]));
    assert_eq!(p.load::<2>(3), None);
    assert_eq!(p.load::<1>(4), None);
    assert_eq!(p.load::<4>(u32::MAX), None);
    assert_eq!(p.load::<0>(4), Some([]));
    assert_eq!(p.be16_at(1), Some(0x0203));
    assert_eq!(p.u8_at(u32::MAX), None);
}

#[test]
fn ipv4_header_checksum_is_valid() {
    for opt in (0..=40).step_by(4) {
        let l3 = v4()
            .options(opt)
            .ttl(3)
            .id(77)
            .df(true)
            .build(IPPROTO_UDP, &udp(1, 2, &[]));
        assert_eq!(fixtures::inet_checksum(&l3[..20 + opt]), 0);
        assert_eq!(l3[8], 3);
    }
}
