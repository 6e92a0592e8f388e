//! Faults the agent must survive (issue 8), in the lab (prefix `wsz`), with the agent running
//! and traffic flowing:
//!
//! - `tunnel_faults_are_survived`: the client's tunnel gets its MTU changed, its peer removed
//!   and re-added with a new endpoint, renamed (and back), deleted and re-created, and
//!   (wireguard-go only) its daemon killed and restarted. After each the agent is attached
//!   to the interface again within 2 s (its log's `attached to IFACE (ifindex N)` for the new
//!   index, or `wirescope_attach_info`), an exact number of echoed datagrams is counted
//!   again, `/healthz` answers 200, every new log line about the event is there once, and no
//!   datapath counter series (`wirescope_{tunnel,wire}_{packets,bytes}_total`) went backwards.
//! - `agents_in_two_namespaces_and_a_refused_second_one`: agents in the client's and the
//!   relay's namespaces count the same echoes exactly, each its side; a second agent in the
//!   client's namespace exits 1 naming the running one (pid and listen address).
//! - `scrape_flood_and_slowloris`: 200 concurrent scrapes while a client holds connections
//!   open without sending: every scrape answers within 2 s and the agent's RSS stays under
//!   40 MB.
//! - `bad_uapi_answers_are_counted`: a fake UAPI socket served by the test answers
//!   malformed, huge and never: `wirescope_source_errors_total{source="wireguard_uapi"}`
//!   rises, each failure is logged, and the other metrics keep being served; a Mullvad CLI
//!   printing truncated JSON counts in `{source="mullvad"}` on every poll, logged once.
//!
//! Needs root and the lab's tools; with CI=true a missing prerequisite fails. Run:
//! `cargo test -p wirescope --test lab -- --test-threads=1 faults::`.

use crate::common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixListener,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    COUNTER_FAMILIES, Names, bin, bring_back, echo_via_tunnel, lab_up, log_path, start, stop, val,
};
use xtask::{
    agent::Agent,
    lab::{GATEWAY_V4, Lab, LabConfig, Role, Topology},
    netns,
    scrape::{Metrics, http_get},
};

const PREFIX: &str = "wsz";
/// Re-attachment deadline after an interface is back.
const REATTACH: Duration = Duration::from_secs(2);

/// Echoes `n` datagrams from the client through the tunnel to the gateway (in the exit
/// namespace) and back, between two scrapes of `agent`. Returns (before, after).
fn echo_round(lab: &Lab, agent: &Agent, n: usize) -> (Metrics, Metrics) {
    let dst = SocketAddr::new(GATEWAY_V4.into(), 7000);
    let payloads: Vec<usize> = (0..n).map(|i| 20 + i).collect();
    let before = echo_via_tunnel(lab, dst, &payloads, || {
        agent.scrape().expect("scrape before")
    });
    (before, agent.scrape().expect("scrape after"))
}

/// Packets of `peer` on tunnel `tun` in `dir` gained between two scrapes.
fn tunnel_delta(b: &Metrics, a: &Metrics, tun: &str, peer: &str, dir: &str) -> i64 {
    let l = [("interface", tun), ("peer", peer), ("direction", dir)];
    val(a, "wirescope_tunnel_packets_total", &l) as i64
        - val(b, "wirescope_tunnel_packets_total", &l) as i64
}

/// Every series of [`COUNTER_FAMILIES`], keyed by family and labels; `rename` maps an old interface
/// name to its new one (the series continues under the new name).
fn series(m: &Metrics, rename: Option<(&str, &str)>) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for f in COUNTER_FAMILIES {
        for (labels, v) in m.select(f, &[]) {
            let mut labels = labels.clone();
            if let (Some((old, new)), Some(i)) = (rename, labels.get_mut("interface"))
                && i == old
            {
                *i = new.to_string();
            }
            out.insert((f.to_string(), format!("{labels:?}")), v);
        }
    }
    out
}

