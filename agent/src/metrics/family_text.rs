//! The per-peer histogram families written straight as text, byte for byte what
//! prometheus-client's encoders write, only without their per-line work.
//!
//! A relay's transit histograms are half its body (2,000 active peers: 100,000 lines of the
//! 200,000); prometheus-client encodes every bucket line label by label, escaping every
//! value and formatting every bound again: 38 % of the agent's CPU during the churn bench
//! went to that family. Here a series' labels are escaped once, the bounds are formatted
//! once per scrape, and each line is a few appends: 4,000 such series (100,000 lines) take
//! 5-8 ms instead of 28-37 ms (release build, this VM, both formats). Counters stay with
//! prometheus-client: written this way they measured no faster (20,000 lines in 4-6 ms
//! either way; one line per series leaves nothing to share).
//!
//! What prometheus-client writes besides the samples (the descriptor lines, the sample names,
//! each bound's `le` value) is taken from prometheus-client itself, from a one-series family
//! rendered through it at every scrape ([`Template`]), so the two stay the same text; the
//! tests compare whole families in both formats. These families are written before the
//! registry's ([`super::encode_with`]): exposition order means nothing to a scraper.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use super::{Format, crypto::Series};

/// Something that writes families as text beside the registry's ([`super::encode_with`]).
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
        let text = render(&registry, format)?;
        let (header, samples) = split_header(&text, f.name)?;
        let header = header.to_owned();
        let mut le = Vec::new();
        for line in samples.lines() {
            if let Some((_, rest)) = line.split_once("le=\"")
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

/// A rendered one-family template split into its descriptor lines and its samples: the
/// samples start at the first line that begins with the family's name (prometheus-client
/// does not escape a newline in OpenMetrics' HELP, so lines alone do not tell).
fn split_header<'t>(template: &'t str, name: &str) -> Result<(&'t str, &'t str), fmt::Error> {
    let at = template
        .match_indices(name)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || template.as_bytes()[i - 1] == b'\n')
        .ok_or(fmt::Error)?;
    Ok(template.split_at(at))
}

/// `registry` rendered in `format` without OpenMetrics' `# EOF`.
fn render(registry: &Registry, format: Format) -> Result<String, fmt::Error> {
    let mut text = String::new();
    match format {
        Format::OpenMetrics => {
            prometheus_client::encoding::text::encode_registry(&mut text, registry)?
        }
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?
        }
    }
    Ok(text)
}

/// A series' labels, escaped, as `k1="v1",k2="v2"` into `out` (cleared first).
fn label_text(out: &mut String, set: &[(&str, &str)]) {
    out.clear();
    for (i, (k, v)) in set.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        push_escaped(out, v);
        out.push('"');
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
        label_text(&mut labels, set);
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
        help: "a test family, with a \\ and a \"quote\"\nand a newline",
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
