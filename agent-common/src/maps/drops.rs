//! Kernel drops (`skb:kfree_skb`, `wirescope_drops_total`) and UDP receive errors
//! (`udp:udp_fail_queue_rcv_skb`, `wirescope_udp_receive_errors_total`), counted only in the
//! agent's own network namespace.

pub const DROPS_CFG: &str = "DROPS_CFG";
pub const DROPS: &str = "DROPS";
pub const UDP_ERRORS: &str = "UDP_ERRORS";
pub const DROPS_ERRORS: &str = "DROPS_ERRORS";

/// (ifindex, reason): 256 interfaces x the ~20 reasons that occur on one.
pub const MAX_DROPS: u32 = 8_192;
/// Local UDP ports with failed receives.
pub const MAX_UDP_ERRORS: u32 = 4_096;

/// `DropKey.ifindex` of a drop whose skb had no device (attributed to the namespace by
/// its socket).
pub const NO_DEVICE: u32 = 0;
/// `DropsConfig.reason_off` when the tracepoint has no reason field (before 5.17): such
/// drops count with reason [`NOT_SPECIFIED`].
pub const NO_REASON_FIELD: u32 = u32::MAX;
/// SKB_DROP_REASON_NOT_SPECIFIED, used when the kernel gives no reason. (2 on every
/// kernel with reasons; the agent names values from the running kernel's BTF.)
pub const NOT_SPECIFIED: u32 = 2;

/// Indexes of the `DROPS_ERRORS` per-CPU array: updates the kernel refused.
pub mod error {
    pub const DROPS: u32 = 0;
    pub const UDP_ERRORS: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Offsets the programs follow, from the tracepoint's format file and the running
/// kernel's BTF, written by the agent once before it attaches (no CO-RE in Rust eBPF).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropsConfig {
    /// 0: the programs do nothing.
    pub enabled: u32,
    /// skb:kfree_skb's `skbaddr` and `reason` fields in the tracepoint record.
    pub skbaddr_off: u32,
    pub reason_off: u32,
    /// Reasons that are not drops (SKB_NOT_DROPPED_YET, SKB_CONSUMED), from BTF.
    pub not_dropped: u32,
    pub consumed: u32,
    /// sk_buff.dev and sk_buff.sk.
    pub skb_dev: u32,
    pub skb_sk: u32,
    /// net_device.ifindex and net_device.nd_net.
    pub netdev_ifindex: u32,
    pub netdev_net: u32,
    /// sock.__sk_common.skc_net and .skc_num (the local port, host order).
    pub sk_net: u32,
    pub sk_num: u32,
    /// net.ns.inum.
    pub net_inum: u32,
    /// The agent's network namespace (inode number of /proc/self/ns/net).
    pub netns_inum: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DropsConfig>() == 56);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub ifindex: u32,
    /// The kernel's `enum skb_drop_reason` value.
    pub reason: u32,
}
const _: () = assert!(core::mem::size_of::<DropKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for DropsConfig {}
    unsafe impl aya::Pod for DropKey {}
}
