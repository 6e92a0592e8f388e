//! Helpers shared by the parser tests.
#![allow(dead_code)]

use agent_common::{
    maps::kind,
    parse::{IPPROTO_TCP, IPPROTO_UDP, Ip, L4, ParseError, frag, parse_ip, parse_l4},
    wireguard::{Message, classify},
};

pub const A4: [u8; 4] = [192, 0, 2, 1];
pub const B4: [u8; 4] = [198, 51, 100, 7];
pub const A6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
];
pub const B6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
];

/// Everything the datapath reads from a packet, the way agent-ebpf chains the calls.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub ip: Ip,
    pub l4: Option<L4>,
    pub msg: Option<Message>,
}

/// parse_ip, then parse_l4, then classify for UDP: errors of parse_l4 are returned too.
pub fn parse_all(pkt: &[u8], l3: bool) -> Result<Parsed, ParseError> {
    let ip = parse_ip(&pkt, l3)?;
    let l4 = parse_l4(&pkt, &ip)?;
    let msg = match l4 {
        Some(l4) if ip.proto == IPPROTO_UDP => classify(&pkt, ip.l4_off + 8, l4.udp_payload_len),
        _ => None,
    };
    Ok(Parsed { ip, l4, msg })
}

/// Whatever the parser returns for `pkt` must be internally consistent and within the
/// packet; none of the calls may panic. Returns the result for further checks.
pub fn check_consistent(pkt: &[u8], l3: bool) -> Option<Parsed> {
    let len = pkt.len() as u32;
    let ip = match parse_ip(&pkt, l3) {
        Ok(ip) => ip,
        Err(_) => return None,
    };
    assert!(ip.family == 4 || ip.family == 6, "{ip:?}");
    if l3 {
        assert_eq!(ip.l3_off, 0);
    } else {
        assert!([14, 18, 22].contains(&ip.l3_off), "{ip:?}");
    }
    let min_hdr = if ip.family == 4 { 20 } else { 40 };
    assert!(ip.l4_off >= ip.l3_off + min_hdr, "{ip:?}");
    assert!(ip.l4_off <= ip.l3_off + ip.l3_len, "{ip:?} len {len}");
    assert!(ip.l3_off + ip.l3_len <= len, "{ip:?} len {len}");
    assert!(ip.frag <= frag::LATER);
    if ip.family == 4 {
        assert!(ip.src[4..].iter().chain(&ip.dst[4..]).all(|&b| b == 0));
        assert!(ip.l4_off - ip.l3_off <= 60);
    }
    let l3_end = ip.l3_off + ip.l3_len;
    let l4 = match parse_l4(&pkt, &ip) {
        Ok(l4) => l4,
        Err(_) => {
            return Some(Parsed {
                ip,
                l4: None,
                msg: None,
            });
        }
    };
    let mut msg = None;
    match l4 {
        None => assert!(
            ip.frag == frag::LATER || (ip.proto != IPPROTO_UDP && ip.proto != IPPROTO_TCP),
            "{ip:?}"
        ),
        Some(l4) => {
            assert_ne!(ip.frag, frag::LATER);
            assert!(ip.l4_off + l4.hdr_len <= l3_end, "{ip:?} {l4:?}");
            match ip.proto {
                IPPROTO_UDP => {
                    assert_eq!(l4.hdr_len, 8);
                    if ip.frag == frag::NONE {
                        assert!(
                            ip.l4_off + 8 + l4.udp_payload_len <= l3_end,
                            "{ip:?} {l4:?}"
                        );
                    }
                    msg = classify(&pkt, ip.l4_off + 8, l4.udp_payload_len);
                    if let Some(m) = msg {
                        check_message(&m);
                        assert_eq!(m.len, l4.udp_payload_len);
                    }
                }
                IPPROTO_TCP => {
                    assert!((20..=60).contains(&l4.hdr_len) && l4.hdr_len % 4 == 0);
                    assert_eq!(l4.udp_payload_len, 0);
                }
                p => panic!("ports for protocol {p}"),
            }
        }
    }
    Some(Parsed { ip, l4, msg })
}

/// A classified message's kind agrees with its length.
pub fn check_message(m: &Message) {
    match m.kind {
        kind::HANDSHAKE_INITIATION => assert_eq!(m.len, 148),
        kind::HANDSHAKE_RESPONSE => assert_eq!(m.len, 92),
        kind::COOKIE_REPLY => assert_eq!(m.len, 64),
        kind::KEEPALIVE => assert_eq!(m.len, 32),
        kind::DATA => {
            assert!(m.len > 32);
            let p = m.len - 32;
            assert!(p.is_multiple_of(16) || p >= 20, "{m:?}");
        }
        k => panic!("kind {k}"),
    }
    if m.kind != kind::HANDSHAKE_RESPONSE {
        assert_eq!(m.receiver, 0);
    }
    if m.kind != kind::DATA && m.kind != kind::KEEPALIVE {
        assert_eq!(m.counter, 0);
    }
}

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}
