//! The lab's impairments, checked end to end through real tunnels: the impairing relay in
//! the hop drops, swaps and delays exactly what it is told (its counters and what the client
//! receives agree), dropping handshake responses keeps the client from ever completing a
//! handshake, the relay can sit between the multihop relays instead, and the small-MTU hop
//! router sends real ICMP fragmentation-needed. Needs root; see `xtask::lab::can_run`.
//!
//! The tests share one prefix, so they must not run in parallel: `--test-threads=1`
//! (`cargo xtask test` does that).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use xtask::capture::Capture;
use xtask::impair::{DirRules, ImpairStats, Impairment, Place, wait_for};
use xtask::lab::{self, GATEWAY_V4, Lab, LabConfig, Role, Topology};
use xtask::udp::{UdpEcho, recv_sizes, send_udp};
use xtask::wg;

const PREFIX: &str = "wsi";

fn up(topology: Topology, hop: bool) -> Lab {
    Lab::up(LabConfig {
        hop,
        ..LabConfig::new(topology, PREFIX)
    })
    .expect("lab up")
}

fn to_client(rules: DirRules) -> Impairment {
    Impairment {
        to_client: rules,
        ..Default::default()
    }
}

/// Echoes one datagram per size off the gateway and returns the sizes the client got back,
/// in arrival order.
fn echo_through(lab: &Lab, sizes: &[usize]) -> Vec<usize> {
    let dst = SocketAddr::new(GATEWAY_V4.into(), 7000);
    let echo = UdpEcho::start(&lab.exit().netns, dst, sizes.len(), Duration::from_secs(10))
        .expect("echo server on the gateway");
    let sock = send_udp(&lab.client().netns, None, dst, sizes).expect("send");
    let got = recv_sizes(&sock, sizes.len(), Duration::from_secs(2)).expect("receive");
    assert_eq!(echo.stop().unwrap(), sizes.len(), "the gateway echoed all");
    got
}

/// The smallest round trip of `count` pings to the gateway, in milliseconds.
fn min_rtt_ms(lab: &Lab, count: u32) -> f64 {
    let out = lab
        .exec(
            &lab.client().netns,
            &[
                "ping",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                &GATEWAY_V4.to_string(),
            ],
        )
        .expect("ping through the tunnel");
    let out = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 80.415/80.602/80.790/0.155 ms
    let line = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or_else(|| panic!("no rtt line in {out}"));
    line.split('=')
        .nth(1)
        .unwrap()
        .trim()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Threads of this process that belong to an impairing relay (`impair-to-client` and
/// `impair-to-relay`, cut to 15 characters; the test binary's main thread is `impair-HASH`).
fn relay_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("impair-to-"))
        })
        .count()
}

/// Towards the client, between two readings: data messages counted, dropped, pairs swapped,
/// data messages forwarded. (Other messages, e.g. a handshake response late under load, pass
/// uncounted and are taken out of the forwarded count.)
/// The relay's counters once they stop moving: it counts a datagram as forwarded after
/// sending it, so the echo can be back before the count is (seen: 99 of 100 forwarded).
/// Two equal reads 50 ms apart, at most 2 s.
fn settled(stats: impl Fn() -> ImpairStats) -> ImpairStats {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = stats();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = stats();
        if now == last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

fn delta(after: &ImpairStats, before: &ImpairStats) -> (u64, u64, u64, u64) {
    let (a, b) = (&after.to_client, &before.to_client);
    let uncounted = (a.received - b.received) - (a.counted - b.counted);
    (
        a.counted - b.counted,
        a.dropped - b.dropped,
        a.reordered_pairs - b.reordered_pairs,
        a.forwarded - b.forwarded - uncounted,
    )
}

#[test]
fn drops_every_10th_data_message_to_the_client() {
    if !lab::can_run("drops_every_10th_data_message_to_the_client") {
        return;
    }
    let lab = up(Topology::Single, true);
    let imp = lab.start_impairment(Impairment::none()).unwrap();
    lab.handshake(Duration::from_secs(15)).unwrap();
    imp.set(to_client(DirRules {
        drop_every: Some(10),
        ..Default::default()
    }));
    let before = imp.stats();
    let sizes: Vec<usize> = (0..100).map(|i| 100 + i).collect();
    let got = echo_through(&lab, &sizes);
    let after = settled(|| imp.stats());
    // The 10th, 20th, ... reply is the one missing.
    let want: Vec<usize> = sizes
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % 10 != 0)
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        delta(&after, &before),
        (100, 10, 0, 90),
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.to_relay.dropped, 0);
    // The client learned nothing of the hop: its peer endpoint is the hop's address.
    let d = lab.wg_dump(Role::Client).unwrap();
    assert_eq!(d.peers[0].endpoint, Some(imp.listen_addr()));
    let hop = lab.hop().unwrap().netns.clone();
    assert!(wg::udp_port_bound_in(&hop, lab::RELAY_PORT).unwrap());
    assert_eq!(relay_threads(), 2, "one thread per direction");
    let stats = imp.stop().unwrap();
    assert!(stats.to_relay.forwarded >= 100);
    // Nothing of the relay is left: its threads are joined, its sockets closed.
    assert_eq!(relay_threads(), 0);
    assert!(!wg::udp_port_bound_in(&hop, lab::RELAY_PORT).unwrap());
    let d = lab.wg_dump(Role::Client).unwrap();
    assert_eq!(d.peers[0].endpoint, Some(lab.entry_endpoint()), "restored");
    lab.teardown().unwrap();
}

