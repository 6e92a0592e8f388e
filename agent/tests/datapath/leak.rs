//! Leak detection, exact: `BPF_PROG_TEST_RUN` of the compiled TC programs on byte fixtures
//! (`main.rs` explains what test_run does with the input): what leaves an underlay outside
//! the tunnel while it is up counts once with its kind and L3 bytes, and what is no leak
//! (WireGuard, the tunnel's own traffic, a tunnel that is down) never does. The agent in
//! the lab is the lab tier's `kernel::leak`.
//!
//! Each test enters a fresh network namespace on its own thread: `lo` (ifindex 1) plays the
//! WireGuard interface (TUNNEL | L3), one end of a veth pair the underlay (UNDERLAY,
//! Ethernet); the interfaces are down, so only the test runs reach the programs.
//!
//! Needs root and BPF; without them the tests print why and pass, except with CI=true,
//! where they fail. Run: `cargo test -p wirescope --test datapath -- --test-threads=1 leak::`.

use crate::common;

use std::collections::HashMap;

use agent_common::{
    fixtures::{ETH_P_ARP, Framing, Ipv4, Ipv6, arp_request, tcp, udp, wg, wg_ipv4},
    maps::{
        Counter,
        leak::{LeakConfig, LeakKey, kind},
    },
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};
use common::{Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT, RELAY_V4, UNDERLAY_ETH, relay_v6, v6};
use wirescope::{
    datapath::monotonic_ns,
    sync::leak::{MullvadView, TunnelView, leak_config, settle},
};

const REMOTE_V4: [u8; 4] = [93, 184, 216, 34];
const RESOLVER_V4: [u8; 4] = [9, 9, 9, 9];
const ALLOWED_V4: [u8; 4] = [198, 51, 100, 7];
const EPHEMERAL: u16 = 40000;

/// (packets, bytes) per (ifindex, kind).
type Leaks = HashMap<(u32, u8), (u64, u64)>;

/// `dp`, `tun` (lo) and `under` (lk-under).
type Lab = common::NetnsLab<Leak>;
/// This module's marker (see [`common::NetnsLab`]).
struct Leak;

impl Lab {
    /// A fresh network namespace for this thread, the programs attached to `lo` (tunnel)
    /// and `lk-under` (underlay), one peer with endpoint RELAY:51820 and the local listen
    /// port 51821, the tunnel up. `None` when not root and not in CI.
    fn new() -> Option<Lab> {
        let mut lab = Lab::enter(
            "the leak tests need root (BPF, BPF_PROG_TEST_RUN, network namespaces)",
            ("lk-under", "lk-other"),
            true,
            &[(RELAY_V4.into(), 1), (relay_v6().into(), 1)],
        )?;
        lab.up(true);
        Some(lab)
    }

    /// The tunnel up (for the next minute) or down.
    fn up(&mut self, up: bool) {
        let until = if up {
            monotonic_ns() + 60_000_000_000
        } else {
            0
        };
        self.dp
            .leak
            .set_tunnel_up_until(until)
            .expect("writing LEAK_CFG");
    }

    fn leaks(&self) -> Leaks {
        self.dp
            .leak
            .leaks()
            .expect("reading LEAKS")
            .into_iter()
            .map(|(k, c): (LeakKey, Counter)| ((k.ifindex, k.kind), (c.packets, c.bytes)))
            .collect()
    }

    /// Runs `data` through the program of `dir` as seen on `ifindex` and returns what it
    /// added to LEAKS. Checks the verdict, the unchanged packet, and no refused update.
    fn run(&mut self, dir: Dir, ifindex: u32, gso: (u32, u32), data: &[u8]) -> Leaks {
        let before = self.leaks();
        let out = common::run_tc(&mut self.dp, "leak", dir.prog(), ifindex, gso, data);
        common::assert_unchanged("leak", dir.prog(), data, &out);
        common::assert_no_refused_updates(&self.dp, "leak");
        let mut delta = Leaks::new();
        for (k, (p, b)) in self.leaks() {
            let (p0, b0) = before.get(&k).copied().unwrap_or_default();
            if (p, b) != (p0, b0) {
                delta.insert(k, (p - p0, b - b0));
            }
        }
        delta
    }

