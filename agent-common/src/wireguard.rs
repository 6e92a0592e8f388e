//! Recognising WireGuard messages inside UDP payloads.
//!
//! A message is accepted only when its type byte, its three reserved zero bytes and its exact
//! size all agree: 148, 92 and 64 bytes for the handshake messages, and for transport data
//! 32 + P (a 16-byte header, P bytes of ciphertext, a 16-byte tag), where P is a multiple of
//! 16 (the plaintext padded, as kernel WireGuard and wireguard-go do), or at least
//! [`MIN_UNPADDED`]: an IP packet whose padding was cut short at the sender's tunnel MTU
//! (full-size packets through a tunnel of MTU 1420 or 1380), or not padded at all (boringtun
//! 0.6.0 sends every plaintext as is).

use crate::{maps::kind, parse::Packet};

pub const MSG_INITIATION: u8 = 1;
pub const MSG_RESPONSE: u8 = 2;
pub const MSG_COOKIE_REPLY: u8 = 3;
pub const MSG_DATA: u8 = 4;

pub const INITIATION_LEN: u32 = 148;
pub const RESPONSE_LEN: u32 = 92;
pub const COOKIE_REPLY_LEN: u32 = 64;
/// Data header (16) + Poly1305 tag (16): the size of a keepalive.
pub const DATA_MIN_LEN: u32 = 32;
pub const DATA_OVERHEAD: u32 = 32;
/// The shortest plaintext a data message can carry that is not a multiple of 16: an IP
/// packet (an IPv4 header alone) sent unpadded. Kernel WireGuard and wireguard-go pad to 16
/// but not past the tunnel MTU (so only an MTU, 68 or more, ends elsewhere); boringtun 0.6.0
/// does not pad at all, so any IP packet's length is a possible plaintext.
pub const MIN_UNPADDED: u32 = 20;

/// A recognised message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// One of `maps::kind::{HANDSHAKE_INITIATION, ..., DATA, KEEPALIVE}`.
    pub kind: u8,
    /// The UDP payload length.
    pub len: u32,
    /// Sender index (initiation, response), receiver index (cookie reply, data).
    pub index: u32,
    /// Receiver index of a response, else 0.
    pub receiver: u32,
    /// Data messages' counter (nonce), else 0.
    pub counter: u64,
}

/// Classify the UDP payload of `len` bytes at `off`.
#[inline(always)]
pub fn classify<P: Packet>(pkt: &P, off: u32, len: u32) -> Option<Message> {
    let h: [u8; 16] = if len >= 16 {
        pkt.load(off)?
    } else {
        return None;
    };
    if h[1] != 0 || h[2] != 0 || h[3] != 0 {
        return None;
    }
    let index = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let (k, receiver, counter) = match h[0] {
        MSG_INITIATION if len == INITIATION_LEN => (kind::HANDSHAKE_INITIATION, 0, 0),
        MSG_RESPONSE if len == RESPONSE_LEN => (
            kind::HANDSHAKE_RESPONSE,
            u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            0,
        ),
        MSG_COOKIE_REPLY if len == COOKIE_REPLY_LEN => (kind::COOKIE_REPLY, 0, 0),
        MSG_DATA if len >= DATA_MIN_LEN && plaintext_len_ok(len - DATA_MIN_LEN) => {
            let c = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            let k = if len == DATA_MIN_LEN {
                kind::KEEPALIVE
            } else {
                kind::DATA
            };
            (k, 0, c)
        }
        _ => return None,
    };
    Some(Message {
        kind: k,
        len,
        index,
        receiver,
        counter,
    })
}

/// A plaintext length WireGuard can produce: padded to a multiple of 16, or an IP packet's
/// own length (capped at an MTU, or unpadded).
#[inline(always)]
const fn plaintext_len_ok(p: u32) -> bool {
    p.is_multiple_of(16) || p >= MIN_UNPADDED
}

/// The L3 size of the data message that carries an inner packet of `inner_len` bytes over
/// an outer IP header of `outer_ip_hdr` bytes, per the WireGuard padding rule (plaintext
/// padded to a multiple of 16, but not past the tunnel MTU; `mtu` 0 means no cap).
///
/// Mirrors the kernel's `calculate_skb_padding` (and wireguard-go's `calculatePaddingSize`),
/// including their handling of a packet longer than the MTU: only `inner_len % mtu` is
/// padded then. Saturates instead of overflowing.
pub const fn data_wire_len(inner_len: u32, mtu: u32, outer_ip_hdr: u32) -> u32 {
    let padding = if mtu == 0 {
        align16(inner_len) - inner_len
    } else {
        let last = if inner_len > mtu {
            inner_len % mtu
        } else {
            inner_len
        };
        let padded = align16(last);
        let padded = if padded > mtu { mtu } else { padded };
        padded - last
    };
    outer_ip_hdr
        .saturating_add(8 + DATA_OVERHEAD)
        .saturating_add(inner_len)
        .saturating_add(padding)
}

/// `n` rounded up to a multiple of 16, or `n` itself when that would overflow (then the
/// padding is 0, never negative).
const fn align16(n: u32) -> u32 {
    match n.checked_add(15) {
        Some(m) => m & !15,
        None => n,
    }
}
