//! The standard `process_*` metrics every Prometheus client library exports (CPU seconds,
//! resident and virtual memory, open and maximum file descriptors, threads, start time),
//! read from /proc by the metrics-process crate on every scrape, so dashboards and alerts
//! written for any exporter's own cost work on the agent too.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

#[derive(Debug, Default)]
pub struct ProcessCollector;

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Option<f64>,
) -> Result<(), std::fmt::Error> {
    // A value /proc did not give is left out, as client_golang does.
    let Some(v) = value else {
        return Ok(());
    };
    let fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(fam)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = metrics_process::collector::collect();
        if let Some(cpu) = m.cpu_seconds_total {
            let fam = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(fam)?;
        }
        let f = |v: Option<u64>| v.map(|v| v as f64);
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            f(m.open_fds),
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            f(m.max_fds),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            f(m.virtual_memory_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_max_bytes",
            "Maximum amount of virtual memory available in bytes.",
            f(m.virtual_memory_max_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            f(m.resident_memory_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            f(m.start_time_seconds),
        )?;
        gauge(
            &mut encoder,
            "process_threads",
            "Number of OS threads in the process.",
            f(m.threads),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::metrics::{Format, encode_string};

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Every family, in both formats; the values that can be derived here exactly are.
    #[test]
    fn process_metrics_of_this_process() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        // Some CPU time (clock ticks are 10 ms) for the counter to be above 0.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        for format in [Format::OpenMetrics, Format::Prometheus] {
            let text = encode_string(&registry, format).expect("encodes");
            let type_line = match format {
                Format::OpenMetrics => "# TYPE process_cpu_seconds counter",
                Format::Prometheus => "# TYPE process_cpu_seconds_total counter",
            };
            assert!(text.contains(type_line), "{text}");
            assert!(value(&text, "process_cpu_seconds_total") > 0.0);
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid pointer to an rlimit.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
            assert_eq!(value(&text, "process_max_fds"), lim.rlim_cur as f64);
            assert!(value(&text, "process_resident_memory_bytes") > 0.0);
            assert!(
                value(&text, "process_virtual_memory_bytes")
                    >= value(&text, "process_resident_memory_bytes")
            );
            assert!(value(&text, "process_threads") >= 1.0);
            assert!(value(&text, "process_open_fds") >= 3.0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs_f64();
            let start = value(&text, "process_start_time_seconds");
            assert!(start <= now && start > now - 3600.0, "{start} vs {now}");
        }
    }
}
