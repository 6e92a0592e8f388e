//! What every feature's maps have in common, written once: taking a map out of the loaded
//! object, folding a per-CPU map over CPUs, bringing a kernel map to a wanted content, and
//! the [`FeatureMaps`] trait through which [`super::Datapath`] lists each map's usage and
//! refused updates for `wirescope_bpf_map_*`.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    sync::Arc,
};

use agent_common::maps::{Counter, HistValue};
use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
        PerCpuValues, ProgramArray, lpm_trie::LpmTrie,
    },
    programs::SchedClassifier,
};

use super::{
    DatapathError,
    batch::{self, BatchError},
};

/// (map name, entries, capacity).
pub type MapUsage = (&'static str, u64, u64);

/// One feature's maps as the agent's self-metrics see them. `Datapath::map_usage` and
/// `Datapath::map_update_errors` chain these lists over the features, so a feature's maps
/// are reported by implementing this and nothing else.
pub trait FeatureMaps {
    /// (map name, entries, capacity) for each of the feature's maps.
    fn usage(&self) -> Vec<MapUsage>;
    /// Updates the kernel refused, per map name, summed over CPUs.
    fn update_errors(&self) -> Vec<(&'static str, u64)>;
    /// Removes every entry keyed by (or, for in-flight state, belonging to) one of the peer
    /// ids `ids`, and whatever the agent keeps about them: the sync loop forgets peers gone
    /// for longer than `--peer-grace`, and gives their ids again afterwards. Returns how
    /// many entries went. A feature without per-peer state has nothing to do.
    fn forget_peers(&mut self, ids: &HashSet<u32>) -> Result<u64, DatapathError>;
    /// Back to the state of a fresh load: every map of the feature emptied or zeroed (its
    /// program arrays and the shared `MAP_ERRORS` aside) and what the agent keeps about them
    /// forgotten ([`super::Datapath::reset`]).
    fn clear(&mut self) -> Result<(), DatapathError>;
}

/// Emptying a map: every entry removed (hash maps, LPM tries) or set to zero (arrays).
pub(crate) trait Clear {
    fn clear(&mut self, name: &'static str) -> Result<(), DatapathError>;
}

/// Removes every key of a hash-like map; a key gone meanwhile is no error.
macro_rules! clear_keys {
    ($map:expr, $name:expr) => {{
        let keys = $map
            .keys()
            .collect::<Result<Vec<_>, MapError>>()
            .map_err(DatapathError::map($name))?;
        for k in keys {
            match $map.remove(&k) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(DatapathError::map($name)(e)),
            }
        }
        Ok(())
    }};
}

impl<K: Pod, V: Pod> Clear for BpfHashMap<MapData, K, V> {
    fn clear(&mut self, name: &'static str) -> Result<(), DatapathError> {
        clear_keys!(self, name)
    }
}

impl<K: Pod, V: Pod> Clear for PerCpuHashMap<MapData, K, V> {
    fn clear(&mut self, name: &'static str) -> Result<(), DatapathError> {
        clear_keys!(self, name)
    }
}

impl<K: Pod, V: Pod> Clear for LpmTrie<MapData, K, V> {
    fn clear(&mut self, name: &'static str) -> Result<(), DatapathError> {
        clear_keys!(self, name)
    }
}

impl<V: Pod + Default> Clear for Array<MapData, V> {
    fn clear(&mut self, name: &'static str) -> Result<(), DatapathError> {
        for i in 0..self.len() {
            self.set(i, V::default(), 0)
                .map_err(DatapathError::map(name))?;
        }
        Ok(())
    }
}

impl<V: Pod + Default> Clear for PerCpuArray<MapData, V> {
    fn clear(&mut self, name: &'static str) -> Result<(), DatapathError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, io_error)| {
            DatapathError::map(name)(MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error,
            }))
        })?;
        for i in 0..self.len() {
            let zeros = (0..cpus).map(|_| V::default()).collect::<Vec<_>>();
            let values = PerCpuValues::try_from(zeros).map_err(|io_error| {
                DatapathError::map(name)(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error,
                }))
            })?;
            self.set(i, values, 0).map_err(DatapathError::map(name))?;
        }
        Ok(())
    }
}

/// A per-CPU array in which the programs count the map updates the kernel refused, one
/// slot per map (`agent_common::maps::map_error` and each feature's `error` module). The
/// shared `MAP_ERRORS` array is held by several features at once, hence the `Arc`.
pub struct ErrorSlots(pub(super) PerCpuArray<MapData, u64>);

impl ErrorSlots {
    pub fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Arc<Self>, DatapathError> {
        Ok(Arc::new(Self(take(ebpf, name)?)))
    }

