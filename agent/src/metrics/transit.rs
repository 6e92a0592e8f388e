//! `wirescope_tunnel_transit_seconds`: the time between an IP packet on the tunnel interface
//! and its encrypted (tx) or decrypted (rx) WireGuard message on the carrying interface,
//! from the transit histogram ([`crate::datapath::transit`]) on every scrape, summed by
//! label set. Empty with `--transit-time off`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use log::warn;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use crate::{
    datapath::Datapath,
    metrics::{Labels, crypto::Series, direction},
    sync::inventory::Inventory,
};

/// Exported bounds: 2^10 ns (1 us) to 2^31 ns (2.1 s), doubling; a packet not matched
/// within 2 s is taken for lost.
const FIRST_BOUND_LOG2: u8 = 10;
const LAST_BOUND_LOG2: u8 = 31;

#[derive(Debug)]
pub struct TransitCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
}

/// The series by (interface, peer, direction).
pub type Snapshot = BTreeMap<(String, String, &'static str), Series>;

impl TransitCollector {
    pub fn new(datapath: Arc<Mutex<Datapath>>, inventory: Arc<RwLock<Inventory>>) -> Self {
        Self {
            datapath,
            inventory,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let hist = {
            let Ok(dp) = self.datapath.lock() else {
                return Snapshot::default();
            };
            dp.transit.hist().unwrap_or_else(|e| {
                warn!("reading transit times: {e}");
                Vec::new()
            })
        };
        let Ok(inv) = self.inventory.read() else {
            return Snapshot::default();
        };
        let mut s = Snapshot::default();
        for (k, v) in hist {
            let Some(peer) = inv.peer_label(k.peer) else {
                continue;
            };
            let iface = inv.iface_name(k.ifindex);
            let series = s.entry((iface, peer, direction(k.dir))).or_default();
            if let Some(b) = series.buckets.get_mut(k.bucket as usize) {
                *b += v.count;
            }
            series.count += v.count;
            series.sum_ns += v.sum_ns;
        }
        s
    }
}

impl Collector for TransitCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        let mut fam = encoder.encode_descriptor(
            "wirescope_tunnel_transit_seconds",
            "time between an IP packet on the tunnel interface and its encrypted (tx) or decrypted (rx) WireGuard message on the carrying interface",
            None,
            MetricType::Histogram,
        )?;
        for ((interface, peer, dir), series) in &s {
            let l: Labels = vec![
                ("interface", interface.clone()),
                ("peer", peer.clone()),
                ("direction", dir.to_string()),
            ];
            fam.encode_family(&l)?.encode_histogram::<NoLabelSet>(
                series.sum_ns as f64 / 1e9,
                series.count,
                &series.encoder_buckets(FIRST_BOUND_LOG2, LAST_BOUND_LOG2),
                None,
            )?;
        }
        Ok(())
    }
}
