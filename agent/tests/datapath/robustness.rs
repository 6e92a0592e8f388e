//! Robustness: random bytes, random headers and mutations of valid packets through both
//! programs on the tunnel and the underlay. Every run must leave exactly what the host model
//! ([`Lab::model`]) says, and nothing may count as WireGuard that a format check written
//! here independently does not call a WireGuard message.

use agent_common::{
    fixtures::{self, Ext, Framing, Ipv6, udp, wg},
    maps::kind,
    parse::{IPPROTO_UDP, parse_ip, parse_l4},
};

use crate::client::{
    CLIENT_V4, Delta, EXIT_RELAY_V4, Lab, client_v6, exit_relay_v6, families, messages, udp_flow,
    underlay_for,
};
use crate::common::{Dir, LISTEN_PORT, RELAY_PORT};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// WireGuard's message format, written here independently of `wireguard::classify`: the
/// kind of a UDP payload whose first bytes are `head` and whose UDP length says `len`.
fn wireguard_kind(head: &[u8], len: usize) -> Option<u8> {
    if head.len() < 16 || head[1..4] != [0, 0, 0] {
        return None;
    }
    match (head[0], len) {
        (1, 148) => Some(kind::HANDSHAKE_INITIATION),
        (2, 92) => Some(kind::HANDSHAKE_RESPONSE),
        (3, 64) => Some(kind::COOKIE_REPLY),
        (4, 32) => Some(kind::KEEPALIVE),
        // Padded to 16, or an IP packet's own length (cut at a tunnel MTU, or unpadded).
        (4, n) if n > 32 && ((n - 32) % 16 == 0 || n - 32 >= 20) => Some(kind::DATA),
        _ => None,
    }
}

/// Valid packets that count, to mutate: WireGuard to known endpoints and from the listen
/// port, inner packets, in every framing the interface takes.
fn seeds() -> Vec<(Framing, Dir, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in Dir::BOTH {
        for (_, local, known, _, stranger) in families() {
            for (_, msg, _) in messages() {
                let framing =
                    [Framing::Ethernet, Framing::Vlan(3), Framing::QinQ(4, 5)][msg.len() % 3];
                out.push((
                    framing,
                    dir,
                    framing.frame(&udp_flow(dir, (local, LISTEN_PORT), known, &msg)),
                ));
                out.push((
                    Framing::Ethernet,
                    dir,
                    Framing::Ethernet.frame(&udp_flow(dir, (local, LISTEN_PORT), stranger, &msg)),
                ));
            }
        }
        let (s, d) = dir.flow(CLIENT_V4, EXIT_RELAY_V4);
        out.push((
            Framing::L3,
            dir,
            fixtures::wg_ipv4(s, LISTEN_PORT, d, RELAY_PORT, &wg::keepalive(1, 2)),
        ));
        out.push((Framing::L3, dir, fixtures::tcp_ipv4(s, 1, d, 2, 8, 64)));
        let (s, d) = dir.flow(client_v6(), exit_relay_v6());
        out.push((
            Framing::L3,
            dir,
            fixtures::wg_ipv6(s, LISTEN_PORT, d, RELAY_PORT, &wg::initiation(7)),
        ));
        let ext = Ipv6::new(s, d).ext(Ext::HopByHop(8)).ext(Ext::Routing(16));
        out.push((
            Framing::L3,
            dir,
            ext.build(
                IPPROTO_UDP,
                &udp(LISTEN_PORT, RELAY_PORT, &wg::response(1, 2)),
            ),
        ));
    }
    out
}

