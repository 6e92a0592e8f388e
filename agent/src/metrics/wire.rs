//! `wirescope_wire_packets_total` and `wirescope_wire_bytes_total`: the wire role's
//! WireGuard messages per interface, peer, direction and message type. Known peers' counts
//! come from `COUNTERS`, read once per scrape with the tunnel's ([`super::tunnel`]); traffic
//! of endpoints no peer has from `UNKNOWN_WIRE`, labelled by [`EndpointLabeler`], and what
//! that LRU map evicted as [`OTHER_ENDPOINTS`]: the strangers' total in `COUNTERS` (peer
//! `PEER_UNKNOWN`) less what the live entries hold.

use std::collections::{BTreeMap, HashMap};

use agent_common::maps::{Counter, kind, wire::UnknownWireKey};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use super::{direction, tunnel::add};
use crate::{datapath::wire::endpoint_addr, sync::peer_label::EndpointLabeler};

/// (interface, peer, direction, message).
pub type WireKey = (String, String, &'static str, &'static str);

/// The `message` label of a WireGuard message kind.
pub fn message(k: u8) -> Option<&'static str> {
    Some(match k {
        kind::HANDSHAKE_INITIATION => "handshake_initiation",
        kind::HANDSHAKE_RESPONSE => "handshake_response",
        kind::COOKIE_REPLY => "cookie_reply",
        kind::DATA => "data",
        kind::KEEPALIVE => "keepalive",
        _ => return None,
    })
}

/// The `peer` label of unknown endpoints' messages that `UNKNOWN_WIRE` no longer holds an
/// entry for (evicted by newer strangers). No endpoint label can be it: those are
/// `endpoint:` and 12 hex digits, or `endpoint:IP:PORT`.
pub const OTHER_ENDPOINTS: &str = "endpoint:other";

/// (interface, direction, message): one total of the unknown endpoints.
pub type UnknownTotalKey = (String, &'static str, &'static str);

/// The last [`OTHER_ENDPOINTS`] value exported per total, kept by the collector across
/// scrapes (see [`other_endpoints`]).
pub type OtherFloors = HashMap<UnknownTotalKey, Counter>;

/// Adds the traffic of unknown endpoints, each labelled as its endpoint, and per total in
/// `totals` the part no entry holds as [`OTHER_ENDPOINTS`], so that the series of one
/// interface, direction and message sum to its total. `totals` must have been read before
/// `unknown` (see [`other_endpoints`]).
pub(super) fn add_unknown(
    wire: &mut BTreeMap<WireKey, Counter>,
    unknown: Vec<(UnknownWireKey, Counter)>,
    totals: &BTreeMap<UnknownTotalKey, Counter>,
    floors: &mut OtherFloors,
    endpoints: &EndpointLabeler,
    iface: impl Fn(u32) -> String,
) {
    let mut held: BTreeMap<UnknownTotalKey, Counter> = BTreeMap::new();
    for (k, v) in unknown {
        let Some(msg) = message(k.kind) else { continue };
        let (interface, dir) = (iface(k.ifindex), direction(k.dir));
        add(held.entry((interface.clone(), dir, msg)).or_default(), &v);
        let peer = endpoints.label(endpoint_addr(&k.endpoint));
        add(wire.entry((interface, peer, dir, msg)).or_default(), &v);
    }
    for (key, total) in totals {
        let floor = floors.entry(key.clone()).or_default();
        let held = held.get(key).copied().unwrap_or_default();
        *floor = other_endpoints(*floor, total, &held);
        let (interface, dir, msg) = key.clone();
        add(
            wire.entry((interface, OTHER_ENDPOINTS.to_string(), dir, msg))
                .or_default(),
            floor,
        );
    }
}

/// The [`OTHER_ENDPOINTS`] value of one total: `total - held`, the counts of evicted
/// entries, but never below `floor`, the value exported before.
///
/// Why the floor: `total - held` can dip while nothing is wrong. The two maps are read one
/// after the other, entry by entry, while the programs keep counting, and an entry can be
/// counted in, evicted, and created again between the reads: a message counted in `held`
/// but not yet in `total` makes the difference smaller than at the previous scrape, and a
/// counter series must never go backwards. Reading `total` first keeps every difference at
/// or below the true count of evicted messages at the end of the read (whatever the
/// entries gain after `total` was read only lowers it, and an eviction meanwhile raises the
/// true count at least as much as the difference), and that true count only grows; so the
/// floor, the largest difference seen, never exceeds it either: the guard only holds a
/// value until the true count passes it, and when nothing is evicted the value is 0.
pub fn other_endpoints(floor: Counter, total: &Counter, held: &Counter) -> Counter {
    Counter {
        packets: floor
            .packets
            .max(total.packets.saturating_sub(held.packets)),
        bytes: floor.bytes.max(total.bytes.saturating_sub(held.bytes)),
    }
}

