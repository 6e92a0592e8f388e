//! Per-peer histogram families written straight as text, byte for byte what
//! prometheus-client's encoders write, only without their per-line work.
//!
//! A relay's transit histograms are most of its body (2,000 active peers: 100,000 lines of
//! the 200,000), and prometheus-client encodes each bucket line label by label, escaping
//! every value and formatting every bound again: 38 % of the agent's CPU during the churn
//! bench went to that one family. Here a series' labels are escaped once, the bounds are
//! formatted once per scrape, and each line is a few appends.
//!
//! What prometheus-client writes besides the samples (the descriptor lines, each bound's `le`
//! value) is taken from prometheus-client itself, from a one-series family rendered through
//! it at every scrape ([`Template`]), so the two stay the same text; the tests compare whole
//! families in both formats. These families are written after the registry's
//! ([`super::encode_with`]): exposition order means nothing to a scraper.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use super::{Format, crypto::Series};

/// Something that writes families as text after the registry's ([`super::encode_with`]).
pub trait TextFamilies: Send + Sync {
    fn write(&self, format: Format, out: &mut dyn fmt::Write) -> fmt::Result;
}

/// A family of histograms over log2 nanosecond buckets.
#[derive(Clone, Copy, Debug)]
pub struct HistogramFamily {
    pub name: &'static str,
    pub help: &'static str,
    /// Bounds 2^first .. 2^last ns (seconds in the text), then +Inf.
    pub bounds: (u8, u8),
}

/// The family's text apart from the samples, as prometheus-client writes it in one format.
struct Template {
    /// The descriptor lines (`# HELP`, `# TYPE`, ...), each with its newline.
    header: String,
    /// Each bucket's `le` value, in order, +Inf last.
    le: Vec<String>,
}

/// The family with one series without labels, through prometheus-client.
#[derive(Debug)]
struct One(HistogramFamily);

impl Collector for One {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let f = self.0;
        let mut fam = encoder.encode_descriptor(f.name, f.help, None, MetricType::Histogram)?;
        let (first, last) = f.bounds;
        fam.encode_histogram::<NoLabelSet>(
            0.0,
            0,
            &Series::default().encoder_buckets(first, last),
            None,
        )
    }
}

impl Template {
    fn of(f: HistogramFamily, format: Format) -> Result<Template, fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(One(f)));
        let mut text = String::new();
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode_registry(&mut text, &registry)?
            }
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?
            }
        }
        let mut header = String::new();
        let mut le = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                header.push_str(line);
                header.push('\n');
            } else if let Some((_, rest)) = line.split_once("le=\"")
                && let Some((value, _)) = rest.split_once('"')
            {
                le.push(value.to_owned());
            }
        }
        let (first, last) = f.bounds;
        // One `le` per bucket prometheus-client was given; anything else is a format this
        // module does not know, and writing it would produce a wrong body.
        if le.len() != Series::default().encoder_buckets(first, last).len() {
            return Err(fmt::Error);
        }
        Ok(Template { header, le })
    }
}

