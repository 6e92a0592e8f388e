//! Path-MTU signals, passive: `wirescope_fragments_total{interface,direction,layer}`,
//! `wirescope_icmp_too_big_total{interface,family}` and
//! `wirescope_icmp_reported_mtu_bytes{interface}`, read from the TC programs' maps on every
//! scrape (see agent-ebpf path.rs for what counts).
//!
//! The reported MTU is exact over its 10-minute window: the programs keep, per (interface,
//! reported MTU), the time of the latest report; the gauge is the lowest MTU whose latest
//! report is at most 10 minutes old, and it disappears when none is. The sync tick removes
//! older entries so the map stays bounded.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use agent_common::maps::{DIR_TX, path::layer};
use log::warn;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    datapath::Datapath,
    metrics::{Labels, encode_counters, encode_gauges},
    sync::inventory::Inventory,
};

#[derive(Debug)]
pub struct PathCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
}

/// Every family's series.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// (interface, direction, layer) -> fragments.
    pub fragments: BTreeMap<(String, &'static str, &'static str), u64>,
    /// (interface, family) -> messages.
    pub too_big: BTreeMap<(String, &'static str), u64>,
    /// interface -> lowest MTU reported in the last 10 minutes.
    pub reported_mtu: BTreeMap<String, u32>,
}

pub fn layer_name(l: u8) -> Option<&'static str> {
    match l {
        layer::OUTER => Some("outer"),
        layer::INNER => Some("inner"),
        layer::OTHER => Some("other"),
        _ => None,
    }
}

impl PathCollector {
    pub fn new(datapath: Arc<Mutex<Datapath>>, inventory: Arc<RwLock<Inventory>>) -> Self {
        Self {
            datapath,
            inventory,
        }
    }

    /// The series at monotonic time `now_ns` (CLOCK_MONOTONIC, as bpf_ktime_get_ns).
    pub fn snapshot_at(&self, now_ns: u64) -> Snapshot {
        let (frags, too_big, mtus) = {
            let Ok(dp) = self.datapath.lock() else {
                return Snapshot::default();
            };
            let p = &dp.path;
            let frags = p.fragments().unwrap_or_else(|e| {
                warn!("reading fragments: {e}");
                Vec::new()
            });
            let too_big = p.icmp_too_big().unwrap_or_else(|e| {
                warn!("reading ICMP too-big counts: {e}");
                Vec::new()
            });
            (frags, too_big, p.lowest_mtus(now_ns))
        };
        let Ok(inv) = self.inventory.read() else {
            return Snapshot::default();
        };
        let iface = |i: u32| inv.iface_name(i);
        let mut s = Snapshot::default();
        for (k, c) in frags {
            let Some(l) = layer_name(k.kind) else {
                continue;
            };
            let dir = if k.dir == DIR_TX { "tx" } else { "rx" };
            *s.fragments.entry((iface(k.ifindex), dir, l)).or_default() += c.packets;
        }
        for (k, c) in too_big {
            let family = match k.kind {
                4 => "ipv4",
                6 => "ipv6",
                _ => continue,
            };
            *s.too_big.entry((iface(k.ifindex), family)).or_default() += c.packets;
        }
        for (ifindex, mtu) in mtus {
            s.reported_mtu.insert(iface(ifindex), mtu);
        }
        s
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(crate::datapath::monotonic_ns())
    }
}

impl Collector for PathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        encode_counters(
            &mut encoder,
            "wirescope_fragments",
            "IP fragments seen; layer is outer (fragments of WireGuard UDP), inner (on a tunnel interface) or other",
            s.fragments.iter().map(|((i, d, l), n)| {
                let labels: Labels = vec![
                    ("interface", i.clone()),
                    ("direction", d.to_string()),
                    ("layer", l.to_string()),
                ];
                (labels, *n)
            }),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_icmp_too_big",
            "ICMP fragmentation-needed (family ipv4) and ICMPv6 packet-too-big (ipv6) received",
            s.too_big.iter().map(|((i, f), n)| {
                let labels: Labels = vec![("interface", i.clone()), ("family", f.to_string())];
                (labels, *n)
            }),
        )?;
        encode_gauges(
            &mut encoder,
            "wirescope_icmp_reported_mtu_bytes",
            "lowest next-hop MTU reported by those messages in the last 10 minutes",
            s.reported_mtu.iter().map(|(i, m)| {
                let labels: Labels = vec![("interface", i.clone())];
                (labels, *m as i64)
            }),
        )
    }
}
