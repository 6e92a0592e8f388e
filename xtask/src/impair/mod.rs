//! A deterministic impairing UDP relay for the lab: a userspace forwarder that one WireGuard
//! client's traffic to one relay goes through, and that can drop every k-th message, swap
//! every m-th pair, delay by a fixed time, or drop every handshake response, each per
//! direction, exactly and countably (no randomness, unlike netem).
//!
//! It listens on `listen` (the client's peer endpoint is pointed there), forwards every
//! datagram to `upstream` from a second socket connected to it, and sends what comes back
//! from `upstream` to the address the client last sent from (one client, one flow). Two
//! threads, one per direction, each with its own delay queue; both sockets are created in
//! the namespace given to [`Impairer::start`] (see [`netns::run_in`]) and live only as long
//! as the threads. Dropping the [`Impairer`] stops and joins them (within 20 ms).
//!
//! How each rule works, per direction ([`DirRules`]):
//! - Counting: the rules below count WireGuard data messages (type 4, keepalives included)
//!   by default, or every datagram with [`Count::All`]; other datagrams pass untouched.
//! - `drop_every: Some(k)`: the k-th, 2k-th, ... counted datagram is dropped.
//! - `reorder_every: Some(m)`: the counted datagrams that survived the drop rule form pairs
//!   (1st and 2nd, 3rd and 4th, ...); of every m-th pair the first is held back and sent
//!   right after the second. A held datagram whose partner does not come within
//!   [`HOLD_LIMIT`] is sent alone (counted in `unpaired`). N datagrams sent back to back
//!   thus make exactly floor(N / 2m) swapped pairs.
//! - `delay`: every datagram of the direction (after the rules above) leaves `delay` after it
//!   arrived, in arrival order (a timer queue of at most [`QUEUE_LIMIT`] datagrams; beyond,
//!   datagrams are dropped and counted in `overflow`). One-way: a round trip through the
//!   relay with the same delay both ways takes 2 x delay more.
//! - `drop_handshake_responses`: every WireGuard handshake response (type 2) is dropped,
//!   before the rules above look at it (so with [`Count::All`] it is not counted either).
//!
//! [`Impairer::set`] replaces the rules at run time and restarts the counting (the next
//! counted datagram is the 1st, also when its thread was already waiting for it);
//! [`Impairer::stats`] reads the counters, which are never reset: take differences.
//!
//! Datapath: each thread receives into one fixed 64 KiB buffer and copies the datagram into a
//! buffer from its own pool (reused, so in a steady state nothing is allocated); a datagram
//! that is not delayed or held is sent at once.
//!
//! In the lab, [`Lab::start_impairment`] (or `cargo xtask lab impair`) starts it at a
//! [`Place`]: in the hop, or between the multihop relays, and points the client at it; the
//! returned [`ImpairHandle`] undoes that and stops the relay when dropped.

use std::time::Duration;

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};

mod lab;
mod relay;
#[cfg(test)]
mod tests;

pub use lab::{ImpairHandle, Place, RELAYS_PORT};
pub use relay::{Impairer, wait_for};

/// The longest a datagram of a pair to swap waits for its partner.
pub const HOLD_LIMIT: Duration = Duration::from_millis(200);
/// The most datagrams a direction's delay queue holds.
pub const QUEUE_LIMIT: usize = 4096;
/// Largest datagram relayed (the largest UDP payload of IPv4).
const MAX_DATAGRAM: usize = 65_507;
/// How often the threads look at the stop flag when idle.
const TICK: Duration = Duration::from_millis(20);

/// Which datagrams `drop_every` and `reorder_every` count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Count {
    /// WireGuard transport data messages (type 4), keepalives included.
    #[default]
    Data,
    /// Every datagram.
    All,
}

/// What happens to the datagrams of one direction. The default changes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirRules {
    pub count: Count,
    /// Drop the k-th, 2k-th, ... counted datagram.
    pub drop_every: Option<u32>,
    /// Swap the two datagrams of every m-th pair of counted datagrams.
    pub reorder_every: Option<u32>,
    /// Fixed one-way delay of every datagram of this direction (`delay_ms` in JSON).
    #[serde(rename = "delay_ms", with = "millis")]
    pub delay: Duration,
    /// Drop every WireGuard handshake response (type 2).
    pub drop_handshake_responses: bool,
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `21st`.
fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

impl DirRules {
    pub fn is_noop(&self) -> bool {
        self.drop_every.is_none()
            && self.reorder_every.is_none()
            && self.delay.is_zero()
            && !self.drop_handshake_responses
    }