/// A label value escaped as prometheus-client escapes it (both formats): `\`, `"`, newline.
fn push_escaped(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Writes family `f` with `series` (labels in exposition order, and the histogram) to `out`
/// in `format`, as prometheus-client's `encode_histogram` would; an empty family gets its
/// descriptor lines, as there.
pub fn write_family<'a>(
    out: &mut dyn fmt::Write,
    format: Format,
    f: HistogramFamily,
    series: impl IntoIterator<Item = (&'a [(&'a str, &'a str)], &'a Series)>,
) -> fmt::Result {
    let t = Template::of(f, format)?;
    out.write_str(&t.header)?;
    let (first, last) = f.bounds;
    let mut labels = String::new();
    // One series' lines at a time: one call into `out` per series.
    let mut text = String::with_capacity(4096);
    let (mut int, mut float) = (itoa::Buffer::new(), dtoa::Buffer::new());
    for (set, s) in series {
        labels.clear();
        for (i, (k, v)) in set.iter().enumerate() {
            if i > 0 {
                labels.push(',');
            }
            labels.push_str(k);
            labels.push_str("=\"");
            push_escaped(&mut labels, v);
            labels.push('"');
        }
        text.clear();
        let sum = s.sum_ns as f64 / 1e9;
        let sample = |text: &mut String, suffix: &str, value: &str| {
            text.push_str(f.name);
            text.push_str(suffix);
            if !labels.is_empty() {
                text.push('{');
                text.push_str(&labels);
                text.push('}');
            }
            text.push(' ');
            text.push_str(value);
            text.push('\n');
        };
        let sum_text = float.format(sum).to_owned();
        if format == Format::OpenMetrics {
            sample(&mut text, "_sum", &sum_text);
            sample(&mut text, "_count", int.format(s.count));
        }
        let mut cumulative = 0u64;
        for ((_, n), le) in s.encoder_buckets(first, last).iter().zip(&t.le) {
            cumulative += n;
            text.push_str(f.name);
            text.push_str("_bucket{");
            match format {
                // prometheus-client puts `le` first in OpenMetrics, last in 0.0.4.
                Format::OpenMetrics => {
                    text.push_str("le=\"");
                    text.push_str(le);
                    text.push('"');
                    if !labels.is_empty() {
                        text.push(',');
                        text.push_str(&labels);
                    }
                }
                Format::Prometheus => {
                    if !labels.is_empty() {
                        text.push_str(&labels);
                        text.push(',');
                    }
                    text.push_str("le=\"");
                    text.push_str(le);
                    text.push('"');
                }
            }
            text.push_str("} ");
            text.push_str(int.format(cumulative));
            text.push('\n');
        }
        if format == Format::Prometheus {
            sample(&mut text, "_sum", &sum_text);
            sample(&mut text, "_count", int.format(s.count));
        }
        out.write_str(&text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::crypto::encode_histograms;

    const FAMILY: HistogramFamily = HistogramFamily {
        name: "wirescope_test_seconds",
        help: "a test family, with a \\ and a \"quote\"",
        bounds: (10, 31),
    };

    /// Series with their labels, as the collectors hold them ([`crate::metrics::Labels`]).
    type Case = Vec<(crate::metrics::Labels, Series)>;

    /// The same family through prometheus-client's encoder, as the collectors write it.
    #[derive(Debug)]
    struct Reference(Case);

    impl Collector for Reference {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            let mut fam =
                encoder.encode_descriptor(FAMILY.name, FAMILY.help, None, MetricType::Histogram)?;
            encode_histograms(&mut fam, FAMILY.bounds, self.0.iter().map(|(l, s)| (l, s)))
        }
    }

    fn series(seed: u64) -> Series {
        let mut s = Series::default();
        for b in 0..s.buckets.len() as u64 {
            s.buckets[b as usize] = (seed * 7 + b * 13) % 5;
        }
        // Out-of-range observations count in the total only.
        s.count = s.buckets.iter().sum::<u64>() + seed % 3;
        s.sum_ns = seed * 1_234_567 + 89;
        s
    }

    /// Whole families, both formats, labels that need escaping and none, several series, an
    /// empty family: the same text as prometheus-client's.
    #[test]
    fn the_same_text_as_prometheus_client() {
        let cases: Vec<Case> = vec![
            vec![],
            vec![(vec![], series(1))],
            vec![
                (
                    vec![
                        ("interface", "wg0".into()),
                        ("peer", "AAAA+/bbbb=".into()),
                        ("direction", "rx".into()),
                    ],
                    series(2),
                ),
                (
                    vec![
                        ("interface", "we\"ird\\\nname".into()),
                        ("peer", "x".into()),
                        ("direction", "tx".into()),
                    ],
                    series(3),
                ),
                (vec![("interface", "wg1".into())], Series::default()),
            ],
        ];
        for case in cases {
            for format in [Format::OpenMetrics, Format::Prometheus] {
                let mut registry = Registry::default();
                registry.register_collector(Box::new(Reference(case.clone())));
                let mut want = String::new();
                match format {
                    Format::OpenMetrics => {
                        prometheus_client::encoding::text::encode_registry(&mut want, &registry)
                            .unwrap()
                    }
                    Format::Prometheus => {
                        prometheus_client::encoding::prometheus_text::encode(&mut want, &registry)
                            .unwrap()
                    }
                }
                let labels: Vec<Vec<(&str, &str)>> = case
                    .iter()
                    .map(|(l, _)| l.iter().map(|(k, v)| (*k, v.as_str())).collect())
                    .collect();
                let mut got = String::new();
                write_family(
                    &mut got,
                    format,
                    FAMILY,
                    labels
                        .iter()
                        .map(Vec::as_slice)
                        .zip(case.iter().map(|(_, s)| s)),
                )
                .unwrap();
                assert_eq!(got, want, "{format:?}, {} series", case.len());
            }
        }
    }
}
