//! `deploy/` checked with the real Prometheus tools: `promtool check rules` and `promtool
//! test rules` on the rules; every dashboard query parsed by a Prometheus server and every
//! metric name in the rules and the dashboard found in the contract; and end to end, the
//! Prometheus server from Debian scraping the agent in the multihop lab every second with
//! `deploy/rules.yml`: after traffic, every recording rule and every dashboard query returns
//! data through the HTTP API, except those on metrics still to come ([`PENDING`], now none),
//! no alert fires in the healthy lab but the MTU one (its hop has a small link), a 150 ms
//! delay each way between the relays (probe round trips over 300 ms) fires the RTT alert
//! and runs the agent's failover hook exactly once, and a DNS datagram outside the tunnel
//! fires the leak alert.
//!
//! Needs promtool and prometheus (Debian package `prometheus`, `cargo xtask setup`); the end
//! to end test also needs root, the lab's tools and the agent built (`cargo build -p
//! wirescope`, or `WIRESCOPE_BIN=path`). With CI=true a missing prerequisite fails the test,
//! otherwise it is skipped with the reason on stderr. Run with `--test-threads=1`:
//! `cargo test -p xtask --test prometheus -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::{
    agent::Agent,
    impair::{Impairment, Place},
    lab::{self, GATEWAY_V4, Lab, LabConfig, Topology},
    netns,
    prometheus::{
        self, Options, Prometheus, base_name, dashboard_queries, dashboard_variables,
        documented_metric_labels, documented_metric_names, fill_grafana_variables, grouping_labels,
        label_values_as_promql, legend_labels, metric_names, replaced_labels, selector_labels,
    },
    udp::{UdpEcho, recv_sizes, send_udp},
};

const PREFIX: &str = "wsx";

/// Metrics of the contract the agent does not export yet. A rule or dashboard query that
/// uses one of them may return no data end to end; everything else must. Remove each name
/// when it lands (the test prints a note when a pending query returns data already). Empty:
/// every metric of the contract is exported (the failover and Mullvad ones since issue 6).
const PENDING: &[&str] = &[];

/// Contract metrics the README's table may not list yet (issue 6), for clones without
/// `docs/CONTRACT.md`.
const BEYOND_README: &[&str] = &[
    "wirescope_probe_rtt_seconds",
    "wirescope_probe_sent_total",
    "wirescope_probe_lost_total",
    "wirescope_path_mtu_bytes",
    "wirescope_recommended_mtu_bytes",
    "wirescope_path_healthy",
    "wirescope_failover_total",
    "mullvad_up",
    "mullvad_tunnel_state",
    "mullvad_relay_info",
];

/// Names that are not the agent's: Prometheus' own `up`.
const PROMETHEUS_NAMES: &[&str] = &["up"];

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when `missing` is empty; otherwise fails with CI=true, or prints why and skips.
fn prerequisites(test: &str, missing: Vec<String>) -> bool {
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if ci() {
        panic!("{test}: needs {why} (CI=true, so this fails instead of being skipped)");
    }
    eprintln!("skipping {test}: needs {why}");
    false
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

fn tools(progs: &[&str]) -> Vec<String> {
    progs
        .iter()
        .filter(|p| !on_path(p))
        .map(|p| format!("`{p}` (Debian package prometheus: `cargo xtask setup`)"))
        .collect()
}

fn deploy(file: &str) -> PathBuf {
    prometheus::deploy_dir().join(file)
}

fn read(file: &str) -> String {
    let p = deploy(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana-dashboard.json")).expect("the dashboard is JSON")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(prometheus::deploy_dir())
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The contract's metric names: `docs/CONTRACT.md` in the repository (or
/// `WIRESCOPE_CONTRACT`); on a clone without it, the README's table of metrics implemented
/// plus [`BEYOND_README`] and [`PENDING`].
fn contract_names() -> BTreeSet<String> {
    let contract = std::env::var_os("WIRESCOPE_CONTRACT")
        .map(PathBuf::from)
        .unwrap_or_else(|| xtask::build::repo_root().join("docs/CONTRACT.md"));
    match std::fs::read_to_string(&contract) {
        Ok(text) => documented_metric_names(&text),
        Err(_) => {
            let readme = std::fs::read_to_string(xtask::build::repo_root().join("README.md"))
                .expect("README.md");
            let mut n = documented_metric_names(&readme);
            n.extend(BEYOND_README.iter().map(|s| s.to_string()));
            n.extend(PENDING.iter().map(|s| s.to_string()));
            n
        }
    }
}

/// Every (what, expr) in the rules file: recording and alerting rules' `expr`, read with a
/// line scanner (the repository has no YAML parser; Prometheus itself reads the file in the
/// other tests): `record:`/`alert:` names, then `expr:` inline or as a `|` block.
fn rule_exprs(rules: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        let t = t.strip_prefix("- ").unwrap_or(t);
        if let Some(n) = t
            .strip_prefix("record:")
            .or_else(|| t.strip_prefix("alert:"))
        {
            name = n.trim().to_owned();
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            if e == "|" || e == ">" || e == "|-" || e == ">-" {
                let indent = lines[i].len() - lines[i].trim_start().len();
                let mut body = String::new();
                while i + 1 < lines.len() {
                    let l = lines[i + 1];
                    let li = l.len() - l.trim_start().len();
                    if !l.trim().is_empty() && li <= indent {
                        break;
                    }
                    body.push_str(l.trim());
                    body.push(' ');
                    i += 1;
                }
                out.push((name.clone(), body.trim().to_owned()));
            } else {
                out.push((name.clone(), e.to_owned()));
            }
        }
        i += 1;
    }
    out
}

fn recorded_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| {
            let t = l.trim_start();
            t.strip_prefix("- record:")
                .or_else(|| t.strip_prefix("record:"))
        })
        .map(|n| n.trim().to_owned())
        .collect()
}

