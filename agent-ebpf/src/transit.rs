//! Encrypt/decrypt transit time: an inner packet on a tunnel interface matched with its
//! WireGuard data message on the carrying interface, per (peer, direction), in order, by
//! length (see `agent_common::maps::transit` for the queue's design).

use crate::count;
use agent_common::maps::{
    HistValue, log2_bucket,
    transit::{
        HistKey, LOOKAHEAD, LOOKBEHIND, MAX_TRANSIT_HIST, MAX_TRANSIT_SEQ, MAX_TRANSIT_SLOTS,
        Queue, QueueKey, RING, STALE_NS, Slot, SlotKey, error, fits,
    },
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
};

#[map]
pub static TRANSIT_SEQ: HashMap<QueueKey, Queue> = HashMap::with_max_entries(MAX_TRANSIT_SEQ, 0);

#[map]
pub static TRANSIT_SLOTS: HashMap<SlotKey, Slot> = HashMap::with_max_entries(MAX_TRANSIT_SLOTS, 0);

#[map]
pub static TRANSIT_HIST: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::with_max_entries(MAX_TRANSIT_HIST, 0);

#[map]
pub static TRANSIT_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(error::COUNT, 0);

#[inline(always)]
fn bump(idx: u32) {
    if let Some(e) = TRANSIT_ERRORS.get_ptr_mut(idx) {
        // SAFETY: this CPU's slot.
        unsafe { *e += 1 };
    }
}

/// `*p += v`, atomically, returning the old value: BPF_ATOMIC | BPF_FETCH (kernel 5.12+).
/// Written out because LLVM emits it only for `-mcpu=v3`, and aya-build links for the
/// generic CPU (which would reject using the old value); the verifier checks the kernel
/// supports it.
///
/// # Safety
/// `p` must point into a map value.
#[inline(always)]
unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    unsafe {
        core::arch::asm!(
            "{r} = atomic_fetch_add((u64 *)({p} + 0), {r})",
            p = in(reg) p,
            r = inout(reg) r,
            options(nostack),
        );
    }
    r
}