    /// Zeroes every slot, through a handle of its own: the shared array has no `&mut`.
    pub fn clear(&self, name: &'static str) -> Result<(), DatapathError> {
        let id = aya::maps::IterableMap::map(&self.0)
            .info()
            .map_err(DatapathError::map(name))?
            .id();
        let data = MapData::from_id(id).map_err(DatapathError::map(name))?;
        let mut own: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(DatapathError::map(name))?;
        own.clear(name)
    }

    /// Updates refused in slot `idx`, summed over CPUs.
    pub fn refused(&self, idx: u32) -> u64 {
        self.0.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// (map name, refused) for each (slot, map name).
    pub fn list(&self, slots: &[(u32, &'static str)]) -> Vec<(&'static str, u64)> {
        slots
            .iter()
            .map(|&(idx, name)| (name, self.refused(idx)))
            .collect()
    }
}

/// The keys (or entries) of a map read through `items` that `doomed` picks, read in one
/// pass before any is removed (removing while walking a BPF hash map restarts the walk).
pub(crate) fn picked<T, K>(
    items: impl Iterator<Item = Result<T, MapError>>,
    name: &'static str,
    doomed: impl Fn(&T) -> Option<K>,
) -> Result<Vec<K>, DatapathError> {
    let mut out = Vec::new();
    for item in items {
        let item = item.map_err(DatapathError::map(name))?;
        if let Some(k) = doomed(&item) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Removes `keys` through `remove`; a key gone meanwhile (removed by a program, or
/// expired) is no error. Returns how many this call removed.
pub(crate) fn remove_each<K>(
    keys: Vec<K>,
    name: &'static str,
    mut remove: impl FnMut(&K) -> Result<(), MapError>,
) -> Result<u64, DatapathError> {
    let mut n = 0;
    for k in &keys {
        match remove(k) {
            Ok(()) => n += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(DatapathError::map(name)(e)),
        }
    }
    Ok(n)
}

/// The hash maps a forgotten peer's entries are removed from, whatever their value type:
/// aya's map types share no trait for walking keys and removing one.
pub(crate) trait KeyedMap<K> {
    fn map_keys(&self) -> impl Iterator<Item = Result<K, MapError>> + '_;
    fn remove_key(&mut self, k: &K) -> Result<(), MapError>;
}

impl<K: Pod, V: Pod> KeyedMap<K> for BpfHashMap<MapData, K, V> {
    fn map_keys(&self) -> impl Iterator<Item = Result<K, MapError>> + '_ {
        self.keys()
    }
    fn remove_key(&mut self, k: &K) -> Result<(), MapError> {
        self.remove(k)
    }
}

impl<K: Pod, V: Pod> KeyedMap<K> for PerCpuHashMap<MapData, K, V> {
    fn map_keys(&self) -> impl Iterator<Item = Result<K, MapError>> + '_ {
        self.keys()
    }
    fn remove_key(&mut self, k: &K) -> Result<(), MapError> {
        self.remove(k)
    }
}

/// Removes the entries of `map` (named `name`) whose key holds a peer `peer_of` finds in
/// `ids`, for [`FeatureMaps::forget_peers`]; returns how many went.
pub(crate) fn forget_keys<K: Pod>(
    map: &mut impl KeyedMap<K>,
    name: &'static str,
    ids: &HashSet<u32>,
    peer_of: impl Fn(&K) -> u32,
) -> Result<u64, DatapathError> {
    let doomed = picked(map.map_keys(), name, |k: &K| {
        ids.contains(&peer_of(k)).then_some(*k)
    })?;
    remove_each(doomed, name, |k| map.remove_key(k))
}

/// [`forget_keys`] for a map whose value, not its key, holds the peer.
pub(crate) fn forget_values<K: Pod, V: Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    name: &'static str,
    ids: &HashSet<u32>,
    peer_of: impl Fn(&V) -> u32,
) -> Result<u64, DatapathError> {
    let doomed = picked(map.iter(), name, |(k, v): &(K, V)| {
        ids.contains(&peer_of(v)).then_some(*k)
    })?;
    remove_each(doomed, name, |k| map.remove(k))
}

/// Takes map `name` out of the loaded object, typed.
pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(DatapathError::map(name))
}

/// The program array `array` with the (loaded) TC program `prog` at index 0, for a tail
/// call. The caller keeps the array open: the kernel empties a program array when the last
/// user-space reference to it goes.
pub(crate) fn tail_program(
    ebpf: &mut Ebpf,
    array: &'static str,
    prog: &'static str,
) -> Result<ProgramArray<MapData>, DatapathError> {
    let mut arr: ProgramArray<MapData> = take(ebpf, array)?;
    let fd = ebpf
        .program(prog)
        .ok_or(DatapathError::Missing(prog))
        .and_then(|p| {
            <&SchedClassifier>::try_from(p)
                .and_then(|p| p.fd())
                .map_err(|source| DatapathError::Program { name: prog, source })
        })?;
    arr.set(0, fd, 0).map_err(DatapathError::map(array))?;
    Ok(arr)
}

/// A per-CPU counter map, summed over CPUs.
pub(crate) fn sum_per_cpu<K: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, Counter>,
    name: &'static str,
) -> Result<Vec<(K, Counter)>, DatapathError> {
    summed(map, name, |sum: &mut Counter, c| {
        sum.packets += c.packets;
        sum.bytes += c.bytes;
    })
}

/// A per-CPU histogram map, summed over CPUs.
pub(crate) fn sum_hist<K: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, HistValue>,
    name: &'static str,
) -> Result<Vec<(K, HistValue)>, DatapathError> {
    summed(map, name, |sum: &mut HistValue, v| {
        sum.count += v.count;
        sum.sum_ns += v.sum_ns;
    })
}

