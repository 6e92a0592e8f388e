//! The shipped systemd unit under a real systemd (issue 13), in the lab (prefix `wsu`):
//! `deploy/wirescope.service`, byte for byte, started, restarted and stopped by systemd
//! 252 (Debian bookworm's) as PID 1 of a systemd-nspawn container, which joins the lab
//! client's network namespace. The agent's counters continue across `systemctl restart`:
//! exact packet and byte counts before and after, no series going backwards, a real
//! Prometheus scraping throughout sees `resets()` = 0, and the journal has no "BPF maps
//! not pinned" warning (the unit's sandbox once made /sys/fs/bpf read-only, and every
//! restart started from zero).
//!
//! The container: the Debian root of `xtask::sysroot` (debootstrap, cached in
//! target/systemd-root), the agent binary bound read-only at the unit's
//! /usr/local/bin/wirescope, the unit at /etc/systemd/system/wirescope.service, the host's
//! bpffs at /sys/fs/bpf (what systemd mounts there on a real host), wireguard-go's control
//! sockets (/run/wireguard) read-only; nspawn grants the container CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN and the bpf and perf_event_open system calls, which the unit then narrows
//! down for the service as it would on a host.
//!
//! Host only (not in `kernel::`: the VMs have no container tools; the unit does not depend
//! on the kernel's WireGuard). Needs root, the lab's tools, systemd-nspawn and debootstrap
//! (`cargo xtask setup`), and prometheus; with CI=true a missing prerequisite, or a root
//! that cannot be built, fails. Run:
//! `cargo test -p wirescope --test lab -- --test-threads=1 systemd::`.

use crate::common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{COUNTER_FAMILIES, Names, bin, echo_via_tunnel, val};
use xtask::{
    lab::{self, GATEWAY_V4, Lab, LabConfig, Topology},
    nspawn::{Boot, Container},
    prometheus::{Options, Prometheus},
    scrape::{Metrics, http_get},
};

const PREFIX: &str = "wsu";
/// The unit's default listen address, in the client's namespace the container shares.
const AGENT: &str = "127.0.0.1:9586";
/// The capability sets the unit leaves the agent (CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON,
/// CAP_BPF), as /proc/PID/status prints them.
const UNIT_CAPS: &str = "000000c000003000";

fn skip_unless(test: &str, r: anyhow::Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {e:#} (CI=true, so this fails instead of being skipped)")
        }
        Err(e) => {
            eprintln!("skipping {test}: {e:#}");
            false
        }
    }
}

fn scrape(ns: &str) -> Metrics {
    let addr: SocketAddr = AGENT.parse().expect("address");
    let (status, body) = http_get(ns, addr, "/metrics").expect("scrape");
    assert_eq!(status, 200, "GET /metrics: {body}");
    Metrics::parse(&body).expect("metrics parse")
}

