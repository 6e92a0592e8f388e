//! Host tests of `agent_common::wireguard` (message recognition and the size formula) on
//! exact byte fixtures, through the same parse_ip -> parse_l4 -> classify chain as the
//! eBPF programs.

mod common;

use agent_common::{
    fixtures::{self, Framing, IpHeader, Ipv4, Ipv6, udp, wg},
    maps::kind,
    parse::IPPROTO_UDP,
    wireguard::{Message, classify, data_wire_len},
};
use common::*;

fn headers() -> [IpHeader; 2] {
    [Ipv4::new(A4, B4).into(), Ipv6::new(A6, B6).into()]
}

/// Classify `msg` carried in UDP over every family and framing; all must agree.
fn classify_everywhere(msg: &[u8]) -> Option<Message> {
    let mut seen = None;
    for hdr in headers() {
        let l3 = hdr.build(IPPROTO_UDP, &udp(51820, 51821, msg));
        for framing in Framing::ALL {
            let pkt = framing.frame(&l3);
            let p = parse_all(&pkt, framing.is_l3()).unwrap();
            assert_eq!(p.l4.unwrap().udp_payload_len as usize, msg.len());
            if let Some(m) = p.msg {
                check_message(&m);
            }
            match seen {
                None => seen = Some(p.msg),
                Some(prev) => assert_eq!(prev, p.msg, "{hdr:?} {framing:?}"),
            }
        }
    }
    seen.unwrap()
}

// ---------------------------------------------------------------------------------------
// Every message type
// ---------------------------------------------------------------------------------------

#[test]
fn handshake_initiation() {
    let m = classify_everywhere(&wg::initiation(0xdead_beef)).unwrap();
    assert_eq!(
        m,
        Message {
            kind: kind::HANDSHAKE_INITIATION,
            len: 148,
            index: 0xdead_beef,
            receiver: 0,
            counter: 0
        }
    );
}

#[test]
fn handshake_response() {
    let m = classify_everywhere(&wg::response(0x0102_0304, 0xa0b0_c0d0)).unwrap();
    assert_eq!(
        m,
        Message {
            kind: kind::HANDSHAKE_RESPONSE,
            len: 92,
            index: 0x0102_0304,
            receiver: 0xa0b0_c0d0,
            counter: 0
        }
    );
}

#[test]
fn cookie_reply() {
    let m = classify_everywhere(&wg::cookie_reply(42)).unwrap();
    assert_eq!(
        m,
        Message {
            kind: kind::COOKIE_REPLY,
            len: 64,
            index: 42,
            receiver: 0,
            counter: 0
        }
    );
}

#[test]
fn transport_data() {
    let m = classify_everywhere(&wg::data(0x7777_0001, 0x0102_0304_0506_0708, 100, 1420)).unwrap();
    assert_eq!(
        m,
        Message {
            kind: kind::DATA,
            len: 32 + 112,
            index: 0x7777_0001,
            receiver: 0,
            counter: 0x0102_0304_0506_0708
        }
    );
}

#[test]
fn keepalive_is_an_empty_data_message() {
    let m = classify_everywhere(&wg::keepalive(9, u64::MAX)).unwrap();
    assert_eq!(
        m,
        Message {
            kind: kind::KEEPALIVE,
            len: 32,
            index: 9,
            receiver: 0,
            counter: u64::MAX
        }
    );
    // The smallest data message after a keepalive carries 16 bytes of plaintext.
    let m = classify_everywhere(&wg::data_with_plaintext(9, 1, 16)).unwrap();
    assert_eq!((m.kind, m.len), (kind::DATA, 48));
}