/// Every entry of a per-CPU hash map with its values folded by `add`: in batches where the
/// kernel can ([`super::batch`]), else entry by entry.
fn summed<K: aya::Pod, V: aya::Pod + Default>(
    map: &PerCpuHashMap<MapData, K, V>,
    name: &'static str,
    add: impl Fn(&mut V, &V),
) -> Result<Vec<(K, V)>, DatapathError> {
    use aya::maps::IterableMap as _;
    let fold = |per_cpu: &[V]| {
        let mut sum = V::default();
        for v in per_cpu {
            add(&mut sum, v);
        }
        sum
    };
    let mut out = Vec::new();
    match batch::per_cpu_entries(map.map(), |k, per_cpu: &[V]| out.push((k, fold(per_cpu)))) {
        Ok(()) => {}
        Err(BatchError::Io(e)) => return Err(batch_failed(name, e)),
        Err(BatchError::Unsupported) => {
            out.clear();
            for item in map.iter() {
                let (k, per_cpu) = item.map_err(DatapathError::map(name))?;
                out.push((k, fold(&per_cpu)));
            }
        }
    }
    scrape::seen(map.map(), out.len() as u64);
    Ok(out)
}

/// Entry counts of the maps a scrape has read whole, so that the usage gauge
/// (`wirescope_bpf_map_entries`, rendered last) takes them from the collectors' reads
/// instead of walking the biggest maps (COUNTERS, TRANSIT_HIST, RX_SEQ, ...) a second time
/// under the datapath lock. Only within [`one_scrape`], on the thread that renders it:
/// everywhere else (the sync loop, tests) a count is a fresh walk.
pub mod scrape {
    use std::{
        cell::RefCell,
        collections::HashMap,
        os::fd::{AsFd as _, AsRawFd as _},
    };

    use aya::maps::MapData;

    thread_local! {
        static SEEN: RefCell<Option<HashMap<i32, u64>>> = const { RefCell::new(None) };
    }

    /// Runs `render` (one scrape's collectors, one after the other on this thread)
    /// remembering the entry count of every map read whole during it.
    pub fn one_scrape<T>(render: impl FnOnce() -> T) -> T {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                SEEN.with(|s| *s.borrow_mut() = None);
            }
        }
        SEEN.with(|s| *s.borrow_mut() = Some(HashMap::new()));
        let _reset = Reset;
        render()
    }

    fn fd(map: &MapData) -> i32 {
        map.fd().as_fd().as_raw_fd()
    }

    /// `map` was just read whole and held `n` entries.
    pub(crate) fn seen(map: &MapData, n: u64) {
        SEEN.with(|s| {
            if let Some(seen) = s.borrow_mut().as_mut() {
                seen.insert(fd(map), n);
            }
        });
    }

    /// The count of `map` from a read earlier in this scrape, if any. Maps are not closed
    /// while the agent runs, so a descriptor names one map for the whole scrape.
    pub(crate) fn count(map: &MapData) -> Option<u64> {
        SEEN.with(|s| {
            s.borrow()
                .as_ref()
                .and_then(|seen| seen.get(&fd(map)).copied())
        })
    }
}

/// Every entry of a hash map (not per-CPU): in batches where the kernel can, else entry by
/// entry. An entry the kernel cannot give is left out, as a walk with aya's iterator leaves
/// out what it cannot read (the sweeps that use this retry on their next tick).
pub(crate) fn all_entries<K: Pod, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> Vec<(K, V)> {
    use aya::maps::IterableMap as _;
    let mut out = Vec::new();
    match batch::entries(map.map(), |k: K, v: V| out.push((k, v))) {
        Ok(()) => out,
        Err(e) => {
            if let BatchError::Io(e) = e {
                log::debug!("batch read failed ({e}); reading entry by entry");
            }
            map.iter().flatten().collect()
        }
    }
}

