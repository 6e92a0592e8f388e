//! `wirescope_tunnel_packets_total` and `wirescope_tunnel_bytes_total`: the tunnel role's
//! counters, read from `COUNTERS` on every scrape and summed by label set, so an interface
//! that is re-created (new ifindex, same name) continues its series instead of resetting it.
//!
//! The wire role counts into the same map under its message kinds, so the one read here
//! also yields the wire families, which [`super::wire`] folds and encodes; under peer
//! `PEER_UNKNOWN` those kinds are the totals of the unknown endpoints, which are no series of
//! their own but what [`super::wire::add_unknown`] completes `UNKNOWN_WIRE`'s entries to.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use agent_common::maps::{Counter, PEER_UNKNOWN, kind};
use log::warn;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use super::{direction, wire};
use crate::{datapath::Datapath, sync::inventory::Inventory, sync::peer_label::EndpointLabeler};

#[derive(Debug)]
pub struct TunnelCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
    endpoints: EndpointLabeler,
    /// What `endpoint:other` was at the last snapshot ([`wire::other_endpoints`]).
    other_floors: Mutex<wire::OtherFloors>,
}

impl TunnelCollector {
    pub fn new(
        datapath: Arc<Mutex<Datapath>>,
        inventory: Arc<RwLock<Inventory>>,
        endpoints: EndpointLabeler,
    ) -> Self {
        Self {
            datapath,
            inventory,
            endpoints,
            other_floors: Mutex::new(wire::OtherFloors::new()),
        }
    }
}

/// (interface, peer, direction).
type TunnelKey = (String, String, &'static str);

/// The counters as label sets, summed.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub tunnel: BTreeMap<TunnelKey, Counter>,
    pub wire: BTreeMap<wire::WireKey, Counter>,
}

pub(super) fn add(c: &mut Counter, v: &Counter) {
    c.packets += v.packets;
    c.bytes += v.bytes;
}

impl TunnelCollector {
    pub fn snapshot(&self) -> Snapshot {
        let (counters, unknown) = {
            let Ok(dp) = self.datapath.lock() else {
                return Snapshot::default();
            };
            // COUNTERS (with the unknown endpoints' totals) before UNKNOWN_WIRE: see
            // `wire::other_endpoints`.
            let counters = dp.tunnel.counters().unwrap_or_else(|e| {
                warn!("reading counters: {e}");
                Vec::new()
            });
            let unknown = dp
                .wire
                .unknown_wire()
                .inspect_err(|e| warn!("reading counters: {e}"))
                .ok();
            (counters, unknown)
        };
        let Ok(inv) = self.inventory.read() else {
            return Snapshot::default();
        };
        let iface = |i: u32| inv.iface_name(i);
        let mut s = Snapshot::default();
        let mut unknown_totals = BTreeMap::new();
        for (k, v) in counters {
            if k.peer == PEER_UNKNOWN && k.kind != kind::TUNNEL {
                if let Some(msg) = wire::message(k.kind) {
                    add(
                        unknown_totals
                            .entry((iface(k.ifindex), direction(k.dir), msg))
                            .or_default(),
                        &v,
                    );
                }
                continue;
            }
            let Some(peer) = inv.peer_label(k.peer) else {
                continue;
            };
            let dir = direction(k.dir);
            if k.kind == kind::TUNNEL {
                add(
                    s.tunnel.entry((iface(k.ifindex), peer, dir)).or_default(),
                    &v,
                );
            } else if let Some(msg) = wire::message(k.kind) {
                add(
                    s.wire
                        .entry((iface(k.ifindex), peer, dir, msg))
                        .or_default(),
                    &v,
                );
            }
        }
        // Without the entries every total would look evicted, and the floor would keep
        // that: this scrape has no unknown endpoints at all.
        let Some(unknown) = unknown else { return s };
        let mut floors = self
            .other_floors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        wire::add_unknown(
            &mut s.wire,
            unknown,
            &unknown_totals,
            &mut floors,
            &self.endpoints,
            iface,
        );
        s
    }
}

impl Collector for TunnelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        let families: [(&str, &str, bool); 2] = [
            (
                "wirescope_tunnel_packets",
                "IP packets on a WireGuard interface, per peer (GSO packets count per segment)",
                true,
            ),
            (
                "wirescope_tunnel_bytes",
                "L3 bytes of those packets, as they are after segmentation",
                false,
            ),
        ];
        for (name, help, packets) in families {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((interface, peer, dir), c) in &s.tunnel {
                let labels = [
                    ("interface", interface.as_str()),
                    ("peer", peer.as_str()),
                    ("direction", dir),
                ];
                let v = if packets { c.packets } else { c.bytes };
                ConstCounter::new(v).encode(fam.encode_family(&labels)?)?;
            }
        }
        wire::encode(&mut encoder, &s.wire)
    }
}
