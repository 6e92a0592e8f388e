//! Wire health, passive: `wirescope_handshake_rtt_seconds`, `wirescope_handshake_timeouts_total`,
//! `wirescope_rx_counter_gaps_total`, `wirescope_rx_late_packets_total` and
//! `wirescope_rx_implausible_counter_jumps_total`, read from the
//! health maps (and the agent's timeout counts, [`crate::datapath::health`]) on every
//! scrape, summed by label set. With `--peer-histograms off` the round-trip histogram is
//! per interface (no `peer` label); the counters stay per peer.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use agent_common::maps::health::seq;
use log::warn;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use crate::{
    datapath::Datapath,
    metrics::{
        Labels,
        crypto::{Series, encode_histograms},
        encode_counters,
    },
    sync::inventory::Inventory,
};

/// Exported round-trip bounds: 2^14 ns (16 us) to 2^33 ns (8.6 s), doubling. Round trips
/// above 5 s are timeouts, never observed.
const FIRST_BOUND_LOG2: u8 = 14;
const LAST_BOUND_LOG2: u8 = 33;

#[derive(Debug)]
pub struct HealthCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
    /// `--peer-histograms`: a round-trip series per peer, or per interface.
    per_peer: bool,
}

impl HealthCollector {
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
}

/// The exported round-trip series: per (interface, peer), or summed per interface.
pub fn rtt_series(rtt: &BTreeMap<Key, Series>, per_peer: bool) -> Vec<(Labels, Series)> {
    if per_peer {
        return rtt.iter().map(|(k, s)| (labels(k), s.clone())).collect();
    }
    let mut by_iface: BTreeMap<&str, Series> = BTreeMap::new();
    for ((interface, _), s) in rtt {
        by_iface.entry(interface).or_default().merge(s);
    }
    by_iface
        .into_iter()
        .map(|(i, s)| (vec![("interface", i.to_owned())], s))
        .collect()
}

type Key = (String, String);

/// Every family's series, by (interface, peer).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub rtt: BTreeMap<Key, Series>,
    pub timeouts: BTreeMap<Key, u64>,
    pub gaps: BTreeMap<Key, u64>,
    pub late: BTreeMap<Key, u64>,
    /// Counter jumps past seq::MAX_PLAUSIBLE_GAP (forged or corrupt messages).
    pub implausible: BTreeMap<Key, u64>,
}

impl HealthCollector {
    pub fn snapshot(&self) -> Snapshot {
        let (rtt, seqs, timeouts) = {
            let Ok(dp) = self.datapath.lock() else {
                return Snapshot::default();
            };
            let rtt = dp.health.handshake_rtt().unwrap_or_else(|e| {
                warn!("reading handshake round trips: {e}");
                Vec::new()
            });
            let seqs = dp.health.rx_seq().unwrap_or_else(|e| {
                warn!("reading counter gaps: {e}");
                Vec::new()
            });
            (rtt, seqs, dp.health.handshake_timeouts())
        };
        let Ok(inv) = self.inventory.read() else {
            return Snapshot::default();
        };
        let iface = |i: u32| inv.iface_name(i);
        let peer = |p: u32| inv.peer_label(p);
        let mut s = Snapshot::default();
        for (k, v) in rtt {
            let Some(p) = peer(k.peer) else { continue };
            s.rtt
                .entry((iface(k.ifindex), p))
                .or_default()
                .add(k.bucket.into(), v.count, v.sum_ns);
        }
        // Every peer with a round trip has a timeout series, at 0 when none timed out.
        for k in s.rtt.keys() {
            s.timeouts.entry(k.clone()).or_default();
        }
        for ((ifindex, p), n) in timeouts {
            let Some(p) = peer(p) else { continue };
            *s.timeouts.entry((iface(ifindex), p)).or_default() += n;
        }
        for (k, c) in seqs {
            let Some(p) = peer(k.peer) else { continue };
            let map = match k.kind {
                seq::GAPS => &mut s.gaps,
                seq::LATE => &mut s.late,
                seq::IMPLAUSIBLE => &mut s.implausible,
                _ => continue,
            };
            *map.entry((iface(k.ifindex), p)).or_default() += c.packets;
        }
        // Every tracked session's peer has the series, at 0 when nothing implausible came.
        for k in s.gaps.keys() {
            s.implausible.entry(k.clone()).or_default();
        }
        s
    }
}

fn labels((interface, peer): &Key) -> Labels {
    vec![("interface", interface.clone()), ("peer", peer.clone())]
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_handshake_rtt_seconds",
                "from a handshake initiation leaving to the matching response arriving (matched by sender index)",
                None,
                MetricType::Histogram,
            )?;
            let rtt = rtt_series(&s.rtt, self.per_peer);
            encode_histograms(
                &mut fam,
                (FIRST_BOUND_LOG2, LAST_BOUND_LOG2),
                rtt.iter().map(|(l, s)| (l, s)),
            )?;
        }
        encode_counters(
            &mut encoder,
            "wirescope_handshake_timeouts",
            "initiations sent that got no response within 5 s",
            s.timeouts.iter().map(|(k, n)| (labels(k), *n)),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_rx_counter_gaps",
            "messages skipped in the peer's counter (nonce) sequence, per session",
            s.gaps.iter().map(|(k, n)| (labels(k), *n)),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_rx_late_packets",
            "messages that arrived with a counter below the highest already seen (reordered or duplicated)",
            s.late.iter().map(|(k, n)| (labels(k), *n)),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_rx_implausible_counter_jumps",
            "data messages whose counter was more than 2^24 past the highest seen: forged (the \
             receiver index is not secret) or corrupt; WireGuard drops them, and they are \
             neither counted as gaps nor followed",
            s.implausible.iter().map(|(k, n)| (labels(k), *n)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--peer-histograms off`: the round trips of an interface's peers in one series
    /// labelled by the interface alone.
    #[test]
    fn per_interface_round_trips_sum_the_peers() {
        let mut rtt = BTreeMap::new();
        let mut a = Series::default();
        a.buckets[20] = 2;
        a.count = 2;
        a.sum_ns = 3_000_000;
        let mut b = Series::default();
        b.buckets[22] = 1;
        b.count = 1;
        b.sum_ns = 5_000_000;
        rtt.insert(("wg0".to_owned(), "A".to_owned()), a.clone());
        rtt.insert(("wg0".to_owned(), "B".to_owned()), b);
        rtt.insert(("wg1".to_owned(), "C".to_owned()), a);
        assert_eq!(rtt_series(&rtt, true).len(), 3);
        let agg = rtt_series(&rtt, false);
        assert_eq!(agg.len(), 2);
        assert_eq!(agg[0].0, vec![("interface", "wg0".to_owned())]);
        let s = &agg[0].1;
        assert_eq!(
            (s.count, s.sum_ns, s.buckets[20], s.buckets[22]),
            (3, 8_000_000, 2, 1)
        );
        assert_eq!(agg[1].0, vec![("interface", "wg1".to_owned())]);
        assert_eq!(agg[1].1.count, 2);
    }
}
