//! `datapath::batch`, the agent's one raw `bpf()` call (BPF_MAP_LOOKUP_BATCH), against aya's
//! iterators on the same maps: every entry and every CPU's value read the same, also when
//! the first chunk is too small for a bucket (the kernel's ENOSPC, then the retry with a
//! bigger chunk) and past the 1,024-entry chunk; a map type without batches, or a per-CPU
//! map read as a plain one (and the reverse), is refused so the callers fall back to the
//! iterators.
//!
//! Needs root and BPF; without them the test prints why and passes, except with CI=true,
//! where it fails. Run: `cargo test -p wirescope --test datapath -- --test-threads=1 batch::`.

use crate::common;

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, IterableMap as _, MapData, PerCpuHashMap, PerCpuValues};
use wirescope::datapath::batch::{self, BatchError};

/// More entries than one 1,024-entry chunk, fewer than the map holds.
const ENTRIES: u32 = 3_000;

/// A key with padding the kernel copies as it is: 12 bytes, not a multiple of 8.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C)]
struct Key {
    id: u32,
    kind: u16,
    pad: u16,
    other: u32,
}
// SAFETY: repr(C), no implicit padding, any bit pattern is a value.
unsafe impl aya::Pod for Key {}
const _: () = assert!(size_of::<Key>() == 12);

fn key(i: u32) -> Key {
    Key {
        id: i,
        kind: (i % 7) as u16,
        pad: 0,
        other: i.wrapping_mul(2_654_435_761),
    }
}

/// CPU `cpu`'s value for entry `i`: different on every CPU, so a mixed-up stride shows.
fn value(i: u32, cpu: usize) -> [u64; 2] {
    [
        u64::from(i) * 1_000 + cpu as u64,
        u64::from(i) << 32 | cpu as u64,
    ]
}

#[test]
fn batch_reads_equal_the_iterators() {
    if !common::privileged("the batch tests create BPF maps") {
        return;
    }
    let cpus = aya::util::nr_cpus().expect("possible CPUs");

    // A per-CPU hash: what every counter and histogram map is.
    let mut per_cpu =
        PerCpuHashMap::<MapData, Key, [u64; 2]>::create(2 * ENTRIES, 0).expect("creating a map");
    for i in 0..ENTRIES {
        let values = PerCpuValues::try_from((0..cpus).map(|c| value(i, c)).collect::<Vec<_>>())
            .expect("per-CPU values");
        per_cpu.insert(key(i), values, 0).expect("insert");
    }
    let iterated: BTreeMap<Key, Vec<[u64; 2]>> = per_cpu
        .iter()
        .map(|r| r.map(|(k, v)| (k, v.iter().copied().collect())))
        .collect::<Result<_, _>>()
        .expect("iterating");
    assert_eq!(iterated.len(), ENTRIES as usize);
    // Chunk 1: any bucket with two keys (3,000 keys in 8,192 buckets have hundreds) makes
    // the kernel answer ENOSPC, and the reader retries with a bigger chunk.
    for chunk in [1024, 1] {
        let mut read = BTreeMap::new();
        batch::per_cpu_entries_from(per_cpu.map(), chunk, |k: Key, v: &[[u64; 2]]| {
            assert!(read.insert(k, v.to_vec()).is_none(), "{k:?} read twice");
        })
        .unwrap_or_else(|e| panic!("batch read, first chunk {chunk}: {e:?}"));
        assert_eq!(read, iterated, "first chunk {chunk}");
        for (k, v) in &read {
            assert_eq!(v.len(), cpus);
            assert_eq!(v[cpus - 1], value(k.id, cpus - 1), "{k:?}");
        }
    }
    assert_eq!(
        batch::count(per_cpu.map()).expect("count"),
        u64::from(ENTRIES)
    );

    // A plain hash (the peer and session maps).
    let mut plain = HashMap::<MapData, Key, u32>::create(2 * ENTRIES, 0).expect("creating a map");
    for i in 0..ENTRIES / 2 {
        plain.insert(key(i), i, 0).expect("insert");
    }
    assert_eq!(
        batch::count(plain.map()).expect("count"),
        u64::from(ENTRIES / 2)
    );
    let iterated: BTreeMap<Key, u32> = plain.iter().collect::<Result<_, _>>().expect("iterating");
    let mut read = BTreeMap::new();
    batch::entries(plain.map(), |k: Key, v: u32| {
        assert!(read.insert(k, v).is_none(), "{k:?} read twice");
    })
    .expect("batch read");
    assert_eq!(read, iterated);
    assert!(read.iter().all(|(k, v)| k.id == *v));
    // Read as the other kind, either map is refused (the caller falls back), not misread.
    assert!(matches!(
        batch::entries(per_cpu.map(), |_: Key, _: [u64; 2]| {}),
        Err(BatchError::Unsupported)
    ));
    assert!(matches!(
        batch::per_cpu_entries(plain.map(), |_: Key, _: &[u64]| {}),
        Err(BatchError::Unsupported)
    ));
    // Removing shows at once.
    for i in 0..10 {
        plain.remove(&key(i)).expect("remove");
    }
    assert_eq!(
        batch::count(plain.map()).expect("count"),
        u64::from(ENTRIES / 2 - 10)
    );

    // An empty map reads as empty, not as an error.
    let empty = HashMap::<MapData, Key, u32>::create(16, 0).expect("creating a map");
    assert_eq!(batch::count(empty.map()).expect("count"), 0);

    // An array has no hash batches here: the callers must fall back to the iterators.
    let array = Array::<MapData, u64>::create(4, 0).expect("creating a map");
    assert!(matches!(
        batch::count(array.map()),
        Err(BatchError::Unsupported)
    ));
}