    /// Egress on the underlay, Ethernet, no GSO.
    #[track_caller]
    fn expect_tx(&mut self, what: &str, l3: &[u8], want: Option<(u8, u64)>) {
        let under = self.under;
        let got = self.run(Dir::Tx, under, (0, 0), &Framing::Ethernet.frame(l3));
        let want: Leaks = want
            .map(|(k, bytes)| ((under, k), (1, bytes)))
            .into_iter()
            .collect();
        assert_eq!(got, want, "{what}");
    }
}

fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: usize) -> Vec<u8> {
    Ipv4::new(src, dst).build(IPPROTO_UDP, &udp(sport, dport, &vec![7u8; payload]))
}

fn udp6(src: &str, sport: u16, dst: &str, dport: u16, payload: usize) -> Vec<u8> {
    Ipv6::new(v6(src), v6(dst)).build(IPPROTO_UDP, &udp(sport, dport, &vec![7u8; payload]))
}

fn icmp6(dst: &str, icmp_type: u8) -> Vec<u8> {
    let mut body = vec![icmp_type, 0, 0, 0];
    body.extend_from_slice(&[0u8; 20]);
    Ipv6::new(v6("fe80::2"), v6(dst)).build(IPPROTO_ICMPV6, &body)
}

/// What leaves an underlay while the tunnel is up, by kind, with its L3 bytes; and that the
/// same packets count nothing while it is down.
#[test]
fn leaks_by_kind_while_the_tunnel_is_up() {
    let Some(mut lab) = Lab::new() else { return };
    let dns = udp4(LOCAL_V4, EPHEMERAL, RESOLVER_V4, 53, 30);
    lab.expect_tx("UDP to port 53", &dns, Some((kind::DNS, 20 + 8 + 30)));
    lab.expect_tx("again", &dns, Some((kind::DNS, 58)));
    lab.up(false);
    lab.expect_tx("tunnel down: UDP to port 53", &dns, None);
    // Up until a moment already past: not exported (held for the next round's verdict, see
    // the_agents_deadline_counts_and_what_left_unrenewed_is_judged).
    lab.dp.leak.set_tunnel_up_until(monotonic_ns() - 1).unwrap();
    lab.expect_tx("tunnel up time over: UDP to port 53", &dns, None);
    lab.up(true);

    let tcp53 =
        Ipv4::new(LOCAL_V4, RESOLVER_V4).build(IPPROTO_TCP, &tcp(EPHEMERAL, 53, 0, &[1; 40]));
    lab.expect_tx("TCP to port 53", &tcp53, Some((kind::DNS, 20 + 20 + 40)));
    // Port 53 as the source is not DNS to a resolver.
    let from53 = udp4(LOCAL_V4, 53, REMOTE_V4, EPHEMERAL, 30);
    lab.expect_tx("UDP from port 53", &from53, Some((kind::IPV4, 58)));
    let plain = udp4(LOCAL_V4, EPHEMERAL, REMOTE_V4, 443, 100);
    lab.expect_tx("UDP elsewhere", &plain, Some((kind::IPV4, 128)));
    let tcp443 =
        Ipv4::new(LOCAL_V4, REMOTE_V4).build(IPPROTO_TCP, &tcp(EPHEMERAL, 443, 12, &[2; 10]));
    lab.expect_tx("TCP elsewhere", &tcp443, Some((kind::IPV4, 20 + 32 + 10)));
    let ping = Ipv4::new(LOCAL_V4, REMOTE_V4).build(IPPROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1]);
    lab.expect_tx("ICMP echo", &ping, Some((kind::IPV4, 28)));
    let v6plain = udp6("2001:db8:c::2", EPHEMERAL, "2001:db8:ffff::34", 443, 50);
    lab.expect_tx("IPv6 UDP", &v6plain, Some((kind::IPV6, 40 + 8 + 50)));
    let v6dns = udp6("2001:db8:c::2", EPHEMERAL, "2620:fe::fe", 53, 50);
    lab.expect_tx("IPv6 UDP to port 53", &v6dns, Some((kind::DNS, 98)));
    lab.expect_tx(
        "ICMPv6 echo request to a global address",
        &icmp6("2001:db8:ffff::34", 128),
        Some((kind::IPV6, 40 + 24)),
    );
    // The relay's address, but not its WireGuard port: a leak like any other.
    let relay53 = udp4(LOCAL_V4, EPHEMERAL, RELAY_V4, 53, 30);
    lab.expect_tx(
        "UDP to the relay's port 53",
        &relay53,
        Some((kind::DNS, 58)),
    );
    // The relay's WireGuard port, but not a WireGuard message.
    let junk = udp4(LOCAL_V4, LISTEN_PORT, RELAY_V4, RELAY_PORT, 33);
    lab.expect_tx(
        "not WireGuard to the endpoint",
        &junk,
        Some((kind::IPV4, 61)),
    );

    // A first fragment counts once with its own bytes; later fragments never.
    let first = Ipv4::new(LOCAL_V4, RESOLVER_V4)
        .mf(true)
        .build(IPPROTO_UDP, &udp(EPHEMERAL, 53, &[5; 64]));
    lab.expect_tx(
        "first fragment to port 53",
        &first,
        Some((kind::DNS, 20 + 8 + 64)),
    );
    let later = Ipv4::new(LOCAL_V4, RESOLVER_V4)
        .frag_offset(9)
        .build(IPPROTO_UDP, &[5; 64]);
    lab.expect_tx("later fragment", &later, None);

    // GSO: one skb of 3 TCP segments counts 3 packets, each with its own headers.
    let gso =
        Ipv4::new(LOCAL_V4, REMOTE_V4).build(IPPROTO_TCP, &tcp(EPHEMERAL, 443, 0, &[3; 3000]));
    let under = lab.under;
    let got = lab.run(Dir::Tx, under, (3, 1000), &Framing::Ethernet.frame(&gso));
    let want: Leaks = [((under, kind::IPV4), (3, 3040 + 2 * 40))].into();
    assert_eq!(got, want, "GSO");
}

