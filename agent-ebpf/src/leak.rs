//! Leak detection, on underlay egress only: while a watched tunnel is up (the agent writes
//! until when into `LEAK_CFG` every second, a few seconds ahead while one is up), an IP
//! packet leaving an underlay that is not WireGuard (to a known endpoint, or from a local
//! listen port, and shaped like a WireGuard message: the wire role's recognition) went
//! around the tunnel. Past that deadline, while the agent's last word still was "up" (it
//! died, or its sync stalled), such packets are counted apart (`state::UNRENEWED`): whether
//! a tunnel stayed up meanwhile is for the next agent to judge.
//!
//! Not leaks: anything that is not IP (ARP), ICMP to a known WireGuard endpoint address or
//! obfuscation flow's relay (the agent's own path-MTU search to a relay), IPv6 neighbour
//! discovery and router solicitation/advertisement and redirects (ICMPv6 133-137), DHCP
//! (UDP 67/68) and DHCPv6 (546/547), destinations that never leave the link or the host
//! (127/8, 169.254/16, 224/4, 255.255.255.255, ::1, fe80::/10, ff00::/8), destinations
//! inside the `--leak-allow` CIDRs, any packet on the loopback device, and an obfuscation proxy's flow to its relay
//! (`obfuscation.rs`: wirescope_egress never calls here for it). A fragmented packet counts
//! once, with its first fragment (later fragments carry no ports to tell WireGuard from
//! anything else).
//! Only (interface, kind) counts are kept: never an address.

use agent_common::{
    maps::{
        Counter,
        leak::{
            AllowV4, AllowV6, LeakConfig, LeakKey, MAX_LEAK_ALLOW, MAX_LEAKS, error, kind, state,
        },
        wire::Endpoint,
    },
    parse::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ip, L4, Packet, frag, segmented,
    },
    wireguard::classify,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, PerCpuHashMap, ProgramArray, lpm_trie::Key},
    programs::TcContext,
};

use crate::{
    maps::{ENDPOINTS, WG_PORTS},
    skb::Skb,
};

/// `wirescope_leak` at index 0, written by the agent after loading it.
#[map]
pub static LEAK_PROG: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Whether the agent's last word was that a watched tunnel is up (whether that word is
/// still current is read only for a packet that is a leak: [`unrenewed`]).
#[inline(always)]
pub fn watching() -> bool {
    LEAK_CFG.get(0).is_some_and(|c| c.tunnel_up_until_ns != 0)
}

/// The `LeakKey.state` of a leak leaving now: None when the agent has just said no tunnel
/// is up (after [`watching`] was read).
#[inline(always)]
fn leak_state() -> Option<u8> {
    let until = LEAK_CFG.get(0).map_or(0, |c| c.tunnel_up_until_ns);
    if until == 0 {
        return None;
    }
    // SAFETY: a plain helper call.
    Some(if unsafe { bpf_ktime_get_ns() } < until {
        state::UP
    } else {
        state::UNRENEWED
    })
}

/// Jumps to `wirescope_leak` (does not return; when the array is empty, goes on).
#[inline(always)]
pub fn check(ctx: &TcContext) {
    // SAFETY: a TC context for a TC program array.
    unsafe { LEAK_PROG.tail_call(ctx, 0) };
}

/// One entry: until when (bpf_ktime_get_ns) a tunnel is up. Pinned, like the counts: what
/// a killed agent last said stays for the programs left running and for the next agent.
#[map]
pub static LEAK_CFG: Array<LeakConfig> = Array::pinned(1, 0);

/// `--leak-allow` destinations.
#[map]
pub static LEAK_ALLOW_V4: LpmTrie<AllowV4, u8> = LpmTrie::with_max_entries(MAX_LEAK_ALLOW, 0);

#[map]
pub static LEAK_ALLOW_V6: LpmTrie<AllowV6, u8> = LpmTrie::with_max_entries(MAX_LEAK_ALLOW, 0);

/// Packets and L3 bytes per (interface, kind).
#[map]
pub static LEAKS: PerCpuHashMap<LeakKey, Counter> = PerCpuHashMap::pinned(MAX_LEAKS, 0);

#[map]
pub static LEAK_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(error::COUNT, 0);

/// The loopback device's index in every network namespace (LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;
const DNS_PORT: u16 = 53;

