//! `wirescope_path_healthy` and `wirescope_failover_total`, from the failover state.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::{
    metrics::encode_counters,
    probes::failover::{Failover, Outcomes},
};

#[derive(Debug)]
pub struct FailoverCollector {
    state: Arc<Mutex<Failover>>,
    outcomes: Outcomes,
}

impl FailoverCollector {
    pub fn new(state: Arc<Mutex<Failover>>, outcomes: Outcomes) -> Self {
        Self { state, outcomes }
    }
}

impl Collector for FailoverCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let states = self.state.lock().map(|s| s.states()).unwrap_or_default();
        {
            let mut fam = encoder.encode_descriptor(
                "wirescope_path_healthy",
                "1 while latency, loss and handshake age are within the failover thresholds",
                None,
                MetricType::Gauge,
            )?;
            for (interface, peer, healthy) in states {
                let labels = [("interface", interface), ("peer", peer)];
                ConstGauge::new(i64::from(healthy)).encode(fam.encode_family(&labels)?)?;
            }
        }
        let outcomes = self.outcomes.lock().map(|o| o.clone()).unwrap_or_default();
        // Both results of the configured action from the start, so rates are 0, not absent.
        encode_counters(
            &mut encoder,
            "wirescope_failover",
            "failover actions run, with result ok or failed",
            outcomes.into_iter().map(|((action, result), n)| {
                (
                    vec![
                        ("action", action.to_string()),
                        ("result", result.to_string()),
                    ],
                    n,
                )
            }),
        )
    }
}
