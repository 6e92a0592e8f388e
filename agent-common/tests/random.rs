//! Randomized robustness tests: random bytes, and random truncations and mutations of valid
//! fixtures. Deterministic (xorshift with fixed seeds); the parser must never panic and every
//! Ok result must be consistent with the bytes (see `common::check_consistent`).

mod common;

use agent_common::{
    fixtures::{self, Ext, Framing, Ipv4, Ipv6, tcp, udp, wg},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};
use common::*;

#[test]
fn random_bytes() {
    let mut rng = Rng::new(0x5eed_0001);
    let (mut ok, mut with_ports) = (0, 0);
    for _ in 0..200_000 {
        let len = rng.below(160);
        let mut pkt: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        let l3 = rng.below(2) == 0;
        // Most get a plausible start (ethertype, version, IHL, a length field that fits) so
        // that the parser gets past the first checks and into the transport header.
        if rng.below(8) != 0 {
            let mut off = 0;
            let v6 = rng.below(2) == 0;
            if !l3 {
                let tags = rng.below(3);
                for t in 0..tags {
                    let tpid: u16 = [0x8100, 0x88a8][rng.below(2)];
                    put16(&mut pkt, 12 + 4 * t, tpid);
                }
                off = 14 + 4 * tags;
                put16(&mut pkt, off - 2, if v6 { 0x86dd } else { 0x0800 });
            }
            let avail = len.saturating_sub(off);
            if v6 {
                if let Some(b) = pkt.get_mut(off) {
                    *b = 0x60;
                }
                put16(
                    &mut pkt,
                    off + 4,
                    avail.saturating_sub(40 + rng.below(4)) as u16,
                );
                if let Some(b) = pkt.get_mut(off + 6) {
                    *b = [0, 6, 17, 43, 44, 60, 58][rng.below(7)];
                }
            } else {
                if let Some(b) = pkt.get_mut(off) {
                    *b = 0x45 + rng.below(3) as u8;
                }
                put16(&mut pkt, off + 2, avail.saturating_sub(rng.below(4)) as u16);
                if let Some(b) = pkt.get_mut(off + 9) {
                    *b = [1, 6, 17][rng.below(3)];
                }
            }
        }
        if let Some(p) = check_consistent(&pkt, l3) {
            ok += 1;
            if p.l4.is_some() {
                with_ports += 1;
            }
        }
        check_consistent(&pkt, !l3);
    }
    // The generator does reach the Ok paths.
    assert!(ok > 20_000, "only {ok} random packets parsed");
    assert!(
        with_ports > 1_000,
        "only {with_ports} random packets had ports"
    );
}

/// Valid packets of many shapes, bare IP.
fn corpus() -> Vec<Vec<u8>> {
    let (a4, b4, a6, b6) = (A4, B4, A6, B6);
    let mut out = vec![
        fixtures::wg_ipv4(a4, 51820, b4, 51820, &wg::initiation(1)),
        fixtures::wg_ipv4(a4, 51820, b4, 51820, &wg::response(1, 2)),
        fixtures::wg_ipv6(a6, 51820, b6, 51820, &wg::cookie_reply(3)),
        fixtures::wg_ipv6(a6, 51820, b6, 51820, &wg::keepalive(3, 4)),
        fixtures::wg_data_ipv4(a4, 1, b4, 2, 1419, 1420),
        fixtures::wg_data_ipv6(a6, 1, b6, 2, 200, 1380),
        fixtures::tcp_ipv4(a4, 1, b4, 2, 12, 100),
        fixtures::tcp_ipv6(a6, 1, b6, 2, 40, 10),
        Ipv4::new(a4, b4)
            .options(20)
            .build(IPPROTO_UDP, &udp(1, 2, &wg::initiation(5))),
        Ipv4::new(a4, b4)
            .mf(true)
            .build(IPPROTO_UDP, &udp(1, 2, &fixtures::payload(300))[..64]),
        Ipv4::new(a4, b4)
            .frag_offset(3)
            .build(IPPROTO_UDP, &fixtures::payload(64)),
        Ipv6::new(a6, b6)
            .ext(Ext::HopByHop(8))
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
                id: 1,
            })
            .build(IPPROTO_TCP, &tcp(1, 2, 8, &fixtures::payload(16))),
        Ipv6::new(a6, b6)
            .ext(Ext::Routing(24))
            .ext(Ext::Fragment {
                offset: 5,
                more: false,
                id: 1,
            })
            .build(IPPROTO_UDP, &fixtures::payload(40)),
    ];
    let mut deep = Ipv6::new(a6, b6);
    for _ in 0..6 {
        deep = deep.ext(Ext::DestOpts(8));
    }
    out.push(deep.build(IPPROTO_UDP, &udp(1, 2, &wg::data(1, 2, 64, 1420))));
    out
}

#[test]
fn truncations_and_mutations_of_valid_packets() {
    let corpus = corpus();
    let mut rng = Rng::new(0x5eed_0002);
    for l3 in &corpus {
        for framing in Framing::ALL {
            let pkt = framing.frame(l3);
            let full = check_consistent(&pkt, framing.is_l3()).expect("valid fixture parses");
            assert!(full.l4.is_some() || full.ip.frag == agent_common::parse::frag::LATER);
        }
    }
    for _ in 0..100_000 {
        let l3 = &corpus[rng.below(corpus.len())];
        let framing = Framing::ALL[rng.below(4)];
        let mut pkt = framing.frame(l3);
        // Mutate a few bytes, mostly in the headers.
        for _ in 0..rng.below(4) {
            let span = pkt.len().min(framing.l3_offset() as usize + 80);
            let at = rng.below(span);
            match rng.below(3) {
                0 => pkt[at] = rng.byte(),
                1 => pkt[at] ^= 1 << rng.below(8),
                _ => pkt[at] = [0, 0xff, 0x05, 0x06, 0x11, 0x2c, 0x3c][rng.below(7)],
            }
        }
        // Truncate, or pad, sometimes.
        match rng.below(4) {
            0 => {
                let cut = rng.below(pkt.len() + 1);
                pkt.truncate(cut);
            }
            1 => {
                let extra = rng.below(40);
                pkt.extend((0..extra).map(|_| rng.byte()));
            }
            _ => {}
        }
        check_consistent(&pkt, framing.is_l3());
        check_consistent(&pkt, !framing.is_l3());
    }
}

/// Write a big-endian u16 at `at` if it fits.
fn put16(pkt: &mut [u8], at: usize, v: u16) {
    if let Some(b) = pkt.get_mut(at..at + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}