    /// A short description for people, e.g. `drop every 10th data, delay 40ms`.
    pub fn describe(&self) -> String {
        let what = match self.count {
            Count::Data => "data",
            Count::All => "datagram",
        };
        let mut parts = Vec::new();
        if let Some(k) = self.drop_every {
            parts.push(format!("drop every {} {what}", ordinal(k)));
        }
        if let Some(m) = self.reorder_every {
            parts.push(format!("swap every {} pair of {what}s", ordinal(m)));
        }
        if !self.delay.is_zero() {
            parts.push(format!("delay {:?}", self.delay));
        }
        if self.drop_handshake_responses {
            parts.push("drop handshake responses".to_owned());
        }
        if parts.is_empty() {
            "pass".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

impl std::str::FromStr for DirRules {
    type Err = anyhow::Error;

    /// Comma-separated: `drop-every=K`, `reorder-every=M`, `delay=MS` (milliseconds),
    /// `drop-handshake-responses`, `count=data|all`; empty or `pass` for nothing. E.g.
    /// `drop-every=10,delay=40`.
    fn from_str(spec: &str) -> Result<Self> {
        let mut r = DirRules::default();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            let num = |v: Option<&str>| -> Result<u32> {
                let v = v.ok_or_else(|| anyhow!("`{key}` needs a value: `{key}=N`"))?;
                match v.parse::<u32>() {
                    Ok(n) if n > 0 || key == "delay" => Ok(n),
                    _ => Err(anyhow!("`{item}`: expected a positive whole number")),
                }
            };
            match key {
                "pass" if value.is_none() => {}
                "drop-every" => r.drop_every = Some(num(value)?),
                "reorder-every" => r.reorder_every = Some(num(value)?),
                "delay" => r.delay = Duration::from_millis(num(value)?.into()),
                "drop-handshake-responses" if value.is_none() => r.drop_handshake_responses = true,
                "count" => {
                    r.count = match value {
                        Some("data") => Count::Data,
                        Some("all") => Count::All,
                        _ => return Err(anyhow!("`{item}`: use count=data or count=all")),
                    }
                }
                _ => {
                    return Err(anyhow!(
                        "unknown impairment `{item}`: use drop-every=K, reorder-every=M, \
                         delay=MS, drop-handshake-responses, count=data|all"
                    ));
                }
            }
        }
        Ok(r)
    }
}

/// The rules of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impairment {
    /// Datagrams from the relay (upstream) to the client.
    pub to_client: DirRules,
    /// Datagrams from the client to the relay.
    pub to_relay: DirRules,
}

impl Impairment {
    /// Forwards everything unchanged.
    pub fn none() -> Self {
        Self::default()
    }

    /// The same fixed delay both ways: round trips take 2 x `delay` longer.
    pub fn delay(delay: Duration) -> Self {
        let d = DirRules {
            delay,
            ..Default::default()
        };
        Impairment {
            to_client: d,
            to_relay: d,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "to relay: {}; to client: {}",
            self.to_relay.describe(),
            self.to_client.describe()
        )
    }
}

/// What one direction did, since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStats {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent on.
    pub forwarded: u64,
    /// Received datagrams by WireGuard message type: index 1 initiation, 2 response, 3 cookie
    /// reply, 4 data; 0 anything else.
    pub messages: [u64; 5],
    /// Datagrams the drop and reorder rules counted.
    pub counted: u64,
    /// Dropped by `drop_every`.
    pub dropped: u64,
    /// Handshake responses dropped by `drop_handshake_responses`.
    pub dropped_handshake_responses: u64,
    /// Pairs sent in swapped order.
    pub reordered_pairs: u64,
    /// Datagrams that went through the delay queue.
    pub delayed: u64,
    /// Held datagrams sent alone when no partner came within [`HOLD_LIMIT`].
    pub unpaired: u64,
    /// Dropped because the delay queue was full.
    pub overflow: u64,
    /// Datagrams towards the client dropped before the client had sent anything.
    pub no_destination: u64,
    /// Sends that failed (e.g. ICMP port unreachable reported by the kernel).
    pub send_errors: u64,
}

/// Both directions' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImpairStats {
    pub to_client: DirStats,
    pub to_relay: DirStats,
}

/// The WireGuard message type of a datagram (1 to 4), or 0 when it is none: the first byte
/// is the type and the next three are zero.
pub fn message_type(d: &[u8]) -> u8 {
    match d {
        [t @ 1..=4, 0, 0, 0, ..] => *t,
        _ => 0,
    }
}
