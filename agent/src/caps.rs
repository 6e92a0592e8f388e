//! Dropping capabilities once the programs are attached.
//!
//! After the first sync the agent needs only what attaching to a WireGuard interface that
//! appears later, reading peers and probing take:
//!
//! | capability | why it is kept |
//! |---|---|
//! | CAP_BPF | every bpf() call: map reads and updates, links for new interfaces |
//! | CAP_PERFMON | kprobes (crypto timing) on a new kernel WireGuard interface |
//! | CAP_NET_ADMIN | TCX links / clsact qdiscs and filters; WireGuard's netlink peer dump |
//! | CAP_NET_RAW | ICMP probes and the path-MTU search (raw sockets, SO_BINDTODEVICE) |
//! | CAP_SYS_ADMIN | only on kernels without CAP_BPF/CAP_PERFMON (before 5.8), where BPF needs it |
//!
//! Everything else goes from the effective, permitted, inheritable and bounding sets (the
//! bounding set only when CAP_SETPCAP is there to drop it: under the systemd unit it already
//! holds just the kept set), and of what was asked only what the agent had is kept.
//!
//! Capabilities belong to threads, not processes: capset(2) changes the calling thread
//! only. The agent's runtime threads already exist when it drops, so the drop is applied on
//! every thread, as glibc does for setuid(2): a real-time signal whose handler makes the
//! same async-signal-safe syscalls on its own thread, then `/proc/self/task/*/status` is
//! read back until every thread shows the kept set (a thread created meanwhile by one not
//! yet done inherits the old sets and is signalled in the next round).

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use log::{info, warn};

pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The names of capabilities 0..=40 (linux/capability.h).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The name of capability `cap` (`CAP_N` for one newer than this list).
pub fn name(cap: u32) -> String {
    NAMES
        .get(cap as usize)
        .map_or_else(|| format!("CAP_{cap}"), |n| n.to_string())
}

/// The names of the capabilities in `mask`, lowest first.
pub fn names(mask: u64) -> Vec<String> {
    (0..64).filter(|c| mask & (1 << c) != 0).map(name).collect()
}

fn bit(cap: u32) -> u64 {
    1u64 << cap
}

/// What re-attachment needs on a kernel whose highest capability is `last_cap`.
pub fn wanted(last_cap: u32) -> u64 {
    if last_cap >= CAP_BPF {
        bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_NET_ADMIN) | bit(CAP_NET_RAW)
    } else {
        bit(CAP_SYS_ADMIN) | bit(CAP_NET_ADMIN) | bit(CAP_NET_RAW)
    }
}

/// The running kernel's highest capability number.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_BPF + 1)
        .min(63)
}

/// What the drop did, for the log and `/api/v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    /// Kept in the effective and permitted sets.
    pub kept: Vec<String>,
    /// Dropped from them.
    pub dropped: Vec<String>,
    /// The bounding set after the drop.
    pub bounding: Vec<String>,
    /// Threads the drop was applied on.
    pub threads: usize,
}

static DONE: OnceLock<Dropped> = OnceLock::new();

/// The result of [`drop_unneeded`], once it succeeded: `/api/v1/status`'s `capabilities`.
pub fn status() -> serde_json::Value {
    match DONE.get() {
        Some(d) => serde_json::json!({
            "kept": d.kept,
            "dropped": d.dropped,
            "bounding": d.bounding,
        }),
        None => serde_json::Value::Null,
    }
}

// capget/capset (linux/capability.h, version 3: two 32-bit words per set).
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// (effective, permitted, inheritable) of the calling thread; async-signal-safe.
fn capget() -> Result<(u64, u64, u64), i32> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: header and a two-element data array, as version 3 wants.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    if r != 0 {
        return Err(errno());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(d[0].effective, d[1].effective),
        join(d[0].permitted, d[1].permitted),
        join(d[0].inheritable, d[1].inheritable),
    ))
}

fn capset(eff: u64, prm: u64, inh: u64) -> Result<(), i32> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let d = [
        Data {
            effective: eff as u32,
            permitted: prm as u32,
            inheritable: inh as u32,
        },
        Data {
            effective: (eff >> 32) as u32,
            permitted: (prm >> 32) as u32,
            inheritable: (inh >> 32) as u32,
        },
    ];
    // SAFETY: as in capget.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    if r != 0 { Err(errno()) } else { Ok(()) }
}

fn errno() -> i32 {
    // SAFETY: the thread's errno location.
    unsafe { *libc::__errno_location() }
}

/// The drop on the calling thread: bounding set first (that needs CAP_SETPCAP, about to
/// go), then effective/permitted/inheritable. Async-signal-safe (syscalls only). Returns 0
/// or the errno of the failing capset; a refused bounding-set drop is recorded in
/// [`BOUNDING_ERRNO`].
fn apply_here(keep: u64, last: u32) -> i32 {
    for cap in 0..=last {
        if keep & bit(cap) != 0 {
            continue;
        }
        // SAFETY: plain prctl calls.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if present == 1
            && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0
        {
            BOUNDING_ERRNO.store(errno(), Ordering::Relaxed);
        }
    }
    match capget() {
        Ok((_, prm, inh)) => match capset(keep & prm, keep & prm, keep & inh) {
            Ok(()) => 0,
            Err(e) => e,
        },
        Err(e) => e,
    }
}