#[test]
fn data_sizes_of_real_inner_packets() {
    // Every inner length an IPv4 or IPv6 tunnel can carry, at the common MTUs: accepted as
    // data, with the length the formula predicts.
    for mtu in [1280u32, 1380, 1420, 1440, 1500, 9000] {
        for inner in 20..=mtu {
            let msg = wg::data(3, inner as u64, inner, mtu);
            let m = classify(&msg.as_slice(), 0, msg.len() as u32)
                .unwrap_or_else(|| panic!("inner {inner} mtu {mtu}: rejected"));
            assert_eq!(m.kind, kind::DATA);
            assert_eq!(m.counter, inner as u64);
            assert_eq!(
                m.len + 28,
                data_wire_len(inner, mtu, 20),
                "inner {inner} mtu {mtu}"
            );
        }
    }
}

#[test]
fn full_size_packets_capped_at_the_mtu() {
    // MTU 1420 is not a multiple of 16: a 1420-byte inner packet is padded to 1420, not 1424,
    // and the message is 1452 bytes.
    for (inner, mtu) in [
        (1420, 1420),
        (1419, 1420),
        (1409, 1420),
        (1380, 1380),
        (1377, 1380),
    ] {
        let msg = wg::data(1, 2, inner, mtu);
        assert_eq!(msg.len() as u32, 32 + mtu);
        let m = classify_everywhere(&msg).unwrap();
        assert_eq!((m.kind, m.len), (kind::DATA, 32 + mtu));
    }
}

// ---------------------------------------------------------------------------------------
// Rejections
// ---------------------------------------------------------------------------------------

/// `msg` resized to `len` bytes (cut, or extended with filler).
fn resized(mut msg: Vec<u8>, len: usize) -> Vec<u8> {
    msg.resize(len, 0x5a);
    msg
}

#[test]
fn handshake_messages_of_the_wrong_size() {
    for len in [0, 1, 16, 92, 146, 147, 149, 150, 164] {
        assert_eq!(
            classify_everywhere(&resized(wg::initiation(1), len)),
            None,
            "{len}"
        );
    }
    for len in [16, 64, 91, 93, 148] {
        assert_eq!(
            classify_everywhere(&resized(wg::response(1, 2), len)),
            None,
            "{len}"
        );
    }
    for len in [16, 32, 63, 65, 92] {
        assert_eq!(
            classify_everywhere(&resized(wg::cookie_reply(1), len)),
            None,
            "{len}"
        );
    }
}

#[test]
fn data_of_impossible_sizes() {
    // Shorter than a keepalive.
    for len in 0..32 {
        assert_eq!(
            classify_everywhere(&resized(wg::keepalive(1, 0), len)),
            None,
            "{len}"
        );
    }
    // 33..47: a plaintext of 1..15 bytes is neither padded to 16 nor any interface's MTU.
    for len in 33..48 {
        assert_eq!(
            classify_everywhere(&resized(wg::keepalive(1, 0), len)),
            None,
            "{len}"
        );
    }
    // Below an IPv4 header (20), only multiples of 16 are possible.
    for p in 1..20u32 {
        let msg = wg::data_with_plaintext(1, 0, p);
        let m = classify(&msg.as_slice(), 0, msg.len() as u32);
        assert_eq!(m.is_some(), p % 16 == 0, "plaintext {p}");
    }
    // From there any length may be an unpadded or MTU-capped message.
    for p in 20..2000u32 {
        let msg = wg::data_with_plaintext(1, 0, p);
        assert!(
            classify(&msg.as_slice(), 0, msg.len() as u32).is_some(),
            "plaintext {p}"
        );
    }
}

/// boringtun 0.6.0 does not pad: a UDP datagram of 0 or 1 byte (inner 28, 29), a bare TCP
/// ACK with timestamps (52), a SYN (60) travel as plaintexts of exactly those lengths, each
/// one data message.
#[test]
fn unpadded_data_of_boringtun() {
    for p in [20u32, 28, 29, 52, 60, 67, 583, 1028] {
        let msg = wg::data_with_plaintext(1, 7, p);
        let m = classify_everywhere(&msg).unwrap_or_else(|| panic!("plaintext {p}"));
        assert_eq!(
            (m.kind, m.len, m.counter),
            (kind::DATA, 32 + p, 7),
            "plaintext {p}"
        );
    }
}