#[test]
fn swaps_every_5th_pair_to_the_client() {
    if !lab::can_run("swaps_every_5th_pair_to_the_client") {
        return;
    }
    let lab = up(Topology::Single, true);
    let imp = lab.start_impairment(Impairment::none()).unwrap();
    lab.handshake(Duration::from_secs(15)).unwrap();
    imp.set(to_client(DirRules {
        reorder_every: Some(5),
        ..Default::default()
    }));
    let before = imp.stats();
    let sizes: Vec<usize> = (0..100).map(|i| 100 + i).collect();
    let got = echo_through(&lab, &sizes);
    let after = settled(|| imp.stats());
    let mut want = sizes.clone();
    for p in (5..=50).step_by(5) {
        want.swap(2 * p - 2, 2 * p - 1);
    }
    // WireGuard accepts them (within its replay window) and delivers them as they came.
    assert_eq!(got, want);
    assert_eq!(
        delta(&after, &before),
        (100, 0, 10, 100),
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.to_client.unpaired, 0);
    drop(imp);
    lab.teardown().unwrap();
}

#[test]
fn delays_40ms_each_way() {
    if !lab::can_run("delays_40ms_each_way") {
        return;
    }
    let lab = up(Topology::Single, true);
    let imp = lab.start_impairment(Impairment::none()).unwrap();
    lab.handshake(Duration::from_secs(15)).unwrap();
    let plain = min_rtt_ms(&lab, 3);
    // One-way delays: a round trip crosses the relay twice.
    imp.set(Impairment::delay(Duration::from_millis(40)));
    let before = imp.stats();
    let rtt = min_rtt_ms(&lab, 5);
    let after = settled(|| imp.stats());
    assert!(
        (80.0..80.0 + plain + 40.0).contains(&rtt),
        "rtt {rtt} ms, {plain} ms without"
    );
    assert_eq!(after.to_relay.delayed - before.to_relay.delayed, 5);
    assert_eq!(after.to_client.delayed - before.to_client.delayed, 5);
    drop(imp);
    lab.teardown().unwrap();
}

