//! The running agent, when one answers: its `/metrics`, read as samples, give the checks
//! what only it measures (path MTU, UDP receive errors, handshake timeouts, leaks).

use crate::{
    config::cli::AgentAddr,
    ops::client::{AgentClient, ClientError},
};

/// GET /metrics from the agent (HTTP or HTTPS, see [`crate::ops::client`]).
pub(super) fn fetch_metrics(agent: &AgentAddr) -> Result<String, String> {
    let client = AgentClient::new(agent).map_err(|e| e.to_string())?;
    let (code, body) = client
        .get("/metrics", "text/plain;version=0.0.4", 64 << 20)
        .map_err(|e| match e {
            ClientError::Unreachable { cause, hint, .. } => format!("{cause}; {hint}"),
            e => e.to_string(),
        })?;
    if code != 200 {
        return Err(format!(
            "HTTP status {code} for /metrics: {}",
            client.status_hint(code)
        ));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// One sample: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Samples of a Prometheus/OpenMetrics text exposition.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Tolerant: lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Self { samples }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, l, v)| (l.as_slice(), *v))
    }

    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // + 0.0: an empty f64 sum is -0.0.
        self.select(name, labels).map(|(_, v)| v).sum::<f64>() + 0.0
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.select(name, labels).map(|(_, v)| v).next()
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    // A quoted value follows.
                    let (_, q) = chars.next()?;
                    if q != '"' {
                        return None;
                    }
                    let mut val = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => val.push('\n'),
                                other => val.push(other),
                            },
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), val));
                }
                c => key.push(c),
            }
        }
        rest = &r[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let v = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE wirescope_recommended_mtu_bytes gauge\n\
             wirescope_recommended_mtu_bytes{interface=\"wg0\"} 1340\n\
             wirescope_udp_receive_errors_total{port=\"51820\"} 7\n\
             wirescope_udp_receive_errors_total{port=\"53\"} 2\n\
             weird{a=\"x\\\"y,z\",b=\"\"} 1.5 1700000000\n\
             plain 3\n# EOF\n",
        );
        assert_eq!(
            m.get("wirescope_recommended_mtu_bytes", &[("interface", "wg0")]),
            Some(1340.0)
        );
        assert_eq!(m.sum("wirescope_udp_receive_errors_total", &[]), 9.0);
        assert_eq!(
            m.sum("wirescope_udp_receive_errors_total", &[("port", "53")]),
            2.0
        );
        assert_eq!(m.get("weird", &[("a", "x\"y,z"), ("b", "")]), Some(1.5));
        assert_eq!(m.get("plain", &[]), Some(3.0));
        assert_eq!(m.get("absent", &[]), None);
    }
}
