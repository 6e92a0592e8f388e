//! The agent killed with SIGKILL and restarted (issues 8 and 13), in the lab (prefix `wsr`):
//! the counting maps are pinned under /sys/fs/bpf/wirescope/<netns>/<layout id>/ and reused,
//! so the counters continue from where they were; stale pins of an incompatible build are
//! removed with one log line; a real Prometheus scraping through the restart sees
//! `resets()` = 0 for every datapath counter series.
//!
//! Packets sent while no agent runs are counted, exactly, whatever the TC hook: under TCX
//! the links are pinned in the pin directory's `hooks/` and keep running the killed agent's
//! programs, and the restarted agent replaces the program in each link in place (the same
//! link ids afterwards, new program ids, one program per hook); clsact filters outlive the
//! process anyway (no link pins; the restarted agent replaces the filters). The tail-call
//! arrays are pinned beside them, so a leak sent in the gap counts too. A clean stop leaves
//! no hook pinned and no program attached, and keeps the counting maps.
//!
//! `interfaces_gone_while_down_keep_their_names`: the tunnel deleted and re-created (as
//! Mullvad does on every connect) and a second WireGuard interface deleted while no agent
//! runs: the restarted agent exports their counts under their names (pinned `IFACE_NAMES`,
//! and the peers' labels from `PEER_IDS`), never as `ifindexN`, with their exact values.
//!
//! The agent runs under `ip netns exec`, whose private mount namespace hides the host's
//! bpffs; the test mounts bpffs at /sys/fs/bpf on the host when it is not there, and the
//! agent pins in it through its parent's (this test's) mount namespace.
//!
//! Needs root and the lab's tools (and `prometheus`); with CI=true a missing prerequisite
//! fails. Run: `cargo test -p wirescope --test lab -- --test-threads=1 kernel::restart::`.

use crate::common;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{COUNTER_FAMILIES, Names, bring_back, echo_via_tunnel, start, val};
use xtask::{
    agent::Agent,
    lab::{self, GATEWAY_V4, Lab, LabConfig, Topology},
    prometheus::{Options, Prometheus},
    scrape::Metrics,
    udp::{UdpEcho, recv_sizes, send_udp},
};

const PREFIX: &str = "wsr";

/// A second peer of the client: a fixed key, allowed IPs 10.99.0.0/24 (routed into the
/// tunnel), an endpoint on the relay's address at a port nothing listens on (so kernel
/// WireGuard queues its packets rather than refusing them for want of an endpoint).
const GHOST: &str = "R2hvc3RQZWVyS2V5Rm9yVGhlUmVzdGFydFRlc3QwMDA=";
const GHOST_HOST: [u8; 4] = [10, 99, 0, 1];