#[test]
fn dropped_handshake_responses_keep_the_client_out() {
    if !lab::can_run("dropped_handshake_responses_keep_the_client_out") {
        return;
    }
    let lab = up(Topology::Single, true);
    let imp = lab
        .start_impairment(to_client(DirRules {
            drop_handshake_responses: true,
            ..Default::default()
        }))
        .unwrap();
    let key = lab.exit().wg().public_key.clone();
    let hs = |lab: &Lab| {
        lab.wg_dump(Role::Client)
            .unwrap()
            .peer(&key)
            .unwrap()
            .latest_handshake
    };
    if hs(&lab) != 0 {
        // Something (e.g. an IPv6 report into the tunnel) already made a session: start the
        // client's peer afresh, still pointing at the relay.
        let (ns, iface) = (&lab.client().netns, &lab.client().wg().iface);
        let (ep, key) = (imp.listen_addr().to_string(), key.as_str());
        lab.exec(ns, &["wg", "set", iface, "peer", key, "remove"])
            .unwrap();
        lab.exec(
            ns,
            &[
                "wg",
                "set",
                iface,
                "peer",
                key,
                "endpoint",
                &ep,
                "allowed-ips",
                "0.0.0.0/0,::/0",
            ],
        )
        .unwrap();
    }
    assert_eq!(hs(&lab), 0, "no handshake before any traffic");
    // Traffic for 6 s: the client initiates at once and retries after 5 s.
    let t = Instant::now();
    let _ = lab.exec(
        &lab.client().netns,
        &[
            "ping",
            "-q",
            "-c",
            "6",
            "-i",
            "1",
            "-W",
            "1",
            &GATEWAY_V4.to_string(),
        ],
    );
    assert!(t.elapsed() >= Duration::from_secs(5));
    assert_eq!(hs(&lab), 0, "a handshake completed");
    // Every initiation was answered, and every answer dropped.
    let s = wait_for(&imp, Duration::from_secs(2), |s| {
        s.to_client.messages[2] == s.to_relay.messages[1]
    })
    .unwrap();
    let initiations = s.to_relay.messages[1];
    assert!((2..=3).contains(&initiations), "{s:?}");
    assert_eq!(s.to_client.dropped_handshake_responses, initiations);
    assert_eq!(s.to_client.forwarded, 0);
    assert_eq!(s.to_relay.messages[4], 0, "no data without a session");
    // Lifting the rule lets the next retry through.
    imp.set(Impairment::none());
    lab.handshake(Duration::from_secs(15)).unwrap();
    assert!(hs(&lab) > 0);
    drop(imp);
    lab.teardown().unwrap();
}

#[test]
fn multihop_delay_between_the_relays_only() {
    if !lab::can_run("multihop_delay_between_the_relays_only") {
        return;
    }
    let lab = up(Topology::Multihop, false);
    lab.handshake(Duration::from_secs(15)).unwrap();
    let plain = min_rtt_ms(&lab, 3);
    let imp = lab
        .start_impairment_at(Place::Relays, Impairment::delay(Duration::from_millis(40)))
        .unwrap();
    let rtt = min_rtt_ms(&lab, 5);
    assert!(
        (80.0..80.0 + plain + 40.0).contains(&rtt),
        "rtt {rtt} ms, {plain} ms without"
    );
    // Only the exit layer went through the relay: its messages, and no entry-layer ones.
    let s = imp.stop().unwrap();
    assert!(
        s.to_relay.messages[4] >= 5 && s.to_client.messages[4] >= 5,
        "{s:?}"
    );
    assert_eq!(s.to_relay.delayed, s.to_relay.received);
    // Restored: the exit peer's endpoint is the exit relay again and the delay is gone.
    let d = lab.wg_dump(Role::Client).unwrap();
    let xp = d.peer(&lab.exit().wg().public_key).unwrap();
    assert_eq!(xp.endpoint, Some(lab.exit_endpoint()));
    assert!(min_rtt_ms(&lab, 3) < 40.0);
    lab.teardown().unwrap();
}

#[test]
fn small_mtu_hop_sends_fragmentation_needed() {
    if !lab::can_run("small_mtu_hop_sends_fragmentation_needed") {
        return;
    }
    let lab = Lab::up(LabConfig {
        hop: true,
        path_mtu: Some(1400),
        ..LabConfig::new(Topology::Single, PREFIX)
    })
    .expect("lab up");
    let c = lab.client();
    let relay = lab.exit().address().to_string();
    let cap = Capture::start(&c.netns, &c.underlay().name, "icmp").unwrap();
    // 1450 + 8 + 20 = 1478 bytes with DF: fits the client's link, not the hop's onward one.
    let big = lab.exec(
        &c.netns,
        &[
            "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1450", &relay,
        ],
    );
    assert!(
        big.is_err(),
        "a 1478-byte DF packet crossed a 1400-byte link"
    );
    // Below the path MTU it goes through.
    lab.exec(
        &c.netns,
        &[
            "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1372", &relay,
        ],
    )
    .unwrap();
    let lines = cap.stop().unwrap();
    let hop = lab.hop().unwrap().address();
    let too_big: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.contains(&format!(
                "{hop} > {}: ICMP {relay} unreachable - need to frag",
                c.address()
            ))
        })
        .collect();
    assert_eq!(too_big.len(), 1, "{lines:#?}");
    assert!(too_big[0].contains("(mtu 1400)"), "{too_big:?}");
    // The tunnel still works: WireGuard's outer packets do not set DF, so the hop fragments.
    let got = echo_through(&lab, &[1392, 100]);
    assert_eq!(got, [1392, 100]);
    lab.teardown().unwrap();
}