/// Random bytes, random headers, and mutations of valid packets (header bytes, WireGuard
/// type and reserved bytes, UDP and IP lengths, truncation, padding), on the tunnel and the
/// underlay, through both programs. Every run: verdict -1, bytes unchanged, exactly what the
/// host model says, and nothing counted as WireGuard that is not a WireGuard message.
#[test]
fn random_and_adversarial_input() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, under) = (lab.tun, lab.under);
    let seeds = seeds();
    let mut rng = Rng(0x7e57_5eed_0bad_cafe);
    let (mut counted, mut counted_wire) = (0, 0);
    for i in 0..600 {
        let (framing, pkt) = match i % 4 {
            // Garbage.
            0 => {
                let len = 14 + rng.below(300);
                let framing = if rng.below(2) == 0 {
                    Framing::L3
                } else {
                    Framing::Ethernet
                };
                (framing, (0..len).map(|_| rng.byte()).collect::<Vec<u8>>())
            }
            // Garbage behind a plausible IP header start.
            1 => {
                let len = 34 + rng.below(300);
                let mut p: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
                let v6 = rng.below(2) == 0;
                let framing = if rng.below(2) == 0 {
                    Framing::L3
                } else {
                    Framing::Ethernet
                };
                let off = framing.l3_offset() as usize;
                if off == 14 {
                    p[12..14].copy_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
                }
                let avail = (len - off) as u16;
                if v6 {
                    p[off] = 0x60;
                    if len >= off + 40 {
                        p[off + 4..off + 6]
                            .copy_from_slice(&avail.saturating_sub(40).to_be_bytes());
                        p[off + 6] = [17, 6, 0, 44][rng.below(4)];
                    }
                } else {
                    p[off] = 0x45;
                    p[off + 2..off + 4].copy_from_slice(&avail.to_be_bytes());
                    p[off + 6] = 0;
                    p[off + 9] = [17, 6, 1][rng.below(3)];
                }
                (framing, p)
            }
            // Mutations of valid packets.
            _ => {
                let (framing, _, seed) = &seeds[rng.below(seeds.len())];
                let mut p = seed.clone();
                let off = framing.l3_offset() as usize;
                let ip = parse_ip(&p.as_slice(), framing.is_l3()).expect("seed parses");
                let wg_off = ip.l4_off as usize + 8;
                for _ in 0..1 + rng.below(3) {
                    match rng.below(6) {
                        // A header byte.
                        0 => {
                            let at = rng.below(p.len().min(wg_off + 16));
                            p[at] = rng.byte();
                        }
                        // A bit anywhere in the first 100 bytes.
                        1 => {
                            let at = rng.below(p.len().min(100));
                            p[at] ^= 1 << rng.below(8);
                        }
                        // The WireGuard type or reserved bytes.
                        2 if p.len() > wg_off + 4 => {
                            p[wg_off + rng.below(4)] = [0, 1, 2, 3, 4, 5, 0x80, 0xff][rng.below(8)];
                        }
                        // Resize the UDP payload, keeping the lengths consistent.
                        3 if ip.proto == IPPROTO_UDP => {
                            let new_len = (wg_off
                                + [0, 1, 15, 16, 31, 33, 48, 63, 65, 91, 93, 99, 100, 147, 149]
                                    [rng.below(15)])
                            .min(p.len() + 200);
                            p.resize(new_len, 0x5a);
                            let l3_len = (p.len() - off) as u16;
                            let udp_len = (p.len() - ip.l4_off as usize) as u16;
                            if ip.family == 4 {
                                p[off + 2..off + 4].copy_from_slice(&l3_len.to_be_bytes());
                            } else {
                                p[off + 4..off + 6].copy_from_slice(&(l3_len - 40).to_be_bytes());
                            }
                            let u = ip.l4_off as usize;
                            p[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
                        }
                        // Truncate.
                        4 if p.len() > 15 => {
                            let cut = 14 + rng.below(p.len() - 14);
                            p.truncate(cut);
                        }
                        // Pad.
                        _ => {
                            let extra = rng.below(40);
                            p.extend((0..extra).map(|_| rng.byte()));
                        }
                    }
                }
                (*framing, p)
            }
        };
        let ifindex = if framing.is_l3() {
            // Bare IP: alternately the tunnel and the underlay with the L3 flag.
            if i % 8 < 4 {
                tun
            } else {
                underlay_for(&mut lab, Framing::L3);
                under
            }
        } else {
            underlay_for(&mut lab, Framing::Ethernet);
            under
        };
        for dir in Dir::BOTH {
            let what = format!(
                "random input {i} ({} bytes: {:02x?})",
                pkt.len(),
                &pkt[..pkt.len().min(64)]
            );
            let got = lab.run(&what, dir, ifindex, (0, 0), &pkt);
            let want = lab.model(dir, ifindex, 0, &pkt);
            assert_eq!(got, want, "{what}: {dir:?} on ifindex {ifindex}");
            if got != Delta::none() {
                counted += 1;
            }
            if got.has_wire() {
                counted_wire += 1;
                // Independently: it is a UDP datagram whose payload is a WireGuard message
                // of the kind counted.
                let ip = parse_ip(&pkt.as_slice(), framing.is_l3()).expect("counted, so IP");
                let l4 = parse_l4(&pkt.as_slice(), &ip)
                    .expect("counted")
                    .expect("has ports");
                assert_eq!(ip.proto, IPPROTO_UDP, "{what}");
                let at = ip.l4_off as usize + 8;
                let head = &pkt[at..pkt.len().min(at + 16)];
                let k = wireguard_kind(head, l4.udp_payload_len as usize);
                let counted_kind = got
                    .counters
                    .iter()
                    .map(|(k, _)| k.kind)
                    .chain(got.unknown.iter().map(|(k, _)| k.kind))
                    .find(|k| *k != kind::TUNNEL);
                assert_eq!(
                    k, counted_kind,
                    "{what}: counted as WireGuard kind {counted_kind:?}"
                );
            }
        }
    }
    eprintln!("random input: {counted} runs counted something, {counted_wire} as WireGuard");
    // The generator reaches the counting paths.
    assert!(counted > 100, "only {counted} random runs counted anything");
    assert!(
        counted_wire > 50,
        "only {counted_wire} random runs counted WireGuard"
    );

    // Every valid seed and every truncation of it, on the interface it belongs to.
    for (framing, dir, pkt) in &seeds {
        let ifindex = if framing.is_l3() { tun } else { under };
        if !framing.is_l3() {
            underlay_for(&mut lab, *framing);
        }
        let want = lab.model(*dir, ifindex, 0, pkt);
        assert_ne!(want, Delta::none(), "seed {pkt:02x?} counts");
        lab.expect("seed", *dir, ifindex, pkt, want);
        lab.expect_truncations_count_nothing("seed", *dir, ifindex, pkt);
    }
}
