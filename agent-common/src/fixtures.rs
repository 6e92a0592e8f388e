//! Exact packet bytes for tests: the parser's host tests, and `BPF_PROG_TEST_RUN` tests of
//! the compiled TC programs (`agent-common = { features = ["fixtures"] }` as a
//! dev-dependency).
//!
//! Host-only (it allocates): compiled under `cfg(test)` or the `fixtures` feature, never
//! into the eBPF programs.
//!
//! A packet is built inside out: a transport header with its payload ([`udp`], [`tcp`]), an
//! IP header around it ([`Ipv4`], [`Ipv6`], or either through [`IpHeader`]), and finally the
//! link layer ([`Framing`]). The IPv4 header checksum is always right; UDP and TCP checksums
//! are computed for unfragmented packets (the parser does not check them, the kernel may).
//! WireGuard messages of every type come from [`wg`]. The `*_ipv4` / `*_ipv6` functions at
//! the end build the common cases in one call and return bare IP packets; wrap them with
//! [`Framing::frame`] for an Ethernet interface.
//!
//! ```
//! use agent_common::fixtures::{Framing, wg_data_ipv4};
//! // An inner packet of 100 bytes, encrypted for a tunnel with MTU 1420, seen on a veth:
//! let l3 = wg_data_ipv4([192, 0, 2, 1], 40000, [198, 51, 100, 7], 51820, 100, 1420);
//! assert_eq!(l3.len(), 20 + 8 + 32 + 112);
//! let frame = Framing::Ethernet.frame(&l3);
//! assert_eq!(frame.len(), 14 + l3.len());
//! ```
//!
//! Builders panic on impossible requests (options longer than the header allows, lengths
//! past 65535): they are test helpers, and a wrong fixture should fail loudly.

extern crate alloc;

use alloc::vec::Vec;

use crate::parse::{IPPROTO_TCP, IPPROTO_UDP};
use crate::wireguard::{
    COOKIE_REPLY_LEN, DATA_OVERHEAD, INITIATION_LEN, MSG_COOKIE_REPLY, MSG_DATA, MSG_INITIATION,
    MSG_RESPONSE, RESPONSE_LEN,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

/// Source MAC of every Ethernet fixture.
pub const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Destination MAC of every Ethernet fixture.
pub const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// Receiver index of the data messages built by the `wg_data_*` helpers.
pub const FIXTURE_RECEIVER: u32 = 0x1122_3344;
/// Counter of the data messages built by the `wg_data_*` helpers.
pub const FIXTURE_COUNTER: u64 = 7;

/// Filler for bytes whose value does not matter (ciphertext, keys, payload): a fixed
/// non-zero pattern, so that a parser reading the wrong offset does not see zeros.
fn filler(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 0x01)
        .collect()
}

fn put_be16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn len16(len: usize, what: &str) -> u16 {
    match u16::try_from(len) {
        Ok(v) => v,
        Err(_) => panic!("fixture: {what} of {len} bytes does not fit in 16 bits"),
    }
}

// ---------------------------------------------------------------------------------------
// Link layer
// ---------------------------------------------------------------------------------------

/// What comes before the IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Bare IP, as on a WireGuard or TUN interface: the IP header at offset 0.
    L3,
    /// Ethernet II (14 bytes).
    Ethernet,
    /// Ethernet with one 802.1Q tag carrying this VLAN id (18 bytes).
    Vlan(u16),
    /// Ethernet with an 802.1ad outer tag and an 802.1Q inner tag (22 bytes): (outer, inner).
    QinQ(u16, u16),
}

impl Framing {
    /// Every framing, for tests that loop over them.
    pub const ALL: [Framing; 4] = [
        Framing::L3,
        Framing::Ethernet,
        Framing::Vlan(100),
        Framing::QinQ(200, 100),
    ];

