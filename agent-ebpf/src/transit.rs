//! Encrypt/decrypt transit time: an inner packet on a tunnel interface matched with its
//! WireGuard data message on the carrying interface, per (peer, direction), in order, by
//! length (see `agent_common::maps::transit` for the queue's design).

use crate::count;
use agent_common::maps::{
    HistValue, log2_bucket,
    transit::{
        DEQUEUE, ENQUEUE, HistKey, LOOKAHEAD, LOOKBEHIND, MAX_BATCH, MAX_OPS, MAX_TRANSIT_HIST,
        MAX_TRANSIT_SEQ, MAX_TRANSIT_SLOTS, Op, Ops, Queue, QueueKey, RING, STALE_NS, Slot,
        SlotKey, error, fits,
    },
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
    programs::TcContext,
};

#[map]
pub static TRANSIT_SEQ: HashMap<QueueKey, Queue> =
    HashMap::with_max_entries(MAX_TRANSIT_SEQ, BPF_F_NO_PREALLOC);

#[map]
pub static TRANSIT_SLOTS: HashMap<SlotKey, Slot> = HashMap::with_max_entries(MAX_TRANSIT_SLOTS, 0);

#[map]
pub static TRANSIT_HIST: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::pinned(MAX_TRANSIT_HIST, BPF_F_NO_PREALLOC);

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

