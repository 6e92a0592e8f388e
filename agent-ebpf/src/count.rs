//! Adding to the per-CPU counters without ever losing an update silently.

use agent_common::maps::{Counter, map_error};
use aya_ebpf::{bindings::BPF_NOEXIST, maps::PerCpuHashMap};

use crate::maps::MAP_ERRORS;

#[inline(always)]
pub fn add<K>(map: &PerCpuHashMap<K, Counter>, key: &K, packets: u64, bytes: u64, err_idx: u32) {
    if let Some(c) = map.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; BPF programs do not migrate mid-run.
        unsafe {
            (*c).packets += packets;
            (*c).bytes += bytes;
        }
        return;
    }
    let fresh = Counter { packets, bytes };
    if map.insert(key, &fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU may have created the entry between lookup and insert.
    if let Some(c) = map.get_ptr_mut(key) {
        unsafe {
            (*c).packets += packets;
            (*c).bytes += bytes;
        }
        return;
    }
    map_error(err_idx);
}

#[inline(always)]
fn map_error(idx: u32) {
    if let Some(e) = MAP_ERRORS.get_ptr_mut(idx) {
        unsafe { *e += 1 };
    }
}

pub const COUNTERS_ERR: u32 = map_error::COUNTERS;
pub const UNKNOWN_WIRE_ERR: u32 = map_error::UNKNOWN_WIRE;
