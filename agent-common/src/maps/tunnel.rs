//! The tunnel role: inner IP packets on a WireGuard interface, attributed to a peer by
//! longest-prefix match in its allowed IPs (`ALLOWED_V4`, `ALLOWED_V6`), counted in
//! `COUNTERS` with `kind::TUNNEL`.

/// Allowed IPs, per family, over every tunnel.
pub const MAX_ALLOWED_IPS: u32 = 65_536;

/// Key of the LPM tries of allowed IPs: the interface first so one trie serves every tunnel.
/// The prefix length given to the trie is 32 (ifindex) + the allowed IP's prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedV4 {
    /// Big-endian, so that the trie's bitwise match of the first 32 bits is an exact match.
    pub ifindex_be: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AllowedV4>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedV6 {
    pub ifindex_be: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AllowedV6>() == 20);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for AllowedV4 {}
    unsafe impl aya::Pod for AllowedV6 {}
}