fn uses_pending(expr: &str) -> bool {
    let pending: BTreeSet<String> = PENDING.iter().map(|s| s.to_string()).collect();
    metric_names(expr).iter().any(|n| {
        let n = base_name(n, &pending);
        pending.contains(n)
    })
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if !prerequisites("promtool_checks_and_tests_the_rules", tools(&["promtool"])) {
        return;
    }
    let t = Instant::now();
    let out = promtool(&["check", "rules", "rules.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["check", "config", "prometheus.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "rules_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert has both annotations and a test; every recording rule is tested.
    let rules = read("rules.yml");
    let tests = read("rules_test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 7, "{alerts:?}");
    for a in &alerts {
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "rules_test.yml has no alert_rule_test for {a}"
        );
    }
    for r in recorded_names(&rules) {
        assert!(
            tests.contains(&format!("expr: round({r}")) || tests.contains(&format!("expr: {r}")),
            "rules_test.yml does not test the recording rule {r}"
        );
    }
    let summaries = rules.matches("summary:").count();
    let descriptions = rules.matches("description:").count();
    assert_eq!(summaries, alerts.len(), "one summary per alert");
    assert_eq!(descriptions, alerts.len(), "one description per alert");
    eprintln!("promtool: {:?}", t.elapsed());
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = read("wirescope.service");
    for want in [
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW\n",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_NETLINK AF_UNIX AF_INET AF_INET6",
        "StateDirectory=wirescope",
        // Pins under /sys/fs/bpf keep the counters across restarts (systemd:: in the lab
        // tier checks it under systemd).
        "ReadWritePaths=-/sys/fs/bpf\n",
        "ReadOnlyPaths=/sys /proc/sys\n",
    ] {
        assert!(unit.contains(want), "wirescope.service lacks {want}");
    }
    assert!(
        !unit
            .lines()
            .any(|l| l.trim() == "ProtectKernelTunables=yes"),
        "ProtectKernelTunables=yes makes /sys/fs/bpf read-only, whatever ReadWritePaths= says"
    );
    if !on_path("systemd-analyze") {
        eprintln!("the_systemd_unit_verifies: no systemd-analyze, the unit's text only");
        return;
    }
    // The unit names /usr/local/bin/wirescope; verify a copy pointing at a file that exists.
    let dir = prometheus::temp_dir("unit").unwrap();
    let copy = dir.join("wirescope.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/wirescope", "/bin/true")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

/// The contract's metrics and their labels (see [`contract_names`] for where from);
/// Prometheus' `up` with none of its own.
fn contract_labels() -> BTreeMap<String, BTreeSet<String>> {
    let contract = std::env::var_os("WIRESCOPE_CONTRACT")
        .map(PathBuf::from)
        .unwrap_or_else(|| xtask::build::repo_root().join("docs/CONTRACT.md"));
    let text = std::fs::read_to_string(&contract).expect("docs/CONTRACT.md");
    let mut l = documented_metric_labels(&text);
    for n in PROMETHEUS_NAMES {
        l.insert(n.to_string(), BTreeSet::new());
    }
    l
}

/// The overview row at the top: tunnels, peers up, Mullvad state and relay, leaks in 24 h,
/// the agent's CPU and RSS, side by side above every other panel. Legends show short keys
/// (or friendly names), never a 44-character key. And every label a query matches on,
/// groups by or shows is one the contract gives the metrics it uses (or `instance`, `job`,
/// `le`, or one its `label_replace` makes). Needs no Prometheus.
#[test]
fn dashboard_overview_short_keys_and_labels() {
    let dash = dashboard();
    let panels = dash["panels"].as_array().unwrap();
    let pos = |p: &Value, k: &str| p["gridPos"][k].as_i64().unwrap();
    assert_eq!(
        (panels[0]["type"].as_str(), panels[0]["title"].as_str()),
        (Some("row"), Some("Overview"))
    );
    assert_eq!(pos(&panels[0], "y"), 0);
    let end = panels[1..]
        .iter()
        .position(|p| p["type"] == "row")
        .map(|i| i + 1)
        .expect("a row after the overview");
    let overview = &panels[1..end];
    let titles: Vec<&str> = overview
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        titles,
        [
            "Tunnels",
            "Peers up",
            "Mullvad",
            "Mullvad relay",
            "Leaks (24 h)",
            "Agent CPU",
            "Agent memory (RSS)"
        ]
    );
    // One line of stats, 24 columns wide, above the next row.
    let mut x = 0;
    for p in overview {
        assert_eq!(p["type"], "stat", "{}", p["title"]);
        assert_eq!((pos(p, "x"), pos(p, "y")), (x, 1), "{}", p["title"]);
        x += pos(p, "w");
    }
    assert_eq!(x, 24);
    let bottom = overview.iter().map(|p| pos(p, "y") + pos(p, "h")).max();
    assert_eq!(Some(pos(&panels[end], "y")), bottom);
    let exprs = |p: &Value| -> Vec<String> {
        p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["expr"].as_str().unwrap().to_owned())
            .collect()
    };
    let uses = |i: usize, metric: &str| {
        exprs(&overview[i])
            .iter()
            .any(|e| metric_names(e).contains(metric))
    };
    for (i, metric) in [
        (0, "wirescope_attach_info"),
        (1, "wireguard_latest_handshake_seconds"),
        (1, "wirescope_peer_info"),
        (2, "mullvad_tunnel_state"),
        (3, "mullvad_relay_info"),
        (4, "wirescope_leaked_packets_total"),
        (5, "process_cpu_seconds_total"),
        (6, "process_resident_memory_bytes"),
    ] {
        assert!(uses(i, metric), "{}: no {metric}", titles[i]);
    }
    assert!(exprs(&overview[0])[0].contains(r#"role="tunnel""#));
    assert!(exprs(&overview[4])[0].contains("[24h]"));
    assert_eq!(
        overview[5]["fieldConfig"]["defaults"]["unit"],
        "percentunit"
    );
    assert_eq!(overview[6]["fieldConfig"]["defaults"]["unit"], "bytes");

    // Short keys: a legend never shows `peer` or `public_key` whole; `key` is peer's first
    // 8 characters, `name` the friendly name or public_key's first 8.
    const KEY: &str = r#", "key", "$1", "peer", "(.{1,8}).*")"#;
    const NAME: &str =
        r#", "name", "$1", "public_key", "(.{1,8}).*"), "name", "$1", "friendly_name", "(.+)")"#;
    let (mut keyed, mut named) = (0, 0);
    let known = contract_labels();
    let names: BTreeSet<String> = known.keys().cloned().collect();
    let mut bad = Vec::new();
    for q in dashboard_queries(&dash) {
        let t = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == q.panel.as_str())
            .and_then(|p| {
                p["targets"]
                    .as_array()?
                    .iter()
                    .find(|t| t["refId"] == q.ref_id.as_str())
                    .cloned()
            })
            .unwrap();
        let legend = legend_labels(t["legendFormat"].as_str().unwrap_or(""));
        let what = format!("panel {:?} {}", q.panel, q.ref_id);
        assert!(
            !legend.contains("peer") && !legend.contains("public_key"),
            "{what}: a whole key in the legend"
        );
        if legend.contains("key") {
            assert!(
                q.expr.starts_with("label_replace(") && q.expr.ends_with(KEY),
                "{what}: {}",
                q.expr
            );
            keyed += 1;
        }
        if legend.contains("name") {
            assert!(
                q.expr.starts_with("label_replace(label_replace(") && q.expr.ends_with(NAME),
                "{what}: {}",
                q.expr
            );
            named += 1;
        }
        // Labels: those of the metrics used, Prometheus' target labels, `le` of histograms,
        // and those label_replace makes.
        let mut have: BTreeSet<String> = ["instance", "job", "le"].map(String::from).into();
        for m in metric_names(&q.expr) {
            match known.get(base_name(&m, &names)) {
                Some(l) => have.extend(l.iter().cloned()),
                None => bad.push(format!("{what}: metric {m} not in the contract")),
            }
        }
        have.extend(replaced_labels(&q.expr));
        for (m, l) in selector_labels(&q.expr) {
            let of_metric = known
                .get(base_name(&m, &names))
                .is_some_and(|k| k.contains(&l));
            if !of_metric && l != "instance" && l != "job" {
                bad.push(format!("{what}: {m} has no label {l}"));
            }
        }
        for l in grouping_labels(&q.expr).iter().chain(&legend) {
            if !have.contains(l) {
                bad.push(format!("{what}: label {l} is not one of its metrics'"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // Every per-peer query of the other rows: 10 with `key`, 3 with `name`.
    assert_eq!((keyed, named), (10, 3));
    let peer = dashboard_variables(&dash);
    assert!(peer.iter().any(|(n, _)| n == "peer"));
    let var = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "peer")
        .unwrap();
    assert_eq!(var["regex"], "/^(?<value>(?<text>.{8}).*)$/");
}

#[test]
fn dashboard_queries_are_valid() {
    if !prerequisites("dashboard_queries_are_valid", tools(&["prometheus"])) {
        return;
    }
    let t = Instant::now();
    let dash = dashboard();
    let rules = read("rules.yml");
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "{} queries", queries.len());

    // Templated by a Prometheus datasource variable, instance, interface and peer.
    let vars = dashboard_variables(&dash);
    let list = dash["templating"]["list"].as_array().unwrap();
    assert!(
        list.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );
    for want in ["instance", "interface", "peer"] {
        assert!(vars.iter().any(|(n, _)| n == want), "no variable {want}");
    }
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }

    // Parsed by Prometheus: an empty server (rules loaded, nothing scraped) answers each
    // query with success or a parse error.
    let p = Prometheus::start(Options {
        netns: None,
        config: "global:\n  evaluation_interval: 1s\nrule_files:\n  - \"@RULES@\"\n".into(),
        rules: Some(rules.clone()),
    })
    .expect("prometheus starts");
    let mut bad = Vec::new();
    for q in &queries {
        if let Err(e) = p.query(&fill_grafana_variables(&q.expr, "1m")) {
            bad.push(format!("{} {}: {e:#}", q.panel, q.ref_id));
        }
    }
    for (name, q) in &vars {
        let promql = label_values_as_promql(q)
            .unwrap_or_else(|| panic!("variable {name}: not label_values(SELECTOR, LABEL): {q}"));
        if let Err(e) = p.query(&fill_grafana_variables(&promql, "1m")) {
            bad.push(format!("variable {name}: {e:#}"));
        }
    }
    let loaded = p.rules().expect("rules");
    assert_eq!(
        loaded.len(),
        rule_exprs(&rules).len(),
        "Prometheus loaded every rule"
    );
    p.stop().unwrap();
    assert!(
        bad.is_empty(),
        "queries Prometheus rejects:\n{}",
        bad.join("\n")
    );

    // Every metric name used exists in the contract (recording rules: in rules.yml).
    let known = contract_names();
    let recorded = recorded_names(&rules);
    let mut exprs: Vec<(String, String)> = rule_exprs(&rules)
        .into_iter()
        .map(|(n, e)| (format!("rule {n}"), e))
        .collect();
    exprs.extend(
        queries
            .iter()
            .map(|q| (format!("panel {} {}", q.panel, q.ref_id), q.expr.clone())),
    );
    exprs.extend(vars.iter().map(|(n, q)| {
        (
            format!("variable {n}"),
            label_values_as_promql(q).unwrap_or_default(),
        )
    }));
    let mut unknown = Vec::new();
    for (what, e) in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{what}: no metric in {e}");
        for n in names {
            let ok = if n.contains(':') {
                recorded.contains(&n)
            } else {
                known.contains(base_name(&n, &known)) || PROMETHEUS_NAMES.contains(&n.as_str())
            };
            if !ok {
                unknown.push(format!("{what}: {n}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metric names in neither the contract nor rules.yml:\n{}",
        unknown.join("\n")
    );
    eprintln!(
        "dashboard_queries_are_valid: {} panel queries, {} variables, {} rules in {:?}",
        queries.len(),
        vars.len(),
        loaded.len(),
        t.elapsed()
    );
}

fn agent_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WIRESCOPE_BIN") {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| xtask::build::repo_root().join("target"));
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("wirescope"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// A stand-in for the Mullvad CLI: `status --json` prints a connected multihop tunnel on
/// the lab's client interface, shaped as in the contract.
fn fake_mullvad(dir: &Path, tun: &str) -> PathBuf {
    let json = format!(
        r#"{{"state":"connected","details":{{"endpoint":{{"address":"192.0.2.20:51820","protocol":"udp","quantum_resistant":true,"obfuscation":null,"entry_endpoint":{{"address":"192.0.2.10:51820","protocol":"udp"}},"tunnel_interface":"{tun}","daita":{{"enabled":false}}}},"location":{{"ipv4":"10.64.0.2","hostname":"se-got-wg-101","city":"Gothenburg","country":"Sweden","entry_hostname":"de-fra-wg-001","entry_city":"Frankfurt","entry_country":"Germany","mullvad_exit_ip":true}},"feature_indicators":["Multihop","QuantumResistance"]}}}}"#
    );
    let path = dir.join("mullvad");
    std::fs::write(&path, format!("#!/bin/sh\ncat <<'EOF'\n{json}\nEOF\n")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn ping(lab: &Lab, args: &[&str]) -> String {
    let out = netns::command(&lab.client().netns, "ping")
        .args(args)
        .output()
        .expect("running ping");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Traffic that makes every non-pending series exist: handshakes on both hops, UDP echoes
/// through both (small and large: inner packets over the exit layer's MTU), a ping too big
/// for the hop's onward link with DF (ICMP fragmentation-needed) and without (the relay's
/// reply arrives in outer fragments), and a datagram to a closed port (a NO_SOCKET drop).
///
/// A counter series that appears already holding all its increments has no rate, so the
/// traffic is spread over several 1 s scrapes: the handshakes create the series, the
/// echoes come in rounds after them.
fn traffic(lab: &Lab) {
    lab.handshake(Duration::from_secs(20)).expect("handshakes");
    let dst = SocketAddr::new(GATEWAY_V4.into(), 7000);
    let sizes: Vec<usize> = [16, 100, 555, 1000, 1372].repeat(4);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        let echo = UdpEcho::start(&lab.exit().netns, dst, sizes.len(), Duration::from_secs(15))
            .expect("echo on the gateway");
        let sock = send_udp(&lab.client().netns, None, dst, &sizes).expect("send");
        let got = recv_sizes(&sock, sizes.len(), Duration::from_secs(10)).expect("echoes");
        assert_eq!(got.len(), sizes.len());
        assert_eq!(echo.join().expect("echo"), sizes.len());
    }

    let relay = lab.first_relay().address().to_string();
    let out = ping(
        lab,
        &["-c", "1", "-W", "1", "-M", "do", "-s", "1450", &relay],
    );
    assert!(out.contains("1 packets transmitted"), "{out}");
    let out = ping(
        lab,
        &[
            "-c", "2", "-i", "0.2", "-W", "1", "-M", "dont", "-s", "1450", &relay,
        ],
    );
    assert!(out.contains(" 2 received"), "{out}");
    let closed: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for _ in 0..2 {
        send_udp(&lab.client().netns, None, closed, &[10, 10, 10]).expect("to a closed port");
        std::thread::sleep(Duration::from_millis(1200));
    }
}

/// `expr` returns data (retried for up to 5 s: the last scrapes and evaluations may still be
/// coming), or, when it uses a pending metric, may not (and a note says when it does).
fn check_data(
    p: &Prometheus,
    what: String,
    expr: &str,
    pending: bool,
    failures: &mut Vec<String>,
    pending_seen: &mut Vec<String>,
) {
    let wait = if pending {
        Duration::ZERO
    } else {
        Duration::from_secs(5)
    };
    match p.wait_for_data(expr, wait) {
        Ok(s) if !s.is_empty() => {
            if pending {
                pending_seen.push(format!(
                    "{what} returns data: remove its metrics from PENDING"
                ));
            }
        }
        Ok(_) if pending => {}
        Ok(_) => failures.push(format!("{what}: no data for {expr}")),
        Err(e) => failures.push(format!("{what}: {e:#}")),
    }
}

/// One way between the multihop relays: probe round trips of 300 ms and more, above the
/// 200 ms of the alert and of the failover's default limit.
const RTT_DELAY: Duration = Duration::from_millis(150);

/// The impairing relay between the relays ([`Place::Relays`]) delays the exit layer by
/// [`RTT_DELAY`] each way. The probes to 10.64.0.1 then take over 300 ms: through the real
/// Prometheus, `wirescope:probe_rtt_seconds:p90_5m` passes 0.2 and WirescopeHighRTT fires
/// for the probe on the client's tunnel; in the agent, the exit peer (the probe goes through
/// it: its 0.0.0.0/0 holds the target) turns unhealthy and the failover hook runs exactly
/// once (an hour of cool-down). Pushes what is wrong to `failures`; returns the timings.
///
/// The rule's 5-minute range is left as shipped: the lab's whole probe history is shorter
/// than that, and the p90 passes 0.2 as soon as over a tenth of it is slow, a few seconds
/// into the delay, so only `for:` is shortened (`with_short_for`).
///
/// Not in the hop: there the client's entry endpoint would become the hop's address, and the
/// agent's path-MTU search to that new endpoint (ICMP outside the tunnel, to an address not
/// in `--leak-allow`) counts as a leak, which fires WirescopeLeak with `kind="ipv4"` before
/// the test's DNS datagram. Between the relays everything new goes through the tunnel.
fn high_rtt(
    p: &Prometheus,
    agent: &Agent,
    lab: &Lab,
    hook: &Path,
    failures: &mut Vec<String>,
) -> String {
    let tun = lab.client().wg().iface.clone();
    let exit = lab.exit().wg().public_key.clone();
    let gw = GATEWAY_V4.to_string();
    // Without a delay first: the client's endpoint of the exit moves to the impairing relay
    // and the exit learns the client's new address from its next packet, nothing lost (a
    // lost probe in the failover's window would make its reason `loss`, not `rtt`).
    let imp = lab
        .start_impairment_at(Place::Relays, Impairment::none())
        .expect("impairing relay between the relays");
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    imp.set(Impairment::delay(RTT_DELAY));

    let deadline = t + Duration::from_secs(20);
    while !hook.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let hooked = t.elapsed();
    if !hook.exists() {
        failures.push(format!(
            "the failover hook did not run within {hooked:?} of a {RTT_DELAY:?} delay each way"
        ));
    }
    let fired = p.wait_for_alert("WirescopeHighRTT", Duration::from_secs(40));
    let fired_after = t.elapsed();
    match fired {
        Ok(a)
            if a.iter().any(|a| {
                a.labels.get("interface") == Some(&tun)
                    && a.labels.get("target") == Some(&gw)
                    && a.value.is_some_and(|v| v > 0.2)
            }) => {}
        Ok(a) => failures.push(format!(
            "WirescopeHighRTT not for {gw} through {tun}: {a:#?}"
        )),
        Err(e) => failures.push(format!("{e:#}")),
    }
    // Room for a second (wrong) action, and for Prometheus to scrape the counter.
    std::thread::sleep(Duration::from_secs(3));
    let lines: Vec<String> = std::fs::read_to_string(hook)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default();
    let want = vec![format!("rtt {tun} {exit}")];
    if lines != want {
        failures.push(format!(
            "the failover hook's lines: {lines:?}, want exactly {want:?}"
        ));
    }
    let m = agent.scrape().expect("scrape");
    let counted: Vec<(String, String, f64)> = m
        .select("wirescope_failover_total", &[])
        .filter(|(_, v)| *v != 0.0)
        .map(|(l, v)| {
            let get = |k: &str| l.get(k).cloned().unwrap_or_default();
            (get("action"), get("result"), v)
        })
        .collect();
    if counted != [("command".to_owned(), "ok".to_owned(), 1.0)] {
        failures.push(format!(
            "wirescope_failover_total, non-zero series: {counted:?}, want command/ok 1"
        ));
    }
    // The same through Prometheus, and the path's state.
    match p.query("wirescope_failover_total != 0") {
        Ok(s)
            if s.len() == 1
                && s[0].labels.get("action").map(String::as_str) == Some("command")
                && s[0].labels.get("result").map(String::as_str) == Some("ok")
                && s[0].value == 1.0 => {}
        Ok(s) => failures.push(format!(
            "Prometheus: wirescope_failover_total != 0 is {s:?}, want command/ok 1"
        )),
        Err(e) => failures.push(format!("{e:#}")),
    }
    match p.query(&format!("wirescope_path_healthy{{peer=\"{exit}\"}}")) {
        Ok(s) if s.len() == 1 && s[0].value == 0.0 => {}
        Ok(s) => failures.push(format!(
            "Prometheus: wirescope_path_healthy of the exit peer under the delay: {s:?}"
        )),
        Err(e) => failures.push(format!("{e:#}")),
    }
    if let Err(e) = imp.stop() {
        failures.push(format!("{e:#}"));
    }
    format!("hook ran {hooked:?} and the alert fired {fired_after:?} into the delay")
}

#[test]
fn end_to_end_rules_and_dashboard_return_data() {
    const TEST: &str = "end_to_end_rules_and_dashboard_return_data";
    if !lab::can_run(TEST) {
        return;
    }
    let bin = agent_bin();
    let mut missing = tools(&["prometheus"]);
    if bin.is_none() {
        missing.push("the agent built (`cargo build -p wirescope`, or WIRESCOPE_BIN)".into());
    }
    if !prerequisites(TEST, missing) {
        return;
    }
    let bin = bin.unwrap();
    let started = Instant::now();
    let lab = Lab::up(LabConfig {
        hop: true,
        path_mtu: Some(1400),
        ..LabConfig::new(Topology::Multihop, PREFIX)
    })
    .expect("lab up");
    let ns = lab.client().netns.clone();
    let log = std::env::temp_dir().join("wirescope-prometheus-e2e.log");
    // The pings to the relay below leave outside the tunnel on purpose: not leaks here.
    let relay_cidr = format!("{}/32", lab.first_relay().address());
    let tun = lab.client().wg().iface.clone();
    let probe = format!("{GATEWAY_V4}@{tun}");
    let work = prometheus::temp_dir("e2e").expect("temp dir");
    let mullvad = fake_mullvad(&work, &tun);
    let hook = work.join("failover-events");
    let hook_cmd = format!(
        "echo \"$WIRESCOPE_REASON $WIRESCOPE_INTERFACE $WIRESCOPE_PEER\" >> {}",
        hook.display()
    );
    let agent = Agent::start(
        &bin,
        &ns,
        &[
            "--leak-allow",
            &relay_cidr,
            "--probe",
            &probe,
            "--probe-interval",
            "1s",
            "--mullvad-cli",
            &mullvad.display().to_string(),
            "--mullvad-interval",
            "1s",
            // The failover hook, run for real: one line per action into `hook`. A short
            // window so that the path turns unhealthy a few seconds into the delay below; the
            // default 200 ms RTT limit, the alert's; an hour of cool-down, so one action.
            "--failover-command",
            &hook_cmd,
            "--failover-window",
            "3s",
            "--failover-cooldown",
            "1h",
        ],
        &log,
    )
    .expect("agent starts");
    let up_at = started.elapsed();

    // The shipped prometheus.yml (scraping 127.0.0.1:9586, where the agent listens in the
    // client namespace) with 1 s intervals, and the shipped rules with short `for:`.
    let config = prometheus::test_config(&read("prometheus.yml"), Path::new("@RULES@"), "1s")
        .expect("test config");
    let rules = read("rules.yml");
    let p = Prometheus::start(Options {
        netns: Some(ns.clone()),
        config,
        rules: Some(prometheus::with_short_for(&rules, "1s")),
    })
    .expect("prometheus starts");
    p.wait_scraped(Duration::from_secs(15))
        .expect("the agent is scraped");

    traffic(&lab);
    let traffic_at = started.elapsed();
    // A few scrapes and rule evaluations after the traffic.
    std::thread::sleep(Duration::from_secs(4));

    let mut failures = Vec::new();
    let mut pending_seen = Vec::new();

    // No alert fires in a healthy lab but the MTU one (the hop's small link), and the path
    // is healthy: no failover action.
    let alerts = p.alerts().expect("alerts");
    for a in &alerts {
        if a.state == "firing" && a.name() != "WirescopeMTUMismatch" {
            failures.push(format!("alert firing in the healthy lab: {a:?}"));
        }
    }
    if hook.exists() {
        failures.push(format!(
            "the failover hook ran in the healthy lab: {:?}",
            std::fs::read_to_string(&hook)
        ));
    }

    // A delay above 200 ms: WirescopeHighRTT fires and the failover hook runs exactly once.
    // (Before the data checks below, so the failover counter has its series by then.)
    let rtt = high_rtt(&p, &agent, &lab, &hook, &mut failures);
    let rtt_at = started.elapsed();

    let scraped = agent.scrape().expect("scrape");
    let exported: BTreeSet<String> = scraped.names().cloned().collect();
    let pending: BTreeSet<String> = PENDING.iter().map(|s| s.to_string()).collect();

    // Every rule evaluates without error; every recording rule has data.
    let loaded = p.rules().expect("rules");
    let recording: Vec<_> = loaded.iter().filter(|r| r.kind == "recording").collect();
    assert!(recording.len() >= 5, "{loaded:#?}");
    for r in &loaded {
        if r.health != "ok" {
            failures.push(format!(
                "rule {}: health {} {}",
                r.name, r.health, r.last_error
            ));
        }
    }
    for r in &recording {
        check_data(
            &p,
            format!("recording rule {}", r.name),
            &r.name,
            uses_pending(&r.query),
            &mut failures,
            &mut pending_seen,
        );
    }

    // Every dashboard query and variable has data.
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    for q in &queries {
        let expr = fill_grafana_variables(&q.expr, "1m");
        let pend = uses_pending(&expr);
        check_data(
            &p,
            format!("panel {:?} {}", q.panel, q.ref_id),
            &expr,
            pend,
            &mut failures,
            &mut pending_seen,
        );
    }
    for (name, q) in dashboard_variables(&dash) {
        let promql = label_values_as_promql(&q).expect("label_values");
        let expr = fill_grafana_variables(&promql, "1m");
        let pend = uses_pending(&expr);
        check_data(
            &p,
            format!("variable {name}"),
            &expr,
            pend,
            &mut failures,
            &mut pending_seen,
        );
    }

    // Every metric the rules and the dashboard use, but the pending ones, is in the agent's
    // output.
    let mut names = BTreeSet::new();
    for (_, e) in rule_exprs(&rules) {
        names.extend(metric_names(&e));
    }
    for q in &queries {
        names.extend(metric_names(&q.expr));
    }
    for n in names {
        if n.contains(':') || PROMETHEUS_NAMES.contains(&n.as_str()) {
            continue;
        }
        let base = base_name(&n, &exported).to_owned();
        let exported_now = exported.contains(&n) || exported.contains(&base);
        let pend = pending.contains(&n) || pending.contains(base_name(&n, &pending));
        if !exported_now && !pend {
            failures.push(format!("{n}: not in the agent's output"));
        }
    }

    // Two alerts end to end, through the harness a later test uses to wait for one: the
    // small-MTU hop (ICMP too-big, outer fragments) fires WirescopeMTUMismatch on the
    // client's underlay, and a DNS datagram to the hop, outside the tunnel, WirescopeLeak.
    let underlay = lab.client().underlay().name.clone();
    let on_underlay = |alerts: &[prometheus::Alert], kind: Option<&str>| {
        alerts.iter().any(|a| {
            a.labels.get("interface") == Some(&underlay)
                && kind.is_none_or(|k| a.labels.get("kind").map(String::as_str) == Some(k))
                && a.annotations.contains_key("summary")
                && a.annotations.contains_key("description")
        })
    };
    match p.wait_for_alert("WirescopeMTUMismatch", Duration::from_secs(10)) {
        Ok(a) if on_underlay(&a, None) => {}
        Ok(a) => failures.push(format!("WirescopeMTUMismatch not on {underlay}: {a:#?}")),
        Err(e) => failures.push(format!("{e:#}")),
    }
    let hop = lab.hop().expect("the lab has a hop").address();
    send_udp(&ns, None, SocketAddr::new(hop.into(), 53), &[40]).expect("a datagram to the hop");
    match p.wait_for_alert("WirescopeLeak", Duration::from_secs(10)) {
        Ok(a) if on_underlay(&a, Some("dns")) => {}
        Ok(a) => failures.push(format!("WirescopeLeak not dns on {underlay}: {a:#?}")),
        Err(e) => failures.push(format!("{e:#}")),
    }
    let checked_at = started.elapsed();

    if let Some(secs) = std::env::var_os("WIRESCOPE_E2E_KEEP") {
        eprintln!("keeping prometheus at {} in {ns}", p.addr());
        std::thread::sleep(Duration::from_secs(
            secs.to_string_lossy().parse().unwrap_or(60),
        ));
    }
    let prom_log = p.log_text();
    p.stop().expect("prometheus stops");
    let status = agent.stop().expect("agent stops");
    lab.teardown().expect("lab down");
    let _ = std::fs::remove_dir_all(&work);
    for s in &pending_seen {
        eprintln!("note: {s}");
    }
    eprintln!(
        "end to end: lab and agent up {up_at:?}, traffic done {traffic_at:?}, RTT alert and \
         failover done {rtt_at:?} ({rtt}), checked {checked_at:?}, total {:?}; {} recording \
         rules, {} panel queries",
        started.elapsed(),
        recording.len(),
        queries.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\nprometheus log:\n{prom_log}",
        failures.len(),
        failures.join("\n")
    );
    assert!(status.success(), "the agent exited with {status}");
}
