//! ICMP too-big messages arriving on a watched interface (`wirescope_icmp_too_big_total`,
//! `wirescope_icmp_reported_mtu_bytes`): ICMPv4 type 3 code 4 (fragmentation needed; the
//! next-hop MTU is the u16 at bytes 6..8 of the ICMP header) and ICMPv6 type 2 (packet too
//! big; the MTU is the u32 at bytes 4..8).
//!
//! A message counts only when it is unfragmented and holds the ICMP header and the start of
//! the packet it reports on (the invoking IP header: 20 bytes for ICMPv4, 40 for ICMPv6) within
//! its IP length, as the kernel itself requires before acting on it; anything shorter is
//! malformed and counts nowhere. Every message counts per (interface, family); its MTU, when
//! not 0 (an old router that does not say), goes into `ICMP_MTU` as (interface, MTU) -> time
//! of the latest report, from which the agent takes the lowest of the last 10 minutes.

use agent_common::{
    maps::{
        CounterKey, DIR_RX,
        path::{MAX_ICMP_MTU, MAX_ICMP_TOO_BIG, MtuKey, error},
    },
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, Ip, Packet, frag},
};
use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns, macros::map, maps::HashMap, maps::PerCpuHashMap,
};

use crate::{frag::add, skb::Skb};

/// (ifindex, 0, family 4 or 6, rx) -> messages.
#[map]
pub static ICMP_TOO_BIG: PerCpuHashMap<CounterKey, agent_common::maps::Counter> =
    PerCpuHashMap::pinned(MAX_ICMP_TOO_BIG, 0);

/// (ifindex, reported MTU) -> bpf_ktime_get_ns of the latest report.
#[map]
pub static ICMP_MTU: HashMap<MtuKey, u64> = HashMap::with_max_entries(MAX_ICMP_MTU, 0);

#[inline(always)]
pub fn observe(pkt: &Skb, ifindex: u32, ip: &Ip) {
    if ip.frag != frag::NONE {
        return;
    }
    let end = ip.l3_off.saturating_add(ip.l3_len);
    let avail = end.saturating_sub(ip.l4_off);
    let mtu = match (ip.family, ip.proto) {
        (4, IPPROTO_ICMP) => {
            if avail < 8 + 20 {
                return;
            }
            let Some(h) = pkt.load::<8>(ip.l4_off) else {
                return;
            };
            if h[0] != 3 || h[1] != 4 {
                return;
            }
            u16::from_be_bytes([h[6], h[7]]) as u32
        }
        (6, IPPROTO_ICMPV6) => {
            if avail < 8 + 40 {
                return;
            }
            let Some(h) = pkt.load::<8>(ip.l4_off) else {
                return;
            };
            // The code is 0 and ignored by receivers (RFC 4443).
            if h[0] != 2 {
                return;
            }
            u32::from_be_bytes([h[4], h[5], h[6], h[7]])
        }
        _ => return,
    };
    let key = CounterKey {
        ifindex,
        peer: 0,
        kind: ip.family,
        dir: DIR_RX,
        _pad: [0; 2],
    };
    add(
        &ICMP_TOO_BIG,
        &key,
        1,
        ip.l3_len as u64,
        error::ICMP_TOO_BIG,
    );
    if mtu == 0 {
        return;
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if ICMP_MTU.insert(&MtuKey { ifindex, mtu }, &now, 0).is_err() {
        crate::frag::error(error::ICMP_MTU);
    }
}
