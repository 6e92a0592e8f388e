//! Leak detection: IP packets leaving an underlay outside every tunnel while a tunnel is up
//! (`wirescope_leaked_packets_total`, `wirescope_leaked_bytes_total`). Only counts per
//! (interface, kind) are kept: never an address.

pub const LEAK_CFG: &str = "LEAK_CFG";
pub const LEAK_ALLOW_V4: &str = "LEAK_ALLOW_V4";
pub const LEAK_ALLOW_V6: &str = "LEAK_ALLOW_V6";
pub const LEAKS: &str = "LEAKS";
pub const LEAK_ERRORS: &str = "LEAK_ERRORS";
/// Holds `wirescope_leak` (index 0) for wirescope_egress's tail call.
pub const LEAK_PROG: &str = "LEAK_PROG";
/// The leak check's own program (see agent-ebpf main.rs for why).
pub const PROG: &str = "wirescope_leak";

/// `--leak-allow` CIDRs, per family.
pub const MAX_LEAK_ALLOW: u32 = 1_024;
/// (ifindex, kind): 256 interfaces x 3 kinds.
pub const MAX_LEAKS: u32 = 1_024;

/// How far ahead of the sync round that writes it the "tunnel up" deadline lies: the agent
/// renews it every second while a tunnel is up, and an agent that died stops renewing it, so
/// its last word expires this long after. What leaves after that is counted apart
/// ([`state::UNRENEWED`]) until the next agent judges it.
pub const TUNNEL_UP_HOLD_NS: u64 = 5_000_000_000;

/// Tunnels the agent names in [`LeakConfig::up_ifindexes`]; more up at once are not named
/// (the next agent's judgement needs only one that stayed up).
pub const MAX_UP_TUNNELS: usize = 8;

/// `LeakKey.state`: when the packet left.
pub mod state {
    /// While a tunnel was up, as the agent last said within its deadline.
    pub const UP: u8 = 0;
    /// After that deadline, while a tunnel was up when the agent last said anything: the
    /// agent died (or its sync stalled). Not exported; the next sync round that renews the
    /// state judges these ([`JUDGED`] or dropped), since only then is it known whether a
    /// tunnel stayed up meanwhile.
    pub const UNRENEWED: u8 = 1;
    /// [`UNRENEWED`] packets a later sync round judged leaks: a tunnel up at the last word
    /// before them was still up (the same interface) at the next. Written by the agent only.
    pub const JUDGED: u8 = 2;
}

/// `LeakKey.kind`.
pub mod kind {
    /// UDP or TCP to port 53.
    pub const DNS: u8 = 0;
    pub const IPV4: u8 = 1;
    pub const IPV6: u8 = 2;
    pub const COUNT: u8 = 3;
}

/// Indexes of the `LEAK_ERRORS` per-CPU array: updates the kernel refused.
pub mod error {
    pub const LEAKS: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// The single entry of the `LEAK_CFG` array, written by the agent on every sync tick. Pinned:
/// a restarted agent reads what its predecessor last said (which tunnels were up) to judge
/// what left while nobody renewed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakConfig {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) until which a watched tunnel is up: the sync
    /// round that saw one up + [`TUNNEL_UP_HOLD_NS`]. 0: no tunnel up, nothing is a leak.
    pub tunnel_up_until_ns: u64,
    /// The ifindexes of the tunnels up at that round (at most [`MAX_UP_TUNNELS`]), 0 in the
    /// unused slots. Read by the agent only.
    pub up_ifindexes: [u32; MAX_UP_TUNNELS],
}
const _: () = assert!(core::mem::size_of::<LeakConfig>() == 8 + 4 * MAX_UP_TUNNELS);

/// Key of the `LEAK_ALLOW_V4` LPM trie (prefix length = the CIDR's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowV4 {
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AllowV4>() == 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowV6 {
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AllowV6>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LeakKey {
    pub ifindex: u32,
    pub kind: u8,
    /// [`state`]: counted, held for judgement, or judged a leak.
    pub state: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<LeakKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for LeakConfig {}
    unsafe impl aya::Pod for AllowV4 {}
    unsafe impl aya::Pod for AllowV6 {}
    unsafe impl aya::Pod for LeakKey {}
}