/// No series of `before` is missing from `after` or smaller there.
fn assert_monotonic(what: &str, before: &Metrics, after: &Metrics, rename: Option<(&str, &str)>) {
    let (b, a) = (series(before, rename), series(after, None));
    assert!(!b.is_empty(), "{what}: no datapath series before");
    for (k, v) in &b {
        let now = a.get(k).copied();
        assert!(
            now.is_some_and(|n| n >= *v),
            "{what}: {} {} went from {v} to {now:?}",
            k.0,
            k.1
        );
    }
}

/// The agent's log lines (without the timestamp and level prefix) from line `from` on.
fn log_lines(agent: &Agent, from: usize) -> Vec<String> {
    agent
        .log_text()
        .lines()
        .skip(from)
        .map(|l| match l.split_once("] ") {
            Some((_, rest)) if l.starts_with('[') => rest.to_string(),
            _ => l.to_string(),
        })
        .collect()
}

/// The ifindex of `iface` in `ns`, when it exists.
fn ifindex_in(ns: &str, iface: &str) -> Option<u32> {
    let out = netns::exec(ns, &["ip", "-j", "link", "show", "dev", iface]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0)?.get("ifindex")?.as_u64().map(|i| i as u32)
}

/// Waits until the agent logs its attachment to `iface` at its current ifindex (or, when it
/// already was attached at that index, until `wirescope_attach_info` shows `iface`), and
/// returns how long that took.
fn wait_attached(agent: &Agent, ns: &str, iface: &str, since: Instant) -> Duration {
    let idx = ifindex_in(ns, iface).unwrap_or_else(|| panic!("no {iface} in {ns}"));
    // A rename keeps the hooks: the log has the attachment under the old name.
    let want = format!("(ifindex {idx}) with ");
    loop {
        let logged = agent
            .log_text()
            .lines()
            .any(|l| l.contains("attached to ") && l.contains(&want));
        let shown = agent.scrape().ok().is_some_and(|m| {
            val(
                &m,
                "wirescope_attach_info",
                &[("interface", iface), ("direction", "tx")],
            ) == 1
        });
        if logged && shown {
            return since.elapsed();
        }
        if since.elapsed() > Duration::from_secs(10) {
            panic!(
                "{iface} (ifindex {idx}) not attached 10 s after it came back (logged {logged}, \
                 in attach_info {shown}); log:\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `iface` no longer exists in `ns`.
fn wait_gone(ns: &str, iface: &str) {
    let t = Instant::now();
    while ifindex_in(ns, iface).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{iface} still exists"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a fault: re-attached within [`REATTACH`] of `back` (when the interface came back),
/// exact counts of 5 echoes on `tun` again, healthy, no datapath series backwards since
/// `before`, no log line about the event repeated, and the lines `expect` each there once.
#[allow(clippy::too_many_arguments)]
fn check_recovery(
    what: &str,
    lab: &Lab,
    agent: &Agent,
    tun: &str,
    relay: &str,
    back: Instant,
    before: &Metrics,
    log_from: usize,
    expect: &[String],
    rename: Option<(&str, &str)>,
) {
    let took = wait_attached(agent, &lab.client().netns, tun, back);
    eprintln!(
        "{what}: attached to {tun} again {} ms after it was back",
        took.as_millis()
    );
    assert!(took <= REATTACH, "{what}: re-attached only after {took:?}");
    // The peer state too: the maps know the relay again within a sync.
    std::thread::sleep(Duration::from_millis(1200));
    let (b, a) = echo_round(lab, agent, 5);
    for dir in ["tx", "rx"] {
        assert_eq!(
            tunnel_delta(&b, &a, tun, relay, dir),
            5,
            "{what}: 5 echoed datagrams counted {dir} on {tun} for the relay"
        );
    }
    let (code, body) = agent.get("/healthz").expect("healthz");
    assert_eq!(code, 200, "{what}: /healthz after recovery: {body}");
    assert_monotonic(what, before, &a, rename);
    let lines = log_lines(agent, log_from);
    for e in expect {
        let n = lines.iter().filter(|l| *l == e).count();
        assert_eq!(
            n,
            1,
            "{what}: {e:?} logged {n} times; new log lines:\n{}",
            lines.join("\n")
        );
    }
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        if l.contains("tunnel ") || l.contains("attached to") || l.contains("detached from") {
            assert!(
                seen.insert(l.clone()),
                "{what}: {l:?} logged twice; new log lines:\n{}",
                lines.join("\n")
            );
        }
    }
}

#[test]
fn tunnel_faults_are_survived() {
    let Some(lab) = lab_up(
        "tunnel_faults_are_survived",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names {
        cns, tun, relay, ..
    } = Names::of(&lab);
    let agent = start(&lab, "faults");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let (b, a) = echo_round(&lab, &agent, 5);
    assert_eq!(tunnel_delta(&b, &a, &tun, &relay, "tx"), 5, "baseline");
    let log_len = |agent: &Agent| agent.log_text().lines().count();
    let exec = |args: &[&str]| {
        lab.exec(&cns, args)
            .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
    };

    // (d) MTU changed.
    let before = agent.scrape().unwrap();
    let from = log_len(&agent);
    exec(&["ip", "link", "set", "dev", &tun, "mtu", "1380"]);
    let back = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    check_recovery(
        "MTU 1420 -> 1380",
        &lab,
        &agent,
        &tun,
        &relay,
        back,
        &before,
        from,
        &[format!("tunnel {tun}: MTU 1420 -> 1380")],
        None,
    );
    exec(&["ip", "link", "set", "dev", &tun, "mtu", "1420"]);
    std::thread::sleep(Duration::from_millis(1500));

    // (e) The peer removed, then re-added with a new endpoint (a second relay address).
    let rns = lab.exit().netns.clone();
    let rveth = lab.exit().underlay().name.clone();
    lab.exec(
        &rns,
        &["ip", "addr", "add", "198.51.100.9/24", "dev", &rveth],
    )
    .unwrap();
    let conf_peer = lab
        .client()
        .wg()
        .peer(Role::Relay)
        .expect("relay peer")
        .clone();
    let before = agent.scrape().unwrap();
    let from = log_len(&agent);
    exec(&["wg", "set", &tun, "peer", &relay, "remove"]);
    std::thread::sleep(Duration::from_millis(2500));
    let allowed = conf_peer.allowed_ips.join(",");
    exec(&[
        "wg",
        "set",
        &tun,
        "peer",
        &relay,
        "endpoint",
        "198.51.100.9:51820",
        "allowed-ips",
        &allowed,
    ]);
    let back = Instant::now();
    check_recovery(
        "peer removed and re-added with a new endpoint",
        &lab,
        &agent,
        &tun,
        &relay,
        back,
        &before,
        from,
        &[
            format!("tunnel {tun}: peer {relay} removed"),
            format!("tunnel {tun}: peer {relay} added"),
        ],
        None,
    );

    // (c) Renamed, and back. A wireguard-go device keeps its control socket under the old
    // name.
    // Not `{PREFIX}r0`: that is the relay's interface (its socket is in the same directory).
    let renamed = format!("{PREFIX}q0");
    // The client's routes through the tunnel, added again through the device `name`.
    let restore_routes = |name: &str| {
        for r in lab.client().routes.iter().filter(|r| r.contains(&tun)) {
            let r = r.replace(&tun, name);
            let mut all = vec!["ip"];
            all.extend(r.split_whitespace());
            let _ = lab.exec(&cns, &all);
        }
    };
    let before = agent.scrape().unwrap();
    let from = log_len(&agent);
    let idx = ifindex_in(&cns, &tun).expect("ifindex");
    exec(&["ip", "link", "set", "dev", &tun, "down"]);
    exec(&["ip", "link", "set", "dev", &tun, "name", &renamed]);
    exec(&["ip", "link", "set", "dev", &renamed, "up"]);
    // Routes through the device went with `down`.
    restore_routes(&renamed);
    let back = Instant::now();
    let took = wait_attached(&agent, &cns, &renamed, back);
    eprintln!(
        "rename: {renamed} in attach_info after {} ms",
        took.as_millis()
    );
    assert!(took <= REATTACH, "rename: shown only after {took:?}");
    std::thread::sleep(Duration::from_millis(1200));
    let (b, a) = echo_round(&lab, &agent, 5);
    assert_eq!(
        tunnel_delta(&b, &a, &renamed, &relay, "tx"),
        5,
        "counted under the new name"
    );
    assert_eq!(
        tunnel_delta(&b, &a, &renamed, &relay, "rx"),
        5,
        "counted under the new name"
    );
    assert_monotonic("rename", &before, &a, Some((&tun, &renamed)));
    let lines = log_lines(&agent, from);
    let line = format!("tunnel {tun} renamed to {renamed} (ifindex {idx})");
    assert_eq!(
        lines.iter().filter(|l| **l == line).count(),
        1,
        "{line:?} once; new log lines:\n{}",
        lines.join("\n")
    );
    let before = agent.scrape().unwrap();
    // The log position before the rename: the agent may log it before the routes are back.
    let from = log_len(&agent);
    exec(&["ip", "link", "set", "dev", &renamed, "down"]);
    exec(&["ip", "link", "set", "dev", &renamed, "name", &tun]);
    exec(&["ip", "link", "set", "dev", &tun, "up"]);
    restore_routes(&tun);
    let back = Instant::now();
    check_recovery(
        "renamed back",
        &lab,
        &agent,
        &tun,
        &relay,
        back,
        &before,
        from,
        &[format!("tunnel {renamed} renamed to {tun} (ifindex {idx})")],
        Some((&renamed, &tun)),
    );

    // The tunnel taken away by `remove`, then brought back from `conf` 2.5 s after it is
    // gone (a killed daemon leaves its socket behind; the restart replaces it): the agent
    // logs it gone and watches it anew.
    let conf = String::from_utf8_lossy(&lab.exec(&cns, &["wg", "showconf", &tun]).unwrap().stdout)
        .into_owned();
    let gone_and_back = |what: &str, remove: &dyn Fn()| {
        let before = agent.scrape().unwrap();
        let from = log_len(&agent);
        remove();
        wait_gone(&cns, &tun);
        std::thread::sleep(Duration::from_millis(2500));
        // The 2 s run from the start of the re-creation (device, configuration, addresses).
        let back = Instant::now();
        bring_back(&lab, &tun, &conf);
        let idx = ifindex_in(&cns, &tun).unwrap_or_else(|| panic!("{what}: no ifindex"));
        check_recovery(
            what,
            &lab,
            &agent,
            &tun,
            &relay,
            back,
            &before,
            from,
            &[
                format!("tunnel {tun} is gone"),
                format!("watching tunnel {tun} (ifindex {idx})"),
            ],
            None,
        );
    };

    // (b) Deleted and re-created.
    gone_and_back("deleted and re-created", &|| {
        exec(&["ip", "link", "del", "dev", &tun])
    });

    // (a) wireguard-go killed (SIGKILL) and restarted.
    if lab.wireguard.is_userspace() {
        let pids = xtask::procs::wireguard_go_pids(|i| i == tun).expect("daemon pids");
        assert_eq!(pids.len(), 1, "one {} for {tun}: {pids:?}", lab.wireguard);
        gone_and_back("wireguard-go killed and restarted", &|| {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pids[0] as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill wireguard-go");
        });
    } else {
        eprintln!("kernel WireGuard: no daemon to kill (the re-creation above covers it)");
    }

    stop(agent);
    lab.teardown().unwrap();
}

/// The pid of the `wirescope run` process in `ns`.
fn agent_pid(ns: &str) -> u32 {
    let me = bin().display().to_string();
    xtask::procs::netns_pids(ns)
        .expect("pids")
        .into_iter()
        .find(|p| {
            xtask::procs::argv(*p)
                .is_some_and(|a| a.first() == Some(&me) && a.iter().any(|x| x == "run"))
        })
        .unwrap_or_else(|| panic!("no wirescope run in {ns}"))
}

#[test]
fn agents_in_two_namespaces_and_a_refused_second_one() {
    let Some(lab) = lab_up(
        "agents_in_two_namespaces_and_a_refused_second_one",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names {
        cns,
        tun: ctun,
        relay,
        ..
    } = Names::of(&lab);
    let rns = lab.exit().netns.clone();
    let rtun = lab.exit().wg().iface.clone();
    let client = lab.client().wg().public_key.clone();
    let a1 = start(&lab, "faults-ns1");
    let a2 = Agent::start(bin(), &rns, &[], &log_path("faults-ns2")).expect("agent in the relay");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    for n in [3, 7] {
        let b2 = a2.scrape().unwrap();
        let (b1, a1m) = echo_round(&lab, &a1, n);
        let a2m = a2.scrape().unwrap();
        for dir in ["tx", "rx"] {
            assert_eq!(
                tunnel_delta(&b1, &a1m, &ctun, &relay, dir),
                n as i64,
                "client {dir}"
            );
            assert_eq!(
                tunnel_delta(&b2, &a2m, &rtun, &client, dir),
                n as i64,
                "relay {dir}"
            );
        }
        // Neither sees the other's interfaces.
        assert_eq!(
            val(&a1m, "wirescope_attach_info", &[("interface", &rtun)]),
            0
        );
        assert_eq!(
            val(&a2m, "wirescope_attach_info", &[("interface", &ctun)]),
            0
        );
    }

    // A second agent in the client's namespace refuses, naming the first.
    let pid = agent_pid(&cns);
    let out = netns::command(&cns, &bin().display().to_string())
        .args(["run", "--web.listen-address", "127.0.0.1:9587"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running a second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1; stderr: {err}");
    assert!(
        err.contains(&format!("pid {pid}, serving http://127.0.0.1:9586")),
        "names the running agent (pid {pid}): {err}"
    );
    eprintln!("refused: {}", err.trim());
    // The first one is unharmed and still counts.
    let (b, a) = echo_round(&lab, &a1, 2);
    assert_eq!(tunnel_delta(&b, &a, &ctun, &relay, "tx"), 2);

    assert!(a1.stop().unwrap().success());
    assert!(a2.stop().unwrap().success());
    lab.teardown().unwrap();
}

/// VmRSS of `pid` in kB.
fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// A `kB` field of /proc/PID/status.
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn scrape_flood_and_slowloris() {
    let Some(lab) = lab_up(
        "scrape_flood_and_slowloris",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let cns = lab.client().netns.clone();
    let agent = start(&lab, "faults-scrape");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let pid = agent_pid(&cns);
    let addr: SocketAddr = xtask::agent::LISTEN.parse().unwrap();

    // Slowloris: connections that never send a byte, opened before and during the flood
    // and kept open past it.
    let held = netns::run_in(&cns, move || {
        let mut v = Vec::new();
        for _ in 0..100 {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                v.push(s);
            }
        }
        v
    })
    .expect("slowloris connections");
    eprintln!("slowloris: {} silent connections open", held.len());
    let mut trickle = netns::run_in(&cns, move || TcpStream::connect(addr))
        .unwrap()
        .expect("trickling connection");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // One header byte a second, never finishing the request.
            let _ = trickle.write_all(b"GET /metrics HTTP/1.1\r\n");
            while !stop.load(Ordering::Relaxed) {
                if trickle.write_all(b"X").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let mut max_rss = rss_kb(pid);
    eprintln!("agent RSS before the flood: {max_rss} kB");
    // Sampled every 5 ms through the flood.
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(rss_kb(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        })
    };
    let t0 = Instant::now();
    let handles: Vec<_> = (0..200)
        .map(|_| {
            let ns = cns.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = http_get(&ns, addr, "/metrics");
                (
                    t.elapsed(),
                    r.map(|(c, b)| (c, b.len())).map_err(|e| format!("{e:#}")),
                )
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    let mut failures = Vec::new();
    for h in handles {
        max_rss = max_rss.max(rss_kb(pid));
        let (took, r) = h.join().expect("scrape thread");
        worst = worst.max(took);
        match r {
            Ok((200, len)) if len > 1000 => {}
            other => failures.push(format!("{other:?}")),
        }
    }
    max_rss = max_rss.max(rss_kb(pid));
    stop.store(true, Ordering::Relaxed);
    let _ = trickler.join();
    max_rss = max_rss.max(sampler.join().expect("RSS sampler"));
    eprintln!(
        "200 concurrent scrapes in {} ms, slowest {} ms, max RSS {} kB, failures {}",
        t0.elapsed().as_millis(),
        worst.as_millis(),
        max_rss,
        failures.len()
    );
    // This binary's own pages are part of RSS (a debug build's are several times a
    // release build's): the split says which part grew.
    eprintln!(
        "after the flood: RssAnon {} kB, RssFile {} kB",
        status_kb(pid, "RssAnon:"),
        status_kb(pid, "RssFile:")
    );
    assert!(failures.is_empty(), "failed scrapes: {failures:?}");
    assert!(
        worst <= Duration::from_secs(2),
        "slowest scrape took {worst:?}"
    );
    assert!(max_rss < 40 * 1024, "RSS {max_rss} kB");
    // Still serving after the flood, with the silent connections still open.
    let (code, _) = agent.get("/healthz").unwrap();
    assert_eq!(code, 200);
    drop(held);
    common::stop(agent);
    lab.teardown().unwrap();
}

/// What the fake daemon does with the next connection.
const GOOD: u8 = 0;
const MALFORMED: u8 = 1;
const HUGE: u8 = 2;
const SILENT: u8 = 3;

const FAKE_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";

/// Serves `get=1` on `path` as `mode` says, until the listener is removed.
fn fake_daemon(path: &std::path::Path, mode: Arc<AtomicU8>) {
    let _ = std::fs::remove_file(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(path).expect("fake UAPI socket");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mode = mode.load(Ordering::Relaxed);
            std::thread::spawn(move || {
                let mut req = [0u8; 64];
                let _ = c.read(&mut req);
                let _ = match mode {
                    GOOD => c.write_all(
                        format!(
                            "listen_port=51999\npublic_key={FAKE_KEY}\nallowed_ip=10.99.0.0/24\n\
                             rx_bytes=1\ntx_bytes=2\nerrno=0\n\n"
                        )
                        .as_bytes(),
                    ),
                    MALFORMED => c.write_all(b"listen_port=51999\nthis is not uapi\nerrno=0\n\n"),
                    HUGE => {
                        let line = vec![b'x'; 1 << 20];
                        let mut r = Ok(());
                        for _ in 0..10 {
                            r = c
                                .write_all(b"unknown_key=")
                                .and_then(|_| c.write_all(&line));
                            if r.is_err() {
                                break;
                            }
                        }
                        r
                    }
                    _ => {
                        std::thread::sleep(Duration::from_secs(4));
                        Ok(())
                    }
                };
            });
        }
    });
}

#[test]
fn bad_uapi_answers_are_counted() {
    if !common::privileged("the fake UAPI socket test needs root (a netns, BPF)") {
        return;
    }
    let ns = format!("{PREFIX}-fake");
    let iface = format!("{PREFIX}fake0");
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(std::process::Stdio::null())
        .status();
    common::ip_cmd(&["netns", "add", &ns]);
    struct Cleanup(String, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
            let _ = std::fs::remove_file(&self.1);
        }
    }
    let sock = std::path::PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
    let _cleanup = Cleanup(ns.clone(), sock.clone());
    common::ip_cmd(&["-n", &ns, "link", "set", "lo", "up"]);
    // A tun device, like wireguard-go's (no dummy driver everywhere).
    common::ip_cmd(&["-n", &ns, "tuntap", "add", "dev", &iface, "mode", "tun"]);
    common::ip_cmd(&["-n", &ns, "link", "set", &iface, "up"]);
    let mode = Arc::new(AtomicU8::new(GOOD));
    fake_daemon(&sock, mode.clone());
    // A Mullvad CLI whose JSON is cut short.
    let mullvad_cli =
        std::env::temp_dir().join(format!("wirescope-faults-mullvad-{}", std::process::id()));
    std::fs::write(&mullvad_cli, "#!/bin/sh\necho '{\"state\":\"connec'\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&mullvad_cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let agent = Agent::start(
        bin(),
        &ns,
        &[
            "--tunnel",
            &iface,
            "--mullvad-cli",
            mullvad_cli.to_str().expect("UTF-8 path"),
            "--mullvad-interval",
            "1s",
        ],
        &log_path("faults-uapi"),
    )
    .expect("agent on the fake");
    let errors = |m: &Metrics| {
        val(
            m,
            "wirescope_source_errors_total",
            &[("source", "wireguard_uapi")],
        )
    };
    let m = agent.scrape().unwrap();
    for s in [
        "wireguard_uapi",
        "wireguard_netlink",
        "rtnetlink",
        "mullvad",
    ] {
        assert_eq!(
            m.select("wirescope_source_errors_total", &[("source", s)])
                .count(),
            1,
            "{s} exported from the start"
        );
    }
    let base = errors(&m);
    assert_eq!(base, 0, "a good answer is no error");
    let key_b64 = {
        use base64::Engine as _;
        let mut k = [0u8; 32];
        k[31] = 1;
        base64::engine::general_purpose::STANDARD.encode(k)
    };
    assert_eq!(
        val(
            &m,
            "wireguard_sent_bytes_total",
            &[("public_key", &key_b64)]
        ),
        2,
        "the fake's peer is read"
    );

    let mut last = base;
    for (name, which, logged) in [
        ("malformed", MALFORMED, "expected key=value"),
        ("huge", HUGE, "answer larger than"),
        ("silent", SILENT, "no complete answer within"),
    ] {
        mode.store(which, Ordering::Relaxed);
        let t = Instant::now();
        let mut now = last;
        while t.elapsed() < Duration::from_secs(8) && now < last + 2 {
            std::thread::sleep(Duration::from_millis(250));
            let s = Instant::now();
            let m = agent.scrape().expect("metrics keep flowing");
            assert!(
                s.elapsed() < Duration::from_secs(2),
                "{name}: a scrape took {:?}",
                s.elapsed()
            );
            assert_eq!(
                val(
                    &m,
                    "wirescope_attach_info",
                    &[("interface", &iface), ("direction", "tx")]
                ),
                1,
                "{name}: the rest is still served"
            );
            assert_eq!(val(&m, "wirescope_build_info", &[]), 1);
            now = errors(&m);
        }
        eprintln!(
            "{name}: wirescope_source_errors_total{{source=\"wireguard_uapi\"}} {last} -> {now}"
        );
        assert!(
            now >= last + 2,
            "{name}: the counter rose by {} in 8 s",
            now - last
        );
        let log = agent.log_text();
        assert!(
            log.lines().filter(|l| l.contains(logged)).count() >= 1,
            "{name}: logged ({logged:?}); log:\n{log}"
        );
        last = now;
    }
    mode.store(GOOD, Ordering::Relaxed);
    // Recovers: the counter stops rising and the peer is back.
    std::thread::sleep(Duration::from_secs(6));
    let m1 = agent.scrape().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let m2 = agent.scrape().unwrap();
    assert_eq!(
        errors(&m1),
        errors(&m2),
        "no errors once the answers are good again"
    );
    assert_eq!(
        val(
            &m2,
            "wireguard_sent_bytes_total",
            &[("public_key", &key_b64)]
        ),
        2,
        "the peer is back"
    );
    let (code, body) = agent.get("/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    // The truncated Mullvad JSON, polled every second, counted each time and logged once.
    let mullvad = |m: &Metrics| val(m, "wirescope_source_errors_total", &[("source", "mullvad")]);
    let (n1, n2) = (mullvad(&m1), mullvad(&m2));
    eprintln!("mullvad: wirescope_source_errors_total{{source=\"mullvad\"}} {n1} -> {n2} in 3 s");
    assert!(n1 >= 5 && n2 >= n1 + 2, "mullvad errors {n1} then {n2}");
    assert_eq!(val(&m2, "mullvad_up", &[]), 0);
    let log = agent.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("Mullvad:") && l.contains("status --json"))
        .count();
    assert_eq!(lines, 1, "the Mullvad failure logged once; log:\n{log}");
    stop(agent);
    let _ = std::fs::remove_file(&mullvad_cli);
}
