//! Encrypt/decrypt transit time: an inner packet on a tunnel interface matched with its
//! WireGuard data message on the carrying interface, per (peer, direction), in order, by
//! length (see `agent_common::maps::transit` for the queue's design).

use crate::count;
use agent_common::maps::{
    HistValue, log2_bucket,
    transit::{
        DEQUEUE, ENQUEUE, HistKey, LOOKAHEAD, LOOKBEHIND, MAX_OPS, MAX_TRANSIT_HIST,
        MAX_TRANSIT_SEQ, MAX_TRANSIT_SLOTS, Op, Ops, Queue, QueueKey, RING, STALE_NS, Slot,
        SlotKey, error, fits,
    },
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
    programs::TcContext,
};

#[map]
pub static TRANSIT_SEQ: HashMap<QueueKey, Queue> = HashMap::with_max_entries(MAX_TRANSIT_SEQ, 0);

#[map]
pub static TRANSIT_SLOTS: HashMap<SlotKey, Slot> = HashMap::with_max_entries(MAX_TRANSIT_SLOTS, 0);

#[map]
pub static TRANSIT_HIST: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::pinned(MAX_TRANSIT_HIST, 0);

#[map]
pub static TRANSIT_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(error::COUNT, 0);

/// The operations the current packet left (this CPU's; a TC program runs to its end, tail
/// call included, without migrating).
#[map]
pub static TRANSIT_OPS: PerCpuArray<Ops> = PerCpuArray::with_max_entries(1, 0);

/// `wirescope_transit` at index 0, written by the agent after loading it.
#[map]
pub static TRANSIT_PROG: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// 0 when the agent runs with `--transit-time off`. Set at load time
/// (`EbpfLoader::override_global`) in read-only data, which the verifier reads as a
/// constant: with 0, every transit branch below is dead code it drops, and a packet costs
/// what it would without the feature (about 90 ns less on a data message).
#[unsafe(no_mangle)]
static TRANSIT_TIME: u8 = 1;

#[inline(always)]
fn enabled() -> bool {
    // SAFETY: a plain read of a static; volatile so that the compiler leaves the decision to
    // the load-time value.
    unsafe { core::ptr::read_volatile(&TRANSIT_TIME) != 0 }
}

/// At the start of every packet: no operations yet.
#[inline(always)]
pub fn begin() {
    if !enabled() {
        return;
    }
    if let Some(ops) = TRANSIT_OPS.get_ptr_mut(0) {
        // SAFETY: this CPU's value.
        unsafe { (*ops).n = 0 };
    }
}

#[inline(always)]
fn defer(op: Op) {
    if !enabled() {
        return;
    }
    let Some(ops) = TRANSIT_OPS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value.
    let n = unsafe { (*ops).n } as usize;
    if n < MAX_OPS {
        unsafe {
            (*ops).ops[n] = op;
            (*ops).n = n as u32 + 1;
        }
    }
}

/// Leaves an [`enqueue`] for `wirescope_transit`.
#[inline(always)]
pub fn defer_enqueue(peer: u32, dir: u8, ifindex: u32, len: u32, last_len: u32, left: u32) {
    defer(Op {
        kind: ENQUEUE,
        dir,
        tx: 0,
        _pad: 0,
        peer,
        ifindex,
        len,
        last_len,
        left,
    });
}

/// Leaves a [`dequeue`] for `wirescope_transit`.
#[inline(always)]
pub fn defer_dequeue(peer: u32, dir: u8, ifindex: u32, len: u32, tx: bool) {
    defer(Op {
        kind: DEQUEUE,
        dir,
        tx: tx as u8,
        _pad: 0,
        peer,
        ifindex,
        len,
        last_len: len,
        left: 0,
    });
}

/// At the end of a TC program: jumps to `wirescope_transit` when the packet left work for
/// it. The tail call does not return; when it cannot happen (no program in the array),
/// the program goes on to its own verdict.
#[inline(always)]
pub fn finish(ctx: &TcContext) {
    if !enabled() {
        return;
    }
    let n = TRANSIT_OPS.get(0).map_or(0, |o| o.n);
    if n > 0 {
        // SAFETY: a TC context for a TC program array.
        unsafe { TRANSIT_PROG.tail_call(ctx, 0) };
    }
}

/// The body of `wirescope_transit`: runs the operations left, in order.
#[inline(always)]
pub fn run_ops() {
    let Some(ops) = TRANSIT_OPS.get(0).copied() else {
        return;
    };
    let mut i = 0;
    while i < MAX_OPS {
        if i as u32 >= ops.n {
            break;
        }
        let Some(op) = ops.ops.get(i).copied() else {
            break;
        };
        i += 1;
        if op.kind == ENQUEUE {
            enqueue(op.peer, op.dir, op.ifindex, op.len, op.last_len, op.left);
        } else if op.kind == DEQUEUE {
            dequeue(op.peer, op.dir, op.ifindex, op.len, op.tx != 0);
        }
    }
    begin();
}

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
#[inline(always)]
fn enqueue(peer: u32, dir: u8, ifindex: u32, len: u32, last_len: u32, left: u32) {
    let Some(q) = queue(&queue_key(peer, dir)) else {
        return;
    };
    // SAFETY: a value of a shared map; the add is atomic, so two CPUs never share a number.
    let number = unsafe { fetch_add(&raw mut (*q).tail, 1) };
    let slot = Slot {
        number,
        start_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        len,
        last_len,
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
fn dequeue(peer: u32, dir: u8, ifindex: u32, len: u32, tx: bool) {
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
