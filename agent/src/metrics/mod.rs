//! Prometheus collectors. Each one reads the agent's state on every scrape (prometheus-client's
//! `Collector`; the transit histograms through [`family_text`], which writes the same text
//! faster), so a series exists exactly while what it describes does: nothing to expire,
//! nothing stale.
//!
//! This module also picks the exposition format for a scrape and encodes a registry in it.

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

pub mod agent;
pub mod crypto;
pub mod drops;
pub mod failover;
pub mod family_text;
pub mod health;
pub mod leak;
pub mod mullvad;
pub mod obfuscation;
pub mod path;
pub mod peers;
pub mod probe;
pub mod process;
pub mod transit;
pub mod tunnel;
pub mod wire;

/// The exposition formats /metrics answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
    /// Prometheus text format 0.0.4, for scrapers that do not ask for OpenMetrics.
    Prometheus,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }

    /// Chooses from an Accept header: OpenMetrics when the client accepts it at least as
    /// much as plain text, Prometheus text otherwise. No header or a bare `*/*` (curl, a
    /// browser) gets plain text, as Go exporters do.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let mut best_om: f32 = 0.0;
        let mut best_text: f32 = 0.0;
        for item in accept.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q: f32 = 1.0;
            let mut version: Option<String> = None;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        // An unparsable q counts as 0: ignore what we cannot read.
                        "q" => q = v.trim().parse().unwrap_or(0.0),
                        "version" => version = Some(v.trim().to_owned()),
                        _ => {}
                    }
                }
            }
            match media.as_str() {
                // 0.0.1 and 1.0.0 are the same text format as far as what we emit goes.
                "application/openmetrics-text"
                    if version
                        .as_deref()
                        .is_none_or(|v| v == "1.0.0" || v == "0.0.1") =>
                {
                    best_om = best_om.max(q);
                }
                "text/plain" | "*/*" | "text/*" => best_text = best_text.max(q),
                _ => {}
            }
        }
        if best_om > 0.0 && best_om >= best_text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

/// Encodes everything in `registry` in `format`.
pub fn encode(
    registry: &Registry,
    format: Format,
    mut out: &mut dyn std::fmt::Write,
) -> Result<(), std::fmt::Error> {
    match format {
        // Ends with the mandatory `# EOF`.
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry),
        // prometheus-client's own 0.0.4 encoder: counters' HELP/TYPE named `x_total`,
        // info as gauge, no `# UNIT`, no `# EOF`.
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        }
    }
}

/// `own` families (written as text by their own writers, see [`family_text`]), then
/// what [`encode`] writes. First, because the registry's last collector, the map-usage
/// gauge, counts the maps the others have read in this scrape from those reads
/// ([`crate::datapath::maps::scrape`]); OpenMetrics' `# EOF` stays last.
pub fn encode_with(
    registry: &Registry,
    own: &[&dyn family_text::TextFamilies],
    format: Format,
    out: &mut dyn std::fmt::Write,
) -> Result<(), std::fmt::Error> {
    for f in own {
        f.write(format, out)?;
    }
    encode(registry, format, out)
}

/// [`encode`] into a new string.
pub fn encode_string(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    encode(registry, format, &mut out)?;
    Ok(out)
}

/// Encodes one counter family. `name` is without `_total` (the encoder adds it); samples
/// are (labels, value), e.g. `vec![("interface", "wg0".to_string())]`.
pub fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one gauge family, like [`encode_counters`].
pub fn encode_gauges<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A label set built at scrape time: (name, value) pairs in exposition order.
pub type Labels = Vec<(&'static str, String)>;

/// The `direction` label of a `DIR_RX`/`DIR_TX`.
pub fn direction(dir: u8) -> &'static str {
    if dir == agent_common::maps::DIR_TX {
        "tx"
    } else {
        "rx"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let prometheus_3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
            application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,\
            text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        let prometheus_2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
            text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let cases = [
            (None, Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain"), Format::Prometheus),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("application/openmetrics-text; version=1.0.0"),
                Format::OpenMetrics,
            ),
            (
                Some("Application/OpenMetrics-Text;Version=1.0.0"),
                Format::OpenMetrics,
            ),
            (
                Some("application/openmetrics-text; version=2.0.0"),
                Format::Prometheus,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
            (
                Some("application/openmetrics-text;q=0.2, text/plain;q=0.9"),
                Format::Prometheus,
            ),
            (
                Some("text/plain;q=0.5, application/openmetrics-text;q=0.5"),
                Format::OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=bogus"),
                Format::Prometheus,
            ),
            (Some(prometheus_3), Format::OpenMetrics),
            (Some(prometheus_2), Format::OpenMetrics),
            (
                Some("text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
                Format::Prometheus,
            ),
            (Some(""), Format::Prometheus),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[derive(Debug)]
    struct Fixed;

    impl prometheus_client::collector::Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let l = |v: &str| -> Labels {
                vec![("interface", v.to_owned()), ("note", "a \"q\"\\\n".into())]
            };
            encode_counters(
                &mut enc,
                "demo_bytes",
                "Bytes.",
                [(l("wg0"), 5u64), (l("wg1"), 0)],
            )?;
            encode_gauges(
                &mut enc,
                "demo_seconds",
                "Seconds.",
                [(l("wg0"), 1_700_000_000u64)],
            )?;
            encode_gauges(
                &mut enc,
                "demo_empty",
                "Nothing.",
                Vec::<(Labels, i64)>::new(),
            )
        }
    }

    #[test]
    fn both_formats() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed));
        let om = encode_string(&registry, Format::OpenMetrics).unwrap();
        assert_eq!(
            om,
            "# HELP demo_bytes Bytes.\n\
             # TYPE demo_bytes counter\n\
             demo_bytes_total{interface=\"wg0\",note=\"a \\\"q\\\"\\\\\\n\"} 5\n\
             demo_bytes_total{interface=\"wg1\",note=\"a \\\"q\\\"\\\\\\n\"} 0\n\
             # HELP demo_seconds Seconds.\n\
             # TYPE demo_seconds gauge\n\
             demo_seconds{interface=\"wg0\",note=\"a \\\"q\\\"\\\\\\n\"} 1700000000\n\
             # HELP demo_empty Nothing.\n\
             # TYPE demo_empty gauge\n\
             # EOF\n"
        );
        let text = encode_string(&registry, Format::Prometheus).unwrap();
        assert_eq!(
            text,
            "# HELP demo_bytes_total Bytes.\n\
             # TYPE demo_bytes_total counter\n\
             demo_bytes_total{interface=\"wg0\",note=\"a \\\"q\\\"\\\\\\n\"} 5\n\
             demo_bytes_total{interface=\"wg1\",note=\"a \\\"q\\\"\\\\\\n\"} 0\n\
             # HELP demo_seconds Seconds.\n\
             # TYPE demo_seconds gauge\n\
             demo_seconds{interface=\"wg0\",note=\"a \\\"q\\\"\\\\\\n\"} 1700000000\n\
             # HELP demo_empty Nothing.\n\
             # TYPE demo_empty gauge\n"
        );
    }
}