    /// Offset of the IP header: 0, 14, 18 or 22.
    pub fn l3_offset(self) -> u32 {
        match self {
            Framing::L3 => 0,
            Framing::Ethernet => 14,
            Framing::Vlan(_) => 18,
            Framing::QinQ(..) => 22,
        }
    }

    /// True for [`Framing::L3`]: what `parse::parse_ip` takes as its `l3` argument.
    pub fn is_l3(self) -> bool {
        self == Framing::L3
    }

    /// Put `l3` (an IP packet) behind this link layer; the ethertype follows the IP version
    /// nibble (4 or 6). Panics on anything else: use [`Framing::frame_ethertype`] for that.
    pub fn frame(self, l3: &[u8]) -> Vec<u8> {
        let ethertype = match l3.first().map(|b| b >> 4) {
            Some(4) => ETH_P_IP,
            Some(6) => ETH_P_IPV6,
            _ => panic!("fixture: Framing::frame needs an IPv4 or IPv6 packet"),
        };
        self.frame_ethertype(ethertype, l3)
    }

    /// Put `payload` behind this link layer with an explicit ethertype (ARP, ...).
    /// [`Framing::L3`] returns the payload unchanged.
    pub fn frame_ethertype(self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.l3_offset() as usize + payload.len());
        if self != Framing::L3 {
            out.extend_from_slice(&DST_MAC);
            out.extend_from_slice(&SRC_MAC);
            match self {
                Framing::Vlan(id) => {
                    out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
                    out.extend_from_slice(&(id & 0x0fff).to_be_bytes());
                }
                Framing::QinQ(outer, inner) => {
                    out.extend_from_slice(&ETH_P_8021AD.to_be_bytes());
                    out.extend_from_slice(&(outer & 0x0fff).to_be_bytes());
                    out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
                    out.extend_from_slice(&(inner & 0x0fff).to_be_bytes());
                }
                _ => {}
            }
            out.extend_from_slice(&ethertype.to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }
}

/// An ARP request (28 bytes) for `target` from `sender`, without link layer: frame it with
/// `Framing::Ethernet.frame_ethertype(ETH_P_ARP, &arp_request(..))`.
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    out.extend_from_slice(&SRC_MAC);
    out.extend_from_slice(&sender);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target);
    out
}

// ---------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------

fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn inet_checksum(bytes: &[u8]) -> u16 {
    fold(sum16(0, bytes))
}

/// Recompute the IPv4 header checksum of the header at `l3_off` (after a test edited a
/// field). The header length is taken from the IHL, at least 20 bytes.
pub fn fix_ipv4_checksum(pkt: &mut [u8], l3_off: usize) {
    let ihl = ((pkt[l3_off] & 0x0f) as usize * 4).max(20);
    let end = (l3_off + ihl).min(pkt.len());
    pkt[l3_off + 10] = 0;
    pkt[l3_off + 11] = 0;
    let c = inet_checksum(&pkt[l3_off..end]);
    put_be16(pkt, l3_off + 10, c);
}

/// Fill in the UDP (offset 6) or TCP (offset 16) checksum of `l4`, with the pseudo-header
/// sum `pseudo` already accumulated.
fn fill_l4_checksum(proto: u8, pseudo: u32, l4: &mut [u8]) {
    let at = match proto {
        IPPROTO_UDP => 6,
        IPPROTO_TCP => 16,
        _ => return,
    };
    if l4.len() < at + 2 {
        return;
    }
    l4[at] = 0;
    l4[at + 1] = 0;
    let mut c = fold(sum16(pseudo, l4));
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    put_be16(l4, at, c);
}

// ---------------------------------------------------------------------------------------
// IPv4
// ---------------------------------------------------------------------------------------

/// An IPv4 header. Build it with [`Ipv4::new`] and the setters, then wrap a transport
/// header and payload with [`Ipv4::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub id: u16,
    pub tos: u8,
    /// Don't-fragment flag.
    pub df: bool,
    /// More-fragments flag.
    pub mf: bool,
    /// Fragment offset in 8-byte units (13 bits).
    pub frag_offset: u16,
    /// Bytes of options: a multiple of 4, at most 40 (IHL = 5 + options / 4).
    pub options_len: usize,
}

