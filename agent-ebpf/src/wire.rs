//! Wire role: WireGuard messages in UDP, on every watched interface, attributed to a peer by
//! its endpoint.

use agent_common::{
    maps::{
        Counter, CounterKey, DIR_TX, PEER_UNKNOWN,
        wire::{Endpoint, MAX_UNKNOWN_WIRE, UnknownWireKey},
    },
    parse::{IPPROTO_UDP, Ip, L4, Packet, frag, segmented},
    wireguard::classify,
};
use aya_ebpf::{macros::map, maps::LruPerCpuHashMap};

use crate::{
    count::{self, COUNTERS_ERR, UNKNOWN_WIRE_ERR},
    health,
    maps::{COUNTERS, ENDPOINTS, WG_PORTS},
    skb::Skb,
    transit,
};

/// Messages to or from endpoints not (yet) mapped to a peer. LRU: anyone who reaches a
/// listen port picks these keys, so a full map evicts its stalest endpoint rather than
/// refusing new ones; what an eviction takes away stays in the totals in `COUNTERS` (see
/// [`count`]).
#[map]
pub static UNKNOWN_WIRE: LruPerCpuHashMap<UnknownWireKey, Counter> =
    LruPerCpuHashMap::pinned(MAX_UNKNOWN_WIRE, 0);

/// Counts the packet if it is a WireGuard message (to or from a known endpoint, or on a
/// local listen port, and shaped like one); returns whether it was.
#[inline(always)]
pub fn count(pkt: &Skb, ifindex: u32, dir: u8, ip: &Ip, l4: &L4, gso_segs: u32) -> bool {
    if ip.proto != IPPROTO_UDP {
        return false;
    }
    let (remote_addr, remote_port, local_port) = if dir == DIR_TX {
        (&ip.dst, l4.dport, l4.sport)
    } else {
        (&ip.src, l4.sport, l4.dport)
    };
    let endpoint = Endpoint {
        addr: *remote_addr,
        port: remote_port,
        family: ip.family,
        _pad: 0,
    };
    // The message's shape first: one read of 16 bytes rejects nearly every UDP datagram
    // that is not WireGuard (DNS, QUIC, ...), where the two hash lookups below cost several
    // times that (both conditions must hold, so the order changes no outcome).
    let Some(msg) = classify(pkt, ip.l4_off + 8, l4.udp_payload_len) else {
        return false;
    };
    // SAFETY: values are plain u32/u8 written by the agent.
    let peer = unsafe { ENDPOINTS.get(&endpoint) }.copied();
    if peer.is_none() && unsafe { WG_PORTS.get(&local_port) }.is_none() {
        return false;
    }
    let (packets, bytes) = if ip.frag == frag::FIRST {
        // An outer datagram split by IP: count the message once, here where its UDP header
        // is, with the datagram's full size (later fragments carry no ports to match).
        (1, (ip.l4_off - ip.l3_off + 8 + l4.udp_payload_len) as u64)
    } else {
        // UDP GSO: every segment is a message of its own, with its own headers.
        segmented(ip, 8, pkt.len(), gso_segs)
    };
    // Handshake round trips and the counter sequence; `packets` is the number of messages
    // (UDP GRO/GSO segments) the skb carries.
    health::observe(ifindex, peer.unwrap_or(PEER_UNKNOWN), dir, &msg, packets);
    if let Some(peer) = peer
        && msg.kind == agent_common::maps::kind::DATA
    {
        use agent_common::maps::transit::padded_len;
        // A UDP GSO/GRO skb carries `packets` messages of gso_size bytes each, the last
        // one shorter; its UDP length is the whole batch's.
        let (each, last) = if packets > 1 {
            let each = pkt.gso_size();
            let rest = msg
                .len
                .saturating_sub((packets as u32 - 1).saturating_mul(each));
            (padded_len(each), padded_len(rest))
        } else {
            (padded_len(msg.len), padded_len(msg.len))
        };
        if dir == DIR_TX {
            transit::defer_dequeue(peer, DIR_TX, ifindex, each, last, packets as u32, true);
        } else {
            transit::defer_enqueue(peer, dir, 0, each, last, packets as u32);
        }
    }
    // A known peer's messages count under its id; a stranger's under PEER_UNKNOWN (which
    // the tunnel role uses only with kind TUNNEL): a total per interface, kind and direction
    // that nothing evicts, of which the agent exports what `UNKNOWN_WIRE` no longer holds.
    let key = CounterKey {
        ifindex,
        peer: peer.unwrap_or(PEER_UNKNOWN),
        kind: msg.kind,
        dir,
        _pad: [0; 2],
    };
    count::add(&COUNTERS, &key, packets, bytes, COUNTERS_ERR);
    if peer.is_none() {
        let key = UnknownWireKey {
            ifindex,
            endpoint,
            kind: msg.kind,
            dir,
            _pad: [0; 2],
        };
        count::add(&UNKNOWN_WIRE, &key, packets, bytes, UNKNOWN_WIRE_ERR);
    }
    true
}
