//! Tunnel role: inner IP packets on a WireGuard interface, per peer by longest-prefix match
//! of the destination (tx) or source (rx) in the peers' allowed IPs.

use agent_common::{
    maps::{
        CounterKey, DIR_RX, DIR_TX, PEER_UNKNOWN, kind,
        tunnel::{AllowedV4, AllowedV6, MAX_ALLOWED_IPS},
    },
    parse::{Ip, L4, Packet, segmented},
};
use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};

use crate::{
    count::{self, COUNTERS_ERR},
    maps::COUNTERS,
    skb::Skb,
    transit,
};

/// The peers' allowed IPs -> peer id, written by the agent.
#[map]
pub static ALLOWED_V4: LpmTrie<AllowedV4, u32> = LpmTrie::with_max_entries(MAX_ALLOWED_IPS, 0);

#[map]
pub static ALLOWED_V6: LpmTrie<AllowedV6, u32> = LpmTrie::with_max_entries(MAX_ALLOWED_IPS, 0);

#[inline(always)]
pub fn count(pkt: &Skb, ifindex: u32, dir: u8, ip: &Ip, l4: Option<&L4>, gso_segs: u32) {
    let addr = if dir == DIR_TX { &ip.dst } else { &ip.src };
    let peer = lookup_peer(ifindex, ip.family, addr);
    let hdr = match l4 {
        Some(l4) => l4.hdr_len,
        None => 0,
    };
    let (packets, bytes) = segmented(ip, hdr, pkt.len(), gso_segs);
    let key = CounterKey {
        ifindex,
        peer,
        kind: kind::TUNNEL,
        dir,
        _pad: [0; 2],
    };
    count::add(&COUNTERS, &key, packets, bytes, COUNTERS_ERR);
    if peer == PEER_UNKNOWN {
        return;
    }
    // Transit time: the inner length of each segment is what WireGuard encrypts.
    let (len, last_len) = if gso_segs > 1 {
        let all = pkt.len().saturating_sub(ip.l3_off);
        let seg = pkt.gso_size();
        let hdr = ip.l4_off.saturating_sub(ip.l3_off) + hdr;
        (hdr + seg, all.saturating_sub((gso_segs - 1) * seg))
    } else {
        (ip.l3_len, ip.l3_len)
    };
    if dir == DIR_TX {
        transit::defer_enqueue(peer, DIR_TX, ifindex, len, last_len, packets as u32);
    } else if dir == DIR_RX {
        // A coalesced packet (GRO, or wireguard-go's GSO write to its TUN) is one inner
        // packet per segment, each the plaintext of its own message.
        transit::defer_dequeue(peer, DIR_RX, ifindex, len, last_len, packets as u32, false);
    }
}

#[inline(always)]
fn lookup_peer(ifindex: u32, family: u8, addr: &[u8; 16]) -> u32 {
    let ifindex_be = ifindex.to_be();
    let found = if family == 4 {
        let key = Key::new(
            64,
            AllowedV4 {
                ifindex_be,
                addr: [addr[0], addr[1], addr[2], addr[3]],
            },
        );
        ALLOWED_V4.get(&key).copied()
    } else {
        let key = Key::new(
            160,
            AllowedV6 {
                ifindex_be,
                addr: *addr,
            },
        );
        ALLOWED_V6.get(&key).copied()
    };
    found.unwrap_or(PEER_UNKNOWN)
}
