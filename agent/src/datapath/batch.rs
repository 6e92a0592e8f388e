//! Reading a whole hash map in a few `bpf()` calls (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+)
//! instead of one or two per entry (next key, then lookup), which is what aya's iterators
//! do. A relay's scrape reads and counts tens of thousands of entries: the per-entry
//! syscalls were most of its time. aya 0.14 has no batch operations, so this is the one
//! raw `bpf()` call of the agent; where the kernel refuses it (another map type, an older
//! kernel), the callers fall back to the iterators.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{MapData, MapType},
};

/// `enum bpf_cmd`'s BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call. The kernel copies whole hash buckets and answers ENOSPC
/// when the first one holds more than this: then the call is repeated with a bigger one.
const CHUNK: usize = 1024;
/// The kernel's ENOTSUPP (not ENOTSUP), which it answers for map types without batches.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch read gave nothing.
#[derive(Debug)]
pub enum BatchError {
    /// This kernel or map type has no batch lookup: read entry by entry instead.
    Unsupported,
    Io(io::Error),
}

/// What a caller takes a map to be: the values' layout depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    PerCpu,
    /// Either (the caller only counts).
    Any,
}

/// Calls `each(key, value)` with the bytes of every entry of the hash map `map` (for a
/// per-CPU map, `value` holds every possible CPU's, 8-byte aligned, in CPU order). Entries
/// added or removed meanwhile may or may not be seen, as with iteration.
fn entries_raw(
    map: &MapData,
    kind: Kind,
    each: impl FnMut(&[u8], &[u8]),
) -> Result<(), BatchError> {
    entries_raw_from(map, CHUNK, kind, each)
}

/// [`entries_raw`] asking for `chunk` entries per call at first: a test asks for 1 to make
/// the kernel answer ENOSPC (two keys in one bucket) and the retry with a bigger chunk run.
fn entries_raw_from(
    map: &MapData,
    chunk: usize,
    kind: Kind,
    mut each: impl FnMut(&[u8], &[u8]),
) -> Result<(), BatchError> {
    // One BPF_OBJ_GET_INFO_BY_FD per read of a whole map (aya keeps nr_cpus): the sizes
    // come from the kernel's own record of the map, never from what the caller assumes.
    let info = map.info().map_err(|_| BatchError::Unsupported)?;
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    // What the caller expects to parse must be what the map is.
    let stride = match info.map_type() {
        Ok(MapType::PerCpuHash | MapType::LruPerCpuHash) if kind != Kind::Plain => {
            let cpus = aya::util::nr_cpus().map_err(|_| BatchError::Unsupported)?;
            value_size.next_multiple_of(8) * cpus
        }
        Ok(MapType::Hash | MapType::LruHash) if kind != Kind::PerCpu => value_size,
        _ => return Err(BatchError::Unsupported),
    };
    if key_size == 0 || stride == 0 {
        return Err(BatchError::Unsupported);
    }
    let mut chunk = chunk.max(1);
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    // Hash maps' batch token is a u32 bucket index; a u64 leaves room.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        keys.resize(chunk * key_size, 0u8);
        values.resize(chunk * stride, 0u8);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr points to buffers of `count` keys and `count` values of the sizes
        // the kernel uses for this map; it writes back `count` and the token.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let err = (r < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket bigger than the chunk: nothing was copied; ask for more at once.
            Some(libc::ENOSPC) if chunk < (1 << 20) => {
                chunk *= 4;
                continue;
            }
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first => {
                return Err(BatchError::Unsupported);
            }
            _ => {}
        }
        let got = (attr.count as usize).min(chunk);
        for (k, v) in keys
            .chunks_exact(key_size)
            .zip(values.chunks_exact(stride))
            .take(got)
        {
            each(k, v);
        }
        match err {
            None => {}
            // The last entries came with ENOENT: the map is done.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(BatchError::Io(e)),
        }
        token_in = token_out;
        first = false;
    }
}

/// Calls `each(key, per_cpu_values)` for every entry of the per-CPU hash map `map`, whose
/// key is a `K` and value a `V` (a multiple of 8 bytes: the kernel's per-CPU stride).
pub fn per_cpu_entries<K: Pod, V: Pod>(
    map: &MapData,
    each: impl FnMut(K, &[V]),
) -> Result<(), BatchError> {
    per_cpu_entries_from(map, CHUNK, each)
}

/// [`per_cpu_entries`] asking for `chunk` entries per call at first (tests).
pub fn per_cpu_entries_from<K: Pod, V: Pod>(
    map: &MapData,
    chunk: usize,
    mut each: impl FnMut(K, &[V]),
) -> Result<(), BatchError> {
    if !size_of::<V>().is_multiple_of(8) {
        return Err(BatchError::Unsupported);
    }
    let mut per_cpu: Vec<V> = Vec::new();
    entries_raw_from(map, chunk, Kind::PerCpu, |k, v| {
        if k.len() != size_of::<K>() {
            return;
        }
        // SAFETY: K and V are Pod (any bit pattern is a value) and the slices hold whole
        // ones (the key checked above; the value a multiple of V by the stride).
        let key = unsafe { std::ptr::read_unaligned(k.as_ptr().cast::<K>()) };
        per_cpu.clear();
        per_cpu.extend(
            v.chunks_exact(size_of::<V>())
                .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<V>()) }),
        );
        each(key, &per_cpu);
    })
}

/// Calls `each(key, value)` for every entry of the hash map `map` (not per-CPU), whose key
/// is a `K` and value a `V`.
pub fn entries<K: Pod, V: Pod>(
    map: &MapData,
    mut each: impl FnMut(K, V),
) -> Result<(), BatchError> {
    entries_raw(map, Kind::Plain, |k, v| {
        if k.len() != size_of::<K>() || v.len() != size_of::<V>() {
            return;
        }
        // SAFETY: K and V are Pod and the slices hold exactly one of each (checked above).
        let (key, value) = unsafe {
            (
                std::ptr::read_unaligned(k.as_ptr().cast::<K>()),
                std::ptr::read_unaligned(v.as_ptr().cast::<V>()),
            )
        };
        each(key, value);
    })
}

/// How many entries the hash map `map` (per-CPU or not) holds. The kernel has no
/// count-only batch: the values are copied and dropped.
pub fn count(map: &MapData) -> Result<u64, BatchError> {
    let mut n = 0;
    entries_raw(map, Kind::Any, |_, _| n += 1)?;
    Ok(n)
}
