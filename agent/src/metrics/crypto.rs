//! `wirescope_crypto_seconds`: kernel WireGuard's encryption (tx) and decryption (rx) time
//! per packet, from the kprobe histogram. Absent where the probes are not attached.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use agent_common::maps::HIST_MAX_BUCKET;
use log::warn;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use crate::{datapath::Datapath, inventory::Inventory, metrics::datapath::direction};

/// Exported bucket bounds: 2^8 ns (256 ns) to 2^26 ns (67 ms), doubling.
const FIRST_BOUND_LOG2: u8 = 8;
const LAST_BOUND_LOG2: u8 = 26;

#[derive(Debug)]
pub struct CryptoCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
}

impl CryptoCollector {
    pub fn new(datapath: Arc<Mutex<Datapath>>, inventory: Arc<RwLock<Inventory>>) -> Self {
        Self {
            datapath,
            inventory,
        }
    }
}

/// One series: counts per log2 bucket, total count, total ns.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub buckets: [u64; HIST_MAX_BUCKET as usize + 1],
    pub count: u64,
    pub sum_ns: u64,
}

impl Default for Series {
    fn default() -> Self {
        Self {
            buckets: [0; HIST_MAX_BUCKET as usize + 1],
            count: 0,
            sum_ns: 0,
        }
    }
}

impl Series {
    /// Cumulative (le, count) pairs for the exported bounds. A duration in log2 bucket b
    /// lies in [2^b, 2^(b+1)) ns, so it counts under every bound >= 2^(b+1).
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        self.cumulative_between(FIRST_BOUND_LOG2, LAST_BOUND_LOG2)
    }

    /// The same for bounds 2^first .. 2^last ns.
    pub fn cumulative_between(&self, first: u8, last: u8) -> Vec<(f64, u64)> {
        (first..=last.min(HIST_MAX_BUCKET))
            .map(|k| {
                let n: u64 = self.buckets[..k as usize].iter().sum();
                ((1u64 << k) as f64 / 1e9, n)
            })
            .collect()
    }
}

impl Collector for CryptoCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hist = match self.datapath.lock() {
            Ok(dp) if dp.crypto_attached() => dp.crypto_hist().unwrap_or_else(|e| {
                warn!("reading the crypto histogram: {e}");
                Vec::new()
            }),
            _ => return Ok(()),
        };
        let names = self
            .inventory
            .read()
            .map(|i| i.iface_names.clone())
            .unwrap_or_default();
        let mut series: BTreeMap<(String, &'static str), Series> = BTreeMap::new();
        for (k, v) in hist {
            let iface = names
                .get(&k.ifindex)
                .cloned()
                .unwrap_or_else(|| format!("ifindex{}", k.ifindex));
            let s = series.entry((iface, direction(k.dir))).or_default();
            if let Some(b) = s.buckets.get_mut(k.bucket as usize) {
                *b += v.count;
            }
            s.count += v.count;
            s.sum_ns += v.sum_ns;
        }
        let mut fam = encoder.encode_descriptor(
            "wirescope_crypto_seconds",
            "kernel WireGuard's encryption (tx) and decryption (rx) time per packet, from kprobes",
            None,
            MetricType::Histogram,
        )?;
        for ((iface, dir), s) in &series {
            let labels = [("interface", iface.as_str()), ("direction", *dir)];
            fam.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                s.sum_ns as f64 / 1e9,
                s.count,
                &s.cumulative(),
                None,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_buckets_are_exact() {
        let mut s = Series::default();
        s.buckets[9] = 3; // 512..1023 ns: under le=1024 ns and above
        s.buckets[12] = 2; // 4096..8191 ns
        s.buckets[30] = 1; // ~1 s: only in +Inf
        s.count = 6;
        let c = s.cumulative();
        assert_eq!(c.first(), Some(&(256e-9, 0)));
        let le = |ns: u64| {
            c.iter()
                .find(|(b, _)| (*b - ns as f64 / 1e9).abs() < 1e-15)
                .map(|x| x.1)
        };
        assert_eq!(le(512), Some(0));
        assert_eq!(le(1024), Some(3));
        assert_eq!(le(4096), Some(3));
        assert_eq!(le(8192), Some(5));
        assert_eq!(c.last().map(|x| x.1), Some(5));
    }
}
