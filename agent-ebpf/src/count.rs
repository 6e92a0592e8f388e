//! Adding to the per-CPU counters without ever losing an update silently.

use agent_common::maps::{Counter, HistValue, map_error};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    maps::{LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
};

use crate::maps::MAP_ERRORS;

/// The per-CPU hash maps of counters: the plain one (never evicts, refuses when full) and
/// the LRU one (`UNKNOWN_WIRE`: evicts its oldest entry instead) share an API but no type.
pub trait CounterMap<K> {
    fn get_ptr_mut(&self, key: &K) -> Option<*mut Counter>;
    fn insert(&self, key: &K, value: &Counter, flags: u64) -> Result<(), i32>;
}

impl<K> CounterMap<K> for PerCpuHashMap<K, Counter> {
    #[inline(always)]
    fn get_ptr_mut(&self, key: &K) -> Option<*mut Counter> {
        PerCpuHashMap::get_ptr_mut(self, key)
    }
    #[inline(always)]
    fn insert(&self, key: &K, value: &Counter, flags: u64) -> Result<(), i32> {
        PerCpuHashMap::insert(self, key, value, flags)
    }
}

impl<K> CounterMap<K> for LruPerCpuHashMap<K, Counter> {
    #[inline(always)]
    fn get_ptr_mut(&self, key: &K) -> Option<*mut Counter> {
        LruPerCpuHashMap::get_ptr_mut(self, key)
    }
    #[inline(always)]
    fn insert(&self, key: &K, value: &Counter, flags: u64) -> Result<(), i32> {
        LruPerCpuHashMap::insert(self, key, value, flags)
    }
}

#[inline(always)]
pub fn add<K>(map: &impl CounterMap<K>, key: &K, packets: u64, bytes: u64, err_idx: u32) {
    add_or_report(map, key, packets, bytes, &MAP_ERRORS, err_idx);
}

/// [`add`], reporting a refused update in `errors[err_idx]`.
#[inline(always)]
pub fn add_or_report<K>(
    map: &impl CounterMap<K>,
    key: &K,
    packets: u64,
    bytes: u64,
    errors: &PerCpuArray<u64>,
    err_idx: u32,
) {
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
    if let Some(e) = errors.get_ptr_mut(err_idx) {
        // SAFETY: this CPU's slot.
        unsafe { *e += 1 };
    }
}

/// `n` observations of `ns` into a per-CPU histogram bucket (the bucket is in `key`),
/// reporting a refused insert in `errors[err_idx]`.
#[inline(always)]
pub fn observe<K>(
    map: &PerCpuHashMap<K, HistValue>,
    key: &K,
    ns: u64,
    n: u64,
    errors: &PerCpuArray<u64>,
    err_idx: u32,
) {
    if let Some(v) = map.get_ptr_mut(key) {
        // SAFETY: this CPU's value.
        unsafe {
            (*v).count += n;
            (*v).sum_ns += ns * n;
        }
        return;
    }
    let fresh = HistValue {
        count: n,
        sum_ns: ns * n,
    };
    if map.insert(key, &fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU may have created the entry between lookup and insert.
    if let Some(v) = map.get_ptr_mut(key) {
        unsafe {
            (*v).count += n;
            (*v).sum_ns += ns * n;
        }
        return;
    }
    if let Some(e) = errors.get_ptr_mut(err_idx) {
        // SAFETY: this CPU's slot.
        unsafe { *e += 1 };
    }
}

pub const COUNTERS_ERR: u32 = map_error::COUNTERS;
pub const UNKNOWN_WIRE_ERR: u32 = map_error::UNKNOWN_WIRE;