impl Ipv4 {
    /// TTL 64, id 0x1234, no flags, no options.
    pub fn new(src: [u8; 4], dst: [u8; 4]) -> Self {
        Ipv4 {
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            tos: 0,
            df: false,
            mf: false,
            frag_offset: 0,
            options_len: 0,
        }
    }
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }
    pub fn df(mut self, df: bool) -> Self {
        self.df = df;
        self
    }
    pub fn mf(mut self, mf: bool) -> Self {
        self.mf = mf;
        self
    }
    /// Fragment offset in 8-byte units.
    pub fn frag_offset(mut self, units: u16) -> Self {
        assert!(units < 0x2000, "fixture: IPv4 fragment offset is 13 bits");
        self.frag_offset = units;
        self
    }
    /// `len` bytes of options (NOPs): a multiple of 4, at most 40.
    pub fn options(mut self, len: usize) -> Self {
        assert!(
            len.is_multiple_of(4) && len <= 40,
            "fixture: IPv4 options must be a multiple of 4 bytes, at most 40"
        );
        self.options_len = len;
        self
    }
    /// 20 + options.
    pub fn header_len(&self) -> usize {
        20 + self.options_len
    }
    /// True when this header describes a fragment (MF set or offset non-zero).
    pub fn is_fragment(&self) -> bool {
        self.mf || self.frag_offset != 0
    }

    /// The IPv4 packet: this header, then `payload` (a transport header and its data, or
    /// a fragment of them) carried as protocol `proto`. The header checksum is set; the UDP
    /// or TCP checksum too when the packet is not a fragment.
    pub fn build(&self, proto: u8, payload: &[u8]) -> Vec<u8> {
        let hlen = self.header_len();
        let total = len16(hlen + payload.len(), "IPv4 packet");
        let mut out = Vec::with_capacity(total as usize);
        out.push(0x40 | (hlen / 4) as u8);
        out.push(self.tos);
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        let flags = (self.df as u16) << 14 | (self.mf as u16) << 13 | self.frag_offset;
        out.extend_from_slice(&flags.to_be_bytes());
        out.push(self.ttl);
        out.push(proto);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.src);
        out.extend_from_slice(&self.dst);
        out.resize(hlen, 0x01); // NOP options
        fix_ipv4_checksum(&mut out, 0);
        let l4_start = out.len();
        out.extend_from_slice(payload);
        if !self.is_fragment() {
            let mut pseudo = sum16(0, &self.src);
            pseudo = sum16(pseudo, &self.dst);
            pseudo += proto as u32 + payload.len() as u32;
            fill_l4_checksum(proto, pseudo, &mut out[l4_start..]);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------------------

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options of this total length in bytes (a multiple of 8, 8..=2048).
    HopByHop(usize),
    /// A routing header (type 4, segments left 0) of this total length (multiple of 8).
    Routing(usize),
    /// Destination options of this total length (multiple of 8).
    DestOpts(usize),
    /// A fragment header (8 bytes): `offset` in 8-byte units (13 bits), `more` the M flag.
    /// Offset 0 without M is an "atomic fragment", a whole packet.
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext {
    /// Next-header value that announces this header.
    pub fn protocol(self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::Fragment { .. } => 44,
            Ext::DestOpts(_) => 60,
        }
    }
    /// Bytes this header takes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> usize {
        match self {
            Ext::HopByHop(n) | Ext::Routing(n) | Ext::DestOpts(n) => n,
            Ext::Fragment { .. } => 8,
        }
    }

    fn write(self, next: u8, out: &mut Vec<u8>) {
        match self {
            Ext::HopByHop(n) | Ext::Routing(n) | Ext::DestOpts(n) => {
                assert!(
                    n >= 8 && n.is_multiple_of(8) && n <= 2048,
                    "fixture: IPv6 option headers are 8..=2048 bytes in steps of 8"
                );
                out.push(next);
                out.push((n / 8 - 1) as u8);
                if let Ext::Routing(_) = self {
                    // Routing type 4 (segment routing), segments left 0: ignored by routers.
                    out.extend_from_slice(&[4, 0]);
                    out.resize(out.len() + n - 4, 0);
                } else {
                    // PadN option filling the rest.
                    out.push(1);
                    out.push((n - 4) as u8);
                    out.resize(out.len() + n - 4, 0);
                }
            }
            Ext::Fragment { offset, more, id } => {
                assert!(offset < 0x2000, "fixture: IPv6 fragment offset is 13 bits");
                out.push(next);
                out.push(0);
                out.extend_from_slice(&(offset << 3 | more as u16).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
    }
}

/// An IPv6 header with its extension headers, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub hop_limit: u8,
    pub flow_label: u32,
    pub ext: Vec<Ext>,
}

impl Ipv6 {
    /// Hop limit 64, flow label 0, no extension headers.
    pub fn new(src: [u8; 16], dst: [u8; 16]) -> Self {
        Ipv6 {
            src,
            dst,
            hop_limit: 64,
            flow_label: 0,
            ext: Vec::new(),
        }
    }
    pub fn hop_limit(mut self, hop_limit: u8) -> Self {
        self.hop_limit = hop_limit;
        self
    }
    pub fn flow_label(mut self, label: u32) -> Self {
        self.flow_label = label & 0xf_ffff;
        self
    }
    /// Append an extension header (after those already added).
    pub fn ext(mut self, ext: Ext) -> Self {
        self.ext.push(ext);
        self
    }
    /// 40 + extension headers.
    pub fn header_len(&self) -> usize {
        40 + self.ext.iter().map(|e| e.len()).sum::<usize>()
    }
    /// True when a fragment header with a non-zero offset or the M flag is present.
    pub fn is_fragment(&self) -> bool {
        self.ext
            .iter()
            .any(|e| matches!(e, Ext::Fragment { offset, more, .. } if *offset != 0 || *more))
    }

    /// The IPv6 packet: this header, the extension headers, then `payload` as protocol
    /// `proto` (the last next-header value). The UDP or TCP checksum is set when the packet
    /// is not a fragment.
    pub fn build(&self, proto: u8, payload: &[u8]) -> Vec<u8> {
        let plen = len16(self.header_len() - 40 + payload.len(), "IPv6 payload");
        let mut out = Vec::with_capacity(40 + plen as usize);
        let first_next = self.ext.first().map_or(proto, |e| e.protocol());
        let vtf = 6u32 << 28 | self.flow_label;
        out.extend_from_slice(&vtf.to_be_bytes());
        out.extend_from_slice(&plen.to_be_bytes());
        out.push(first_next);
        out.push(self.hop_limit);
        out.extend_from_slice(&self.src);
        out.extend_from_slice(&self.dst);
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(proto, |n| n.protocol());
            e.write(next, &mut out);
        }
        let l4_start = out.len();
        out.extend_from_slice(payload);
        if !self.is_fragment() {
            let mut pseudo = sum16(0, &self.src);
            pseudo = sum16(pseudo, &self.dst);
            pseudo += payload.len() as u32 + proto as u32;
            fill_l4_checksum(proto, pseudo, &mut out[l4_start..]);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Either family
// ---------------------------------------------------------------------------------------

/// An IPv4 or IPv6 header, for tests written once for both families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpHeader {
    V4(Ipv4),
    V6(Ipv6),
}

impl From<Ipv4> for IpHeader {
    fn from(h: Ipv4) -> Self {
        IpHeader::V4(h)
    }
}
impl From<Ipv6> for IpHeader {
    fn from(h: Ipv6) -> Self {
        IpHeader::V6(h)
    }
}

impl IpHeader {
    /// 4 or 6.
    pub fn family(&self) -> u8 {
        match self {
            IpHeader::V4(_) => 4,
            IpHeader::V6(_) => 6,
        }
    }
    /// IP header bytes before the transport header (options and extension headers included).
    pub fn header_len(&self) -> usize {
        match self {
            IpHeader::V4(h) => h.header_len(),
            IpHeader::V6(h) => h.header_len(),
        }
    }
    /// Source address as `parse::Ip::src` holds it (IPv4 in the first 4 bytes).
    pub fn src16(&self) -> [u8; 16] {
        match self {
            IpHeader::V4(h) => v4_in_16(h.src),
            IpHeader::V6(h) => h.src,
        }
    }
    /// Destination address as `parse::Ip::dst` holds it.
    pub fn dst16(&self) -> [u8; 16] {
        match self {
            IpHeader::V4(h) => v4_in_16(h.dst),
            IpHeader::V6(h) => h.dst,
        }
    }
    pub fn build(&self, proto: u8, payload: &[u8]) -> Vec<u8> {
        match self {
            IpHeader::V4(h) => h.build(proto, payload),
            IpHeader::V6(h) => h.build(proto, payload),
        }
    }
}

/// An IPv4 address laid out as the parser stores it: first 4 bytes, rest zero.
pub fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a);
    out
}

