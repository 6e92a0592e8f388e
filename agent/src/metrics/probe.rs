//! Active probes and path MTU: `wirescope_probe_rtt_seconds` (histogram),
//! `wirescope_probe_sent_total`, `wirescope_probe_lost_total` per (target, interface; empty
//! when the probe is not bound to one), `wirescope_path_mtu_bytes{target,interface}` and
//! `wirescope_recommended_mtu_bytes{interface}` with `wirescope_recommended_mtu_info{interface,method}`
//! (how it was measured), read from [`ProbeStats`] and [`PmtuState`]
//! on every scrape. A probe target's series exist from its first probe on and stay; a path
//! MTU exists while its target is in the set and the last search reached it.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use crate::{
    metrics::{Labels, encode_counters, encode_gauges},
    probes::icmp::{ProbeStats, TargetKey},
    probes::pmtu::PmtuState,
};

#[derive(Debug)]
pub struct ProbeCollector {
    probes: Arc<ProbeStats>,
    pmtu: Arc<PmtuState>,
}

impl ProbeCollector {
    pub fn new(probes: Arc<ProbeStats>, pmtu: Arc<PmtuState>) -> Self {
        Self { probes, pmtu }
    }
}

fn labels((target, iface): &TargetKey) -> Labels {
    vec![("target", target.to_string()), ("interface", iface.clone())]
}

impl Collector for ProbeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let probes = self.probes.snapshot();
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_probe_rtt_seconds",
                "echo round trips of the active probes (ICMP echo through the target's interface)",
                None,
                MetricType::Histogram,
            )?;
            for (k, s) in &probes {
                fam.encode_family(&labels(k))?
                    .encode_histogram::<NoLabelSet>(
                        s.rtt_sum,
                        s.replies,
                        &s.encoder_buckets(),
                        None,
                    )?;
            }
        }
        encode_counters(
            &mut encoder,
            "wirescope_probe_sent",
            "probes sent",
            probes.iter().map(|(k, s)| (labels(k), s.sent)),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_probe_lost",
            "probes without a reply in time",
            probes.iter().map(|(k, s)| (labels(k), s.lost)),
        )?;
        let m = self.pmtu.snapshot();
        encode_gauges(
            &mut encoder,
            "wirescope_path_mtu_bytes",
            "largest don't-fragment probe (IP packet bytes) that got through",
            m.path.iter().map(|((target, iface), v)| {
                let l: Labels = vec![("target", target.clone()), ("interface", iface.clone())];
                (l, i64::from(*v))
            }),
        )?;
        encode_gauges(
            &mut encoder,
            "wirescope_recommended_mtu_bytes",
            "the tunnel MTU that avoids fragmentation on the measured path: path MTU to the hop-1 endpoint minus 20/40 + 8 + 32 bytes per WireGuard layer; \
             the path MTU from a don't-fragment echo search to the endpoint through the underlay, or where that gets no reply (a firewall such as the Mullvad app's) \
             from an in-tunnel echo search whose WireGuard carrier was seen unfragmented: wirescope_recommended_mtu_info{method} says which",
            m.recommended.iter().map(|(iface, v)| {
                let l: Labels = vec![("interface", iface.clone())];
                (l, i64::from(*v))
            }),
        )?;
        encode_gauges(
            &mut encoder,
            "wirescope_recommended_mtu_info",
            "1 per tunnel with a recommended MTU; method: underlay_echo (echo search to the hop-1 endpoint), \
             tunnel_echo (in-tunnel search, carrier unfragmented; exact to the 16 bytes WireGuard pads to, rounded down), \
             tunnel_echo_icmp (the same, narrowed to the MTU an ICMP too-big reported during it)",
            m.method.iter().map(|(iface, method)| {
                let l: Labels = vec![
                    ("interface", iface.clone()),
                    ("method", method.as_str().to_string()),
                ];
                (l, 1)
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::metrics::{Format, encode_string};

    #[test]
    fn nothing_measured_no_series() {
        let mut r = Registry::default();
        r.register_collector(Box::new(ProbeCollector::new(
            Arc::new(ProbeStats::new()),
            Arc::new(PmtuState::new()),
        )));
        let text = encode_string(&r, Format::Prometheus).unwrap();
        for line in text.lines() {
            assert!(line.starts_with('#'), "{line}");
        }
        assert!(text.contains("# TYPE wirescope_probe_rtt_seconds histogram"));
        assert!(text.contains("# TYPE wirescope_path_mtu_bytes gauge"));
        assert!(text.contains("# TYPE wirescope_recommended_mtu_bytes gauge"));
        assert!(text.contains("# TYPE wirescope_recommended_mtu_info gauge"));
        assert!(text.contains("# TYPE wirescope_probe_sent_total counter"));
        assert!(text.contains("# TYPE wirescope_probe_lost_total counter"));
    }
}
