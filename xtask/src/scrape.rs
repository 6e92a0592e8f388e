//! Reading a running agent from the outside, as Prometheus would: plain HTTP/1.0 over a
//! socket made inside the agent's network namespace, and the text format parsed into series.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::netns;

/// `GET path` on `addr` from inside `ns`: (status, body).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    netns::run_in(ns, move || get(addr, &path, Duration::from_secs(10)))?
}

/// Plain HTTP/1.0 GET from the current namespace (the server then answers without
/// chunking), reading for at most `read_timeout`: (status, body).
pub fn get(addr: SocketAddr, path: &str, read_timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(read_timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Every sample of a scrape, keyed by metric name and sorted labels.
/// Labels of one sample, sorted by name.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Default, Clone)]
pub struct Metrics {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Metrics {
    /// Parses the Prometheus text format (and the OpenMetrics subset the agent writes).
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut m = Metrics::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| anyhow!("line {}: no value: {line}", i + 1))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("line {}: bad value in {line}", i + 1))?;
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest
                        .strip_suffix('}')
                        .ok_or_else(|| anyhow!("line {}: unclosed labels: {line}", i + 1))?;
                    (name.to_string(), parse_labels(rest)?)
                }
            };
            m.samples.entry(name).or_default().push((labels, value));
        }
        Ok(m)
    }

    /// The sample of `name` whose labels include all of `labels`; 0 when there is none, an
    /// error when several match (the caller's selector is too loose).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let matches: Vec<f64> = self.select(name, labels).map(|(_, v)| v).collect();
        match matches.len() {
            0 => Ok(0.0),
            1 => Ok(matches[0]),
            n => bail!("{n} series of {name} match {labels:?}"),
        }
    }

    /// Sum over every sample of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.select(name, labels).map(|(_, v)| v).sum()
    }

    pub fn select<'a>(
        &'a self,
        name: &str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a Labels, f64)> + 'a {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(l, v)| (l, *v))
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.samples.keys()
    }
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .ok_or_else(|| anyhow!("bad labels: {s}"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("bad escape in labels: {s}"),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| anyhow!("unterminated label value: {s}"))?;
        out.insert(key.trim_start_matches(',').to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_selects() {
        let text = "# HELP x y\n# TYPE x counter\n\
            x_total{a=\"1\",b=\"q\\\"uo,te\"} 5\nx_total{a=\"2\",b=\"z\"} 7\nup 1\n# EOF\n";
        let m = Metrics::parse(text).unwrap();
        assert_eq!(m.get("x_total", &[("b", "q\"uo,te")]).unwrap(), 5.0);
        assert_eq!(m.sum("x_total", &[]), 12.0);
        assert_eq!(m.get("up", &[]).unwrap(), 1.0);
        assert_eq!(m.get("missing", &[]).unwrap(), 0.0);
        assert!(m.get("x_total", &[]).is_err());
    }
}
