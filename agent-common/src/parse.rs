//! Bounded packet parsing, the same code on the host (over byte slices, in unit tests) and
//! in the eBPF programs (over `TcContext::load`, which also works on non-linear skbs).
//!
//! Every length taken from the packet is checked against fixed bounds before it is used as an
//! offset, and every loop has a small constant trip count, so the verifier accepts it.

/// Read access to packet bytes.
// A packet is never empty where this is used; `is_empty` would be dead code in the programs.
#[allow(clippy::len_without_is_empty)]
pub trait Packet {
    /// Bytes in the packet as the hook sees it (`skb->len`).
    fn len(&self) -> u32;
    /// `N` bytes at `off`, or `None` when they are not all there.
    fn load<const N: usize>(&self, off: u32) -> Option<[u8; N]>;

    #[inline(always)]
    fn u8_at(&self, off: u32) -> Option<u8> {
        self.load::<1>(off).map(|b| b[0])
    }
    #[inline(always)]
    fn be16_at(&self, off: u32) -> Option<u16> {
        self.load::<2>(off).map(u16::from_be_bytes)
    }
}

impl Packet for &[u8] {
    fn len(&self) -> u32 {
        <[u8]>::len(self) as u32
    }
    fn load<const N: usize>(&self, off: u32) -> Option<[u8; N]> {
        let off = off as usize;
        let end = off.checked_add(N)?;
        let bytes = self.get(off..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The packet ends before the header does.
    Truncated,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// A header field is impossible (IHL < 5, total length below the header, ...).
    Malformed,
    /// More IPv6 extension headers than we follow.
    TooManyExtensions,
}

pub const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Fragment position of an IP packet.
pub mod frag {
    pub const NONE: u8 = 0;
    /// Offset 0 with more fragments to come: carries the L4 header.
    pub const FIRST: u8 = 1;
    /// Offset > 0: no L4 header, never read ports here.
    pub const LATER: u8 = 2;
}

/// What the IP header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip {
    /// 4 or 6.
    pub family: u8,
    /// Offset of the IP header (0 on L3 interfaces, 14 or more behind Ethernet).
    pub l3_off: u32,
    /// Length of the IP packet per its header (total length, or payload length + 40; for a
    /// BIG TCP packet over 64 KiB, whose length field is 0, the bytes up to the skb's end).
    pub l3_len: u32,
    /// Protocol of the payload after IPv6 extension headers.
    pub proto: u8,
    /// Offset of the L4 header.
    pub l4_off: u32,
    /// IPv4 addresses fill the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub frag: u8,
}

/// Where the IP header starts: on an L3 interface at 0, else after Ethernet and up to two
/// VLAN tags.
#[inline(always)]
pub fn l3_offset<P: Packet>(pkt: &P, l3: bool) -> Result<u32, ParseError> {
    if l3 {
        return Ok(0);
    }
    let mut off = 12u32;
    let mut i = 0;
    // At most two tags (QinQ); a bounded loop the verifier can unroll.
    while i < 3 {
        let ethertype = pkt.be16_at(off).ok_or(ParseError::Truncated)?;
        match ethertype {
            ETH_P_IP | ETH_P_IPV6 => return Ok(off + 2),
            ETH_P_8021Q | ETH_P_8021AD => off += 4,
            _ => return Err(ParseError::NotIp),
        }
        i += 1;
    }
    Err(ParseError::NotIp)
}

/// Parse the IP header at the start of the packet (`l3 == true`) or behind Ethernet.
///
/// On success `l3_off + 20 (IPv4) or 40 (IPv6) <= l4_off <= l3_off + l3_len <= pkt.len()`:
/// a packet shorter than its IP length field says is `Truncated`, so a cut packet never
/// yields offsets or lengths past its end. Extension headers longer than the IPv6 payload
/// length, like an IPv4 total length below the IHL, are `Malformed`.
#[inline(always)]
pub fn parse_ip<P: Packet>(pkt: &P, l3: bool) -> Result<Ip, ParseError> {
    let l3_off = l3_offset(pkt, l3)?;
    let first = pkt.u8_at(l3_off).ok_or(ParseError::Truncated)?;
    match first >> 4 {
        4 => parse_ipv4(pkt, l3_off),
        6 => parse_ipv6(pkt, l3_off),
        _ => Err(ParseError::NotIp),
    }
}

/// Largest IP packet a length field can describe; beyond it (BIG TCP GSO and GRO packets)
/// Linux writes 0 in the IPv4 total length or the IPv6 payload length and the skb's length
/// is the packet's.
const IP_MAX_LEN: u32 = 65_535;

#[inline(always)]
fn parse_ipv4<P: Packet>(pkt: &P, l3_off: u32) -> Result<Ip, ParseError> {
    let h: [u8; 20] = pkt.load(l3_off).ok_or(ParseError::Truncated)?;
    // Bytes from the IP header to the end of the skb (Ethernet padding included).
    let avail = pkt.len().saturating_sub(l3_off);
    let ihl = (h[0] & 0x0f) as u32 * 4;
    if ihl < 20 {
        return Err(ParseError::Malformed);
    }
    let total = u16::from_be_bytes([h[2], h[3]]) as u32;
    let total = if total == 0 && avail > IP_MAX_LEN {
        avail
    } else {
        total
    };
    if total < ihl {
        return Err(ParseError::Malformed);
    }
    // The whole packet, options included, must be there: a truncated packet never yields
    // an offset or a length past its end.
    if total > avail {
        return Err(ParseError::Truncated);
    }
    let frag_field = u16::from_be_bytes([h[6], h[7]]);
    let more = frag_field & 0x2000 != 0;
    let offset = frag_field & 0x1fff;
    let frag = if offset != 0 {
        frag::LATER
    } else if more {
        frag::FIRST
    } else {
        frag::NONE
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&h[12..16]);
    dst[..4].copy_from_slice(&h[16..20]);
    Ok(Ip {
        family: 4,
        l3_off,
        l3_len: total,
        proto: h[9],
        l4_off: l3_off + ihl,
        src,
        dst,
        frag,
    })
}

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers followed before giving up (one more is `TooManyExtensions`); real
/// traffic rarely has more than two.
const MAX_IPV6_EXT: u32 = 6;

#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P, l3_off: u32) -> Result<Ip, ParseError> {
    let h: [u8; 40] = pkt.load(l3_off).ok_or(ParseError::Truncated)?;
    let avail = pkt.len().saturating_sub(l3_off);
    let payload = u16::from_be_bytes([h[4], h[5]]) as u32;
    let l3_len = if payload == 0 && avail > IP_MAX_LEN + 40 {
        avail
    } else {
        payload + 40
    };
    if l3_len > avail {
        return Err(ParseError::Truncated);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = l3_off + 40;
    let mut frag = frag::NONE;
    let mut found = false;
    let mut i = 0;
    while i < MAX_IPV6_EXT + 1 {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let e: [u8; 2] = pkt.load(off).ok_or(ParseError::Truncated)?;
                next = e[0];
                off += (e[1] as u32 + 1) * 8;
            }
            IPV6_AH => {
                let e: [u8; 2] = pkt.load(off).ok_or(ParseError::Truncated)?;
                next = e[0];
                off += (e[1] as u32 + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let e: [u8; 4] = pkt.load(off).ok_or(ParseError::Truncated)?;
                next = e[0];
                let field = u16::from_be_bytes([e[2], e[3]]);
                let offset = field >> 3;
                let more = field & 1 != 0;
                frag = if offset != 0 {
                    frag::LATER
                } else if more {
                    frag::FIRST
                } else {
                    // An "atomic" fragment (offset 0, no more): a whole packet.
                    frag::NONE
                };
                off += 8;
                if frag == frag::LATER {
                    // What follows is the middle of the original payload: stop here.
                    found = true;
                    break;
                }
            }
            _ => {
                found = true;
                break;
            }
        }
        i += 1;
    }
    if !found {
        return Err(ParseError::TooManyExtensions);
    }
    // Extension headers longer than the payload length says: a lying length field.
    if off - l3_off > l3_len {
        return Err(ParseError::Malformed);
    }
    Ok(Ip {
        family: 6,
        l3_off,
        l3_len,
        proto: next,
        l4_off: off,
        src,
        dst,
        frag,
    })
}

