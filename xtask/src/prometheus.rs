//! The real Prometheus server against `deploy/`: start it (in a lab namespace or on the
//! host's loopback) with a test copy of `deploy/prometheus.yml` and `deploy/rules.yml`, ask
//! its HTTP API (instant queries, rules, alerts), wait for an alert, stop it. Also the
//! helpers the tests use to read `deploy/`: the dashboard's panel queries with Grafana's
//! variables filled in, the metric names a PromQL expression uses, the contract's names.
//!
//! Prometheus and promtool come from Debian's `prometheus` package (`cargo xtask setup`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

use crate::{netns, scrape};

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    crate::build::repo_root().join("deploy")
}

/// `deploy/prometheus.yml` made for a test: scrape and rule evaluation every `interval`
/// (for example `1s`), `rule_files` pointing at `rules` (an absolute path). Fails when the
/// file no longer has the lines this rewrites, so that the shipped example stays tested.
pub fn test_config(shipped: &str, rules: &Path, interval: &str) -> Result<String> {
    let mut out = String::new();
    let (mut scrape, mut eval, mut rule) = (false, false, false);
    for line in shipped.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        if t.starts_with("scrape_interval:") {
            scrape = true;
            out.push_str(&format!("{indent}scrape_interval: {interval}\n"));
        } else if t.starts_with("evaluation_interval:") {
            eval = true;
            out.push_str(&format!("{indent}evaluation_interval: {interval}\n"));
        } else if t == "- rules.yml" {
            rule = true;
            out.push_str(&format!("{indent}- {}\n", rules.display()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !(scrape && eval && rule) {
        bail!(
            "deploy/prometheus.yml lacks `scrape_interval:`, `evaluation_interval:` or a \
             `- rules.yml` rule file line (found: {scrape}, {eval}, {rule})"
        );
    }
    Ok(out)
}

/// `rules` with every alert's `for: DURATION` replaced by `for: short` (e.g. `1s`), so that
/// a test can see an alert fire without waiting minutes.
pub fn with_short_for(rules: &str, short: &str) -> String {
    let mut out = String::new();
    for line in rules.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("for: ")
            && !rest.trim().is_empty()
            && !rest.contains(' ')
        {
            let indent = &line[..line.len() - t.len()];
            out.push_str(&format!("{indent}for: {short}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What [`Prometheus::start`] runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The network namespace to run in (`ip netns exec`), or None for the caller's.
    pub netns: Option<String>,
    /// The prometheus.yml text. Relative rule file paths are relative to the temporary
    /// directory the file is written to: give absolute ones.
    pub config: String,
    /// Written as `rules.yml` into the temporary directory when given (then a config made
    /// by [`test_config`] may point at [`Prometheus::rules_path_for`]).
    pub rules: Option<String>,
}

/// A running Prometheus server; stopped (SIGTERM, then SIGKILL) and its directory removed
/// when dropped.
pub struct Prometheus {
    child: Option<Child>,
    ns: Option<String>,
    addr: SocketAddr,
    dir: PathBuf,
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(tag: &str) -> Result<PathBuf> {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wirescope-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A TCP port on 127.0.0.1 free in `ns` (or here) at the time of the call.
pub fn free_port(ns: Option<&str>) -> Result<u16> {
    let pick = || -> Result<u16> {
        let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        Ok(l.local_addr()?.port())
    };
    match ns {
        Some(ns) => netns::run_in(ns, pick)?,
        None => pick(),
    }
}

impl Prometheus {
    /// Where [`Options::rules`] will be written for a server whose directory is `dir`.
    pub fn rules_path_for(dir: &Path) -> PathBuf {
        dir.join("rules.yml")
    }

    /// Writes the files into a new temporary directory, starts `prometheus` with its
    /// storage there, listening on a free port of 127.0.0.1, and waits up to 30 s for
    /// `/-/ready`. `config` may contain `@RULES@`, replaced by the rules file's path.
    pub fn start(opts: Options) -> Result<Prometheus> {
        let dir = temp_dir("prometheus")?;
        let rules_path = Self::rules_path_for(&dir);
        if let Some(rules) = &opts.rules {
            std::fs::write(&rules_path, rules)
                .with_context(|| format!("writing {}", rules_path.display()))?;
        }
        let config_path = dir.join("prometheus.yml");
        let config = opts
            .config
            .replace("@RULES@", &rules_path.display().to_string());
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let port = free_port(opts.netns.as_deref())?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = dir.join("prometheus.log");
        let logfile = std::fs::File::create(&log)?;
        let args = [
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--log.level=warn".to_owned(),
        ];
        let mut cmd = match &opts.netns {
            Some(ns) => netns::command(ns, "prometheus"),
            None => Command::new("prometheus"),
        };
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile);
        let child = cmd.spawn().context(
            "starting prometheus (Debian package `prometheus`: `cargo xtask setup` installs it)",
        )?;
        let mut p = Prometheus {
            child: Some(child),
            ns: opts.netns,
            addr,
            dir,
        };
        p.wait_ready(Duration::from_secs(30))?;
        Ok(p)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "prometheus exited with {status} before becoming ready; its log:\n{}",
                    self.log_text()
                );
            }
            match self.get("/-/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {body}"),
                Err(e) => last = format!("{e:#}"),
            }
            sleep(Duration::from_millis(100));
        }
        bail!(
            "prometheus not ready within {timeout:?} (last: {last}); its log:\n{}",
            self.log_text()
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` (path and query string already encoded): (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let (addr, path) = (self.addr, path.to_owned());
        match &self.ns {
            // Queries over a long range can take a while: 30 s.
            Some(ns) => netns::run_in(ns, move || {
                scrape::get(addr, &path, Duration::from_secs(30))
            })?,
            None => scrape::get(addr, &path, Duration::from_secs(30)),
        }
    }

    /// `GET /api/v1/...`; the parsed body when Prometheus says `"status": "success"`, else
    /// an error with its `error`.
    pub fn api(&self, path_and_query: &str) -> Result<Value> {
        let (code, body) = self.get(&format!("/api/v1/{path_and_query}"))?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("/api/v1/{path_and_query} answered {code}: {body}"))?;
        if v["status"] != "success" {
            bail!(
                "{} ({}, HTTP {code})",
                v["error"].as_str().unwrap_or(&body),
                v["errorType"].as_str().unwrap_or("?")
            );
        }
        Ok(v["data"].clone())
    }

    /// An instant query now: the result's samples (vector) as (labels, value), or one
    /// sample without labels for a scalar. Fails on a PromQL error.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let data = self
            .api(&format!("query?query={}", urlencode(expr)))
            .with_context(|| format!("query {expr}"))?;
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => Ok(data["result"]
                .as_array()
                .map(|a| a.iter().map(Sample::from_json).collect())
                .unwrap_or_default()),
            Some("scalar") | Some("string") => Ok(vec![Sample {
                labels: Default::default(),
                value: parse_value(&data["result"][1]),
            }]),
            other => bail!("query {expr}: unexpected result type {other:?}"),
        }
    }

    /// Every rule loaded, from `/api/v1/rules`.
    pub fn rules(&self) -> Result<Vec<Rule>> {
        let data = self.api("rules")?;
        let mut out = Vec::new();
        for g in data["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                out.push(Rule {
                    group: g["name"].as_str().unwrap_or_default().to_owned(),
                    name: r["name"].as_str().unwrap_or_default().to_owned(),
                    query: r["query"].as_str().unwrap_or_default().to_owned(),
                    kind: r["type"].as_str().unwrap_or_default().to_owned(),
                    health: r["health"].as_str().unwrap_or_default().to_owned(),
                    last_error: r["lastError"].as_str().unwrap_or_default().to_owned(),
                    state: r["state"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// The alerts pending or firing now, from `/api/v1/alerts`.
    pub fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.api("alerts")?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| Alert {
                labels: labels_of(&a["labels"]),
                annotations: labels_of(&a["annotations"]),
                state: a["state"].as_str().unwrap_or_default().to_owned(),
                value: a["value"].as_str().and_then(|v| v.parse().ok()),
            })
            .collect())
    }

    /// Waits up to `timeout` for alert `name` to be firing; returns its firing instances.
    pub fn wait_for_alert(&self, name: &str, timeout: Duration) -> Result<Vec<Alert>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            seen = self.alerts()?;
            let firing: Vec<Alert> = seen
                .iter()
                .filter(|a| a.name() == name && a.state == "firing")
                .cloned()
                .collect();
            if !firing.is_empty() {
                return Ok(firing);
            }
            sleep(Duration::from_millis(500));
        }
        bail!("alert {name} did not fire within {timeout:?}; alerts now: {seen:#?}")
    }

    /// Waits up to `timeout` for `expr` to return at least one sample.
    pub fn wait_for_data(&self, expr: &str, timeout: Duration) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(expr)?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            sleep(Duration::from_millis(500));
        }
    }

    /// Waits up to `timeout` until there are scrape targets and every one is up.
    pub fn wait_scraped(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let data = self.api("targets?state=active")?;
            let targets = data["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !targets.is_empty() && targets.iter().all(|t| t["health"] == "up") {
                return Ok(());
            }
            last = data;
            sleep(Duration::from_millis(250));
        }
        bail!("the scrape targets are not all up within {timeout:?}: {last}")
    }

    /// SIGTERM, then up to 10 s for a clean exit (SIGKILL after), and removes the directory.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // `ip netns exec` execs prometheus, so the child's pid is prometheus'.
        let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let result = loop {
            if child.try_wait()?.is_some() {
                break Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break Err(anyhow!("prometheus did not stop within 10 s of SIGTERM"));
            }
            sleep(Duration::from_millis(50));
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// One sample of a query result.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    fn from_json(v: &Value) -> Sample {
        let value = if v["value"].is_array() {
            parse_value(&v["value"][1])
        } else {
            v["values"]
                .as_array()
                .and_then(|a| a.last())
                .map(|p| parse_value(&p[1]))
                .unwrap_or(f64::NAN)
        };
        Sample {
            labels: labels_of(&v["metric"]),
            value,
        }
    }
}

fn parse_value(v: &Value) -> f64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

fn labels_of(v: &Value) -> std::collections::BTreeMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A rule as `/api/v1/rules` reports it.
#[derive(Debug, Clone)]
pub struct Rule {
    pub group: String,
    pub name: String,
    pub query: String,
    /// `recording` or `alerting`.
    pub kind: String,
    /// `ok`, `err` or `unknown` (not evaluated yet).
    pub health: String,
    pub last_error: String,
    /// Alerting rules: `inactive`, `pending` or `firing`.
    pub state: String,
}

/// An alert as `/api/v1/alerts` reports it.
#[derive(Debug, Clone)]
pub struct Alert {
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    /// `pending` or `firing`.
    pub state: String,
    pub value: Option<f64>,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query of the dashboard: the panel's title and the target's expression as written.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

/// Every panel target `expr` of a Grafana dashboard (rows' nested panels included).
pub fn dashboard_queries(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &Value, out: &mut Vec<PanelQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(PanelQuery {
                        panel: p["title"].as_str().unwrap_or_default().to_owned(),
                        ref_id: t["refId"].as_str().unwrap_or_default().to_owned(),
                        expr: e.to_owned(),
                    });
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's query variables: (name, query), e.g.
/// `("peer", "label_values(wirescope_peer_info{instance=~\"$instance\"}, peer)")`.
pub fn dashboard_variables(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .unwrap_or_default();
            (
                v["name"].as_str().unwrap_or_default().to_owned(),
                q.to_owned(),
            )
        })
        .collect()
}

/// A `label_values(SELECTOR, LABEL)` variable query as PromQL that returns one series per
/// value: `group by (LABEL) (SELECTOR)`. None for other forms.
pub fn label_values_as_promql(query: &str) -> Option<String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (sel, label) = inner.rsplit_once(',')?;
    Some(format!("group by ({}) ({})", label.trim(), sel.trim()))
}

/// `expr` with Grafana's variables filled in as "All" would: `$__rate_interval`,
/// `$__interval` and `$__range` become `interval`; every other `$name`, `${name}` or
/// `${name:format}` becomes `.*` (the dashboard's variables are used as `label=~"$name"`).
pub fn fill_grafana_variables(expr: &str, interval: &str) -> String {
    let mut out = String::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let (name, end) = if b.get(i + 1) == Some(&b'{') {
                match expr[i + 2..].find('}') {
                    Some(close) => {
                        let inner = &expr[i + 2..i + 2 + close];
                        (
                            inner.split(':').next().unwrap_or("").to_owned(),
                            i + 3 + close,
                        )
                    }
                    None => (String::new(), i + 1),
                }
            } else {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                (expr[i + 1..j].to_owned(), j)
            };
            if name.is_empty() {
                out.push('$');
                i += 1;
                continue;
            }
            if name.starts_with("__") {
                out.push_str(interval);
            } else {
                out.push_str(".*");
            }
            i = end;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// PromQL's keywords that open a list of label names: `by (...)`, `on (...)`, ...
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names (and recording rules' `level:metric:op` names) a PromQL expression
/// selects: identifiers outside string literals that are not followed by `(` (functions),
/// not label names (inside `{...}` before an operator, or inside `by (...)`, `without
/// (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`, `group_right (...)`), not
/// keywords and not durations. Good enough for the expressions in `deploy/`.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    // With the GROUPING keywords, which are checked separately.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
        "atan2",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut brace = 0; // inside a {...} label matcher list
    let mut label_list = 0; // inside by(...)/on(...) etc: paren depth at which it opened
    let mut depth = 0;
    let mut last_word = String::new();
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            let q = c;
            i += 1;
            while i < b.len() && b[i] != q {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == b'{' {
            brace += 1;
        } else if c == b'}' {
            brace -= 1;
        } else if c == b'[' {
            // a range or subquery duration: skip to ]
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
        } else if c == b'(' {
            depth += 1;
            if label_list == 0 && GROUPING.contains(&last_word.as_str()) {
                label_list = depth;
            }
        } else if c == b')' {
            if label_list == depth {
                label_list = 0;
            }
            depth -= 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let next = expr[i..].trim_start().chars().next();
            let is_number = start > 0 && b[start - 1].is_ascii_digit();
            if brace == 0
                && label_list == 0
                && next != Some('(')
                && !is_number
                && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                && !GROUPING.contains(&word.to_ascii_lowercase().as_str())
            {
                names.insert(word.to_owned());
            }
            last_word = word.to_owned();
            continue;
        }
        if !c.is_ascii_whitespace() {
            last_word.clear();
        }
        i += 1;
    }
    names
}

/// The metric names declared in a contract or README: table rows whose first cell is a
/// back-quoted name (`| \`wirescope_...\` | ...`).
pub fn documented_metric_names(markdown: &str) -> BTreeSet<String> {
    documented_metric_labels(markdown).into_keys().collect()
}

/// Whether `name` is a metric name as the contract writes them.
fn is_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.contains('_')
}

/// The metrics declared in a contract or README with their labels: table rows whose first
/// cell holds back-quoted names (one, or several separated by commas), the third cell their
/// labels (`same`: the row above's; a note in parentheses dropped).
pub fn documented_metric_labels(markdown: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    let mut previous = BTreeSet::new();
    for line in markdown.lines() {
        let Some(row) = line.trim().strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(first) = cells.first().filter(|c| c.starts_with('`')) else {
            continue;
        };
        let names: Vec<&str> = first
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|n| is_metric_name(n))
            .collect();
        if names.is_empty() {
            continue;
        }
        let cell = cells.get(2).copied().unwrap_or("");
        let labels: BTreeSet<String> = if cell == "same" {
            previous.clone()
        } else {
            cell.split(',')
                .map(|l| l.split('(').next().unwrap_or("").trim().to_owned())
                .filter(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
                .collect()
        };
        for n in names {
            out.insert(n.to_owned(), labels.clone());
        }
        previous = labels;
    }
    out
}

/// The `(metric, label)` pairs of the label matchers in `expr` (`metric{label=~"..."}`).
pub fn selector_labels(expr: &str) -> Vec<(String, String)> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += usize::from(b[i] == b'\\') + 1;
            }
        } else if b[i] == b'{' {
            let name_start = expr[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(0, |p| p + 1);
            let metric = expr[name_start..i].to_owned();
            let mut j = i + 1;
            let mut label = String::new();
            let mut in_name = true;
            while j < b.len() && b[j] != b'}' {
                match b[j] {
                    b'"' => {
                        j += 1;
                        while j < b.len() && b[j] != b'"' {
                            j += usize::from(b[j] == b'\\') + 1;
                        }
                    }
                    b'=' | b'!' | b'~' if in_name => {
                        out.push((metric.clone(), label.trim().to_owned()));
                        label.clear();
                        in_name = false;
                    }
                    b',' => in_name = true,
                    c if in_name => label.push(c as char),
                    _ => {}
                }
                j += 1;
            }
            i = j;
        }
        i += 1;
    }
    out
}

/// The labels `expr` names in `by`, `without`, `on`, `ignoring`, `group_left` and
/// `group_right` lists.
pub fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for kw in GROUPING {
        let mut rest = expr;
        while let Some(p) = rest.find(kw) {
            let before = rest[..p].chars().next_back();
            let after = rest[p + kw.len()..].trim_start();
            rest = &rest[p + kw.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let Some(list) = after.strip_prefix('(') else {
                continue;
            };
            let Some((inside, _)) = list.split_once(')') else {
                continue;
            };
            out.extend(
                inside
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    out
}

/// The labels `label_replace(..., "DST", "$1", "SRC", "REGEX")` calls in `expr` create.
pub fn replaced_labels(expr: &str) -> BTreeSet<String> {
    expr.match_indices(", \"$1\", \"")
        .filter_map(|(p, _)| {
            let head = expr[..p].strip_suffix('"')?;
            let start = head.rfind('"')?;
            Some(head[start + 1..].to_owned())
        })
        .collect()
}

/// The labels a Grafana legend format shows: `{{label}}`.
pub fn legend_labels(legend: &str) -> BTreeSet<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|p| p.split_once("}}"))
        .map(|(l, _)| l.trim().to_owned())
        .collect()
}

/// `name` without a histogram's `_bucket`, `_sum` or `_count` suffix when the rest is in
/// `known`; otherwise `name`.
pub fn base_name<'a>(name: &'a str, known: &BTreeSet<String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && known.contains(base)
        {
            return base;
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_an_expression() {
        let e = r#"histogram_quantile(0.9, sum by (instance, le) (rate(wirescope_handshake_rtt_seconds_bucket{interface=~"wg.*", peer!=""}[5m]))) * on (instance, peer) group_left (hop) max by (instance, peer, hop) (wirescope_peer_info) > 0.2 or wirescope:x:rate5m offset 1h and time() - up"#;
        let n: Vec<_> = metric_names(e).into_iter().collect();
        assert_eq!(
            n,
            [
                "up",
                "wirescope:x:rate5m",
                "wirescope_handshake_rtt_seconds_bucket",
                "wirescope_peer_info"
            ]
        );
    }

    #[test]
    fn grafana_variables() {
        assert_eq!(
            fill_grafana_variables(
                r#"rate(x{a=~"$instance", b=~"${peer}", c=~"${i:regex}"}[$__rate_interval])"#,
                "1m"
            ),
            r#"rate(x{a=~".*", b=~".*", c=~".*"}[1m])"#
        );
    }

    #[test]
    fn short_for() {
        assert_eq!(
            with_short_for("  - alert: A\n    for: 10m\n    expr: x\n", "1s"),
            "  - alert: A\n    for: 1s\n    expr: x\n"
        );
    }

    #[test]
    fn contract_names() {
        let md = "| name | type |\n|---|---|\n| `wirescope_drops_total` | counter |\n| `mullvad_up` | gauge |\n| `--tunnel IFACE` | x |\n";
        let n: Vec<_> = documented_metric_names(md).into_iter().collect();
        assert_eq!(n, ["mullvad_up", "wirescope_drops_total"]);
    }

    #[test]
    fn contract_labels() {
        let md = "| name | type | labels | meaning |\n|---|---|---|---|\n| `wireguard_sent_bytes_total` | counter | interface, public_key, friendly_name (when known) | x |\n| `wireguard_received_bytes_total` | counter | same | y |\n| `mullvad_up` | gauge | | z |\n| `process_cpu_seconds_total`, `process_threads` | counter / gauges | | w |\n| `--tunnel IFACE` | x | y |\n";
        let l = documented_metric_labels(md);
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(l.len(), 5);
        assert_eq!(
            l["wireguard_received_bytes_total"],
            set(&["interface", "public_key", "friendly_name"])
        );
        assert_eq!(l["mullvad_up"], set(&[]));
        assert_eq!(l["process_threads"], set(&[]));
        assert!(l.contains_key("process_cpu_seconds_total"));
    }

    #[test]
    fn labels_of_an_expression() {
        let e = r#"label_replace(sum by (instance, peer) (rate(x_total{a=~"$i", b!="}", c="d,e"}[5m])) * on (instance) group_left (hop) y, "key", "$1", "peer", "(.{1,8}).*")"#;
        assert_eq!(
            selector_labels(e),
            [
                ("x_total".to_string(), "a".to_string()),
                ("x_total".to_string(), "b".to_string()),
                ("x_total".to_string(), "c".to_string())
            ]
        );
        let g: Vec<_> = grouping_labels(e).into_iter().collect();
        assert_eq!(g, ["hop", "instance", "peer"]);
        let r: Vec<_> = replaced_labels(e).into_iter().collect();
        assert_eq!(r, ["key"]);
        let l: Vec<_> = legend_labels("hop {{hop}} {{ key }} ({{interface}})")
            .into_iter()
            .collect();
        assert_eq!(l, ["hop", "interface", "key"]);
    }

    #[test]
    fn label_values() {
        assert_eq!(
            label_values_as_promql(
                r#"label_values(wirescope_peer_info{instance=~"$instance"}, peer)"#
            )
            .unwrap(),
            r#"group by (peer) (wirescope_peer_info{instance=~"$instance"})"#
        );
    }
}
