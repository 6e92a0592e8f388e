//! The agent about itself: build, attachments, kernel features, BPF maps and run statistics.
//!
//! Counter families are named without `_total`, which the encoder appends: the exposed names
//! are `wirescope_bpf_map_update_errors_total`, `wirescope_bpf_runs_total` and
//! `wirescope_bpf_run_seconds_total`, `wirescope_source_errors_total` and
//! `wirescope_peer_sync_rounds_total`.

use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{datapath::Datapath, datapath::features::Features, sync::inventory::Inventory};

#[derive(Debug)]
pub struct AgentCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
    features: Arc<RwLock<Features>>,
}

impl AgentCollector {
    pub fn new(
        datapath: Arc<Mutex<Datapath>>,
        inventory: Arc<RwLock<Inventory>>,
        features: Arc<RwLock<Features>>,
    ) -> Self {
        Self {
            datapath,
            inventory,
            features,
        }
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let features = self.features.read().map(|f| f.clone()).unwrap_or_default();
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_build_info",
                "wirescope's version and the running kernel",
                None,
                MetricType::Gauge,
            )?;
            let labels = [
                ("version", env!("CARGO_PKG_VERSION")),
                ("kernel", features.kernel.as_str()),
            ];
            ConstGauge::new(1i64).encode(fam.encode_family(&labels)?)?;
        }
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_feature_available",
                "1 when this kernel offers the feature",
                None,
                MetricType::Gauge,
            )?;
            for (name, on) in features.as_pairs() {
                ConstGauge::new(on as i64).encode(fam.encode_family(&[("feature", name)])?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_source_errors",
                "failed reads of a state source (WireGuard UAPI socket or netlink, rtnetlink, \
                 the Mullvad CLI): malformed, too large, slow or refused; the rest keeps flowing",
                None,
                MetricType::Counter,
            )?;
            for (source, n) in crate::sources::errors::snapshot() {
                ConstCounter::new(n).encode(fam.encode_family(&[("source", source)])?)?;
            }
        }
        let sync_duration = self.inventory.read().ok().and_then(|i| i.sync_duration);
        if let Some(d) = sync_duration {
            let mut fam = encoder.encode_descriptor(
                "wirescope_peer_sync_duration_seconds",
                "how long the last sync round took: interfaces, peers from the control \
                 interfaces, routes and the BPF peer maps",
                None,
                MetricType::Gauge,
            )?;
            let no_labels: [(&str, &str); 0] = [];
            ConstGauge::new(d.as_secs_f64()).encode(fam.encode_family(&no_labels)?)?;
        }
        let (interval, (written, unchanged)) = self
            .inventory
            .read()
            .map(|i| (i.sync_interval, i.sync_rounds))
            .unwrap_or_default();
        if let Some(d) = interval {
            let mut fam = encoder.encode_descriptor(
                "wirescope_peer_sync_interval_seconds",
                "the period of the sync rounds: 1 s below 10,000 peers, a second more per \
                 10,000 more, at most 3 s",
                None,
                MetricType::Gauge,
            )?;
            let no_labels: [(&str, &str); 0] = [];
            ConstGauge::new(d.as_secs_f64()).encode(fam.encode_family(&no_labels)?)?;
        }
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_peer_sync_rounds",
                "sync rounds by what they did with the BPF peer maps: written (something that \
                 goes into them changed, or the first round) or unchanged (only counters and \
                 handshake times did: nothing rebuilt, written or compared)",
                None,
                MetricType::Counter,
            )?;
            for (maps, n) in [("written", written), ("unchanged", unchanged)] {
                ConstCounter::new(n).encode(fam.encode_family(&[("maps", maps)])?)?;
            }
        }
        let Ok(dp) = self.datapath.lock() else {
            return Ok(());
        };
        {
            let tunnels: Vec<u32> = self
                .inventory
                .read()
                .map(|i| i.tunnels.iter().map(|t| t.ifindex).collect())
                .unwrap_or_default();
            let mut fam = encoder.encode_descriptor(
                "wirescope_attach_info",
                "TC attachments: role tunnel or underlay, mode tcx or clsact",
                None,
                MetricType::Gauge,
            )?;
            let mut rows: Vec<_> = dp
                .attachments()
                .map(|(i, a)| {
                    let role = if tunnels.contains(i)
                        || a.config.flags & agent_common::maps::IfaceConfig::TUNNEL != 0
                    {
                        "tunnel"
                    } else {
                        "underlay"
                    };
                    (a.name.clone(), role, a.mode.as_str())
                })
                .collect();
            rows.sort();
            for (name, role, mode) in &rows {
                for dir in ["rx", "tx"] {
                    let labels = [
                        ("interface", name.as_str()),
                        ("role", role),
                        ("direction", dir),
                        ("mode", mode),
                    ];
                    ConstGauge::new(1i64).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        let usage = dp.map_usage();
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_bpf_map_entries",
                "entries in each BPF map",
                None,
                MetricType::Gauge,
            )?;
            for (map, n, _) in &usage {
                ConstGauge::new(*n as i64).encode(fam.encode_family(&[("map", *map)])?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_bpf_map_capacity",
                "capacity of each BPF map",
                None,
                MetricType::Gauge,
            )?;
            for (map, _, cap) in &usage {
                ConstGauge::new(*cap as i64).encode(fam.encode_family(&[("map", *map)])?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_bpf_map_update_errors",
                "map updates the kernel refused (map full or busy): counts that were lost",
                None,
                MetricType::Counter,
            )?;
            for (map, n) in dp.map_update_errors() {
                ConstCounter::new(n).encode(fam.encode_family(&[("map", map)])?)?;
            }
        }
        let stats = dp.run_stats();
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_bpf_runs",
                "program runs, from the kernel's BPF statistics (kernel.bpf_stats_enabled=1)",
                None,
                MetricType::Counter,
            )?;
            for (prog, runs, _) in &stats {
                ConstCounter::new(*runs).encode(fam.encode_family(&[("program", *prog)])?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_bpf_run_seconds",
                "time spent in the programs, from the kernel's BPF statistics",
                None,
                MetricType::Counter,
            )?;
            for (prog, _, t) in &stats {
                ConstCounter::new(t.as_secs_f64())
                    .encode(fam.encode_family(&[("program", *prog)])?)?;
            }
        }
        Ok(())
    }
}
