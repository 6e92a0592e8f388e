//! `wirescope status` against the real agent in the multihop lab: after echoed traffic, the
//! real binary runs in the client namespace and its tables are parsed back and checked
//! against `/metrics` (tunnel packets, overhead bytes per packet, hop and via, handshake
//! age), `--json` against `/api/v1/status`, every line within 80 columns; `--watch` through
//! a real terminal (a detached tmux session on a private server), redrawn with a new
//! timestamp; and the error for an address nothing listens on.
//!
//! Needs root, wireguard-go and the lab tools (`cargo xtask setup`), and tmux for the
//! `--watch` part (skipped with a notice without it). Run:
//! `cargo test -p wirescope --test lab -- --test-threads=1 status::`.

use crate::common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use wirescope::ops::status::{WIDTH, abbrev, columns};
use xtask::{
    agent::{Agent, LISTEN},
    lab::{GATEWAY_V4, Lab, LabConfig, Topology},
};

use common::{Names, bin, echo_via_tunnel, lab_up, log_path, val};

const PREFIX: &str = "wss";
const PAYLOADS: [usize; 6] = [0, 1, 100, 555, 1000, 1300];

/// `wirescope status ARGS` in `ns`: (exit code, stdout, stderr).
fn status(ns: &str, args: &[&str]) -> (i32, String, String) {
    let out = xtask::netns::command(ns, &bin().display().to_string())
        .arg("status")
        .args(args)
        .output()
        .expect("running wirescope status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_text(ns: &str) -> String {
    let (code, out, err) = status(ns, &["--web.listen-address", LISTEN]);
    assert_eq!(code, 0, "wirescope status failed: {err}");
    assert!(!out.contains('\x1b'), "colours on a pipe:\n{out}");
    out
}

/// One peer as the table shows it.
#[derive(Debug, Default, PartialEq)]
struct Shown {
    cells: Vec<String>,
    /// (packets, overhead bytes per packet as printed) for tx and rx.
    tx: (u64, Option<String>),
    rx: (u64, Option<String>),
}

/// The peers of the table of `iface`, by abbreviated key.
fn parse(text: &str, iface: &str) -> Vec<Shown> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(&format!("{iface}  ")))
        .unwrap_or_else(|| panic!("no table for {iface} in\n{text}"));
    let mut out: Vec<Shown> = Vec::new();
    for l in &lines[start + 1..] {
        if l.is_empty() || !l.starts_with("  ") {
            break;
        }
        let c = columns(l);
        if c.len() == 7 && c[0].parse::<u32>().is_ok() && c[2].ends_with('…') {
            out.push(Shown {
                cells: c,
                ..Default::default()
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if !l.starts_with("      ") {
            continue;
        }
        // Detail items: "tx N pkt SIZE[ overhead X B/pkt SIZE P%]".
        for item in l.trim().split("  ") {
            let w: Vec<&str> = item.split(' ').collect();
            if w.len() >= 3 && (w[0] == "tx" || w[0] == "rx") && w[2] == "pkt" {
                let pk: u64 = w[1].parse().expect("packet count");
                let ovh = w
                    .iter()
                    .position(|x| *x == "overhead")
                    .map(|i| w[i + 1].to_string());
                if w[0] == "tx" {
                    cur.tx = (pk, ovh);
                } else {
                    cur.rx = (pk, ovh);
                }
            }
        }
    }
    out
}

/// Sends the payloads to an echo behind the exit relay and waits for every echo.
fn echo(lab: &Lab) {
    let dst = SocketAddr::new(GATEWAY_V4.into(), 7100);
    echo_via_tunnel(lab, dst, &PAYLOADS, || ());
}

fn check_width(what: &str, text: &str) {
    for l in text.lines() {
        assert!(
            l.chars().count() <= WIDTH,
            "{what}: {} columns: {l:?}",
            l.chars().count()
        );
    }
}

/// Every JSON path (array elements as `[]`) with the type of its value.
fn shape(v: &Value, at: String, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                shape(x, format!("{at}.{k}"), out);
            }
        }
        Value::Array(a) => {
            for x in a {
                shape(x, format!("{at}[]"), out);
            }
        }
        // A measured value may be null at one moment and a number the next.
        Value::Null | Value::Number(_) => {
            out.insert(format!("{at}: number|null"));
        }
        Value::Bool(_) => {
            out.insert(format!("{at}: bool"));
        }
        Value::String(_) => {
            out.insert(format!("{at}: string"));
        }
    }
}