// ---------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------

/// A UDP header (length = 8 + payload) followed by `payload`. The checksum is left 0 here;
/// [`Ipv4::build`] / [`Ipv6::build`] fill it in for unfragmented packets.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = len16(8 + payload.len(), "UDP datagram");
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    out
}

/// A TCP header with `options_len` bytes of options (NOPs; a multiple of 4, at most 40, so
/// the data offset is 5 + options_len / 4), flags ACK|PSH, followed by `payload`.
pub fn tcp(sport: u16, dport: u16, options_len: usize, payload: &[u8]) -> Vec<u8> {
    assert!(
        options_len.is_multiple_of(4) && options_len <= 40,
        "fixture: TCP options must be a multiple of 4 bytes, at most 40"
    );
    let hlen = 20 + options_len;
    let mut out = Vec::with_capacity(hlen + payload.len());
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    out.extend_from_slice(&0x0506_0708u32.to_be_bytes()); // ack
    out.push(((hlen / 4) as u8) << 4);
    out.push(0x18); // ACK | PSH
    out.extend_from_slice(&0xfaf0u16.to_be_bytes()); // window
    out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    out.resize(hlen, 0x01); // NOP options
    out.extend_from_slice(payload);
    out
}

/// `len` bytes of payload filler.
pub fn payload(len: usize) -> Vec<u8> {
    filler(len, 0x40)
}