#[inline(always)]
fn queue_key(peer: u32, dir: u8) -> QueueKey {
    QueueKey {
        peer,
        dir,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn slot_key(peer: u32, dir: u8, number: u64) -> SlotKey {
    SlotKey {
        peer,
        dir,
        _pad: 0,
        slot: (number % RING) as u16,
    }
}

#[inline(always)]
fn queue(key: &QueueKey) -> Option<*mut Queue> {
    if let Some(q) = TRANSIT_SEQ.get_ptr_mut(key) {
        return Some(q);
    }
    // EEXIST (another CPU made it just now) is no loss; a full map is.
    let _ = TRANSIT_SEQ.insert(key, &Queue::default(), BPF_NOEXIST as u64);
    let q = TRANSIT_SEQ.get_ptr_mut(key);
    if q.is_none() {
        bump(error::SEQ);
    }
    q
}

/// The first half of a pair seen: a packet entering the tunnel (tx) or a data message
/// arriving (rx). `left` messages are expected of it.
///
/// `lens` is the length in its high 32 bits and the last segment's in the low ones (a BPF
/// call takes at most 5 arguments).
#[inline(always)]
pub fn enqueue(peer: u32, dir: u8, ifindex: u32, lens: u64, left: u32) {
    let Some(q) = queue(&queue_key(peer, dir)) else {
        return;
    };
    // SAFETY: a value of a shared map; the add is atomic, so two CPUs never share a number.
    let number = unsafe { fetch_add(&raw mut (*q).tail, 1) };
    let slot = Slot {
        number,
        start_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        len: (lens >> 32) as u32,
        last_len: lens as u32,
        _pad: 0,
        left: left as u64,
    };
    // Overwrites the slot RING packets back, if still there: it is lost either way.
    if TRANSIT_SLOTS
        .insert(&slot_key(peer, dir, number), &slot, 0)
        .is_err()
    {
        bump(error::SLOTS);
    }
}

/// The second half seen: a data message leaving (tx, `padded` plaintext bytes) or an inner
/// packet arriving (rx, `inner` bytes on tunnel `ifindex`). Looks at the first
/// [`LOOKAHEAD`] slots from the head for the first that fits, then at the [`LOOKBEHIND`]
/// slots just behind it: a slot passed over by a match is kept a while, for its partner may
/// only be late (reordered), not lost. Passed-over slots that never match are overwritten
/// [`RING`] packets later or swept by the agent once stale.
#[inline(always)]
pub fn dequeue(peer: u32, dir: u8, ifindex: u32, len: u32, tx: bool) {
    let Some(q) = TRANSIT_SEQ.get_ptr_mut(&queue_key(peer, dir)) else {
        return;
    };
    // SAFETY: values of a shared map, read once; races are settled by who deletes a slot.
    let (tail, mut head) = unsafe { ((*q).tail, (*q).head) };
    if tail > head + RING {
        head = tail - RING;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // Plain initialised values rather than an Option of the slot: LLVM may move an
    // Option's uninitialised payload around, which the verifier refuses to read.
    let mut found = false;
    let (mut f_number, mut f_start, mut f_ifindex, mut f_left) = (0u64, 0u64, 0u32, 0u64);
    // Where the head can move even if nothing matches: past slots gone or stale.
    let mut skip_to = head;
    let mut i = 0;
    while i < LOOKAHEAD + LOOKBEHIND {
        let ahead = i < LOOKAHEAD;
        let number = if ahead {
            head + i as u64
        } else {
            let back = (i - LOOKAHEAD + 1) as u64;
            if back > head {
                break;
            }
            head - back
        };
        i += 1;
        if ahead && number >= tail {
            // Nothing further ahead: look behind.
            i = LOOKAHEAD;
            continue;
        }
        let skey = slot_key(peer, dir, number);
        let Some(s) = TRANSIT_SLOTS.get_ptr_mut(&skey) else {
            if number == skip_to {
                skip_to = number + 1;
            }
            continue;
        };
        let slot = unsafe { *s };
        if slot.number != number {
            if number == skip_to {
                skip_to = number + 1;
            }
            continue;
        }
        if now.saturating_sub(slot.start_ns) > STALE_NS {
            let _ = TRANSIT_SLOTS.remove(&skey);
            if number == skip_to {
                skip_to = number + 1;
            }
            continue;
        }
        let ok = if tx {
            fits(slot.len, len) || fits(slot.last_len, len)
        } else {
            fits(len, slot.len) || fits(len, slot.last_len)
        };
        if !ok {
            continue;
        }
        // A slot expecting several messages (GSO) is used up by the last of them.
        // (Adding u64::MAX subtracts 1: BPF has no atomic subtract.)
        let left = unsafe { fetch_add(&raw mut (*s).left, u64::MAX) };
        if left == 0 || left > 1 << 16 {
            // Another CPU used it up first.
            continue;
        }
        if left == 1 && TRANSIT_SLOTS.remove(&skey).is_err() {
            continue;
        }
        found = true;
        (f_number, f_start, f_ifindex, f_left) = (number, slot.start_ns, slot.ifindex, slot.left);
        break;
    }
    let next = if !found {
        skip_to
    } else if f_left > 1 {
        f_number
    } else {
        f_number + 1
    };
    // SAFETY: see above; a racing CPU can only move head by a slot or two either way.
    unsafe {
        if next > (*q).head {
            (*q).head = next;
        }
    }
    if found {
        let ns = now.saturating_sub(f_start);
        observe(if tx { f_ifindex } else { ifindex }, peer, dir, ns);
    }
}

#[inline(always)]
fn observe(ifindex: u32, peer: u32, dir: u8, ns: u64) {
    let key = HistKey {
        ifindex,
        peer,
        dir,
        bucket: log2_bucket(ns),
        _pad: [0; 2],
    };
    count::observe(&TRANSIT_HIST, &key, ns, &TRANSIT_ERRORS, error::HIST);
}