fn batch_failed(name: &'static str, e: std::io::Error) -> DatapathError {
    DatapathError::map(name)(MapError::SyscallError(aya::sys::SyscallError {
        call: "bpf_map_lookup_batch",
        io_error: e,
    }))
}

/// How many entries a hash map holds, for the map-usage gauges: from a read of the whole
/// map earlier in the same scrape ([`scrape`]), else counted in batches where the kernel can
/// ([`super::batch`]), else key by key. 0 with a warning when the map cannot be read (the
/// gauge is a diagnostic; the scrape goes on).
pub(crate) trait Entries {
    fn entries(&self) -> u64;
}

fn entries_of(map: &MapData, keys: impl FnOnce() -> usize) -> u64 {
    if let Some(n) = scrape::count(map) {
        return n;
    }
    match batch::count(map) {
        Ok(n) => n,
        Err(BatchError::Unsupported) => keys() as u64,
        Err(BatchError::Io(e)) => {
            // Only on failure: the name costs a syscall.
            let name = map
                .info()
                .ok()
                .and_then(|i| i.name_as_str().map(str::to_owned))
                .unwrap_or_else(|| "a BPF map".into());
            log::warn!("counting the entries of {name} failed ({e}): its usage gauge shows 0");
            0
        }
    }
}

impl<K: Pod, V: Pod> Entries for BpfHashMap<MapData, K, V> {
    fn entries(&self) -> u64 {
        use aya::maps::IterableMap as _;
        entries_of(self.map(), || self.keys().count())
    }
}

impl<K: Pod, V: Pod> Entries for PerCpuHashMap<MapData, K, V> {
    fn entries(&self) -> u64 {
        use aya::maps::IterableMap as _;
        entries_of(self.map(), || self.keys().count())
    }
}

/// Makes `applied` (what the kernel map holds) equal to `want` through `write`, which
/// inserts `Some(value)` or removes on `None`; returns the first refusal after trying every
/// entry. Stale entries go first, so a nearly full map makes room; a refused entry stays
/// out of `applied` and is retried on the next call.
pub(crate) fn apply<K: Eq + Hash + Clone, V: PartialEq + Clone>(
    applied: &mut HashMap<K, V>,
    want: &HashMap<K, V>,
    mut write: impl FnMut(&K, Option<&V>) -> Result<(), MapError>,
) -> Result<(), MapError> {
    let stale: Vec<K> = applied
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for k in stale {
        // Already gone (never inserted, or removed by someone) is what we wanted.
        let _ = write(&k, None);
        applied.remove(&k);
    }
    let mut first_err = None;
    for (k, v) in want {
        if applied.get(k) == Some(v) {
            continue;
        }
        match write(k, Some(v)) {
            Ok(()) => {
                applied.insert(k.clone(), v.clone());
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake kernel map that refuses inserts past `cap` entries, like a full BPF map.
    fn run(
        kernel: &mut HashMap<u32, u32>,
        cap: usize,
        applied: &mut HashMap<u32, u32>,
        want: &HashMap<u32, u32>,
    ) -> bool {
        apply(applied, want, |k, v| match v {
            Some(v) if kernel.len() >= cap && !kernel.contains_key(k) => {
                let _ = v;
                Err(MapError::OutOfBounds {
                    index: *k,
                    max_entries: cap as u32,
                })
            }
            Some(v) => {
                kernel.insert(*k, *v);
                Ok(())
            }
            None => {
                kernel.remove(k);
                Ok(())
            }
        })
        .is_ok()
    }

    #[test]
    fn stale_entries_go_first_and_refusals_are_retried() {
        let mut kernel = HashMap::new();
        let mut applied = HashMap::new();
        let first: HashMap<u32, u32> = [(1, 10), (2, 20)].into();
        assert!(run(&mut kernel, 2, &mut applied, &first));
        assert_eq!(kernel, first);
        // Replacing both entries fits only because the stale ones are removed first.
        let second: HashMap<u32, u32> = [(3, 30), (4, 40)].into();
        assert!(run(&mut kernel, 2, &mut applied, &second));
        assert_eq!(kernel, second);
        // One more than fits: an error, what fitted is in, and `applied` says exactly that.
        let third: HashMap<u32, u32> = [(3, 31), (4, 40), (5, 50)].into();
        assert!(!run(&mut kernel, 2, &mut applied, &third));
        assert_eq!(
            kernel.get(&3),
            Some(&31),
            "a changed value is still written"
        );
        assert_eq!(
            applied, kernel,
            "only what the kernel holds counts as applied"
        );
        // Room again: the refused entry goes in on the next sync.
        assert!(run(&mut kernel, 3, &mut applied, &third));
        assert_eq!(kernel, third);
    }
}