/// The stable part of a snapshot: tunnels and peers with their identity and topology.
fn identity(v: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for t in v["tunnels"].as_array().expect("tunnels") {
        for p in t["peers"].as_array().expect("peers") {
            out.push(serde_json::json!([
                t["interface"],
                t["mtu"],
                t["listen_port"],
                p["public_key"],
                p["hop"],
                p["via"],
                p["endpoint"],
                p["allowed_ips"],
                p["friendly_name"],
            ]));
        }
    }
    out
}

#[test]
fn status_against_the_lab_agent() {
    let Some(lab) = lab_up(
        "status_against_the_lab_agent",
        LabConfig::new(Topology::Multihop, PREFIX),
    ) else {
        return;
    };
    let Names {
        cns: ns,
        tun,
        veth,
        relay: exit,
    } = Names::of(&lab);
    let entry = lab.entry().expect("entry relay").wg().public_key.clone();
    let probe = format!("{GATEWAY_V4}@{tun}");
    let agent = Agent::start(
        bin(),
        &ns,
        &[
            "--export-endpoints",
            "--probe",
            &probe,
            "--probe-interval",
            "2s",
        ],
        &log_path("status"),
    )
    .expect("agent starts");
    lab.handshake(Duration::from_secs(20)).expect("handshakes");
    echo(&lab);
    // Two probe rounds and a path-MTU search have had their time.
    std::thread::sleep(Duration::from_secs(3));

    // A table and a scrape of the same moment: the probes keep sending, so retry until
    // two tables around the scrape agree.
    let mut got = None;
    for _ in 0..20 {
        let a = status_text(&ns);
        let m = agent.scrape().expect("scrape");
        let b = status_text(&ns);
        let (pa, pb) = (parse(&a, &tun), parse(&b, &tun));
        let counts = |p: &[Shown]| p.iter().map(|s| (s.tx.0, s.rx.0)).collect::<Vec<_>>();
        if counts(&pa) == counts(&pb) {
            got = Some((a, pa, m));
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let (text, peers, m) = got.expect("two tables in a row agree");
    println!("{text}");
    check_width("status", &text);
    assert!(text.starts_with("wirescope status  "), "{text}");
    assert!(text.contains(&format!("{tun}  ")), "{text}");
    assert_eq!(peers.len(), 2, "two peers in\n{text}");

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for (key, hop, via) in [(&entry, "1", veth.clone()), (&exit, "2", abbrev(&entry))] {
        let s = peers
            .iter()
            .find(|s| s.cells[2] == abbrev(key))
            .unwrap_or_else(|| panic!("no row for {key} in\n{text}"));
        assert_eq!((s.cells[0].as_str(), &s.cells[1]), (hop, &via), "{s:?}");
        // Handshake age: "N s", against the latest handshake /metrics reports.
        let hs = m
            .select("wireguard_latest_handshake_seconds", &[("public_key", key)])
            .next()
            .map(|(_, v)| v)
            .expect("handshake series");
        let shown: f64 = s.cells[4]
            .strip_suffix(" s")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("handshake age {:?}", s.cells[4]));
        assert!(hs > 0.0, "{key}: no handshake in /metrics");
        assert!(
            (shown - (now - hs)).abs() <= 5.0,
            "{key}: handshake {shown} s old in the table, {} s by /metrics",
            now - hs
        );
        // Handshake RTT: the agent saw our initiation and its response.
        assert!(
            s.cells[5].ends_with(" us") || s.cells[5].ends_with(" ms"),
            "{key}: handshake RTT {:?}",
            s.cells[5]
        );
        for (dir, (packets, ovh)) in [("tx", &s.tx), ("rx", &s.rx)] {
            let tl = [
                ("interface", tun.as_str()),
                ("peer", key.as_str()),
                ("direction", dir),
            ];
            let tp = val(&m, "wirescope_tunnel_packets_total", &tl);
            let tb = val(&m, "wirescope_tunnel_bytes_total", &tl);
            assert_eq!(*packets, tp, "{key} {dir}: tunnel packets");
            assert!(tp >= PAYLOADS.len() as u64, "{key} {dir}: {tp} packets");
            let wb = m.sum(
                "wirescope_wire_bytes_total",
                &[("peer", key), ("direction", dir), ("message", "data")],
            ) as u64;
            let want = format!("{:.1}", (wb - tb) as f64 / tp as f64);
            assert_eq!(ovh.as_deref(), Some(want.as_str()), "{key} {dir}: overhead");
        }
    }
    // The probe through the tunnel shows on the exit relay's row (its allowed IPs hold the
    // gateway): an RTT and 0.0 % loss on the clean lab.
    let exit_row = peers.iter().find(|s| s.cells[2] == abbrev(&exit)).unwrap();
    assert!(exit_row.cells[6].ends_with(" 0.0%"), "{exit_row:?}");

    // --json: the snapshot itself, the same as /api/v1/status.
    let (code, out, err) = status(&ns, &["--web.listen-address", LISTEN, "--json"]);
    assert_eq!(code, 0, "{err}");
    let mine: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let (c, body) = agent.get("/api/v1/status").expect("GET /api/v1/status");
    assert_eq!(c, 200);
    let api: Value = serde_json::from_str(&body).expect("status JSON");
    let (mut s1, mut s2) = (BTreeSet::new(), BTreeSet::new());
    shape(&mine, String::new(), &mut s1);
    shape(&api, String::new(), &mut s2);
    assert_eq!(s1, s2, "same fields");
    assert_eq!(identity(&mine), identity(&api));
    assert!(
        mine["tunnels"][0]["peers"][0]["endpoint"].is_string(),
        "endpoints with --export-endpoints"
    );
    assert_eq!(mine["export_endpoints"], true);
    let t = (
        mine["time"].as_u64().unwrap_or(0),
        api["time"].as_u64().unwrap_or(0),
    );
    assert!(t.1 >= t.0 && t.1 - t.0 <= 5, "{t:?}");

    watch_in_tmux(&ns);

    // An address nothing listens on: a clear message, exit status 1.
    let (code, out, err) = status(&ns, &["--web.listen-address", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("cannot reach the agent at http://127.0.0.1:1")
            && err.contains("is `wirescope run` running there? try --web.listen-address"),
        "{err}"
    );

    let st = agent.stop().expect("agent stops");
    assert!(st.success(), "clean exit: {st}");
    lab.teardown().unwrap();
}

/// `tmux -L wss ARGS` on a private server, so no user session is touched.
fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(["-L", "wirescope-wss"])
        .args(args)
        .output()
        .expect("running tmux")
}

/// `status --watch` in a detached 80x50 tmux pane, captured twice 1.5 s apart: the screen
/// is redrawn (new timestamp), holds the tables, fits the pane.
fn watch_in_tmux(ns: &str) {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("skipped --watch: tmux is not installed (apt-get install tmux)");
        return;
    }
    let cmd = format!(
        "ip netns exec {ns} {} status --watch --web.listen-address {LISTEN}",
        bin().display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        "watch",
        "-x",
        "80",
        "-y",
        "50",
        &cmd,
    ]);
    assert!(
        out.status.success(),
        "tmux new-session: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let capture = || {
        let o = tmux(&["capture-pane", "-p", "-t", "watch"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let stamp = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("wirescope status  "))
            .map(str::to_string)
    };
    // Up to 5 s for the first screen.
    let mut first = String::new();
    for _ in 0..50 {
        first = capture();
        if stamp(&first).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let second = capture();
    // On a terminal, colours (`-e` keeps the escape sequences).
    let coloured = tmux(&["capture-pane", "-p", "-e", "-t", "watch"]);
    tmux(&["kill-server"]);
    let coloured = String::from_utf8_lossy(&coloured.stdout);
    assert!(
        coloured.contains("\x1b["),
        "no colours on a terminal:\n{coloured}"
    );
    println!("--watch, second capture:\n{second}");
    let (a, b) = (stamp(&first), stamp(&second));
    assert!(
        a.is_some() && b.is_some(),
        "no status on screen:\n{first}\n---\n{second}"
    );
    assert_ne!(a, b, "the screen was not redrawn with a new time");
    assert_eq!(
        second.matches("wirescope status  ").count(),
        1,
        "redrawn in place, not appended:\n{second}"
    );
    assert!(second.contains("hop via"), "{second}");
    check_width("--watch", &second);
}