/// The agent's rule as the sync loop writes it: an idle tunnel (up, one peer, never a
/// handshake) makes what leaves the underlay count at once; the value written then holds
/// for 5 s; past a deadline nobody renewed (an agent that died) what leaves is held apart,
/// not exported, until the next round's verdict: leaks when the tunnel up at the last word
/// is up again (the same ifindex), dropped when it is down or another interface now; a
/// tunnel that is down, or Mullvad's while its daemon says connecting, writes 0, which
/// counts nothing at once. (The deadlines that expire here are written 300 ms ahead, as the
/// agent's would stand 4.7 s after its last round.)
#[test]
fn the_agents_deadline_counts_and_what_left_unrenewed_is_judged() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, under) = (lab.tun, lab.under);
    let dns = udp4(LOCAL_V4, EPHEMERAL, RESOLVER_V4, 53, 30);
    let write = |lab: &mut Lab, tunnels: &[TunnelView], mullvad: Option<MullvadView>| {
        let cfg = leak_config(tunnels, mullvad, monotonic_ns());
        settle(&mut lab.dp.leak, cfg, monotonic_ns(), |_| None).expect("writing LEAK_CFG");
        cfg
    };
    // An agent's last word, about to expire.
    let expiring = |lab: &mut Lab, up: u32| {
        let mut cfg = LeakConfig {
            tunnel_up_until_ns: monotonic_ns() + 300_000_000,
            ..LeakConfig::default()
        };
        cfg.up_ifindexes[0] = up;
        lab.dp.leak.set_config(cfg).expect("writing LEAK_CFG");
        cfg.tunnel_up_until_ns
    };
    let held = |lab: &Lab| -> Leaks {
        lab.dp
            .leak
            .unrenewed()
            .expect("reading LEAKS")
            .into_iter()
            .map(|(k, c)| ((k.ifindex, k.kind), (c.packets, c.bytes)))
            .collect()
    };
    let idle = [TunnelView {
        name: "wg0-mullvad",
        ifindex: tun,
        link_up: true,
        peers: 1,
    }];
    let written_at = monotonic_ns();
    let cfg = write(&mut lab, &idle, None);
    assert!(
        cfg.tunnel_up_until_ns >= written_at + 5_000_000_000,
        "{cfg:?} vs {written_at}"
    );
    assert_eq!(cfg.up_ifindexes[..2], [tun, 0], "the tunnel up is named");
    lab.expect_tx("idle tunnel, no handshake", &dns, Some((kind::DNS, 58)));

    // Not renewed: counted up to the deadline, held after it.
    let until = expiring(&mut lab, tun);
    lab.expect_tx("before the deadline", &dns, Some((kind::DNS, 58)));
    while monotonic_ns() <= until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    lab.expect_tx("past the deadline", &dns, None);
    lab.expect_tx("past the deadline, again", &dns, None);
    assert_eq!(held(&lab), [((under, kind::DNS), (2, 116))].into(), "held");
    // The next round: the same tunnel up, so they were leaks.
    let before = lab.leaks();
    write(&mut lab, &idle, None);
    assert_eq!(held(&lab), Leaks::new(), "judged");
    let after = lab.leaks();
    assert_eq!(
        after[&(under, kind::DNS)].0 - before[&(under, kind::DNS)].0,
        2,
        "judged leaks: packets"
    );
    assert_eq!(
        after[&(under, kind::DNS)].1 - before[&(under, kind::DNS)].1,
        116,
        "judged leaks: bytes"
    );
    lab.expect_tx("renewed", &dns, Some((kind::DNS, 58)));

    // Held, then the tunnel is down at the next round, or another interface: dropped.
    let down = [TunnelView {
        link_up: false,
        ..idle[0]
    }];
    let recreated = [TunnelView {
        ifindex: under,
        ..idle[0]
    }];
    for (what, next) in [("down", &down), ("re-created", &recreated)] {
        let until = expiring(&mut lab, tun);
        while monotonic_ns() <= until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        lab.expect_tx(&format!("held, then {what}"), &dns, None);
        assert_eq!(held(&lab), [((under, kind::DNS), (1, 58))].into(), "{what}");
        let before = lab.leaks();
        write(&mut lab, next, None);
        assert_eq!(held(&lab), Leaks::new(), "{what}: judged");
        assert_eq!(lab.leaks(), before, "{what}: not leaks");
    }

    let cfg = write(&mut lab, &down, None);
    assert_eq!(cfg, LeakConfig::default());
    lab.expect_tx("interface down", &dns, None);
    write(&mut lab, &idle, None);
    let connecting = MullvadView {
        interface: "wg0-mullvad",
        connected: false,
    };
    assert_eq!(
        write(&mut lab, &idle, Some(connecting)),
        LeakConfig::default()
    );
    lab.expect_tx("Mullvad connecting", &dns, None);
    let connected = MullvadView {
        connected: true,
        ..connecting
    };
    write(&mut lab, &idle, Some(connected));
    lab.expect_tx("Mullvad connected", &dns, Some((kind::DNS, 58)));
    assert_eq!(held(&lab), Leaks::new(), "nothing held");
}

