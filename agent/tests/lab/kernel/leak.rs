//! Leak detection in the lab: the agent in the client namespace, where a DNS query and a
//! UDP datagram sent out the client's veth around the tunnel each count once with their
//! kind and L3 bytes, and WireGuard never does; also around an idle tunnel that never had a
//! handshake, while its interface is up with a peer (and, with Mullvad, while its daemon
//! says connected). Lab prefix `lkt`. (The `BPF_PROG_TEST_RUN` tests of leak detection are
//! the datapath tier's `leak`.)
//!
//! Needs root and the lab tools; without them the test prints why and passes, except with
//! CI=true, where it fails. Run: `cargo test -p wirescope --test lab -- --test-threads=1
//! kernel::leak::`.

use crate::common;

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::{Duration, Instant},
};

use common::{Names, lab_up, stop};
use xtask::{
    agent::Agent,
    lab::{LabConfig, Topology},
    scrape::Metrics,
    udp::send_udp,
};

const PREFIX: &str = "lkt";

fn leaked(m: &Metrics, iface: &str, kind: &str) -> (u64, u64) {
    let l = [("interface", iface), ("kind", kind)];
    (
        m.get("wirescope_leaked_packets_total", &l)
            .expect("one series") as u64,
        m.get("wirescope_leaked_bytes_total", &l)
            .expect("one series") as u64,
    )
}

/// (packets, bytes) per kind between two scrapes.
fn leak_delta(b: &Metrics, a: &Metrics, iface: &str) -> [(u64, u64); 3] {
    ["dns", "ipv4", "ipv6"].map(|k| {
        let (bp, bb) = leaked(b, iface, k);
        let (ap, ab) = leaked(a, iface, k);
        (ap - bp, ab - bb)
    })
}