// ---------------------------------------------------------------------------------------
// WireGuard messages (UDP payloads)
// ---------------------------------------------------------------------------------------

/// WireGuard messages, exactly as they travel in UDP payloads. Encrypted and random parts
/// are filled with a fixed pattern.
pub mod wg {
    use super::*;

    fn header(kind: u8, len: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        out.extend_from_slice(&[kind, 0, 0, 0]);
        out
    }

    /// Handshake initiation (148 bytes) with this sender index.
    pub fn initiation(sender: u32) -> Vec<u8> {
        let mut out = header(MSG_INITIATION, INITIATION_LEN);
        out.extend_from_slice(&sender.to_le_bytes());
        out.extend_from_slice(&filler(INITIATION_LEN as usize - 8, 0x11));
        out
    }

    /// Handshake response (92 bytes): sender index, then the initiator's index as receiver.
    pub fn response(sender: u32, receiver: u32) -> Vec<u8> {
        let mut out = header(MSG_RESPONSE, RESPONSE_LEN);
        out.extend_from_slice(&sender.to_le_bytes());
        out.extend_from_slice(&receiver.to_le_bytes());
        out.extend_from_slice(&filler(RESPONSE_LEN as usize - 12, 0x22));
        out
    }

    /// Cookie reply (64 bytes) to the message whose sender index was `receiver`.
    pub fn cookie_reply(receiver: u32) -> Vec<u8> {
        let mut out = header(MSG_COOKIE_REPLY, COOKIE_REPLY_LEN);
        out.extend_from_slice(&receiver.to_le_bytes());
        out.extend_from_slice(&filler(COOKIE_REPLY_LEN as usize - 8, 0x33));
        out
    }

