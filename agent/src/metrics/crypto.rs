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
    encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

use crate::{datapath::Datapath, metrics::direction, sync::inventory::Inventory};

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

/// Writes each (labels, series) of a histogram family, with the bounds 2^first to 2^last
/// ns.
pub fn encode_histograms<'a, L: EncodeLabelSet + 'a>(
    fam: &mut MetricEncoder,
    (first, last): (u8, u8),
    series: impl IntoIterator<Item = (&'a L, &'a Series)>,
) -> Result<(), std::fmt::Error> {
    for (labels, s) in series {
        fam.encode_family(labels)?.encode_histogram::<NoLabelSet>(
            s.sum_ns as f64 / 1e9,
            s.count,
            &s.encoder_buckets(first, last),
            None,
        )?;
    }
    Ok(())
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
    /// `count` observations in log2 bucket `bucket` (out-of-range buckets count in the
    /// total only), adding up to `sum_ns`.
    pub fn add(&mut self, bucket: u32, count: u64, sum_ns: u64) {
        if let Some(b) = self.buckets.get_mut(bucket as usize) {
            *b += count;
        }
        self.count += count;
        self.sum_ns += sum_ns;
    }

    /// Adds `other`'s observations (a histogram summed over label sets).
    pub fn merge(&mut self, other: &Series) {
        for (b, o) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *b += o;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
    }

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

    /// What prometheus-client's `encode_histogram` takes: per-bound counts (it sums them up
    /// itself) ending with +Inf, so both exposition formats get cumulative buckets and an
    /// +Inf bucket equal to the count.
    pub fn encoder_buckets(&self, first: u8, last: u8) -> Vec<(f64, u64)> {
        let cumulative = self.cumulative_between(first, last);
        let mut out = Vec::with_capacity(cumulative.len() + 1);
        let mut prev = 0;
        for (le, n) in cumulative {
            out.push((le, n - prev));
            prev = n;
        }
        out.push((f64::INFINITY, self.count.saturating_sub(prev)));
        out
    }
}

impl Collector for CryptoCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hist = match self.datapath.lock() {
            Ok(dp) if dp.crypto.attached() => dp.crypto.hist().unwrap_or_else(|e| {
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
            series.entry((iface, direction(k.dir))).or_default().add(
                k.bucket.into(),
                v.count,
                v.sum_ns,
            );
        }
        let mut fam = encoder.encode_descriptor(
            "wirescope_crypto_seconds",
            "kernel WireGuard's encryption (tx) and decryption (rx) time per packet, from kprobes",
            None,
            MetricType::Histogram,
        )?;
        let labeled: Vec<_> = series
            .iter()
            .map(|((iface, dir), s)| ([("interface", iface.as_str()), ("direction", *dir)], s))
            .collect();
        encode_histograms(
            &mut fam,
            (FIRST_BOUND_LOG2, LAST_BOUND_LOG2),
            labeled.iter().map(|(l, s)| (l, *s)),
        )
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
        // The encoder sums per-bound counts itself: differences, then +Inf.
        let e = s.encoder_buckets(FIRST_BOUND_LOG2, LAST_BOUND_LOG2);
        assert_eq!(e.iter().map(|x| x.1).sum::<u64>(), 6);
        assert_eq!(e.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(e.iter().find(|x| x.0 == 1024e-9).map(|x| x.1), Some(3));
        assert_eq!(e.iter().find(|x| x.0 == 8192e-9).map(|x| x.1), Some(2));
    }

    /// Both exposition formats: cumulative buckets, +Inf once and equal to the count.
    #[test]
    fn exposition_is_a_valid_histogram() {
        #[derive(Debug)]
        struct One(Series);
        impl Collector for One {
            fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                let mut fam =
                    enc.encode_descriptor("h_seconds", "h", None, MetricType::Histogram)?;
                fam.encode_family(&[("a", "b")])?
                    .encode_histogram::<NoLabelSet>(
                        self.0.sum_ns as f64 / 1e9,
                        self.0.count,
                        &self.0.encoder_buckets(8, 10),
                        None,
                    )
            }
        }
        let mut s = Series::default();
        s.buckets[8] = 2; // 256..511 ns: le 512
        s.buckets[20] = 1; // only +Inf
        s.count = 3;
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(One(s)));
        for format in [
            crate::metrics::Format::Prometheus,
            crate::metrics::Format::OpenMetrics,
        ] {
            let text = crate::metrics::encode_string(&r, format).unwrap();
            let buckets: Vec<&str> = text.lines().filter(|l| l.contains("_bucket")).collect();
            assert_eq!(buckets.len(), 4, "{text}");
            assert!(
                buckets[0].ends_with(" 0") && buckets[1].ends_with(" 2"),
                "{text}"
            );
            assert!(buckets[2].ends_with(" 2"), "{text}");
            assert!(
                buckets[3].contains("+Inf") && buckets[3].ends_with(" 3"),
                "{text}"
            );
        }
    }
}
