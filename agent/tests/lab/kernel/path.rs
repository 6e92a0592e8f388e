//! Path-MTU signals in the lab (`LabConfig { hop, path_mtu }`): a router whose onward link
//! has a smaller MTU sends real ICMP fragmentation-needed, and a client veth smaller than
//! the WireGuard packets makes the client's kernel fragment them. (The `BPF_PROG_TEST_RUN`
//! tests of fragments and ICMP too-big are the datapath tier's `path`.)
//!
//! Needs root and the lab tools; without them the test prints why and passes, except with
//! CI=true. Run: `cargo test -p wirescope --test lab -- --test-threads=1 kernel::path::`.

use std::{net::SocketAddr, time::Duration};

use agent_common::wireguard::data_wire_len;
use xtask::{
    agent::Agent,
    capture::Capture,
    lab::{self, GATEWAY_V4, Lab, LabConfig, Topology},
    scrape::Metrics,
    udp::{UdpEcho, recv_sizes, send_udp},
};

use crate::common::{bin, log_path, val};

/// The lab prefix of this module's tests.
const PREFIX: &str = "fx";
const PATH_MTU: u32 = 1400;

/// (a) A DF ping too big for the hop's onward link: the hop's ICMP fragmentation-needed
/// arrives on the client's veth, counted once per message as tcpdump sees them, with
/// MTU 1400. (b) With the client's link to the hop at MTU 1400, a WireGuard packet
/// carrying a 1400-byte inner packet (1468 bytes outer) leaves the client in 2
/// fragments, and the relay's equally big reply (its link to the hop has MTU 1400 too)
/// arrives in 2: outer fragments = 2 per datagram each way, exactly.
#[test]
fn path_mtu_signals_in_the_lab() {
    if !lab::can_run("path_mtu_signals_in_the_lab") {
        return;
    }
    let lab = Lab::up(LabConfig {
        hop: true,
        path_mtu: Some(PATH_MTU),
        ..LabConfig::new(Topology::Single, PREFIX)
    })
    .expect("lab up");
    // No path-MTU searches of the agent's own: their DF probes through the small-MTU hop
    // would bring fragmentation-needed messages of their own into the counts.
    let agent = Agent::start(
        bin(),
        &lab.client().netns,
        &["--pmtu-interval", "off"],
        &log_path("path"),
    )
    .expect("agent starts");
    let c = lab.client();
    let veth = c.underlay().name.clone();
    let relay = lab.exit().address().to_string();
    lab.handshake(Duration::from_secs(20)).expect("handshake");

    // (a) ICMP fragmentation-needed from the hop.
    let too_big = [("interface", veth.as_str()), ("family", "ipv4")];
    let before = agent.scrape().expect("scrape");
    let cap = Capture::start(&c.netns, &veth, "icmp").expect("tcpdump");
    let ping = lab.exec(
        &c.netns,
        &[
            "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1450", &relay,
        ],
    );
    assert!(
        ping.is_err(),
        "a 1478-byte DF packet crossed a 1400-byte link"
    );
    let lines = cap.stop().expect("tcpdump");
    let seen = lines
        .iter()
        .filter(|l| l.contains("need to frag") && l.contains("(mtu 1400)"))
        .count() as u64;
    assert_eq!(seen, 1, "one message per ping: {lines:#?}");
    let after = agent.scrape().expect("scrape");
    assert_eq!(
        val(&after, "wirescope_icmp_too_big_total", &too_big)
            - val(&before, "wirescope_icmp_too_big_total", &too_big),
        seen
    );
    assert_eq!(
        val(
            &after,
            "wirescope_icmp_reported_mtu_bytes",
            &[("interface", veth.as_str())]
        ),
        PATH_MTU as u64
    );
    assert_eq!(
        val(
            &after,
            "wirescope_icmp_too_big_total",
            &[("interface", veth.as_str()), ("family", "ipv6")]
        ),
        0
    );

    // (b) Outer fragments made by the client's own kernel, and by the relay's.
    let u = c.underlay();
    lab.exec(
        &c.netns,
        &["ip", "link", "set", "dev", &veth, "mtu", "1400"],
    )
    .expect("client veth mtu");
    lab.exec(
        &u.peer_netns,
        &["ip", "link", "set", "dev", &u.peer_name, "mtu", "1400"],
    )
    .expect("hop veth mtu");
    const N: usize = 10;
    // 20 + 8 + 1372 = 1400-byte inner packets: 1468 bytes outer at wg MTU 1420.
    let payloads = [1372usize; N];
    assert!(data_wire_len(1400, 1420, 20) > PATH_MTU);
    let frags = |m: &Metrics, dir: &str, layer: &str| {
        val(
            m,
            "wirescope_fragments_total",
            &[
                ("interface", veth.as_str()),
                ("direction", dir),
                ("layer", layer),
            ],
        )
    };
    let dst = SocketAddr::new(GATEWAY_V4.into(), 7000);
    let echo = UdpEcho::start(&lab.exit().netns, dst, N, Duration::from_secs(15))
        .expect("echo on the gateway");
    let before = agent.scrape().expect("scrape");
    let sock = send_udp(&c.netns, None, dst, &payloads).expect("send");
    let got = recv_sizes(&sock, N, Duration::from_secs(10)).expect("echoes");
    assert_eq!(got, payloads, "every datagram came back");
    assert_eq!(echo.stop().expect("echo"), N);
    let after = agent.scrape().expect("scrape");
    let d = |dir, layer| frags(&after, dir, layer) - frags(&before, dir, layer);
    assert_eq!(d("tx", "outer"), 2 * N as u64, "client-made fragments");
    assert_eq!(d("rx", "outer"), 2 * N as u64, "relay-made fragments");
    assert_eq!(d("tx", "other") + d("rx", "other"), 0);
    let tun = c.wg().iface.clone();
    assert_eq!(
        after.sum("wirescope_fragments_total", &[("interface", tun.as_str())]),
        0.0,
        "inner packets fit the tunnel MTU"
    );
    drop(agent);
    lab.teardown().unwrap();
}
