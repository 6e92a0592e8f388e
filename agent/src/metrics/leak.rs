//! Leaks: `wirescope_leaked_packets_total` and `wirescope_leaked_bytes_total` per
//! (interface, kind), read from the TC programs' `LEAKS` map on every scrape. Every watched
//! underlay has its three series (`dns`, `ipv4`, `ipv6`) from the start, at 0, so that
//! `increase()` sees the first leak. Destination addresses are never kept or exported.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use agent_common::maps::leak::kind;
use log::warn;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    datapath::Datapath,
    metrics::{Labels, encode_counters},
    sync::inventory::Inventory,
};

/// The `kind` label of a `LeakKey.kind`.
pub fn kind_name(k: u8) -> Option<&'static str> {
    match k {
        kind::DNS => Some("dns"),
        kind::IPV4 => Some("ipv4"),
        kind::IPV6 => Some("ipv6"),
        _ => None,
    }
}

#[derive(Debug)]
pub struct LeakCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
}

impl LeakCollector {
    pub fn new(datapath: Arc<Mutex<Datapath>>, inventory: Arc<RwLock<Inventory>>) -> Self {
        Self {
            datapath,
            inventory,
        }
    }

    /// (interface, kind) -> (packets, bytes).
    pub fn snapshot(&self) -> BTreeMap<(String, &'static str), (u64, u64)> {
        let leaks = match self.datapath.lock() {
            Ok(dp) => dp.leak.leaks().unwrap_or_else(|e| {
                warn!("reading leaks: {e}");
                Vec::new()
            }),
            Err(_) => return BTreeMap::new(),
        };
        let Ok(inv) = self.inventory.read() else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for u in &inv.underlays {
            for k in [kind::DNS, kind::IPV4, kind::IPV6] {
                let name = kind_name(k).expect("known kind");
                out.insert((u.name.clone(), name), (0, 0));
            }
        }
        for (k, c) in leaks {
            let Some(name) = kind_name(k.kind) else {
                continue;
            };
            let iface = inv.iface_name(k.ifindex);
            let e = out.entry((iface, name)).or_insert((0, 0));
            e.0 += c.packets;
            e.1 += c.bytes;
        }
        out
    }
}

fn labels((interface, kind): &(String, &'static str)) -> Labels {
    vec![("interface", interface.clone()), ("kind", kind.to_string())]
}

impl Collector for LeakCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        encode_counters(
            &mut encoder,
            "wirescope_leaked_packets",
            "packets that left an underlay outside every tunnel while a tunnel was up; kind is dns, ipv4 or ipv6",
            s.iter().map(|(k, (p, _))| (labels(k), *p)),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_leaked_bytes",
            "L3 bytes of the leaked packets",
            s.iter().map(|(k, (_, b))| (labels(k), *b)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names() {
        assert_eq!(kind_name(kind::DNS), Some("dns"));
        assert_eq!(kind_name(kind::IPV4), Some("ipv4"));
        assert_eq!(kind_name(kind::IPV6), Some("ipv6"));
        assert_eq!(kind_name(kind::COUNT), None);
    }
}
