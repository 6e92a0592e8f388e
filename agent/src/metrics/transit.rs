//! `wirescope_tunnel_transit_seconds`: the time between an IP packet on the tunnel interface
//! and its encrypted (tx) or decrypted (rx) WireGuard message on the carrying interface,
//! from the transit histogram ([`crate::datapath::transit`]) on every scrape, summed by
//! label set. Empty with `--transit-time off`; per interface and direction (no `peer`
//! label) with `--peer-histograms off`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
};

use log::warn;

use crate::{
    datapath::Datapath,
    metrics::{
        Format, Labels,
        crypto::Series,
        direction,
        family_text::{self, HistogramFamily, TextFamilies},
    },
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
    /// `--peer-histograms`: a series per peer, or per interface.
    per_peer: bool,
}

/// The series by (interface, peer, direction).
pub type Snapshot = BTreeMap<(String, String, &'static str), Series>;

impl TransitCollector {
    pub fn new(
        datapath: Arc<Mutex<Datapath>>,
        inventory: Arc<RwLock<Inventory>>,
        per_peer: bool,
    ) -> Self {
        Self {
            datapath,
            inventory,
            per_peer,
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
        // Bucket entries folded per (interface index, peer id, direction) first, so that the
        // labels are looked up and copied once per series, not once per bucket.
        let mut by_id: HashMap<(u32, u32, u8), Series> = HashMap::new();
        for (k, v) in hist {
            by_id.entry((k.ifindex, k.peer, k.dir)).or_default().add(
                k.bucket.into(),
                v.count,
                v.sum_ns,
            );
        }
        let Ok(inv) = self.inventory.read() else {
            return Snapshot::default();
        };
        let mut s = Snapshot::default();
        for ((ifindex, peer, dir), series) in by_id {
            let Some(peer) = inv.peer_label(peer) else {
                continue;
            };
            s.entry((inv.iface_name(ifindex), peer, direction(dir)))
                .or_default()
                .merge(&series);
        }
        s
    }
}

/// The exported series: `s` as it is, or summed per (interface, direction) with the peer
/// left out of the labels.
pub fn series(s: &Snapshot, per_peer: bool) -> Vec<(Labels, Series)> {
    if per_peer {
        return s
            .iter()
            .map(|((interface, peer, dir), series)| {
                let l: Labels = vec![
                    ("interface", interface.clone()),
                    ("peer", peer.clone()),
                    ("direction", dir.to_string()),
                ];
                (l, series.clone())
            })
            .collect();
    }
    let mut by_iface: BTreeMap<(&str, &str), Series> = BTreeMap::new();
    for ((interface, _, dir), series) in s {
        by_iface.entry((interface, dir)).or_default().merge(series);
    }
    by_iface
        .into_iter()
        .map(|((interface, dir), series)| {
            let l: Labels = vec![
                ("interface", interface.to_owned()),
                ("direction", dir.to_owned()),
            ];
            (l, series)
        })
        .collect()
}

/// The family: [`family_text`] writes it, as prometheus-client would.
const FAMILY: HistogramFamily = HistogramFamily {
    name: "wirescope_tunnel_transit_seconds",
    help: "time between an IP packet on the tunnel interface and its encrypted (tx) or decrypted (rx) WireGuard message on the carrying interface",
    bounds: (FIRST_BOUND_LOG2, LAST_BOUND_LOG2),
};

impl TextFamilies for TransitCollector {
    fn write(&self, format: Format, out: &mut dyn std::fmt::Write) -> std::fmt::Result {
        let s = self.snapshot();
        let series = series(&s, self.per_peer);
        let labels: Vec<Vec<(&str, &str)>> = series
            .iter()
            .map(|(l, _)| l.iter().map(|(k, v)| (*k, v.as_str())).collect())
            .collect();
        family_text::write_family(
            out,
            format,
            FAMILY,
            labels
                .iter()
                .map(Vec::as_slice)
                .zip(series.iter().map(|(_, s)| s)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(bucket: usize, n: u64, sum_ns: u64) -> Series {
        let mut s = Series::default();
        s.buckets[bucket] = n;
        s.count = n;
        s.sum_ns = sum_ns;
        s
    }

    /// `--peer-histograms off`: one series per (interface, direction), the peers' buckets,
    /// counts and sums added, no `peer` label; on: the snapshot as it is.
    #[test]
    fn per_interface_series_sum_the_peers() {
        let mut s = Snapshot::new();
        s.insert(("wg0".into(), "A".into(), "tx"), obs(12, 3, 9_000));
        s.insert(("wg0".into(), "B".into(), "tx"), obs(12, 2, 5_000));
        s.insert(("wg0".into(), "B".into(), "rx"), obs(14, 1, 20_000));
        s.insert(("wg1".into(), "C".into(), "tx"), obs(11, 4, 8_000));
        assert_eq!(series(&s, true).len(), 4);
        let agg = series(&s, false);
        let labels: Vec<&Labels> = agg.iter().map(|(l, _)| l).collect();
        assert_eq!(
            labels,
            [
                &vec![
                    ("interface", "wg0".to_owned()),
                    ("direction", "rx".to_owned())
                ],
                &vec![
                    ("interface", "wg0".to_owned()),
                    ("direction", "tx".to_owned())
                ],
                &vec![
                    ("interface", "wg1".to_owned()),
                    ("direction", "tx".to_owned())
                ],
            ]
        );
        let wg0_tx = &agg[1].1;
        assert_eq!(
            (wg0_tx.count, wg0_tx.sum_ns, wg0_tx.buckets[12]),
            (5, 14_000, 5)
        );
        assert_eq!((agg[0].1.count, agg[2].1.count), (1, 4));
    }
}
