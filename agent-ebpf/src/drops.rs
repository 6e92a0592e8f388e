//! Kernel drops and UDP receive errors, from tracepoints, counted per (interface, reason)
//! and per local port, in the agent's own network namespace only.
//!
//! Rust eBPF has no CO-RE: the record's field offsets (from the tracepoint's format file)
//! and the structure offsets (from the running kernel's BTF) come from the agent in
//! `DROPS_CFG`.

use agent_common::maps::{
    Counter,
    drops::{
        DropKey, DropsConfig, MAX_DROPS, MAX_UDP_ERRORS, NO_DEVICE, NO_REASON_FIELD, NOT_SPECIFIED,
        error,
    },
};
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
};

use crate::count;

#[map]
pub static DROPS_CFG: Array<DropsConfig> = Array::with_max_entries(1, 0);

#[map]
pub static DROPS: PerCpuHashMap<DropKey, Counter> = PerCpuHashMap::pinned(MAX_DROPS, 0);

/// Keyed by the local port.
#[map]
pub static UDP_ERRORS: PerCpuHashMap<u32, Counter> = PerCpuHashMap::pinned(MAX_UDP_ERRORS, 0);

#[map]
pub static DROPS_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(error::COUNT, 0);

/// `*(T *)(base + off)` in kernel memory.
#[inline(always)]
fn read<T>(base: usize, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + off as usize) as *const T) }.ok()
}

/// Whether the `struct net *` at `net` is the agent's namespace.
#[inline(always)]
fn own_netns(cfg: &DropsConfig, net: usize) -> bool {
    read::<u32>(net, cfg.net_inum) == Some(cfg.netns_inum)
}

/// skb:kfree_skb: one drop, attributed to the skb's device; a drop with no device counts
/// with [`NO_DEVICE`] when its socket is in our namespace, and not at all when neither
/// tells the namespace.
#[inline(always)]
pub fn kfree_skb(ctx: &TracePointContext) {
    let Some(cfg) = DROPS_CFG.get(0) else {
        return;
    };
    if cfg.enabled == 0 {
        return;
    }
    let reason = if cfg.reason_off == NO_REASON_FIELD {
        NOT_SPECIFIED
    } else {
        // SAFETY: an offset inside the record, from its format file.
        match unsafe { ctx.read_at::<u32>(cfg.reason_off as usize) } {
            Ok(r) => r,
            Err(_) => return,
        }
    };
    if reason == cfg.not_dropped || reason == cfg.consumed {
        return;
    }
    let Ok(skb) = (unsafe { ctx.read_at::<usize>(cfg.skbaddr_off as usize) }) else {
        return;
    };
    let dev = read::<usize>(skb, cfg.skb_dev).unwrap_or(0);
    let ifindex = if dev != 0 {
        let Some(net) = read::<usize>(dev, cfg.netdev_net) else {
            return;
        };
        if !own_netns(cfg, net) {
            return;
        }
        let Some(ifindex) = read::<u32>(dev, cfg.netdev_ifindex) else {
            return;
        };
        ifindex
    } else {
        let sk = read::<usize>(skb, cfg.skb_sk).unwrap_or(0);
        let Some(net) = read::<usize>(sk, cfg.sk_net) else {
            return;
        };
        if !own_netns(cfg, net) {
            return;
        }
        NO_DEVICE
    };
    let key = DropKey { ifindex, reason };
    count::add_or_report(&DROPS, &key, 1, 0, &DROPS_ERRORS, error::DROPS);
}

/// udp:udp_fail_queue_rcv_skb, as a raw tracepoint for its `struct sock *` (argument 1 on
/// every kernel: `(int rc, struct sock *sk[, struct sk_buff *skb])`): the record has no
/// namespace, the socket does.
#[inline(always)]
pub fn udp_fail(ctx: &RawTracePointContext) {
    let Some(cfg) = DROPS_CFG.get(0) else {
        return;
    };
    if cfg.enabled == 0 {
        return;
    }
    let sk: usize = ctx.arg(1);
    let Some(net) = read::<usize>(sk, cfg.sk_net) else {
        return;
    };
    if !own_netns(cfg, net) {
        return;
    }
    let Some(port) = read::<u16>(sk, cfg.sk_num) else {
        return;
    };
    count::add_or_report(
        &UDP_ERRORS,
        &(port as u32),
        1,
        0,
        &DROPS_ERRORS,
        error::UDP_ERRORS,
    );
}