pub(super) fn encode(
    encoder: &mut DescriptorEncoder,
    wire: &BTreeMap<WireKey, Counter>,
) -> Result<(), std::fmt::Error> {
    let families: [(&str, &str, bool); 2] = [
        (
            "wirescope_wire_packets",
            "WireGuard UDP messages seen on a watched interface, by message type",
            true,
        ),
        (
            "wirescope_wire_bytes",
            "L3 bytes of those messages: outer IP header + UDP header + WireGuard message",
            false,
        ),
    ];
    for (name, help, packets) in families {
        let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for ((interface, peer, dir, msg), c) in wire {
            let labels = [
                ("interface", interface.as_str()),
                ("peer", peer.as_str()),
                ("direction", dir),
                ("message", msg),
            ];
            let v = if packets { c.packets } else { c.bytes };
            ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::maps::{DIR_RX, DIR_TX, wire::Endpoint};

    fn c(packets: u64, bytes: u64) -> Counter {
        Counter { packets, bytes }
    }

    fn stranger(last: u8, k: u8, dir: u8) -> UnknownWireKey {
        UnknownWireKey {
            ifindex: 3,
            endpoint: Endpoint {
                addr: [192, 0, 2, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                port: 51820,
                family: 4,
                _pad: 0,
            },
            kind: k,
            dir,
            _pad: [0; 2],
        }
    }

    /// One scrape: the series of interface eth0.
    fn scrape(
        unknown: Vec<(UnknownWireKey, Counter)>,
        totals: &[((&'static str, &'static str), Counter)],
        floors: &mut OtherFloors,
    ) -> BTreeMap<WireKey, Counter> {
        let totals = totals
            .iter()
            .map(|((d, m), t)| (("eth0".to_string(), *d, *m), *t))
            .collect();
        let mut wire = BTreeMap::new();
        let labeler = EndpointLabeler::with_salt([7; 32], true);
        add_unknown(&mut wire, unknown, &totals, floors, &labeler, |i| {
            assert_eq!(i, 3);
            "eth0".to_string()
        });
        wire
    }

    fn series(wire: &BTreeMap<WireKey, Counter>, peer: &str, dir: &str, msg: &str) -> Counter {
        wire[&("eth0".to_string(), peer.to_string(), dir, msg)]
    }

    /// Sum over every `peer` of one direction and message.
    fn summed(wire: &BTreeMap<WireKey, Counter>, dir: &str, msg: &str) -> Counter {
        let mut s = Counter::default();
        for ((_, _, d, m), v) in wire {
            if (*d, *m) == (dir, msg) {
                add(&mut s, v);
            }
        }
        s
    }

    #[test]
    fn other_is_zero_when_nothing_is_evicted() {
        let mut floors = OtherFloors::new();
        let unknown = vec![
            (stranger(1, kind::HANDSHAKE_INITIATION, DIR_RX), c(3, 528)),
            (stranger(2, kind::HANDSHAKE_INITIATION, DIR_RX), c(2, 352)),
            (stranger(1, kind::COOKIE_REPLY, DIR_TX), c(1, 92)),
        ];
        let totals = [
            (("rx", "handshake_initiation"), c(5, 880)),
            (("tx", "cookie_reply"), c(1, 92)),
        ];
        let wire = scrape(unknown, &totals, &mut floors);
        assert_eq!(wire.len(), 5, "{wire:?}");
        assert_eq!(
            series(
                &wire,
                "endpoint:192.0.2.1:51820",
                "rx",
                "handshake_initiation"
            ),
            c(3, 528)
        );
        assert_eq!(
            series(&wire, OTHER_ENDPOINTS, "rx", "handshake_initiation"),
            c(0, 0)
        );
        assert_eq!(
            series(&wire, OTHER_ENDPOINTS, "tx", "cookie_reply"),
            c(0, 0)
        );
        assert_eq!(summed(&wire, "rx", "handshake_initiation"), c(5, 880));
        assert_eq!(summed(&wire, "tx", "cookie_reply"), c(1, 92));
    }

    #[test]
    fn other_holds_what_was_evicted_and_never_decreases() {
        let mut floors = OtherFloors::new();
        let init = |last, n: u64| {
            (
                stranger(last, kind::HANDSHAKE_INITIATION, DIR_RX),
                c(n, 176 * n),
            )
        };
        let total = |n: u64| [(("rx", "handshake_initiation"), c(n, 176 * n))];
        let other = |w: &BTreeMap<WireKey, Counter>| {
            series(w, OTHER_ENDPOINTS, "rx", "handshake_initiation")
        };

        // 10 messages, 4 of them from endpoints evicted since.
        let w = scrape(vec![init(1, 6)], &total(10), &mut floors);
        assert_eq!(other(&w), c(4, 704));
        assert_eq!(summed(&w, "rx", "handshake_initiation"), c(10, 1760));

        // Endpoint 2 counted twice more, but the total read before those: 12 - 9 = 3 would
        // take the series back; it stays at 4.
        let w = scrape(vec![init(1, 6), init(2, 3)], &total(12), &mut floors);
        assert_eq!(other(&w), c(4, 704));

        // More entries than the total at all (a total refused by a full COUNTERS): 0 is
        // not taken, nor does anything wrap around.
        let w = scrape(vec![init(1, 20)], &total(12), &mut floors);
        assert_eq!(other(&w), c(4, 704));

        // Endpoint 1 evicted (its 6) and endpoint 2 at 3: 14 - 3 = 11, past the floor.
        let w = scrape(vec![init(2, 3)], &total(14), &mut floors);
        assert_eq!(other(&w), c(11, 1936));
        assert_eq!(summed(&w, "rx", "handshake_initiation"), c(14, 2464));

        // Packets and bytes are guarded each on its own.
        assert_eq!(
            other_endpoints(c(5, 100), &c(20, 90), &c(10, 10)),
            c(10, 100)
        );
    }
}