#[test]
fn reserved_bytes_must_be_zero() {
    let msgs = [
        wg::initiation(1),
        wg::response(1, 2),
        wg::cookie_reply(1),
        wg::data(1, 2, 100, 1420),
        wg::keepalive(1, 2),
    ];
    for msg in msgs {
        assert!(classify_everywhere(&msg).is_some());
        for at in 1..4 {
            for v in [1u8, 0x80, 0xff] {
                let mut bad = msg.clone();
                bad[at] = v;
                assert_eq!(classify_everywhere(&bad), None, "type {} byte {at}", msg[0]);
            }
        }
    }
}

#[test]
fn unknown_types_are_rejected() {
    // Every type byte other than 1..=4, at every size a real message has.
    for t in [0u8, 5, 6, 16, 127, 128, 255] {
        for len in [32, 48, 64, 92, 148, 144, 1452] {
            let mut msg = resized(wg::keepalive(1, 0), len);
            msg[0] = t;
            assert_eq!(classify_everywhere(&msg), None, "type {t} len {len}");
        }
    }
    // A type byte right for another message's size.
    let mut m = wg::initiation(1);
    m[0] = 2;
    assert_eq!(classify_everywhere(&m), None);
    let mut m = wg::response(1, 2);
    m[0] = 3;
    assert_eq!(classify_everywhere(&m), None);
    let mut m = wg::cookie_reply(1);
    m[0] = 1;
    assert_eq!(classify_everywhere(&m), None);
}

#[test]
fn classify_reads_nothing_past_the_bytes_it_has() {
    let msg = wg::initiation(77);
    // Fewer than 16 bytes loadable: None, whatever length is claimed.
    for have in 0..16 {
        assert_eq!(classify(&&msg[..have], 0, 148), None, "{have}");
    }
    // Offsets that overflow.
    assert_eq!(classify(&msg.as_slice(), u32::MAX - 3, 148), None);
    assert_eq!(classify(&msg.as_slice(), 0, u32::MAX), None);
}

// ---------------------------------------------------------------------------------------
// The wire length formula
// ---------------------------------------------------------------------------------------

#[test]
fn data_wire_len_hand_computed() {
    // inner 100 B over IPv4: 20 + 8 + 32 + 112.
    assert_eq!(data_wire_len(100, 1420, 20), 172);
    // inner 1420 at MTU 1420: no padding past the MTU.
    assert_eq!(data_wire_len(1420, 1420, 20), 20 + 8 + 32 + 1420);
    // inner 1419 at MTU 1420: padded to 1420, not 1424.
    assert_eq!(data_wire_len(1419, 1420, 20), 20 + 8 + 32 + 1420);
    // inner 1404 at MTU 1420: 1408, a multiple of 16 below the MTU.
    assert_eq!(data_wire_len(1404, 1420, 20), 20 + 8 + 32 + 1408);
    // Mullvad's 1380 over IPv6.
    assert_eq!(data_wire_len(1380, 1380, 40), 40 + 8 + 32 + 1380);
    assert_eq!(data_wire_len(60, 1380, 40), 40 + 8 + 32 + 64);
    // A keepalive: 0 bytes inside.
    assert_eq!(data_wire_len(0, 1420, 20), 20 + 8 + 32);
    // MTU 0: no cap.
    assert_eq!(data_wire_len(1419, 0, 20), 20 + 8 + 32 + 1424);
    // Larger than the MTU (the kernel pads only inner % mtu): 1500 % 1420 = 80, no padding.
    assert_eq!(data_wire_len(1500, 1420, 20), 20 + 8 + 32 + 1500);
    // 1430 % 1420 = 10, padded to 16: 6 bytes of padding.
    assert_eq!(data_wire_len(1430, 1420, 20), 20 + 8 + 32 + 1436);
    // Never overflows.
    assert_eq!(data_wire_len(u32::MAX, 1420, 20), u32::MAX);
    assert_eq!(data_wire_len(u32::MAX - 3, 0, 0), u32::MAX);
}

