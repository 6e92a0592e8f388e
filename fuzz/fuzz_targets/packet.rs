//! agent-common's packet parser over arbitrary bytes: `parse_ip`, `parse_l4` and
//! `wireguard::classify`, chained as agent-ebpf chains them, on both framings (bare IP and
//! Ethernet). Nothing may panic, and every `Ok` must keep the invariants the parser
//! documents (offsets and lengths within the packet; see `check_consistent`, shared with
//! agent-common's randomized tests).
#![no_main]

use agent_common::{
    parse::{parse_ip, parse_l4, segmented},
    wireguard::classify,
};
use libfuzzer_sys::fuzz_target;

#[path = "../../agent-common/tests/common/mod.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let pkt = data;
    for l3 in [true, false] {
        common::check_consistent(pkt, l3);
        // The same calls again: the parser has no state, so the answers must not change.
        let ip = parse_ip(&pkt, l3);
        assert_eq!(ip, parse_ip(&pkt, l3));
        if let Ok(ip) = ip {
            let l4 = parse_l4(&pkt, &ip);
            assert_eq!(l4, parse_l4(&pkt, &ip));
            let hdr = l4.ok().flatten().map_or(0, |l4| l4.hdr_len);
            // GSO accounting never panics, and a segment count of 0 or 1 is the packet itself.
            let (n, bytes) = segmented(&ip, hdr, pkt.len() as u32, 1);
            assert_eq!((n, bytes), (1, u64::from(ip.l3_len)));
            let (n, bytes) = segmented(&ip, hdr, pkt.len() as u32, u32::MAX);
            assert_eq!(n, u64::from(u32::MAX));
            assert!(bytes >= u64::from(pkt.len() as u32 - ip.l3_off));
        }
    }
    // The whole input as a UDP payload (raw WireGuard messages), and at a few offsets with
    // lengths that lie about what is there.
    let len = pkt.len() as u32;
    for (off, claimed) in [
        (0, len),
        (0, len.wrapping_add(16)),
        (8, len.saturating_sub(8)),
        (len, 32),
    ] {
        if let Some(m) = classify(&pkt, off, claimed) {
            common::check_message(&m);
            assert_eq!(m.len, claimed);
            // The 16-byte header it read was there.
            assert!(
                u64::from(off) + 16 <= u64::from(len),
                "{m:?} off {off} len {len}"
            );
        }
    }
});
