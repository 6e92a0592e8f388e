//! IP fragments on every watched interface, both directions, per layer
//! (`wirescope_fragments_total`). IPv4 with MF set or a non-zero offset, IPv6 with a
//! fragment header that is not atomic: the shared parser's `Ip.frag` is FIRST or LATER.
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

use agent_common::{
    maps::{
        Counter, CounterKey, DIR_TX, IfaceConfig,
        path::{MAX_ENDPOINT_ADDRS, MAX_FRAGMENTS, error, layer},
        wire::Endpoint,
    },
    parse::{IPPROTO_UDP, Ip, L4, frag},
};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
};

use crate::maps::WG_PORTS;

/// (ifindex, 0, layer, direction) -> fragments and their L3 bytes.
#[map]
pub static FRAGMENTS: PerCpuHashMap<CounterKey, Counter> = PerCpuHashMap::pinned(MAX_FRAGMENTS, 0);

/// Known endpoint addresses (`Endpoint` with port 0), written by the agent.
#[map]
pub static ENDPOINT_ADDRS: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_ENDPOINT_ADDRS, 0);

/// Updates refused by the path maps (`path::error`).
#[map]
pub static PATH_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(error::COUNT, 0);

#[inline(always)]
pub fn count(ifindex: u32, dir: u8, flags: u32, ip: &Ip, l4: Option<&L4>) {
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

/// Adds to a per-CPU counter; a refused update counts in `PATH_ERRORS[err_idx]`.
#[inline(always)]
pub fn add<K>(map: &PerCpuHashMap<K, Counter>, key: &K, packets: u64, bytes: u64, err_idx: u32) {
    crate::count::add_or_report(map, key, packets, bytes, &PATH_ERRORS, err_idx);
}

#[inline(always)]
pub fn error(idx: u32) {
    if let Some(e) = PATH_ERRORS.get_ptr_mut(idx) {
        // SAFETY: this CPU's slot.
        unsafe { *e += 1 };
    }
}