#[test]
fn data_wire_len_matches_the_contract_formula_and_the_fixtures() {
    // docs/CONTRACT.md: per IPv4-carried packet of L3 length L the overhead is
    // 20 + 8 + 16 + 16 + (L rounded up to a multiple of 16, but not past the MTU) - L.
    for mtu in [576u32, 1280, 1380, 1420, 1500] {
        for l in 0..=mtu {
            let padded = l.div_ceil(16) * 16;
            let padded = padded.min(mtu);
            let expect = 20 + 8 + 16 + 16 + padded;
            assert_eq!(data_wire_len(l, mtu, 20), expect, "L {l} mtu {mtu}");
            let v4 = fixtures::wg_data_ipv4(A4, 1, B4, 2, l, mtu);
            assert_eq!(v4.len() as u32, expect, "L {l} mtu {mtu}");
            if l % 97 == 0 {
                let v6 = fixtures::wg_data_ipv6(A6, 1, B6, 2, l, mtu);
                assert_eq!(v6.len() as u32, data_wire_len(l, mtu, 40));
                assert_eq!(v6.len() as u32, expect + 20);
            }
        }
    }
    // The fixture's independent padding rule agrees with data_wire_len everywhere,
    // including inner packets larger than the MTU.
    for mtu in [0u32, 68, 100, 1420] {
        for inner in 0..3000 {
            assert_eq!(
                data_wire_len(inner, mtu, 20),
                20 + 8 + 32 + wg::padded_len(inner, mtu),
                "inner {inner} mtu {mtu}"
            );
        }
    }
}

#[test]
fn helper_packets_parse_to_their_inputs() {
    let l3 = fixtures::wg_data_ipv4(A4, 40000, B4, 51820, 1419, 1420);
    for framing in Framing::ALL {
        let pkt = framing.frame(&l3);
        let p = parse_all(&pkt, framing.is_l3()).unwrap();
        assert_eq!(p.ip.l3_len, data_wire_len(1419, 1420, 20));
        let l4 = p.l4.unwrap();
        assert_eq!((l4.sport, l4.dport), (40000, 51820));
        let m = p.msg.unwrap();
        assert_eq!(m.kind, kind::DATA);
        assert_eq!(m.index, fixtures::FIXTURE_RECEIVER);
        assert_eq!(m.counter, fixtures::FIXTURE_COUNTER);
    }
    let l3 = fixtures::wg_data_ipv6(A6, 51820, B6, 51820, 0, 1420);
    let p = parse_all(&l3, true).unwrap();
    assert_eq!(p.msg.unwrap().kind, kind::KEEPALIVE);
    assert_eq!(p.ip.l3_len, 40 + 8 + 32);
}

#[test]
fn multihop_wireguard_inside_wireguard() {
    // Mullvad multihop: the exit layer's data message travels as an inner packet of the
    // entry tunnel. On the tunnel interface (L3) it is a WireGuard packet of its own; on the
    // veth it is carried by an entry-layer data message.
    let (client, exit, entry) = ([10, 64, 0, 2], [185, 0, 0, 2], [185, 0, 0, 1]);
    let inner = fixtures::udp_ipv4(client, 5000, [10, 64, 0, 1], 6000, 1000);
    let exit_layer = fixtures::wg_data_ipv4(client, 41000, exit, 51820, inner.len() as u32, 1380);
    let p = parse_all(&exit_layer, true).unwrap();
    assert_eq!(p.msg.unwrap().kind, kind::DATA);
    assert_eq!(p.ip.l3_len, data_wire_len(1000, 1380, 20));
    let entry_layer = fixtures::wg_data_ipv4(
        [192, 168, 1, 2],
        41001,
        entry,
        51820,
        exit_layer.len() as u32,
        1420,
    );
    let p = parse_all(&Framing::Ethernet.frame(&entry_layer), false).unwrap();
    assert_eq!(p.msg.unwrap().kind, kind::DATA);
    assert_eq!(
        p.ip.l3_len,
        data_wire_len(data_wire_len(1000, 1380, 20), 1420, 20)
    );
}
