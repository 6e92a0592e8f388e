//! `wirescope_wire_packets_total` and `wirescope_wire_bytes_total`: the wire role's
//! WireGuard messages per interface, peer, direction and message type. Known peers' counts
//! come from `COUNTERS`, read once per scrape with the tunnel's ([`super::tunnel`]); traffic
//! of endpoints no peer has from `UNKNOWN_WIRE`, labelled by [`EndpointLabeler`].

use std::collections::BTreeMap;

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

/// Adds the traffic of unknown endpoints, each labelled as its endpoint.
pub(super) fn add_unknown(
    wire: &mut BTreeMap<WireKey, Counter>,
    unknown: Vec<(UnknownWireKey, Counter)>,
    endpoints: &EndpointLabeler,
    iface: impl Fn(u32) -> String,
) {
    for (k, v) in unknown {
        let Some(msg) = message(k.kind) else { continue };
        let peer = endpoints.label(endpoint_addr(&k.endpoint));
        add(
            wire.entry((iface(k.ifindex), peer, direction(k.dir), msg))
                .or_default(),
            &v,
        );
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
