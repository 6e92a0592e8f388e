//! Kernel WireGuard's encryption and decryption, timed per packet with a kprobe and a
//! kretprobe on `encrypt_packet` / `decrypt_packet` (static functions of wireguard.ko that
//! Debian's kernels keep out of line). Only where the kernel has kprobes; the agent decides.

use agent_common::maps::{
    HistValue,
    crypto::{CryptoConfig, CryptoStart, HistKey, MAX_CRYPTO_HIST, MAX_CRYPTO_START},
    log2_bucket, map_error,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuHashMap},
    programs::ProbeContext,
};

use crate::maps::MAP_ERRORS;

#[map]
pub static CRYPTO_CFG: Array<CryptoConfig> = Array::with_max_entries(1, 0);

#[map]
pub static CRYPTO_START: HashMap<u64, CryptoStart> = HashMap::with_max_entries(MAX_CRYPTO_START, 0);

#[map]
pub static CRYPTO_HIST: PerCpuHashMap<HistKey, HistValue> =
    PerCpuHashMap::pinned(MAX_CRYPTO_HIST, 0);

/// Follows `base + off` as a kernel pointer.
#[inline(always)]
fn follow(base: usize, off: u32) -> Option<usize> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + off as usize) as *const usize) }.ok()
}

#[inline(always)]
pub fn enter(ctx: &ProbeContext) {
    let Some(cfg) = CRYPTO_CFG.get(0) else {
        return;
    };
    if cfg.enabled == 0 {
        return;
    }
    // encrypt_packet(struct sk_buff *skb, struct noise_keypair *keypair)
    let Some(keypair) = ctx.arg::<usize>(1) else {
        return;
    };
    let dev = (|| {
        let peer = follow(keypair, cfg.keypair_peer)?;
        let device = follow(peer, cfg.peer_device)?;
        follow(device, cfg.device_dev)
    })();
    let Some(dev) = dev else {
        return;
    };
    let Some(net) = follow(dev, cfg.netdev_net) else {
        return;
    };
    // SAFETY: as in follow().
    let inum = unsafe { bpf_probe_read_kernel((net + cfg.net_inum as usize) as *const u32) };
    if inum != Ok(cfg.netns_inum) {
        return;
    }
    let Ok(ifindex) =
        (unsafe { bpf_probe_read_kernel((dev + cfg.netdev_ifindex as usize) as *const u32) })
    else {
        return;
    };
    let start = CryptoStart {
        start_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        _pad: 0,
    };
    if CRYPTO_START
        .insert(&bpf_get_current_pid_tgid(), &start, 0)
        .is_err()
    {
        bump(map_error::CRYPTO_START);
    }
}

#[inline(always)]
pub fn exit(dir: u8) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: only this thread writes its own entry.
    let Some(start) = (unsafe { CRYPTO_START.get(&id) }).copied() else {
        return;
    };
    let _ = CRYPTO_START.remove(&id);
    let ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.start_ns);
    let key = HistKey {
        ifindex: start.ifindex,
        dir,
        bucket: log2_bucket(ns),
        _pad: [0; 2],
    };
    crate::count::observe(
        &CRYPTO_HIST,
        &key,
        ns,
        1,
        &MAP_ERRORS,
        map_error::CRYPTO_HIST,
    );
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(e) = MAP_ERRORS.get_ptr_mut(idx) {
        unsafe { *e += 1 };
    }
}
