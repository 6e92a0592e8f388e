//! Obfuscation carriers, on underlays: the UDP or TCP flow between a local obfuscation proxy
//! and the relay's obfuscation port (`OBFS_ENDPOINTS`, written by the agent with the tunnel
//! peer it carries), counted per (tunnel interface, peer, kind, direction) with its IP-level
//! bytes, the wire role's convention. What this counts is never a leak: the caller skips the
//! leak check for it.

use agent_common::{
    maps::{
        Counter, DIR_TX,
        obfuscation::{
            MAX_OBFS_COUNTERS, MAX_OBFS_ENDPOINTS, ObfsEndpoint, ObfsKey, ObfsTarget, error,
        },
    },
    parse::{IPPROTO_TCP, IPPROTO_UDP, Ip, L4, frag, segmented},
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};

use crate::count;

/// Remote obfuscation endpoint -> the peer whose WireGuard it carries.
#[map]
pub static OBFS_ENDPOINTS: HashMap<ObfsEndpoint, ObfsTarget> =
    HashMap::with_max_entries(MAX_OBFS_ENDPOINTS, 0);

/// One entry: the number of endpoints in `OBFS_ENDPOINTS` (0: skip the lookup).
#[map]
pub static OBFS_CFG: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static OBFS_COUNTERS: PerCpuHashMap<ObfsKey, Counter> =
    PerCpuHashMap::pinned(MAX_OBFS_COUNTERS, 0);

#[map]
pub static OBFS_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(error::COUNT, 0);

/// Counts the packet if it belongs to a known obfuscation flow; returns whether it did.
#[inline(always)]
pub fn count(ip: &Ip, l4: &L4, dir: u8, skb_len: u32, gso_segs: u32) -> bool {
    if ip.proto != IPPROTO_UDP && ip.proto != IPPROTO_TCP {
        return false;
    }
    // An array lookup the verifier inlines: nearly free where nobody obfuscates.
    match OBFS_CFG.get(0) {
        Some(n) if *n != 0 => {}
        _ => return false,
    }
    let (addr, port) = if dir == DIR_TX {
        (ip.dst, l4.dport)
    } else {
        (ip.src, l4.sport)
    };
    let key = ObfsEndpoint {
        addr,
        port,
        family: ip.family,
        proto: ip.proto,
    };
    // SAFETY: plain integers written by the agent.
    let Some(target) = (unsafe { OBFS_ENDPOINTS.get(key) }).copied() else {
        return false;
    };
    let (packets, bytes) = if ip.frag == frag::FIRST && ip.proto == IPPROTO_UDP {
        // A datagram split by IP counts once, here where its ports are, at its full size
        // (later fragments carry no ports to match).
        (1, (ip.l4_off - ip.l3_off + 8 + l4.udp_payload_len) as u64)
    } else {
        // TCP (udp2tcp) leaves in TSO/GSO batches: every segment with its own headers.
        segmented(ip, l4.hdr_len, skb_len, gso_segs)
    };
    let key = ObfsKey {
        ifindex: target.ifindex,
        peer: target.peer,
        kind: target.kind,
        dir,
        _pad: [0; 2],
    };
    count::add_or_report(
        &OBFS_COUNTERS,
        &key,
        packets,
        bytes,
        &OBFS_ERRORS,
        error::OBFS_COUNTERS,
    );
    true
}