/// Waits until the service runs a process other than `old` that answers /healthz and has
/// read `peer` from WireGuard (its counters then count under it); returns its PID.
fn wait_serving(c: &Container, ns: &str, old: &str, peer: &str) -> String {
    let addr: SocketAddr = AGENT.parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pid = c.unit_property("wirescope", "MainPID").unwrap_or_default();
        let healthy = pid != "0"
            && pid != old
            && http_get(ns, addr, "/healthz").is_ok_and(|(s, _)| s == 200)
            && scrape(ns).sum("wirescope_peer_info", &[("peer", peer)]) >= 1.0;
        if healthy {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "wirescope.service not serving within 30 s (MainPID {pid}, was {old}); its \
             journal:\n{}",
            c.journal("wirescope").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Echoes `n` datagrams (payloads 40, 41, ... bytes) from the client through the tunnel
/// and back; returns their L3 bytes (IPv4 and UDP headers included).
fn echo(lab: &Lab, n: usize, port: u16) -> u64 {
    let payloads: Vec<usize> = (0..n).map(|i| 40 + i).collect();
    echo_via_tunnel(
        lab,
        SocketAddr::new(GATEWAY_V4.into(), port),
        &payloads,
        || (),
    );
    payloads.iter().map(|p| (20 + 8 + p) as u64).sum()
}

/// (tx packets, rx packets, tx bytes, rx bytes) of the tunnel's counters for `peer`.
fn tunnel(m: &Metrics, tun: &str, peer: &str) -> [u64; 4] {
    let l = |dir| [("interface", tun), ("peer", peer), ("direction", dir)];
    [
        val(m, "wirescope_tunnel_packets_total", &l("tx")),
        val(m, "wirescope_tunnel_packets_total", &l("rx")),
        val(m, "wirescope_tunnel_bytes_total", &l("tx")),
        val(m, "wirescope_tunnel_bytes_total", &l("rx")),
    ]
}

/// The agent's pin lines in the journal, for failure messages.
fn pin_lines(journal: &str) -> String {
    journal
        .lines()
        .filter(|l| l.contains("BPF maps "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `/sys/fs/bpf/wirescope/<inode>-*`: the pins of the namespace `ns`, which the test
/// removes (the namespace goes with the lab; the next agent would only then collect them).
fn pin_dirs_of(ns: &str) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(ino) = std::fs::metadata(xtask::netns::path(ns)).map(|m| m.ino()) else {
        return Vec::new();
    };
    std::fs::read_dir("/sys/fs/bpf/wirescope")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{ino}-")))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn restart_under_systemd_keeps_counters() {
    let test = "restart_under_systemd_keeps_counters";
    if !lab::can_run(test)
        || !skip_unless(test, xtask::nspawn::prerequisites())
        || !skip_unless(test, xtask::sysroot::prerequisites())
    {
        return;
    }
    if !skip_unless(
        test,
        if lab::on_path("prometheus") {
            Ok(())
        } else {
            Err(anyhow::anyhow!("prometheus (`cargo xtask setup`)"))
        },
    ) {
        return;
    }
    common::ensure_host_bpffs();
    let root = xtask::sysroot::ensure().expect("the Debian root with systemd (debootstrap)");
    let unit = xtask::build::repo_root().join("deploy/wirescope.service");

    let lab = Lab::up(LabConfig::new(Topology::Single, PREFIX)).expect("lab up");
    let Names {
        cns, tun, relay, ..
    } = Names::of(&lab);
    let prom = Prometheus::start(Options {
        netns: Some(cns.clone()),
        config: format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: \
             1s\nscrape_configs:\n  - job_name: wirescope\n    static_configs:\n      - \
             targets: ['{AGENT}']\n"
        ),
        rules: None,
    })
    .expect("prometheus starts");

    let mut bind_ro = vec![
        (
            bin().to_path_buf(),
            PathBuf::from("/usr/local/bin/wirescope"),
        ),
        (
            unit.clone(),
            PathBuf::from("/etc/systemd/system/wirescope.service"),
        ),
    ];
    // wireguard-go's control sockets (kernel WireGuard has none).
    if Path::new("/run/wireguard").is_dir() {
        bind_ro.push(("/run/wireguard".into(), "/run/wireguard".into()));
    }
    let boot_start = Instant::now();
    let c = Container::boot(
        &Boot {
            root: root.root.clone(),
            machine: PREFIX.into(),
            netns: Some(cns.clone()),
            capabilities: ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
                .map(String::from)
                .into(),
            system_calls: ["bpf", "perf_event_open"].map(String::from).into(),
            bind: vec!["/sys/fs/bpf".into()],
            bind_ro,
            log: std::env::temp_dir().join("wirescope-systemd-container.log"),
        },
        Duration::from_secs(60),
    )
    .expect("the container boots");
    let version = c.systemctl(&["--version"]).expect("systemctl --version");
    eprintln!(
        "{} booted as PID 1 of the container in {:.1} s (root {} {:.0} s)",
        version.lines().next().unwrap_or_default(),
        boot_start.elapsed().as_secs_f64(),
        if root.built {
            "built in"
        } else {
            "cached, checked in"
        },
        root.took.as_secs_f64()
    );

    // As deploy/README.md says to.
    c.systemctl(&["enable", "--now", "wirescope"])
        .expect("systemctl enable --now wirescope");
    let pid1 = wait_serving(&c, &cns, "", &relay);
    // The unit's sandbox applies: exactly its four capabilities, no new privileges.
    let status = c
        .exec(&["cat", &format!("/proc/{pid1}/status")])
        .expect("the service's /proc status");
    let status = String::from_utf8_lossy(&status.stdout);
    for want in [
        format!("CapBnd:\t{UNIT_CAPS}"),
        format!("CapEff:\t{UNIT_CAPS}"),
        "NoNewPrivs:\t1".to_string(),
    ] {
        assert!(
            status.contains(&want),
            "{want} in the service's status:\n{status}"
        );
    }

    lab.handshake(Duration::from_secs(20)).expect("handshake");
    const N: usize = 20;
    const M: usize = 7;
    let s0 = scrape(&cns);
    let n_bytes = echo(&lab, N, 7101);
    let s1 = scrape(&cns);
    let [t0, r0, tb0, rb0] = tunnel(&s0, &tun, &relay);
    let before = tunnel(&s1, &tun, &relay);
    assert_eq!(
        before,
        [t0 + N as u64, r0 + N as u64, tb0 + n_bytes, rb0 + n_bytes],
        "the first round, exactly (tx, rx packets; tx, rx bytes)"
    );
    prom.wait_for_data(
        &format!(
            "wirescope_tunnel_packets_total{{interface=\"{tun}\",direction=\"tx\"}} >= {}",
            before[0]
        ),
        Duration::from_secs(20),
    )
    .expect("prometheus saw the first round");

    c.systemctl(&["restart", "wirescope"])
        .expect("systemctl restart wirescope");
    let pid2 = wait_serving(&c, &cns, &pid1, &relay);
    let m_bytes = echo(&lab, M, 7102);
    let s2 = scrape(&cns);
    let after = tunnel(&s2, &tun, &relay);
    let journal = c.journal("wirescope").expect("the service's journal");
    assert_eq!(
        after,
        [
            before[0] + M as u64,
            before[1] + M as u64,
            before[2] + m_bytes,
            before[3] + m_bytes
        ],
        "after `systemctl restart` (PID {pid1} -> {pid2}) the counters continue: the \
         first round plus exactly the second (tx, rx packets; tx, rx bytes). The agent's \
         pinning:\n{}",
        pin_lines(&journal)
    );
    for f in COUNTER_FAMILIES {
        for (l, v) in s1.select(f, &[]) {
            let now = s2.select(f, &[]).find(|(l2, _)| *l2 == l).map(|x| x.1);
            assert!(
                now.is_some_and(|n| n >= v),
                "{f} {l:?}: {v} -> {now:?} across the restart"
            );
        }
    }

    // Prometheus scraped through the restart: no counter reset.
    prom.wait_for_data(
        &format!(
            "wirescope_tunnel_packets_total{{interface=\"{tun}\",direction=\"tx\"}} >= {}",
            after[0]
        ),
        Duration::from_secs(20),
    )
    .expect("prometheus saw the second round");
    for f in COUNTER_FAMILIES {
        let resets = prom
            .query(&format!("resets({f}[5m])"))
            .expect("resets query");
        assert!(!resets.is_empty(), "{f}: no series in Prometheus");
        for s in &resets {
            assert_eq!(s.value, 0.0, "{f} {:?} reset {} times", s.labels, s.value);
        }
    }

    // Both starts pinned, the second reusing every map of the first.
    assert!(
        !journal.contains("BPF maps not pinned"),
        "the pinning warning in the journal:\n{}",
        pin_lines(&journal)
    );
    let pinned: Vec<&str> = journal
        .lines()
        .filter(|l| l.contains("BPF maps pinned in /sys/fs/bpf/wirescope/"))
        .collect();
    assert_eq!(pinned.len(), 2, "one pinning line per start:\n{journal}");
    let reused = pinned[1]
        .split("): ")
        .nth(1)
        .and_then(|r| r.split(" reused").next())
        .and_then(|r| r.split_once(" of "))
        .unwrap_or_else(|| panic!("no `R of N reused` in {:?}", pinned[1]));
    assert_eq!(reused.0, reused.1, "every map reused: {}", pinned[1]);
    assert!(
        reused.0.parse::<u32>().is_ok_and(|n| n > 0),
        "{}",
        pinned[1]
    );

    // A clean stop: SIGTERM, exit 0.
    c.systemctl(&["stop", "wirescope"])
        .expect("systemctl stop wirescope");
    assert_eq!(
        c.unit_property("wirescope", "Result").expect("Result"),
        "success"
    );
    assert_eq!(
        c.unit_property("wirescope", "ExecMainStatus")
            .expect("ExecMainStatus"),
        "0"
    );
    c.poweroff().expect("the container powers off");
    prom.stop().expect("prometheus stops");
    for d in pin_dirs_of(&cns) {
        std::fs::remove_dir_all(&d).expect("removing the test's pins");
    }
    lab.teardown().expect("lab down");
}