    /// Plaintext length after WireGuard's padding of an inner packet of `inner_len` bytes:
    /// rounded up to a multiple of 16 but not past `mtu` (0: no MTU cap). Written from the
    /// kernel's `calculate_skb_padding` (and wireguard-go's `calculatePaddingSize`),
    /// independently of `wireguard::data_wire_len`, so tests can compare the two.
    pub fn padded_len(inner_len: u32, mtu: u32) -> u32 {
        let (inner, mtu) = (inner_len as u64, mtu as u64);
        let align = |n: u64| n.div_ceil(16) * 16;
        let padding = if mtu == 0 {
            align(inner) - inner
        } else {
            let last = if inner > mtu { inner % mtu } else { inner };
            align(last).min(mtu) - last
        };
        (inner + padding) as u32
    }

    /// Transport data message carrying an inner packet of `inner_len` bytes through a tunnel
    /// of MTU `mtu` (0: no cap): 16-byte header (type 4, receiver index, counter), the
    /// padded ciphertext ([`padded_len`]) and the 16-byte tag.
    pub fn data(receiver: u32, counter: u64, inner_len: u32, mtu: u32) -> Vec<u8> {
        data_with_plaintext(receiver, counter, padded_len(inner_len, mtu))
    }

    /// Transport data message whose ciphertext is exactly `plaintext_len` bytes (no padding
    /// applied): total 32 + `plaintext_len`. Use it for sizes WireGuard would never send.
    pub fn data_with_plaintext(receiver: u32, counter: u64, plaintext_len: u32) -> Vec<u8> {
        let len = DATA_OVERHEAD + plaintext_len;
        let mut out = header(MSG_DATA, len);
        out.extend_from_slice(&receiver.to_le_bytes());
        out.extend_from_slice(&counter.to_le_bytes());
        out.extend_from_slice(&filler(plaintext_len as usize + 16, 0x44));
        out
    }

    /// Keepalive: a data message with empty plaintext (32 bytes).
    pub fn keepalive(receiver: u32, counter: u64) -> Vec<u8> {
        data_with_plaintext(receiver, counter, 0)
    }
}

// ---------------------------------------------------------------------------------------
// One-call packets (bare IP; frame them with `Framing::frame`)
// ---------------------------------------------------------------------------------------

/// IPv4 + UDP carrying `msg` (typically from [`wg`]) from `src:sport` to `dst:dport`.
pub fn wg_ipv4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, msg: &[u8]) -> Vec<u8> {
    Ipv4::new(src, dst).build(IPPROTO_UDP, &udp(sport, dport, msg))
}

/// IPv6 + UDP carrying `msg` from `[src]:sport` to `[dst]:dport`.
pub fn wg_ipv6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, msg: &[u8]) -> Vec<u8> {
    Ipv6::new(src, dst).build(IPPROTO_UDP, &udp(sport, dport, msg))
}

/// IPv4 + UDP + a data message ([`FIXTURE_RECEIVER`], [`FIXTURE_COUNTER`]) that carries an
/// inner packet of `inner_len` bytes through a tunnel of MTU `mtu` (0: no cap). Its length
/// is `wireguard::data_wire_len(inner_len, mtu, 20)`.
pub fn wg_data_ipv4(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    inner_len: u32,
    mtu: u32,
) -> Vec<u8> {
    let msg = wg::data(FIXTURE_RECEIVER, FIXTURE_COUNTER, inner_len, mtu);
    wg_ipv4(src, sport, dst, dport, &msg)
}

