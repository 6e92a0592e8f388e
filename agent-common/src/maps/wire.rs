//! The wire role: WireGuard messages in UDP, attributed to a peer by its endpoint
//! (`ENDPOINTS`) or recognised by a local listen port (`WG_PORTS`), counted per message type
//! in `COUNTERS`, or, while the endpoint is not mapped to a peer, in `UNKNOWN_WIRE` per
//! endpoint and in `COUNTERS` under `PEER_UNKNOWN` per interface, kind and direction.
//! `UNKNOWN_WIRE` is an LRU map (anyone reaching a listen port chooses its keys): when full
//! it evicts the stalest endpoint, and the total in `COUNTERS` keeps its counts.

/// Peer endpoints, over every tunnel.
pub const MAX_ENDPOINTS: u32 = 65_536;
/// Listen ports of the local WireGuard interfaces.
pub const MAX_WG_PORTS: u32 = 256;
/// Endpoints of no known peer held at once, each (interface, kind, direction) an entry of
/// its own; beyond that the LRU map evicts.
pub const MAX_UNKNOWN_WIRE: u32 = 4_096;

/// A UDP endpoint. IPv4 addresses fill the first 4 bytes, the rest stays zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);

/// WireGuard traffic whose endpoint the agent has not (yet) mapped to a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnknownWireKey {
    pub ifindex: u32,
    pub endpoint: Endpoint,
    pub kind: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<UnknownWireKey>() == 28);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for UnknownWireKey {}
}
