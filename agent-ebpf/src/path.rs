//! Path-MTU signals, seen passively on every watched interface: IP fragments per layer and
//! ICMP too-big messages with the MTU they report.
//!
//! Fragments, both directions, per layer (`wirescope_fragments_total`). IPv4 with MF set or
//! a non-zero offset, IPv6 with a fragment header that is not atomic: the shared parser's
//! `Ip.frag` is FIRST or LATER.
//!
//! The layer, exactly:
//! - on a tunnel interface every fragment is `inner`;
//! - otherwise, a fragment whose remote address (destination on tx, source on rx) is the
//!   address of a known WireGuard endpoint, whatever the port, is `outer`; so is a first
//!   fragment of UDP whose local port is a local WireGuard listen port (a peer whose endpoint
//!   is not known yet);
//! - anything else is `other`.
//!
//! Ports are read only from first fragments (the parser gives no L4 header for later ones).
//!
//! ICMP too-big messages arriving (`wirescope_icmp_too_big_total`,
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
        Counter, CounterKey, DIR_RX, DIR_TX, IfaceConfig,
        path::{
            MAX_ENDPOINT_ADDRS, MAX_FRAGMENTS, MAX_ICMP_MTU, MAX_ICMP_TOO_BIG, MtuKey, error, layer,
        },
        wire::Endpoint,
    },
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, Ip, L4, Packet, frag},
};
use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
};

use crate::{maps::WG_PORTS, skb::Skb};

/// (ifindex, 0, layer, direction) -> fragments and their L3 bytes.
#[map]
pub static FRAGMENTS: PerCpuHashMap<CounterKey, Counter> = PerCpuHashMap::pinned(MAX_FRAGMENTS, 0);

/// Known endpoint addresses and obfuscation flows' relays (`Endpoint` with port 0), written
/// by the agent.
#[map]
pub static ENDPOINT_ADDRS: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_ENDPOINT_ADDRS, 0);

/// Updates refused by the path maps (`path::error`).
#[map]
pub static PATH_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(error::COUNT, 0);

/// (ifindex, 0, family 4 or 6, rx) -> messages.
#[map]
pub static ICMP_TOO_BIG: PerCpuHashMap<CounterKey, Counter> =
    PerCpuHashMap::pinned(MAX_ICMP_TOO_BIG, 0);

/// (ifindex, reported MTU) -> bpf_ktime_get_ns of the latest report.
#[map]
pub static ICMP_MTU: HashMap<MtuKey, u64> = HashMap::with_max_entries(MAX_ICMP_MTU, 0);

/// Counts the packet in `FRAGMENTS` if it is an IP fragment.
#[inline(always)]
pub fn count_fragment(ifindex: u32, dir: u8, flags: u32, ip: &Ip, l4: Option<&L4>) {
    if ip.frag == frag::NONE {
        return;
    }
    let layer = if flags & IfaceConfig::TUNNEL != 0 {
        layer::INNER
    } else if is_outer(dir, ip, l4) {
        layer::OUTER
    } else {
        layer::OTHER
    };
    let key = CounterKey {
        ifindex,
        peer: 0,
        kind: layer,
        dir,
        _pad: [0; 2],
    };
    add(&FRAGMENTS, &key, 1, ip.l3_len as u64, error::FRAGMENTS);
}

#[inline(always)]
fn is_outer(dir: u8, ip: &Ip, l4: Option<&L4>) -> bool {
    let remote = if dir == DIR_TX { &ip.dst } else { &ip.src };
    let addr = Endpoint {
        addr: *remote,
        port: 0,
        family: ip.family,
        _pad: 0,
    };
    // SAFETY: plain values written by the agent.
    if unsafe { ENDPOINT_ADDRS.get(&addr) }.is_some() {
        return true;
    }
    if ip.frag != frag::FIRST || ip.proto != IPPROTO_UDP {
        return false;
    }
    let Some(l4) = l4 else { return false };
    let local_port = if dir == DIR_TX { l4.sport } else { l4.dport };
    unsafe { WG_PORTS.get(&local_port) }.is_some()
}

/// Counts the packet (arriving) if it is an ICMP too-big message, and records its MTU.
#[inline(always)]
pub fn observe_too_big(pkt: &Skb, ifindex: u32, ip: &Ip) {
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
        bump(error::ICMP_MTU);
    }
}

/// Adds to a per-CPU counter; a refused update counts in `PATH_ERRORS[err_idx]`.
#[inline(always)]
fn add<K>(map: &PerCpuHashMap<K, Counter>, key: &K, packets: u64, bytes: u64, err_idx: u32) {
    crate::count::add_or_report(map, key, packets, bytes, &PATH_ERRORS, err_idx);
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(e) = PATH_ERRORS.get_ptr_mut(idx) {
        // SAFETY: this CPU's slot.
        unsafe { *e += 1 };
    }
}