/// An IP packet leaving the underlay `ifindex` while a tunnel is up (egress; never called
/// for tunnels).
#[inline(always)]
pub fn observe(pkt: &Skb, ifindex: u32, ip: &Ip, l4: Option<&L4>, gso_segs: u32) {
    // Every field defined on every path: with `None`, LLVM may leave the payload of the
    // Option undefined and store it anyway, which the verifier refuses (`!read_ok`).
    let l4 = match l4 {
        Some(l) => *l,
        None => L4 {
            sport: 0,
            dport: 0,
            hdr_len: 0,
            udp_payload_len: 0,
        },
    };
    let has_l4 = l4.hdr_len != 0;
    // (That the agent said a tunnel is up was checked by wirescope_egress just before its
    // tail call here; the clock is read only for what turns out to be a leak.)
    if ifindex == LOOPBACK_IFINDEX || ip.frag == frag::LATER {
        return;
    }
    if local_destination(ip) {
        return;
    }
    let mut k = if ip.family == 4 {
        kind::IPV4
    } else {
        kind::IPV6
    };
    let mut hdr = 0;
    match ip.proto {
        IPPROTO_UDP | IPPROTO_TCP => {
            // A malformed transport header still leaves as an IP packet of its family.
            if has_l4 {
                hdr = l4.hdr_len;
                if ip.proto == IPPROTO_UDP && (dhcp(&l4) || wireguard(pkt, ip, &l4)) {
                    return;
                }
                if l4.dport == DNS_PORT {
                    k = kind::DNS;
                }
            }
        }
        IPPROTO_ICMPV6 => {
            // Router solicitation (133), advertisement, neighbour solicitation and
            // advertisement, redirect (137): the link's own business.
            if let Some(t) = pkt.u8_at(ip.l4_off)
                && (133..=137).contains(&t)
            {
                return;
            }
            if to_endpoint(ip) {
                return;
            }
        }
        IPPROTO_ICMP => {
            if to_endpoint(ip) {
                return;
            }
        }
        _ => {}
    }
    if allowed(ip) {
        return;
    }
    let Some(state) = leak_state() else {
        return;
    };
    let (packets, bytes) = segmented(ip, hdr, pkt.len(), gso_segs);
    add(
        &LeakKey {
            ifindex,
            kind: k,
            state,
            _pad: [0; 2],
        },
        packets,
        bytes,
    );
}

/// ICMP to a WireGuard peer's endpoint address: the agent's own path-MTU search to a relay
/// (and anyone's ping to it) says nothing the WireGuard traffic to that address does not.
#[inline(always)]
fn to_endpoint(ip: &Ip) -> bool {
    let addr = Endpoint {
        addr: ip.dst,
        port: 0,
        family: ip.family,
        _pad: 0,
    };
    // SAFETY: plain values written by the agent.
    unsafe { crate::path::ENDPOINT_ADDRS.get(&addr) }.is_some()
}

/// Destinations that stay on the host or the link: loopback, link-local, multicast and
/// limited broadcast.
#[inline(always)]
fn local_destination(ip: &Ip) -> bool {
    let d = &ip.dst;
    if ip.family == 4 {
        d[0] == 127
            || (d[0] == 169 && d[1] == 254)
            || (d[0] & 0xf0) == 224
            || (d[0] == 255 && d[1] == 255 && d[2] == 255 && d[3] == 255)
    } else {
        let loopback = d[..15].iter().all(|b| *b == 0) && d[15] == 1;
        loopback || d[0] == 0xff || (d[0] == 0xfe && (d[1] & 0xc0) == 0x80)
    }
}

#[inline(always)]
fn dhcp(l4: &L4) -> bool {
    let v4 = |p: u16| p == 67 || p == 68;
    let v6 = |p: u16| p == 546 || p == 547;
    (v4(l4.sport) && v4(l4.dport)) || (v6(l4.sport) && v6(l4.dport))
}

/// The wire role's recognition: to a known endpoint or from a local listen port, and a
/// WireGuard message by type and size.
#[inline(always)]
fn wireguard(pkt: &Skb, ip: &Ip, l4: &L4) -> bool {
    let endpoint = Endpoint {
        addr: ip.dst,
        port: l4.dport,
        family: ip.family,
        _pad: 0,
    };
    // The message's shape first: one 16-byte read, where the lookups cost several times
    // that (both must hold; see wire::count).
    if classify(pkt, ip.l4_off + 8, l4.udp_payload_len).is_none() {
        return false;
    }
    // SAFETY: values are plain integers written by the agent; only presence is read.
    unsafe { ENDPOINTS.get(&endpoint) }.is_some() || unsafe { WG_PORTS.get(&l4.sport) }.is_some()
}

#[inline(always)]
fn allowed(ip: &Ip) -> bool {
    let d = &ip.dst;
    if ip.family == 4 {
        let key = Key::new(
            32,
            AllowV4 {
                addr: [d[0], d[1], d[2], d[3]],
            },
        );
        LEAK_ALLOW_V4.get(&key).is_some()
    } else {
        let key = Key::new(128, AllowV6 { addr: *d });
        LEAK_ALLOW_V6.get(&key).is_some()
    }
}

#[inline(always)]
fn add(key: &LeakKey, packets: u64, bytes: u64) {
    if let Some(c) = LEAKS.get_ptr_mut(key) {
        // SAFETY: this CPU's value.
        unsafe {
            (*c).packets += packets;
            (*c).bytes += bytes;
        }
        return;
    }
    let fresh = Counter { packets, bytes };
    if LEAKS.insert(key, &fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU may have created it between the lookup and the insert.
    if let Some(c) = LEAKS.get_ptr_mut(key) {
        unsafe {
            (*c).packets += packets;
            (*c).bytes += bytes;
        }
        return;
    }
    if let Some(e) = LEAK_ERRORS.get_ptr_mut(error::LEAKS) {
        unsafe { *e += 1 };
    }
}