/// IPv6 version of [`wg_data_ipv4`]: `wireguard::data_wire_len(inner_len, mtu, 40)` bytes.
pub fn wg_data_ipv6(
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
    inner_len: u32,
    mtu: u32,
) -> Vec<u8> {
    let msg = wg::data(FIXTURE_RECEIVER, FIXTURE_COUNTER, inner_len, mtu);
    wg_ipv6(src, sport, dst, dport, &msg)
}

/// An IPv4 + UDP packet of exactly `l3_len` bytes (at least 28): an inner packet as it
/// appears on a tunnel interface.
pub fn udp_ipv4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, l3_len: usize) -> Vec<u8> {
    assert!(l3_len >= 28, "fixture: IPv4 + UDP needs at least 28 bytes");
    Ipv4::new(src, dst).build(IPPROTO_UDP, &udp(sport, dport, &payload(l3_len - 28)))
}

/// An IPv6 + UDP packet of exactly `l3_len` bytes (at least 48).
pub fn udp_ipv6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, l3_len: usize) -> Vec<u8> {
    assert!(l3_len >= 48, "fixture: IPv6 + UDP needs at least 48 bytes");
    Ipv6::new(src, dst).build(IPPROTO_UDP, &udp(sport, dport, &payload(l3_len - 48)))
}

/// An IPv4 + TCP packet with `options_len` bytes of TCP options and `payload_len` bytes of
/// data: 40 + options_len + payload_len bytes. With a large payload it stands for a GSO
/// super-packet (give the segment count to `parse::segmented`).
pub fn tcp_ipv4(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    options_len: usize,
    payload_len: usize,
) -> Vec<u8> {
    Ipv4::new(src, dst).df(true).build(
        IPPROTO_TCP,
        &tcp(sport, dport, options_len, &payload(payload_len)),
    )
}

/// An IPv6 + TCP packet: 60 + options_len + payload_len bytes.
pub fn tcp_ipv6(
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
    options_len: usize,
    payload_len: usize,
) -> Vec<u8> {
    Ipv6::new(src, dst).build(
        IPPROTO_TCP,
        &tcp(sport, dport, options_len, &payload(payload_len)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_checksum_verifies() {
        let p = Ipv4::new([10, 0, 0, 1], [10, 0, 0, 2])
            .options(8)
            .build(17, &udp(1, 2, &[]));
        assert_eq!(inet_checksum(&p[..28]), 0);
    }

    #[test]
    fn udp_checksums_verify() {
        // Summing the pseudo-header and the datagram with its checksum gives 0.
        let v4 = udp_ipv4([10, 0, 0, 1], 1000, [10, 0, 0, 2], 2000, 77);
        let mut acc = sum16(0, &v4[12..20]);
        acc += 17 + (v4.len() - 20) as u32;
        assert_eq!(fold(sum16(acc, &v4[20..])), 0);
        let v6 = udp_ipv6([1; 16], 1000, [2; 16], 2000, 77);
        let mut acc = sum16(0, &v6[8..40]);
        acc += 17 + (v6.len() - 40) as u32;
        assert_eq!(fold(sum16(acc, &v6[40..])), 0);
    }

    #[test]
    fn message_sizes() {
        assert_eq!(wg::initiation(1).len(), 148);
        assert_eq!(wg::response(1, 2).len(), 92);
        assert_eq!(wg::cookie_reply(1).len(), 64);
        assert_eq!(wg::keepalive(1, 0).len(), 32);
        assert_eq!(wg::data(1, 0, 100, 1420).len(), 32 + 112);
        assert_eq!(wg::data(1, 0, 1419, 1420).len(), 32 + 1420);
        assert_eq!(wg::data(1, 0, 1420, 1420).len(), 32 + 1420);
        assert_eq!(wg::data(1, 0, 1419, 0).len(), 32 + 1424);
    }
}