fn add_ghost_peer(lab: &Lab, cns: &str, tun: &str) {
    let out = lab
        .exec(cns, &["wg", "show", tun, "endpoints"])
        .expect("wg show endpoints");
    let text = String::from_utf8_lossy(&out.stdout);
    let relay_ip = text
        .split_whitespace()
        .nth(1)
        .and_then(|ep| ep.parse::<SocketAddr>().ok())
        .map(|ep| ep.ip().to_string())
        .unwrap_or_else(|| panic!("the relay's endpoint in {text:?}"));
    let endpoint = format!("{relay_ip}:51999");
    for args in [
        vec![
            "wg",
            "set",
            tun,
            "peer",
            GHOST,
            "allowed-ips",
            "10.99.0.0/24",
            "endpoint",
            &endpoint,
        ],
        vec!["ip", "route", "replace", "10.99.0.0/24", "dev", tun],
    ] {
        let o = lab.exec(cns, &args).expect("lab exec");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Scrapes until the agent lists `peer` (its allowed IPs are then in the maps).
fn wait_peer_known(agent: &Agent, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent
        .scrape()
        .expect("scrape")
        .sum("wirescope_peer_info", &[("peer", peer)])
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "peer {peer} not synced within 10 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Echoes `n` datagrams from the client through the tunnel to the gateway and back.
fn echo(lab: &Lab, n: usize, port: u16) {
    let dst = SocketAddr::new(GATEWAY_V4.into(), port);
    let payloads: Vec<usize> = (0..n).map(|i| 40 + i).collect();
    echo_via_tunnel(lab, dst, &payloads, || ());
}

/// Scrapes until the tunnel packet series of `peer` exists (the first sync has run).
fn scrape_synced(agent: &Agent, tun: &str, peer: &str) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = agent.scrape().expect("scrape");
        let l = [("interface", tun), ("peer", peer), ("direction", "tx")];
        if m.get("wirescope_tunnel_packets_total", &l)
            .is_ok_and(|v| v > 0.0)
        {
            return m;
        }
        assert!(Instant::now() < deadline, "no tunnel series within 10 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tun_packets(m: &Metrics, tun: &str, peer: &str, dir: &str) -> u64 {
    val(
        m,
        "wirescope_tunnel_packets_total",
        &[("interface", tun), ("peer", peer), ("direction", dir)],
    )
}

fn wire_data(m: &Metrics, peer: &str, dir: &str) -> u64 {
    m.sum(
        "wirescope_wire_packets_total",
        &[("peer", peer), ("direction", dir), ("message", "data")],
    ) as u64
}

/// The pin directory the agent logged ("BPF maps pinned in DIR (layout ID): R of N reused").
fn pinned_line(log: &str) -> (PathBuf, String) {
    let line = log
        .lines()
        .find(|l| l.contains("BPF maps pinned in "))
        .unwrap_or_else(|| panic!("no pinning line in the agent's log:\n{log}"));
    let rest = &line[line.find("BPF maps pinned in ").unwrap() + "BPF maps pinned in ".len()..];
    let dir = rest.split(" (layout").next().unwrap();
    (PathBuf::from(dir), line.to_string())
}

/// (packets, bytes) summed over every key and CPU of the pinned COUNTERS map in `dir`.
fn pinned_totals(dir: &Path) -> (u64, u64) {
    use agent_common::maps::{Counter, CounterKey};
    let data = aya::maps::MapData::from_pin(dir.join("COUNTERS")).expect("pinned COUNTERS");
    let map: aya::maps::PerCpuHashMap<_, CounterKey, Counter> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))
            .expect("COUNTERS is a per-CPU hash");
    let mut t = (0, 0);
    for item in map.iter() {
        let (_, values) = item.expect("COUNTERS entry");
        for v in values.iter() {
            t.0 += v.packets;
            t.1 += v.bytes;
        }
    }
    t
}

/// The relay's underlay address (from the tunnel's endpoint).
fn relay_ip(lab: &Lab, cns: &str, tun: &str) -> IpAddr {
    let out = lab
        .exec(cns, &["wg", "show", tun, "endpoints"])
        .expect("wg show endpoints");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|ep| ep.parse::<SocketAddr>().ok())
        .map(|ep| ep.ip())
        .unwrap_or_else(|| panic!("the relay's endpoint in {text:?}"))
}

/// The L3 bytes of UDP/IPv4 datagrams with these payloads.
fn l3_bytes(payloads: impl IntoIterator<Item = usize>) -> u64 {
    payloads.into_iter().map(|p| (20 + 8 + p) as u64).sum()
}

fn tun_bytes(m: &Metrics, tun: &str, peer: &str, dir: &str) -> u64 {
    val(
        m,
        "wirescope_tunnel_bytes_total",
        &[("interface", tun), ("peer", peer), ("direction", dir)],
    )
}

/// (packets, bytes) counted as IPv4 leaks on `iface`.
fn leaked_v4(m: &Metrics, iface: &str) -> (u64, u64) {
    let l = [("interface", iface), ("kind", "ipv4")];
    (
        val(m, "wirescope_leaked_packets_total", &l),
        val(m, "wirescope_leaked_bytes_total", &l),
    )
}

