//! The maps more than one feature uses, named as `agent_common::maps::names` says; a map
//! only one feature uses is declared in that feature's file.
//!
//! Pinning: every map whose contents must survive an agent restart (the counters and
//! histograms here and in the other modules, and the per-CPU error arrays) is declared with
//! `pinned` (`PinningType::ByName`); the agent loads them from, or pins them to, its pin
//! directory (`agent/src/datapath/pin.rs`: /sys/fs/bpf/wirescope/<netns>/<layout id>/), so a restarted
//! agent continues their counts. Maps the agent rewrites on every sync (interfaces, peers,
//! configuration), program arrays and in-flight state are not pinned.

use agent_common::maps::{
    Counter, CounterKey, IfaceConfig, IfaceName, MAX_COUNTERS, MAX_IFACE_NAMES, MAX_IFACES,
    MAX_PEER_IDS, PeerIdKey, map_error,
    wire::{Endpoint, MAX_ENDPOINTS, MAX_WG_PORTS},
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
};

#[map]
pub static IFACES: HashMap<u32, IfaceConfig> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map]
pub static ENDPOINTS: HashMap<Endpoint, u32> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Listen ports of the local WireGuard interfaces.
#[map]
pub static WG_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_WG_PORTS, 0);

/// Not preallocated: a preallocated per-CPU hash reserves every entry's value on every CPU up
/// front (262,144 x 16 bytes per CPU: 4 MiB per CPU, 268 MiB on 64 CPUs, plus ~80 bytes per
/// element), while an entry here is allocated by the first packet of its (interface, peer,
/// kind, direction) and lives on, so only the first packet of each pays for the allocation.
#[map]
pub static COUNTERS: PerCpuHashMap<CounterKey, Counter> =
    PerCpuHashMap::pinned(MAX_COUNTERS, BPF_F_NO_PREALLOC);

#[map]
pub static MAP_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(map_error::COUNT, 0);

/// The agent's peer numbering, pinned with the counters keyed by it (see
/// `agent_common::maps::PeerIdKey`); only the agent reads and writes it. Not preallocated: a
/// few hundred bytes per peer rather than 65,536 entries up front.
#[map]
pub static PEER_IDS: HashMap<PeerIdKey, u32> = HashMap::pinned(MAX_PEER_IDS, BPF_F_NO_PREALLOC);

/// ifindex -> the interface's latest name, pinned with the counters keyed by ifindex (see
/// `agent_common::maps::IfaceName`); only the agent reads and writes it.
#[map]
pub static IFACE_NAMES: HashMap<u32, IfaceName> =
    HashMap::pinned(MAX_IFACE_NAMES, BPF_F_NO_PREALLOC);

#[inline(always)]
pub fn iface(ifindex: u32) -> Option<IfaceConfig> {
    // SAFETY: IFACES is only written by the agent; a concurrent update can at worst show
    // the old or new flags, both valid.
    unsafe { IFACES.get(&ifindex) }.copied()
}