/// Leaves a [`dequeue`] of `count` messages or packets for `wirescope_transit`.
#[inline(always)]
pub fn defer_dequeue(
    peer: u32,
    dir: u8,
    ifindex: u32,
    len: u32,
    last_len: u32,
    count: u32,
    tx: bool,
) {
    defer(Op {
        kind: DEQUEUE,
        dir,
        tx: tx as u8,
        _pad: 0,
        peer,
        ifindex,
        len,
        last_len,
        left: count,
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
            dequeue(
                op.peer,
                op.dir,
                op.ifindex,
                op.len,
                op.last_len,
                op.left,
                op.tx != 0,
            );
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

/// The second half seen: `count` data messages leaving (tx, `len` padded plaintext bytes
/// each, the last `last`) or `count` inner packets arriving (rx, on tunnel `ifindex`: a
/// coalesced TUN write of wireguard-go's is one skb of many). Each is matched with its own
/// slot, or with its own share of a slot expecting several (a GSO skb queued whole): one
/// scan from the head over the first [`LOOKAHEAD`] + `count` - 1 slots takes what fits, in
/// order, then the [`LOOKBEHIND`] slots just behind it while some are left: a slot passed
/// over by a match is kept a while, for its partner may only be late (reordered), not lost.
/// Passed-over slots that never match are overwritten [`RING`] packets later or swept by
/// the agent once stale. Of a batch of more than [`MAX_BATCH`], the first [`MAX_BATCH`] are
/// matched.
#[inline(always)]
fn dequeue(peer: u32, dir: u8, ifindex: u32, len: u32, last: u32, count: u32, tx: bool) {
    let Some(q) = TRANSIT_SEQ.get_ptr_mut(&queue_key(peer, dir)) else {
        return;
    };
    let Some(scan) = TRANSIT_SCAN.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: values of a shared map, read once; races are settled by who deletes a slot.
    let (tail, mut head) = unsafe { ((*q).tail, (*q).head) };
    if tail > head + RING {
        head = tail - RING;
    }
    let count = if count == 0 {
        1
    } else if count > MAX_BATCH {
        MAX_BATCH
    } else {
        count
    };
    // SAFETY: this CPU's value.
    unsafe {
        *scan = Scan {
            want: count as u64,
            ahead: (LOOKAHEAD + count - 1) as u64,
            tail,
            skip_to: head,
            next: head,
        };
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let who = peer as u64 | (dir as u64) << 32 | (tx as u64) << 40;
    let lens = (len & 0xffff) as u64 | ((last & 0xffff) as u64) << 16 | (ifindex as u64) << 32;
    let mut i = 1u64;
    while i <= (LOOKAHEAD + MAX_BATCH - 1) as u64 {
        if wirescope_transit_step(who, head + i - 1, lens, now, i) == 0 {
            break;
        }
        i += 1;
    }
    let mut back = 1u64;
    while back <= LOOKBEHIND as u64 {
        if back > head || wirescope_transit_step(who, head - back, lens, now, 0) == 0 {
            break;
        }
        back += 1;
    }
    let (skip_to, next) = unsafe { ((*scan).skip_to, (*scan).next) };
    let next = if skip_to > next { skip_to } else { next };
    // SAFETY: see above; a racing CPU can only move head by a slot or two either way.
    unsafe {
        if next > (*q).head {
            (*q).head = next;
        }
    }
}

/// The state of the dequeue running on this CPU, between the steps of its scan.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Scan {
    /// Messages (or packets) still to match.
    want: u64,
    /// How far ahead of the head it looks: [`LOOKAHEAD`] + messages - 1.
    ahead: u64,
    /// The queue's tail when the scan started: nothing at or past it.
    tail: u64,
    /// Where the head moves: past slots gone or stale from the head on, and past (or onto,
    /// when it expects more) the furthest slot matched ahead.
    skip_to: u64,
    next: u64,
}

/// [`Scan`] of the dequeue running on this CPU.
#[map]
pub static TRANSIT_SCAN: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

/// One step of a dequeue's scan (see [`Scan`]): matches what it can of the messages (or
/// packets) still wanted with slot `number`, `i` places ahead of the head (1 for the head
/// itself; 0 for a slot behind it), observing each matched pair. Returns 0 when the scan
/// is over (nothing wanted, or past the window or the tail), 1 to go on. `who`: peer,
/// dir << 32, tx << 40; `lens`: each one's length, the last one's << 16, the tunnel's
/// ifindex (rx) << 32.
///
/// A global function (`no_mangle`, never inlined), with the scan's state in a map: the
/// verifier checks it once, on its own, and each step costs the scan calling it a call
/// and a branch. Inlined, the scan's every way through a slot multiplied the states the
/// verifier walked, past its million-instruction limit at 71 slots.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn wirescope_transit_step(
    who: u64,
    number: u64,
    lens: u64,
    now: u64,
    i: u64,
) -> u64 {
    let Some(scan) = TRANSIT_SCAN.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's value.
    let mut st = unsafe { *scan };
    let ahead = i != 0;
    if st.want == 0 || (ahead && (i > st.ahead || number >= st.tail)) {
        return 0;
    }
    let (peer, dir, tx) = (who as u32, (who >> 32) as u8, (who >> 40) & 1 != 0);
    let (len, last, ifindex) = (
        (lens & 0xffff) as u32,
        ((lens >> 16) & 0xffff) as u32,
        (lens >> 32) as u32,
    );
    let skey = slot_key(peer, dir, number);
    let mut gone = true;
    if let Some(s) = TRANSIT_SLOTS.get_ptr_mut(&skey) {
        // SAFETY: a value of a shared map; races are settled by who deletes it.
        let slot = unsafe { *s };
        if slot.number == number {
            if now.saturating_sub(slot.start_ns) > STALE_NS {
                let _ = TRANSIT_SLOTS.remove(&skey);
            } else {
                gone = false;
                if let Some((got, drained)) = take(s, &slot, &skey, len, last, tx, st.want) {
                    st.want -= got;
                    let past = if drained { number + 1 } else { number };
                    if ahead && past > st.next {
                        st.next = past;
                    }
                    let ns = now.saturating_sub(slot.start_ns);
                    observe(if tx { slot.ifindex } else { ifindex }, peer, dir, ns, got);
                }
            }
        }
    }
    if gone && ahead && number == st.skip_to {
        st.skip_to = number + 1;
    }
    unsafe { *scan = st };
    1
}

/// Takes up to `want` (at most [`MAX_BATCH`]) of what slot `s` expects if its lengths fit:
/// how many it took, and whether that was all it expected (then it is deleted). None when
/// it does not fit or another CPU used it up first.
#[inline(always)]
fn take(
    s: *mut Slot,
    slot: &Slot,
    skey: &SlotKey,
    len: u32,
    last: u32,
    tx: bool,
    want: u64,
) -> Option<(u64, bool)> {
    // Full segments and the last one may sit on either side; a single message or packet
    // has both lengths equal.
    let ok = if tx {
        fits(slot.len, len)
            || fits(slot.last_len, len)
            || fits(slot.len, last)
            || fits(slot.last_len, last)
    } else {
        fits(len, slot.len)
            || fits(len, slot.last_len)
            || fits(last, slot.len)
            || fits(last, slot.last_len)
    };
    if !ok {
        return None;
    }
    let want = if want > MAX_BATCH as u64 {
        MAX_BATCH as u64
    } else {
        want
    };
    let take = if slot.left < want { slot.left } else { want };
    if take == 0 {
        return None;
    }
    // Who takes the last deletes it. (Adding the two's complement subtracts: BPF has no
    // atomic subtract.)
    // SAFETY: `s` points into a map value.
    let had = unsafe { fetch_add(&raw mut (*s).left, take.wrapping_neg()) };
    if had == 0 || had > 1 << 16 {
        return None;
    }
    let drained = had <= take;
    if drained && TRANSIT_SLOTS.remove(skey).is_err() {
        return None;
    }
    Some((if had < take { had } else { take }, drained))
}

/// `n` observations of `ns`.
#[inline(always)]
fn observe(ifindex: u32, peer: u32, dir: u8, ns: u64, n: u64) {
    let key = HistKey {
        ifindex,
        peer,
        dir,
        bucket: log2_bucket(ns),
        _pad: [0; 2],
    };
    count::observe(&TRANSIT_HIST, &key, ns, n, &TRANSIT_ERRORS, error::HIST);
}