/// The ifindex of `iface` in `ns`.
fn ifindex_in(ns: &str, iface: &str) -> u32 {
    let out = xtask::netns::exec(ns, &["ip", "-j", "link", "show", "dev", iface])
        .unwrap_or_else(|e| panic!("ip link show {iface}: {e:#}"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v.get(0)
        .and_then(|l| l.get("ifindex"))
        .and_then(|i| i.as_u64())
        .unwrap_or_else(|| panic!("no ifindex for {iface}")) as u32
}

/// The names of the pins in the pin directory's `hooks/`, sorted.
fn hook_pins(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pin_dir.join("hooks"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// (link id, program id) of the TCX link pinned at `path`.
fn pinned_link(path: &Path) -> (u32, u32) {
    let link = aya::programs::links::PinnedLink::from_pin(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let info = aya::programs::links::FdLink::from(link)
        .info()
        .unwrap_or_else(|e| panic!("link info of {}: {e}", path.display()));
    (info.id(), info.program_id())
}

/// wirescope programs hooked to `ifaces` in `ns`, both directions: clsact filters (from `tc
/// filter show`) or TCX programs (queried in the namespace; bpftool 7.1 does not list TCX).
fn hooked_programs(ns: &str, ifaces: &[String], clsact: bool) -> usize {
    let mut n = 0;
    for iface in ifaces {
        if clsact {
            for dir in ["ingress", "egress"] {
                let out = xtask::netns::exec(ns, &["tc", "filter", "show", "dev", iface, dir])
                    .expect("tc filter show");
                // One line per filter, which names its program.
                n += String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("wirescope_"))
                    .count();
            }
        } else {
            let iface = iface.clone();
            n += xtask::netns::run_in(ns, move || {
                use aya::programs::{SchedClassifier, TcAttachType};
                [TcAttachType::Ingress, TcAttachType::Egress]
                    .into_iter()
                    .map(|t| {
                        let (_, progs) = SchedClassifier::query_tcx(&iface, t)
                            .unwrap_or_else(|e| panic!("query_tcx {iface}: {e}"));
                        progs
                            .iter()
                            .filter(|p| {
                                p.name_as_str().is_some_and(|n| n.starts_with("wirescope_"))
                            })
                            .count()
                    })
                    .sum::<usize>()
            })
            .expect("in the namespace");
        }
    }
    n
}

/// Waits until the killed agent's last "up" deadline has passed for sure (its last sync
/// round, before `killed_at`, + the hold): what leaves an underlay from then on is held for
/// the next agent's verdict. On a slow machine (the VMs) the gap is longer anyway.
fn wait_past_hold(killed_at: Instant) {
    let past = killed_at
        + Duration::from_nanos(agent_common::maps::leak::TUNNEL_UP_HOLD_NS)
        + Duration::from_millis(200);
    if let Some(left) = past.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

#[test]
fn sigkill_restart_keeps_counters() {
    if !lab::can_run("sigkill_restart_keeps_counters") {
        return;
    }
    common::ensure_host_bpffs();
    let lab = Lab::up(LabConfig::new(Topology::Single, PREFIX)).expect("lab up");
    let Names {
        cns,
        tun,
        relay,
        veth,
    } = Names::of(&lab);

    // A real Prometheus in the client's namespace, scraping the agent every second.
    let prom = Prometheus::start(Options {
        netns: Some(cns.clone()),
        config: "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  \
                 evaluation_interval: 1s\nscrape_configs:\n  - job_name: wirescope\n    \
                 static_configs:\n      - targets: ['127.0.0.1:9586']\n"
            .to_string(),
        rules: None,
    })
    .expect("prometheus starts");

    let agent = start(&lab, "restart-1");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let (pin_dir, line) = pinned_line(&agent.log_text());
    assert!(
        pin_dir.starts_with("/sys/fs/bpf/wirescope")
            || pin_dir
                .to_string_lossy()
                .contains("/root/sys/fs/bpf/wirescope"),
        "pinned under the host's /sys/fs/bpf/wirescope: {line}"
    );
    assert!(pin_dir.is_dir(), "{} exists", pin_dir.display());
    assert!(pin_dir.join("COUNTERS").exists(), "COUNTERS pinned");

    const N: usize = 20;
    const M: usize = 7;
    const K: usize = 9;
    let b0 = scrape_synced(&agent, &tun, &relay);
    echo(&lab, N, 7001);
    let s1 = agent.scrape().expect("scrape");
    assert_eq!(
        tun_packets(&s1, &tun, &relay, "tx") - tun_packets(&b0, &tun, &relay, "tx"),
        N as u64
    );
    let base_tx = tun_packets(&s1, &tun, &relay, "tx");
    let base_rx = tun_packets(&s1, &tun, &relay, "rx");
    let base_tx_bytes = tun_bytes(&s1, &tun, &relay, "tx");
    let base_rx_bytes = tun_bytes(&s1, &tun, &relay, "rx");
    let base_leaks = leaked_v4(&s1, &veth);
    let base_wire_tx = wire_data(&s1, &relay, "tx");

    // A second peer on the client's interface, with G datagrams counted under it.
    // wireguard-go lists peers in another order on every read: the restarted agent must
    // give each peer its old id (pinned), or the two peers' counts swap.
    const G: usize = 5;
    add_ghost_peer(&lab, &cns, &tun);
    wait_peer_known(&agent, GHOST);
    send_udp(&cns, None, SocketAddr::new(GHOST_HOST.into(), 9), &[60; G])
        .expect("datagrams to the second peer");
    std::thread::sleep(Duration::from_millis(300));
    let s1 = agent.scrape().expect("scrape");
    assert_eq!(
        tun_packets(&s1, &tun, GHOST, "tx"),
        G as u64,
        "the second peer's packets"
    );
    prom.wait_scraped(Duration::from_secs(20))
        .expect("prometheus scrapes the agent");
    let sel = format!(
        "wirescope_tunnel_packets_total{{interface=\"{tun}\",direction=\"tx\"}} >= {base_tx}"
    );
    prom.wait_for_data(&sel, Duration::from_secs(20))
        .expect("prometheus saw the first round");
    let clsact = agent.log_text().contains("with clsact");
    let ifaces = [tun.clone(), veth.clone()];
    let ifindexes = ifaces.clone().map(|i| ifindex_in(&cns, &i));
    let link_pins: Vec<PathBuf> = ifindexes
        .iter()
        .flat_map(|i| {
            ["ingress", "egress"].map(|d| pin_dir.join("hooks").join(format!("tcx-{i}-{d}")))
        })
        .collect();

    // SIGKILL mid-traffic: a burst of echoed datagrams in flight while the agent dies.
    const BURST: usize = 200;
    let burst_dst = SocketAddr::new(GATEWAY_V4.into(), 7009);
    let burst_echo = UdpEcho::start(&lab.exit().netns, burst_dst, BURST, Duration::from_secs(20))
        .expect("burst echo");
    let burst = {
        let lab_ns = cns.clone();
        // The socket is kept open to the end, so the echoes never draw ICMP errors.
        std::thread::spawn(move || send_udp(&lab_ns, None, burst_dst, &vec![100; BURST]))
    };
    std::thread::sleep(Duration::from_millis(2));
    agent.kill().expect("SIGKILL");
    let killed_at = Instant::now();
    let burst_sock = burst.join().unwrap().expect("burst sent");
    let _ = recv_sizes(&burst_sock, BURST, Duration::from_secs(10));
    let _ = burst_echo.stop();
    std::thread::sleep(Duration::from_millis(300));

    // What keeps counting while no agent runs, per hook.
    let pins = hook_pins(&pin_dir);
    let links_before: Vec<(u32, u32)> = if clsact {
        // clsact filters outlive the process: no link to pin.
        assert!(
            !pins.iter().any(|p| p.starts_with("tcx-")),
            "clsact: no link pins: {pins:?}"
        );
        Vec::new()
    } else {
        // TCX: both directions of both interfaces pinned, still attached.
        for p in &link_pins {
            assert!(p.exists(), "tcx: {} pinned: {pins:?}", p.display());
        }
        link_pins.iter().map(|p| pinned_link(p)).collect()
    };
    for array in ["TRANSIT_PROG-", "LEAK_PROG-"] {
        assert_eq!(
            pins.iter().filter(|p| p.starts_with(array)).count(),
            1,
            "{array}* pinned once: {pins:?}"
        );
    }
    assert_eq!(
        hooked_programs(&cns, &ifaces, clsact),
        4,
        "the killed agent's programs stay hooked"
    );

    // The gap: traffic with no agent running, and what the kernel counted meanwhile, read
    // from the pinned map itself; and a datagram around the tunnel, a leak.
    let g0 = pinned_totals(&pin_dir);
    echo(&lab, M, 7002);
    let relay_ip = relay_ip(&lab, &cns, &tun);
    wait_past_hold(killed_at);
    send_udp(&cns, None, SocketAddr::new(relay_ip, 9999), &[100])
        .expect("a datagram around the tunnel");
    eprintln!("the leak left {:?} after the kill", killed_at.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    let g1 = pinned_totals(&pin_dir);
    eprintln!("pinned COUNTERS (packets, bytes) over the gap: {g0:?} -> {g1:?}");
    assert!(
        g1.0 >= g0.0 + 2 * M as u64,
        "counted through the gap: {g0:?} -> {g1:?}"
    );

    // A stale pin directory from an incompatible build, beside ours.
    let ns_dir = pin_dir.parent().unwrap().to_path_buf();
    let stale = ns_dir.join("00000000deadbeef");
    std::fs::create_dir_all(&stale).expect("stale dir");
    std::os::unix::fs::symlink("/nonexistent-old-map", stale.join("COUNTERS"))
        .expect("bogus map file");

    let agent = start(&lab, "restart-2");
    let log = agent.log_text();
    let removals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("removing pinned maps of an incompatible build"))
        .collect();
    assert_eq!(removals.len(), 1, "one removal line:\n{log}");
    assert!(removals[0].contains("00000000deadbeef"), "{}", removals[0]);
    assert!(!stale.exists(), "the stale directory is gone");
    let (pin_dir2, line2) = pinned_line(&log);
    assert_eq!(pin_dir2, pin_dir, "the same pin directory");
    let reused: Vec<&str> = line2.rsplit(": ").next().unwrap().split(' ').collect();
    assert_eq!(reused[0], reused[2], "every pinned map reused: {line2}");

    let s2 = scrape_synced(&agent, &tun, &relay);
    assert!(
        log.contains("2 peer ids continued from the pinned maps")
            || agent
                .log_text()
                .contains("2 peer ids continued from the pinned maps"),
        "both peers' ids read back:\n{}",
        agent.log_text()
    );
    // Each peer's counts under its own key, whatever order the peers were read in.
    assert_eq!(
        tun_packets(&s2, &tun, GHOST, "tx"),
        G as u64,
        "the second peer keeps its count (and its id)"
    );
    let tx2 = tun_packets(&s2, &tun, &relay, "tx");
    let rx2 = tun_packets(&s2, &tun, &relay, "rx");
    eprintln!(
        "hook {}: before the kill tx {base_tx} rx {base_rx}; after the restart tx {tx2} rx {rx2} \
         (burst 200 + gap {M} sent meanwhile)",
        if clsact { "clsact" } else { "tcx" }
    );
    // Every packet of the burst and of the gap, exactly: counted by the killed agent's
    // programs, none lost or counted twice when the new ones took over.
    let gap_bytes = l3_bytes((0..M).map(|i| 40 + i));
    let burst_bytes = l3_bytes([100; BURST]);
    for (dir, base, now, base_bytes) in [
        ("tx", base_tx, tx2, base_tx_bytes),
        ("rx", base_rx, rx2, base_rx_bytes),
    ] {
        assert_eq!(
            now,
            base + (BURST + M) as u64,
            "{dir}: the burst and the gap counted"
        );
        assert_eq!(
            tun_bytes(&s2, &tun, &relay, dir),
            base_bytes + burst_bytes + gap_bytes,
            "{dir}: their bytes"
        );
    }
    let leaks = leaked_v4(&s2, &veth);
    assert_eq!(
        (leaks.0 - base_leaks.0, leaks.1 - base_leaks.1),
        (1, 20 + 8 + 100),
        "the leak sent in the gap counted once"
    );
    let verdict = format!(
        "1 packets (128 bytes) left the underlays outside the tunnels while the tunnel state \
         went unrenewed (no agent running, or its sync stalled): counted as leaks, since {tun} \
         was up before and is up now"
    );
    assert!(
        agent.log_text().contains(&verdict),
        "the verdict logged:\n{}",
        agent.log_text()
    );
    // The new programs took over the hooks: one per hook, and under TCX in the same links.
    assert_eq!(
        hooked_programs(&cns, &ifaces, clsact),
        4,
        "one program per interface and direction after the restart"
    );
    if !clsact {
        for (p, (link, prog)) in link_pins.iter().zip(&links_before) {
            let (link2, prog2) = pinned_link(p);
            assert_eq!(link2, *link, "{}: the same link", p.display());
            assert_ne!(prog2, *prog, "{}: a new program in it", p.display());
        }
        assert_eq!(
            agent
                .log_text()
                .matches("replacing the previous agent's programs in its pinned links")
                .count(),
            2,
            "both interfaces taken over:\n{}",
            agent.log_text()
        );
    }
    let pins = hook_pins(&pin_dir);
    for array in ["TRANSIT_PROG-", "LEAK_PROG-"] {
        assert_eq!(
            pins.iter().filter(|p| p.starts_with(array)).count(),
            1,
            "only the new agent's {array}* pinned: {pins:?}"
        );
    }
    assert!(wire_data(&s2, &relay, "tx") >= base_wire_tx);

    echo(&lab, K, 7003);
    let s3 = agent.scrape().expect("scrape");
    assert_eq!(
        tun_packets(&s3, &tun, &relay, "tx"),
        tx2 + K as u64,
        "exact after restart"
    );
    assert_eq!(
        tun_packets(&s3, &tun, &relay, "rx"),
        rx2 + K as u64,
        "exact after restart"
    );
    for f in COUNTER_FAMILIES {
        for (l, v) in s1.select(f, &[]) {
            let now = s3.select(f, &[]).find(|(l3, _)| *l3 == l).map(|x| x.1);
            assert!(now.is_some_and(|n| n >= v), "{f} {l:?}: {v} -> {now:?}");
        }
    }

    // Prometheus, scraping through the restart: no counter reset.
    let last = tun_packets(&s3, &tun, &relay, "tx");
    let sel =
        format!("wirescope_tunnel_packets_total{{interface=\"{tun}\",direction=\"tx\"}} >= {last}");
    prom.wait_for_data(&sel, Duration::from_secs(20))
        .expect("prometheus saw the last round");
    for f in COUNTER_FAMILIES {
        let resets = prom
            .query(&format!("resets({f}[5m])"))
            .expect("resets query");
        assert!(!resets.is_empty(), "{f}: no series in Prometheus");
        for s in &resets {
            assert_eq!(s.value, 0.0, "{f} {:?} reset {} times", s.labels, s.value);
        }
    }
    let up = prom
        .query("changes(up{job=\"wirescope\"}[5m])")
        .expect("up query");
    eprintln!("prometheus up changes through the restart: {up:?}");

    assert!(agent.stop().expect("clean stop").success(), "clean exit");
    assert!(
        pin_dir.join("COUNTERS").exists(),
        "a clean stop keeps the counting maps pinned"
    );
    assert_eq!(
        hook_pins(&pin_dir),
        Vec::<String>::new(),
        "a clean stop leaves no hook pinned"
    );
    assert_eq!(
        hooked_programs(&cns, &ifaces, clsact),
        0,
        "a clean stop leaves no program attached"
    );
    prom.stop().expect("prometheus stops");
    // The lab's namespace goes with the lab: its pins would only be collected by the next
    // agent's start; remove them now.
    std::fs::remove_dir_all(&ns_dir).expect("removing the test's pins");
}

/// The peer of the second interface in `interfaces_gone_while_down_keep_their_names`.
const GHOST2: &str = "U2Vjb25kSW50ZXJmYWNlUGVlcktleVJlc3RhcnQwMDA=";

/// A second WireGuard interface `{PREFIX}x0` in the client's namespace (the lab's
/// implementation), up, with one peer: allowed IPs 10.98.0.0/24 (routed into it), an
/// endpoint on the relay's address at a port nothing listens on (its packets wait for a
/// handshake that never comes, after TC egress counted them).
fn add_second_interface(lab: &Lab, cns: &str, relay_ip: IpAddr) -> String {
    let name = format!("{PREFIX}x0");
    lab.wireguard
        .create(cns, &name, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{}: {e:#}", lab.wireguard));
    let key = xtask::wg::genkey().expect("wg genkey");
    let conf = format!(
        "[Interface]\nPrivateKey = {}\n\n[Peer]\nPublicKey = {GHOST2}\nAllowedIPs = \
         10.98.0.0/24\nEndpoint = {relay_ip}:51998\n",
        key.private.trim()
    );
    xtask::wg::setconf(cns, &name, &conf).expect("setconf");
    for args in [
        vec!["ip", "link", "set", &name, "up"],
        vec!["ip", "route", "replace", "10.98.0.0/24", "dev", &name],
    ] {
        let o = lab.exec(cns, &args).expect("lab exec");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    name
}

/// Waits until `iface` no longer exists in `cns`.
fn wait_gone(cns: &str, iface: &str) {
    let t = Instant::now();
    while xtask::netns::exec(cns, &["ip", "link", "show", "dev", iface]).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{iface} still exists"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Interfaces deleted while no agent runs keep their names: the client's tunnel deleted and
/// re-created under a new ifindex (Mullvad re-creates wg0-mullvad on every connect) and a
/// second WireGuard interface deleted for good. The restarted agent exports the counts of
/// both old ifindexes under their interface names, exactly as they were, and no series
/// named `ifindexN`; the re-created tunnel's new counts add to the same series.
#[test]
fn interfaces_gone_while_down_keep_their_names() {
    if !lab::can_run("interfaces_gone_while_down_keep_their_names") {
        return;
    }
    common::ensure_host_bpffs();
    let lab = Lab::up(LabConfig::new(Topology::Single, PREFIX)).expect("lab up");
    let Names {
        cns,
        tun,
        relay,
        veth,
    } = Names::of(&lab);
    let agent = start(&lab, "names-1");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let (pin_dir, _) = pinned_line(&agent.log_text());
    let relay_ip = relay_ip(&lab, &cns, &tun);
    let second = add_second_interface(&lab, &cns, relay_ip);
    wait_peer_known(&agent, GHOST2);

    const N: usize = 12;
    const G: usize = 4;
    const K: usize = 6;
    scrape_synced(&agent, &tun, &relay);
    echo(&lab, N, 7101);
    send_udp(
        &cns,
        None,
        SocketAddr::new([10, 98, 0, 1].into(), 9),
        &[60; G],
    )
    .expect("datagrams into the second interface");
    std::thread::sleep(Duration::from_millis(300));
    let s1 = agent.scrape().expect("scrape");
    assert_eq!(
        tun_packets(&s1, &second, GHOST2, "tx"),
        G as u64,
        "the second interface's packets"
    );
    let conf = String::from_utf8_lossy(&lab.exec(&cns, &["wg", "showconf", &tun]).unwrap().stdout)
        .into_owned();
    let old_tun = ifindex_in(&cns, &tun);

    agent.kill().expect("SIGKILL");
    let killed_at = Instant::now();
    for iface in [&second, &tun] {
        let o = lab
            .exec(&cns, &["ip", "link", "del", "dev", iface])
            .expect("ip link del");
        assert!(o.status.success(), "deleting {iface}");
        wait_gone(&cns, iface);
    }
    let _ = std::fs::remove_file(xtask::wg::socket_path(&second));
    bring_back(&lab, &tun, &conf);
    let new_tun = ifindex_in(&cns, &tun);
    assert_ne!(new_tun, old_tun, "{tun} re-created under a new ifindex");
    // A datagram around the re-created tunnel, after the killed agent's word expired: no
    // tunnel it said was up is up now (one is gone, the other another interface), so
    // nothing tells that a tunnel was up when it left, and it is no leak.
    wait_past_hold(killed_at);
    send_udp(&cns, None, SocketAddr::new(relay_ip, 9999), &[100])
        .expect("a datagram around the tunnel");

    let agent = start(&lab, "names-2");
    wait_peer_known(&agent, &relay);
    let s2 = agent.scrape().expect("scrape");
    assert_eq!(
        leaked_v4(&s2, &veth),
        leaked_v4(&s1, &veth),
        "what left while no agent ran, after the tunnel was re-created, is no leak"
    );
    assert!(
        agent.log_text().contains(
            "1 packets (128 bytes) left the underlays outside the tunnels while the tunnel \
             state went unrenewed (no agent running, or its sync stalled): not counted"
        ),
        "the verdict logged:\n{}",
        agent.log_text()
    );
    for f in COUNTER_FAMILIES {
        let orphans: Vec<_> = s2
            .select(f, &[])
            .filter(|(l, _)| l.get("interface").is_some_and(|i| i.starts_with("ifindex")))
            .collect();
        assert!(
            orphans.is_empty(),
            "{f}: counts without a name: {orphans:?}"
        );
    }
    for dir in ["tx", "rx"] {
        assert_eq!(
            tun_packets(&s2, &tun, &relay, dir),
            tun_packets(&s1, &tun, &relay, dir),
            "{dir}: the deleted {tun}'s packets, under its name"
        );
        assert_eq!(
            tun_bytes(&s2, &tun, &relay, dir),
            tun_bytes(&s1, &tun, &relay, dir),
            "{dir}: their bytes"
        );
    }
    assert_eq!(
        tun_packets(&s2, &second, GHOST2, "tx"),
        G as u64,
        "the deleted {second}'s packets, under its name"
    );
    assert_eq!(
        tun_bytes(&s2, &second, GHOST2, "tx"),
        l3_bytes([60; G]),
        "their bytes"
    );

    // The re-created tunnel counts on, in the same series.
    echo(&lab, K, 7102);
    let s3 = agent.scrape().expect("scrape");
    for dir in ["tx", "rx"] {
        assert_eq!(
            tun_packets(&s3, &tun, &relay, dir),
            tun_packets(&s1, &tun, &relay, dir) + K as u64,
            "{dir}: exact after the re-creation and the restart"
        );
    }
    // An interface that appears after the agent dropped its capabilities gets its links
    // pinned too (the hooks directory is reached through the agent's own descriptor), and
    // a clean stop removes every pin.
    let second = add_second_interface(&lab, &cns, relay_ip);
    wait_peer_known(&agent, GHOST2);
    if !agent.log_text().contains("with clsact") {
        let idx = ifindex_in(&cns, &second);
        let pins = hook_pins(&pin_dir);
        for d in ["ingress", "egress"] {
            assert!(
                pins.contains(&format!("tcx-{idx}-{d}")),
                "{second} (ifindex {idx}) {d} pinned: {pins:?}\n{}",
                agent.log_text()
            );
        }
    }
    assert!(agent.stop().expect("clean stop").success(), "clean exit");
    assert_eq!(
        hook_pins(&pin_dir),
        Vec::<String>::new(),
        "a clean stop leaves no hook pinned:\n{}",
        std::fs::read_to_string(common::log_path("names-2")).unwrap_or_default()
    );
    let _ = std::fs::remove_file(xtask::wg::socket_path(&second));
    std::fs::remove_dir_all(pin_dir.parent().unwrap()).expect("removing the test's pins");
}