/// Waits (up to 5 s) until the agent's sync has read the handshake: the same tick writes
/// the "tunnel up" time into the programs' map, before the peer state the scrape shows.
fn wait_tunnel_up(agent: &Agent) {
    for _ in 0..50 {
        let m = agent.scrape().unwrap();
        if m.sum("wireguard_latest_handshake_seconds", &[]) > 0.0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the agent saw no handshake within 5 s");
}

/// With the tunnel up, a DNS query and a plain UDP datagram sent around it out of the
/// client's veth (its default route) each count once, with their kind and L3 bytes;
/// WireGuard traffic counts nothing; an agent started with `--leak-allow` for the relay's
/// subnet counts neither. (IPv6 is off on the lab's veths and ARP is not IP, so nothing
/// else leaves the veth but WireGuard to the relay's endpoint.)
#[test]
fn lab_dns_and_udp_around_the_tunnel_count_once() {
    let Some(lab) = lab_up(
        "lab_dns_and_udp_around_the_tunnel_count_once",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names { cns, veth, .. } = Names::of(&lab);
    let relay_ip = IpAddr::from(lab.exit().address());
    assert!(
        lab.exit().address().octets()[..3] == [198, 51, 100],
        "the relay's veth is in 198.51.100.0/24: {}",
        lab.exit().address()
    );
    let agent = common::start(&lab, "leak-lab");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    wait_tunnel_up(&agent);

    // WireGuard only: pings through the tunnel.
    let b = agent.scrape().unwrap();
    common::ping(&lab, 10, &[], false);
    let a = agent.scrape().unwrap();
    assert_eq!(
        leak_delta(&b, &a, &veth),
        [(0, 0); 3],
        "WireGuard is no leak"
    );
    let w = [
        ("interface", veth.as_str()),
        ("direction", "tx"),
        ("message", "data"),
    ];
    assert!(
        a.sum("wirescope_wire_packets_total", &w) - b.sum("wirescope_wire_packets_total", &w)
            >= 10.0,
        "the pings went through the tunnel on {veth}"
    );
    // Every series is there from the start.
    for k in ["dns", "ipv4", "ipv6"] {
        let l = [("interface", veth.as_str()), ("kind", k)];
        assert_eq!(
            a.select("wirescope_leaked_packets_total", &l).count(),
            1,
            "{k}"
        );
    }

    // A DNS query to the relay's veth address (not its WireGuard port), a plain datagram,
    // and a destination outside 198.51.100.0/24 by the default route. One agent per network
    // namespace (a second one refuses to start): the agent with --leak-allow runs after the
    // first has stopped, and gets the same traffic.
    let elsewhere: SocketAddr = "192.0.2.77:9".parse().unwrap();
    let around = |agent: &Agent| {
        let b = agent.scrape().unwrap();
        send_udp(&cns, None, SocketAddr::new(relay_ip, 53), &[40]).expect("DNS query");
        send_udp(&cns, None, SocketAddr::new(relay_ip, 9999), &[100]).expect("UDP datagram");
        std::thread::sleep(Duration::from_millis(200));
        let a = agent.scrape().unwrap();
        send_udp(&cns, None, elsewhere, &[10]).expect("UDP datagram elsewhere");
        std::thread::sleep(Duration::from_millis(200));
        let e = agent.scrape().unwrap();
        (leak_delta(&b, &a, &veth), leak_delta(&a, &e, &veth))
    };
    let (to_relay, to_elsewhere) = around(&agent);
    assert_eq!(
        to_relay,
        [(1, 20 + 8 + 40), (1, 20 + 8 + 100), (0, 0)],
        "(packets, bytes) of dns, ipv4, ipv6"
    );
    assert_eq!(
        to_elsewhere,
        [(0, 0), (1, 20 + 8 + 10), (0, 0)],
        "first agent: (packets, bytes) of dns, ipv4, ipv6"
    );
    stop(agent);

    let allowing = Agent::start_on(
        common::bin(),
        &cns,
        "127.0.0.1:9587",
        &["--leak-allow", "198.51.100.0/24"],
        &common::log_path("leak-allow"),
    )
    .expect("agent with --leak-allow");
    wait_tunnel_up(&allowing);
    let (to_relay, to_elsewhere) = around(&allowing);
    assert_eq!(
        to_relay,
        [(0, 0); 3],
        "--leak-allow 198.51.100.0/24: nothing"
    );
    assert_eq!(
        to_elsewhere,
        [(0, 0), (1, 20 + 8 + 10), (0, 0)],
        "allowing agent: (packets, bytes) of dns, ipv4, ipv6"
    );
    assert!(allowing.stop().expect("stops").success());
    lab.teardown().unwrap();
}

/// How long the tests wait for the agent's next sync rounds (one a second) to have written
/// what the tunnel's state now calls for.
const SYNC_ROUNDS: Duration = Duration::from_millis(2500);

/// Sends, from the client around its tunnel (out its veth by the default route), a DNS
/// query with 40 bytes of payload and a datagram of 100 bytes to the relay's veth address,
/// and one of 10 bytes to 192.0.2.77; returns what the agent counted for them, per kind.
fn send_around(agent: &Agent, cns: &str, veth: &str, relay_ip: IpAddr) -> [(u64, u64); 3] {
    let b = agent.scrape().unwrap();
    send_udp(cns, None, SocketAddr::new(relay_ip, 53), &[40]).expect("DNS query");
    send_udp(cns, None, SocketAddr::new(relay_ip, 9999), &[100]).expect("UDP datagram");
    send_udp(cns, None, "192.0.2.77:9".parse().unwrap(), &[10]).expect("UDP elsewhere");
    std::thread::sleep(Duration::from_millis(300));
    leak_delta(&b, &agent.scrape().unwrap(), veth)
}

/// What [`send_around`] counts while the tunnel is up: (packets, bytes) of dns, ipv4, ipv6.
const COUNTED: [(u64, u64); 3] = [(1, 20 + 8 + 40), (2, 20 + 8 + 100 + 20 + 8 + 10), (0, 0)];

/// No handshake on any peer of the client's interface, as the agent reads it.
fn assert_no_handshake(agent: &Agent, what: &str) {
    let m = agent.scrape().unwrap();
    assert!(
        m.select("wireguard_latest_handshake_seconds", &[]).count() >= 1,
        "{what}: the peer is there"
    );
    assert_eq!(
        m.sum("wireguard_latest_handshake_seconds", &[]),
        0.0,
        "{what}: never a handshake"
    );
}

/// A stub `mullvad` in `dir` printing `json` for `status --json` (written aside and renamed
/// over, so that a call never runs a half-written script).
fn mullvad_prints(dir: &Path, json: &str) -> String {
    let tmp = dir.join(".mullvad.new");
    std::fs::write(
        &tmp,
        format!("#!/bin/sh\ncat <<'WIRESCOPE_EOF'\n{json}\nWIRESCOPE_EOF\n"),
    )
    .expect("write the stub");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.join("mullvad");
    std::fs::rename(&tmp, &path).expect("rename the stub");
    path.display().to_string()
}

/// Waits (up to 10 s) until the agent exports `mullvad_tunnel_state{state}` 1.
fn wait_mullvad_state(agent: &Agent, state: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let m = agent.scrape().unwrap();
        if m.get("mullvad_tunnel_state", &[("state", state)]).ok() == Some(1.0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the agent never showed Mullvad {state}; its log:\n{}",
        agent.log_text()
    );
}

/// Waits (up to 10 s) until the agent has sent a probe to `target` through `iface`.
fn wait_probe_sent(agent: &Agent, target: &str, iface: &str) {
    let start = Instant::now();
    let l = [("target", target), ("interface", iface)];
    while start.elapsed() < Duration::from_secs(10) {
        let m = agent.scrape().unwrap();
        if m.sum("wirescope_probe_sent_total", &l) >= 1.0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the agent sent no probe to {target} through {iface}; its log:\n{}",
        agent.log_text()
    );
}

/// Everything bypasses an idle tunnel: nothing is sent through it, so it never has a
/// handshake, yet it is up (its interface up, a peer configured) and what leaves the veth
/// around it counts, exactly. Its interface taken down, nothing counts; up again, it counts
/// again. With Mullvad watching (a stub `mullvad` naming this interface as its tunnel), it
/// counts only while the daemon says connected, not while it says connecting.
///
/// The agent sends nothing into a tunnel by itself, except on Mullvad: while the daemon
/// says connected it probes the in-tunnel gateway 10.64.0.1 through the tunnel (README,
/// "Active probes"; the lab's gateway has that address too), which makes a handshake with
/// a relay that answers, as the daemon's own connectivity check does before it says
/// connected. So for the Mullvad part the relay no longer knows the client (its peer
/// removed): the agent's probes go into the tunnel, WireGuard's initiations go unanswered,
/// there is never a handshake, and what leaves around the tunnel counts all the same. The
/// probe interval is 1 s there, so that the probes surely went out before the leaks do.
#[test]
fn lab_idle_tunnel_leaks_count_without_a_handshake() {
    let Some(lab) = lab_up(
        "lab_idle_tunnel_leaks_count_without_a_handshake",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let Names { cns, veth, tun, .. } = Names::of(&lab);
    let relay_ip = IpAddr::from(lab.exit().address());
    let agent = common::start(&lab, "leak-idle");
    assert_no_handshake(&agent, "at start");
    assert_eq!(
        send_around(&agent, &cns, &veth, relay_ip),
        COUNTED,
        "idle tunnel: (packets, bytes) of dns, ipv4, ipv6"
    );
    assert_no_handshake(&agent, "after the leaks");

    let ip = |state: &str| {
        let out = lab
            .exec(&cns, &["ip", "link", "set", "dev", tun.as_str(), state])
            .expect("ip link set");
        assert!(out.status.success(), "ip link set {tun} {state}: {out:?}");
    };
    ip("down");
    std::thread::sleep(SYNC_ROUNDS);
    assert_eq!(
        send_around(&agent, &cns, &veth, relay_ip),
        [(0, 0); 3],
        "tunnel interface down"
    );
    ip("up");
    std::thread::sleep(SYNC_ROUNDS);
    assert_eq!(
        send_around(&agent, &cns, &veth, relay_ip),
        COUNTED,
        "tunnel interface up again"
    );
    assert_no_handshake(&agent, "after the interface came back");
    stop(agent);

    // The Mullvad daemon names this interface as its tunnel.
    let dir = std::env::temp_dir().join(format!("wirescope-leak-mullvad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mullvad/connected_single.json");
    let connected = std::fs::read_to_string(&fixture)
        .expect("connected_single.json")
        .trim_end()
        .replace("wg0-mullvad", &tun);
    assert!(connected.contains(&format!("\"tunnel_interface\":\"{tun}\"")));
    let connecting = connected.replace("\"state\":\"connected\"", "\"state\":\"connecting\"");
    assert_ne!(connecting, connected);
    let cli = mullvad_prints(&dir, &connecting);
    let relay = lab.exit();
    let client_key = lab.client().wg().public_key.clone();
    let out = lab
        .exec(
            &relay.netns,
            &[
                "wg",
                "set",
                &relay.wg().iface,
                "peer",
                &client_key,
                "remove",
            ],
        )
        .expect("wg set peer remove");
    assert!(
        out.status.success(),
        "the relay forgets the client: {out:?}"
    );
    let agent = Agent::start(
        common::bin(),
        &cns,
        &[
            "--mullvad-cli",
            &cli,
            "--mullvad-interval",
            "1s",
            "--probe-interval",
            "1s",
        ],
        &common::log_path("leak-idle-mullvad"),
    )
    .expect("agent with a Mullvad stub");
    wait_mullvad_state(&agent, "connecting");
    std::thread::sleep(SYNC_ROUNDS);
    assert_eq!(
        send_around(&agent, &cns, &veth, relay_ip),
        [(0, 0); 3],
        "Mullvad connecting"
    );
    mullvad_prints(&dir, &connected);
    wait_mullvad_state(&agent, "connected");
    wait_probe_sent(&agent, "10.64.0.1", &tun);
    std::thread::sleep(SYNC_ROUNDS);
    assert_eq!(
        send_around(&agent, &cns, &veth, relay_ip),
        COUNTED,
        "Mullvad connected"
    );
    assert_no_handshake(&agent, "with Mullvad");
    stop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    lab.teardown().unwrap();
}