/// WireGuard, the link's own traffic, allowed destinations, ingress and the tunnel itself
/// never count.
#[test]
fn what_is_not_a_leak() {
    let Some(mut lab) = Lab::new() else { return };
    for (what, msg) in [
        ("initiation", wg::initiation(1)),
        ("response", wg::response(2, 1)),
        ("cookie reply", wg::cookie_reply(1)),
        ("keepalive", wg::keepalive(1, 0)),
        ("data", wg::data(1, 1, 100, 1420)),
    ] {
        // To the known endpoint, from any port.
        let to_ep = wg_ipv4(LOCAL_V4, EPHEMERAL, RELAY_V4, RELAY_PORT, &msg);
        lab.expect_tx(&format!("{what} to the endpoint"), &to_ep, None);
        // From the local listen port, to an endpoint not (yet) known.
        let from_port = wg_ipv4(LOCAL_V4, LISTEN_PORT, REMOTE_V4, 12345, &msg);
        lab.expect_tx(&format!("{what} from the listen port"), &from_port, None);
    }
    let v6wg = Ipv6::new(v6("2001:db8:c::2"), v6("2001:db8:e::10")).build(
        IPPROTO_UDP,
        &udp(EPHEMERAL, RELAY_PORT, &wg::keepalive(1, 0)),
    );
    lab.expect_tx("IPv6 keepalive to the endpoint", &v6wg, None);

    // DHCP and DHCPv6, broadcast, multicast and unicast (renewals).
    for (what, pkt) in [
        ("DHCP discover", udp4([0; 4], 68, [255; 4], 67, 300)),
        ("DHCP renew", udp4(LOCAL_V4, 68, [192, 0, 2, 1], 67, 300)),
        ("DHCP reply", udp4(LOCAL_V4, 67, [192, 0, 2, 9], 68, 300)),
        ("DHCPv6 solicit", udp6("fe80::2", 546, "ff02::1:2", 547, 60)),
        (
            "DHCPv6 renew",
            udp6("2001:db8:c::2", 546, "2001:db8:c::1", 547, 60),
        ),
    ] {
        lab.expect_tx(what, &pkt, None);
    }
    // Neighbour discovery and router solicitation, to unicast and multicast addresses.
    for t in 133..=137 {
        lab.expect_tx(&format!("ICMPv6 {t}"), &icmp6("ff02::2", t), None);
        lab.expect_tx(
            &format!("ICMPv6 {t} unicast"),
            &icmp6("2001:db8:c::1", t),
            None,
        );
    }
    // Destinations that never leave the link or the host.
    for (what, pkt) in [
        ("mDNS", udp4(LOCAL_V4, 5353, [224, 0, 0, 251], 5353, 40)),
        (
            "SSDP",
            udp4(LOCAL_V4, EPHEMERAL, [239, 255, 255, 250], 1900, 40),
        ),
        ("broadcast", udp4(LOCAL_V4, EPHEMERAL, [255; 4], 9, 40)),
        (
            "link-local",
            udp4(LOCAL_V4, EPHEMERAL, [169, 254, 1, 1], 53, 40),
        ),
        (
            "loopback address",
            udp4(LOCAL_V4, EPHEMERAL, [127, 0, 0, 53], 53, 40),
        ),
        ("IPv6 mDNS", udp6("fe80::2", 5353, "ff02::fb", 5353, 40)),
        (
            "IPv6 link-local",
            udp6("fe80::2", EPHEMERAL, "fe80::1", 53, 40),
        ),
        ("IPv6 loopback", udp6("::1", EPHEMERAL, "::1", 53, 40)),
    ] {
        lab.expect_tx(what, &pkt, None);
    }
    // Not IP at all.
    let under = lab.under;
    let arp = Framing::Ethernet.frame_ethertype(ETH_P_ARP, &arp_request(LOCAL_V4, [192, 0, 2, 1]));
    assert_eq!(lab.run(Dir::Tx, under, (0, 0), &arp), Leaks::new(), "ARP");

    // Allowed CIDRs: inside is no leak, outside still is.
    let allow: Vec<ipnet::IpNet> = ["198.51.100.0/24", "2001:db8:aa::/48"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    lab.dp.leak.set_allowed(&allow).expect("LEAK_ALLOW");
    lab.expect_tx(
        "allowed v4",
        &udp4(LOCAL_V4, EPHEMERAL, ALLOWED_V4, 53, 30),
        None,
    );
    lab.expect_tx(
        "just outside the allowed v4",
        &udp4(LOCAL_V4, EPHEMERAL, [198, 51, 101, 7], 53, 30),
        Some((kind::DNS, 58)),
    );
    lab.expect_tx(
        "allowed v6",
        &udp6("2001:db8:c::2", EPHEMERAL, "2001:db8:aa:1::9", 443, 30),
        None,
    );
    lab.expect_tx(
        "just outside the allowed v6",
        &udp6("2001:db8:c::2", EPHEMERAL, "2001:db8:ab::9", 443, 30),
        Some((kind::IPV6, 78)),
    );

    // Ingress on the underlay, and anything on the tunnel, never count.
    let dns = udp4(LOCAL_V4, EPHEMERAL, RESOLVER_V4, 53, 30);
    let framed = Framing::Ethernet.frame(&dns);
    assert_eq!(
        lab.run(Dir::Rx, under, (0, 0), &framed),
        Leaks::new(),
        "ingress"
    );
    let tun = lab.tun;
    for dir in [Dir::Rx, Dir::Tx] {
        assert_eq!(
            lab.run(dir, tun, (0, 0), &dns),
            Leaks::new(),
            "tunnel {dir:?}"
        );
    }
    // Loopback is never an underlay, even when configured as one.
    lab.dp.attach("lo", tun, UNDERLAY_ETH).expect("re-role lo");
    assert_eq!(
        lab.run(Dir::Tx, tun, (0, 0), &framed),
        Leaks::new(),
        "loopback"
    );
    // The same packet on the real underlay still does (the setup was right).
    lab.expect_tx("control", &dns, Some((kind::DNS, 58)));
}
