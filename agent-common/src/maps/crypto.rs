//! Crypto timing: kernel WireGuard's `encrypt_packet` / `decrypt_packet`, timed per packet by
//! kprobes (`CRYPTO_CFG`, `CRYPTO_START`), into log2 histograms per (interface, direction)
//! (`CRYPTO_HIST`).

/// Encryptions or decryptions in flight at once: one per crypto worker thread.
pub const MAX_CRYPTO_START: u32 = 4_096;
/// (interface, direction, bucket).
pub const MAX_CRYPTO_HIST: u32 = 4_096;

/// Where the kprobes on kernel WireGuard's `encrypt_packet(skb, keypair)` and
/// `decrypt_packet(skb, keypair)` find the interface: keypair -> peer -> device -> net_device
/// -> ifindex. Rust eBPF has no CO-RE, so the agent reads these offsets from the running
/// kernel's BTF (vmlinux and the wireguard module) and writes them here before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CryptoConfig {
    /// 0 until the agent has filled the offsets in: the probes then do nothing.
    pub enabled: u32,
    /// `noise_keypair.entry.peer` (struct wg_peer *).
    pub keypair_peer: u32,
    /// `wg_peer.device` (struct wg_device *).
    pub peer_device: u32,
    /// `wg_device.dev` (struct net_device *).
    pub device_dev: u32,
    /// `net_device.ifindex` (int).
    pub netdev_ifindex: u32,
    /// `net_device.nd_net` (possible_net_t, whose first member is the struct net *).
    pub netdev_net: u32,
    /// `net.ns.inum`: the namespace's inode number, as /proc/self/ns/net shows it.
    pub net_inum: u32,
    /// The agent's own namespace: kprobes fire for every namespace, and an ifindex only
    /// means something inside one.
    pub netns_inum: u32,
}
const _: () = assert!(core::mem::size_of::<CryptoConfig>() == 32);

/// An encryption or decryption under way, keyed by the kernel thread (pid_tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CryptoStart {
    pub start_ns: u64,
    pub ifindex: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CryptoStart>() == 16);

/// A log2 bucket of crypto durations: bucket `b` holds durations in [2^b, 2^(b+1)) ns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HistKey {
    pub ifindex: u32,
    pub dir: u8,
    pub bucket: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<HistKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for CryptoConfig {}
    unsafe impl aya::Pod for CryptoStart {}
    unsafe impl aya::Pod for HistKey {}
}