/// The transport header: ports and its own length (for the headers GSO replicates).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4 {
    pub sport: u16,
    pub dport: u16,
    /// 8 for UDP, the data offset for TCP, 0 for anything else.
    pub hdr_len: u32,
    /// UDP only: the length field minus the header (the datagram's payload).
    pub udp_payload_len: u32,
}

/// Ports of a first (or unfragmented) TCP or UDP packet; `None` for later fragments and
/// other protocols, so ports are never read from a fragment's payload.
///
/// The transport header must lie within the IP packet (`Truncated` otherwise); the UDP
/// length must be at least 8 and, unless the packet is a first fragment, fit in the IP
/// payload (`Malformed` otherwise).
#[inline(always)]
pub fn parse_l4<P: Packet>(pkt: &P, ip: &Ip) -> Result<Option<L4>, ParseError> {
    if ip.frag == frag::LATER {
        return Ok(None);
    }
    // Bytes of the IP packet from the transport header on.
    let l4_avail = (ip.l3_off.saturating_add(ip.l3_len)).saturating_sub(ip.l4_off);
    match ip.proto {
        IPPROTO_UDP => {
            if l4_avail < 8 {
                return Err(ParseError::Truncated);
            }
            let h: [u8; 8] = pkt.load(ip.l4_off).ok_or(ParseError::Truncated)?;
            let len = u16::from_be_bytes([h[4], h[5]]) as u32;
            // A UDP length of 0 is legal for IPv6 jumbograms only; treat as malformed.
            if len < 8 {
                return Err(ParseError::Malformed);
            }
            // A first fragment carries only the start of the datagram the length describes.
            if len > l4_avail && ip.frag != frag::FIRST {
                return Err(ParseError::Malformed);
            }
            Ok(Some(L4 {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
                hdr_len: 8,
                udp_payload_len: len - 8,
            }))
        }
        IPPROTO_TCP => {
            if l4_avail < 20 {
                return Err(ParseError::Truncated);
            }
            let h: [u8; 14] = pkt.load(ip.l4_off).ok_or(ParseError::Truncated)?;
            let doff = (h[12] >> 4) as u32 * 4;
            if doff < 20 {
                return Err(ParseError::Malformed);
            }
            // Options past the end of the IP packet.
            if doff > l4_avail {
                return Err(ParseError::Truncated);
            }
            Ok(Some(L4 {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
                hdr_len: doff,
                udp_payload_len: 0,
            }))
        }
        _ => Ok(None),
    }
}