static KEEP: AtomicU64 = AtomicU64::new(0);
static LAST: AtomicU32 = AtomicU32::new(0);
static HANDLED: AtomicUsize = AtomicUsize::new(0);
static CAPSET_ERRNO: AtomicI32 = AtomicI32::new(0);
static BOUNDING_ERRNO: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    let saved = errno();
    let e = apply_here(KEEP.load(Ordering::SeqCst), LAST.load(Ordering::SeqCst));
    if e != 0 {
        CAPSET_ERRNO.store(e, Ordering::SeqCst);
    }
    HANDLED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: restoring the interrupted code's errno.
    unsafe { *libc::__errno_location() = saved };
}

/// The signal the drop is broadcast with.
fn drop_signal() -> libc::c_int {
    libc::SIGRTMAX() - 3
}

fn gettid() -> libc::pid_t {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// A `Cap*:` line of a /proc status file, as a mask.
fn status_mask(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Threads of this process whose effective or permitted set is not `want`: their ids.
fn threads_not_at(want: u64) -> Result<(Vec<libc::pid_t>, usize), String> {
    let dir = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("reading /proc/self/task: {e}"))?;
    let mut off = Vec::new();
    let mut all = 0;
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that exited meanwhile has no status any more: nothing to do for it.
        let Ok(s) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        all += 1;
        if status_mask(&s, "CapEff:") != Some(want) || status_mask(&s, "CapPrm:") != Some(want) {
            off.push(tid);
        }
    }
    Ok((off, all))
}

/// Drops every capability [`wanted`] does not name, on every thread of the process; logs
/// the outcome once. Never fails the agent: an error is logged (and returned) and the agent
/// goes on with what it has.
pub fn drop_unneeded() -> Result<Dropped, String> {
    let r = drop_inner();
    match &r {
        Ok(d) => info!(
            "capabilities: kept {} and dropped the {} others on all {} threads{}",
            if d.kept.is_empty() {
                "none".to_string()
            } else {
                d.kept.join(", ")
            },
            d.dropped.len(),
            d.threads,
            if BOUNDING_ERRNO.load(Ordering::Relaxed) != 0 {
                format!(
                    " (bounding set left as it was, {}: no CAP_SETPCAP)",
                    d.bounding.join(", ")
                )
            } else {
                String::new()
            }
        ),
        Err(e) => warn!("capabilities: could not drop the unneeded ones: {e}"),
    }
    r
}

fn drop_inner() -> Result<Dropped, String> {
    if let Some(d) = DONE.get() {
        return Ok(d.clone());
    }
    let last = last_cap();
    let (_, prm_before, _) =
        capget().map_err(|e| format!("capget: {}", std::io::Error::from_raw_os_error(e)))?;
    let keep = wanted(last) & prm_before;
    KEEP.store(keep, Ordering::SeqCst);
    LAST.store(last, Ordering::SeqCst);

    // SAFETY: installing a handler that only makes async-signal-safe calls; SA_RESTART so
    // interrupted syscalls of the other threads resume.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(drop_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "installing the signal handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }

    // This thread first; then the others, round after round, until all show `keep`.
    let e = apply_here(keep, last);
    if e != 0 {
        return Err(format!("capset: {}", std::io::Error::from_raw_os_error(e)));
    }
    let me = gettid();
    // SAFETY: no arguments.
    let pid = unsafe { libc::getpid() };
    let deadline = Instant::now() + Duration::from_secs(5);
    let threads = loop {
        let (off, all) = threads_not_at(keep)?;
        if off.is_empty() {
            break all;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "threads {off:?} still hold other capabilities after 5 s"
            ));
        }
        let before = HANDLED.load(Ordering::SeqCst);
        let mut sent = 0;
        for tid in off.into_iter().filter(|&t| t != me) {
            // SAFETY: a signal to a thread of this process.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, drop_signal()) } == 0 {
                sent += 1;
            }
        }
        let wait_until = Instant::now() + Duration::from_millis(500);
        while HANDLED.load(Ordering::SeqCst) < before + sent && Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = CAPSET_ERRNO.load(Ordering::SeqCst);
        if e != 0 {
            return Err(format!(
                "capset on another thread: {}",
                std::io::Error::from_raw_os_error(e)
            ));
        }
    };

    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| status_mask(&s, "CapBnd:"))
        .unwrap_or(0);
    let d = Dropped {
        kept: names(keep),
        dropped: names(prm_before & !keep),
        bounding: names(bounding),
        threads,
    };
    let _ = DONE.set(d.clone());
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_by_kernel() {
        assert_eq!(
            names(wanted(40)),
            ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_PERFMON", "CAP_BPF"]
        );
        // 5.4 (cap_last_cap 37): no CAP_BPF/CAP_PERFMON, so CAP_SYS_ADMIN.
        assert_eq!(
            names(wanted(37)),
            ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"]
        );
        assert_eq!(name(63), "CAP_63");
    }

    #[test]
    fn proc_status_masks() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000000c000003000\nCapEff:\t000000c000003000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(status_mask(s, "CapPrm:"), Some(wanted(40)));
        assert_eq!(status_mask(s, "CapEff:"), Some(wanted(40)));
        assert_eq!(status_mask(s, "CapBnd:"), Some((1 << 41) - 1));
        assert_eq!(status_mask(s, "CapAmb:"), None);
    }
}
