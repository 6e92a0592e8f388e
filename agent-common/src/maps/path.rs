//! Path-MTU signals seen passively by the TC programs: IP fragments per layer
//! (`wirescope_fragments_total`) and ICMP too-big messages with the MTU they report
//! (`wirescope_icmp_too_big_total`, `wirescope_icmp_reported_mtu_bytes`).

pub const FRAGMENTS: &str = "FRAGMENTS";
pub const ICMP_TOO_BIG: &str = "ICMP_TOO_BIG";
pub const ICMP_MTU: &str = "ICMP_MTU";
pub const ENDPOINT_ADDRS: &str = "ENDPOINT_ADDRS";
pub const PATH_ERRORS: &str = "PATH_ERRORS";

/// (ifindex, direction, layer): 256 interfaces x 2 x 3 at most.
pub const MAX_FRAGMENTS: u32 = 2_048;
/// (ifindex, family).
pub const MAX_ICMP_TOO_BIG: u32 = 1_024;
/// (ifindex, reported MTU) -> time of the last report; the agent removes entries older
/// than [`MTU_WINDOW_NS`] on every sync tick.
pub const MAX_ICMP_MTU: u32 = 4_096;
/// Addresses of the known WireGuard endpoints and obfuscation flows' relays (any port), for
/// fragments that carry no ports. One per endpoint at most (the obfuscation relays, a few,
/// are also endpoints' in practice).
pub const MAX_ENDPOINT_ADDRS: u32 = super::wire::MAX_ENDPOINTS;

/// `wirescope_icmp_reported_mtu_bytes` is the lowest MTU reported within this window.
pub const MTU_WINDOW_NS: u64 = 600_000_000_000;

/// `CounterKey.kind` of `FRAGMENTS` (`peer` is 0).
pub mod layer {
    /// Fragments of WireGuard UDP: on an underlay, to or from a known endpoint address or
    /// an obfuscation flow's relay (any port), or a first fragment of UDP to or from a local
    /// WireGuard port.
    pub const OUTER: u8 = 0;
    /// Any fragment on a tunnel interface.
    pub const INNER: u8 = 1;
    pub const OTHER: u8 = 2;
}

/// Indexes of the `PATH_ERRORS` per-CPU array: updates the kernel refused.
pub mod error {
    pub const FRAGMENTS: u32 = 0;
    pub const ICMP_TOO_BIG: u32 = 1;
    pub const ICMP_MTU: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// An MTU some ICMP too-big message reported on an interface (`ICMP_MTU`; the value is
/// the bpf_ktime_get_ns of the latest such report).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MtuKey {
    pub ifindex: u32,
    pub mtu: u32,
}
const _: () = assert!(core::mem::size_of::<MtuKey>() == 8);

#[cfg(feature = "user")]
unsafe impl aya::Pod for MtuKey {}