/// The segment count of an skb, for [`segmented`]. A GSO skb that a userspace program
/// wrote to a TUN device with a virtio-net header (wireguard-go since 0.0.20230223 hands the
/// kernel coalesced packets so) has `gso_size` set and `gso_segs` still 0: the kernel
/// computes it only when it segments. Then the count is the payload after the IP and
/// transport headers in `gso_size` pieces, the last one shorter. Otherwise `gso_segs` as is.
#[inline(always)]
pub fn gso_segments(ip: &Ip, l4_hdr_len: u32, skb_len: u32, gso_segs: u32, gso_size: u32) -> u32 {
    if gso_segs != 0 || gso_size == 0 {
        return gso_segs;
    }
    let hdr = ip.l4_off.saturating_sub(ip.l3_off) + l4_hdr_len;
    let payload = skb_len.saturating_sub(ip.l3_off).saturating_sub(hdr);
    // At most 64 KiB of payload: no overflow.
    payload.div_ceil(gso_size)
}

/// Packets and L3 bytes an skb stands for once segmented: GSO skbs count once per segment,
/// and every segment carries its own copy of the IP and transport headers.
///
/// `skb_len` is the skb's length, `gso_segs` its segment count (0 or 1 when not GSO).
#[inline(always)]
pub fn segmented(ip: &Ip, l4_hdr_len: u32, skb_len: u32, gso_segs: u32) -> (u64, u64) {
    if gso_segs <= 1 {
        return (1, ip.l3_len as u64);
    }
    let payload_total = skb_len.saturating_sub(ip.l3_off) as u64;
    let hdr = ip.l4_off.saturating_sub(ip.l3_off) as u64 + l4_hdr_len as u64;
    (gso_segs as u64, payload_total + (gso_segs as u64 - 1) * hdr)
}
