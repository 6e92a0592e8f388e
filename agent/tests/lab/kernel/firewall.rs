//! Path MTU behind the Mullvad app's firewall: the client namespace gets an nftables table
//! modelled on the one the daemon installs while connected (talpid-core's Linux firewall:
//! table `inet mullvad`, output and input policy drop; to the relay only UDP to its WireGuard
//! port carrying the tunnel's fwmark, from it only established UDP from that port; the
//! tunnel interface and loopback allowed; everything else rejected). The client's WireGuard
//! interface carries Mullvad's fwmark 0x6d6f6c65, as the daemon sets it.
//!
//! The path is the single-relay lab with a hop routing onward over a 1400-byte link, the
//! tunnel MTU 1420. The agent's don't-fragment echo search to the relay's endpoint gets no
//! reply there (the firewall rejects echo to the relay), so before the in-tunnel search
//! there was no `wirescope_recommended_mtu_bytes`. With it, the recommendation comes from
//! echoes to the in-tunnel gateway whose WireGuard carrier arrived unfragmented, exactly:
//!
//! - carriers are 60 + (inner size padded to 16) bytes, so inner sizes up to 1328 fit 1400
//!   (1388 bytes) and 1329 does not (1404): alone that recommends 1328 (`tunnel_echo`);
//! - where the implementation sends its datagrams with don't-fragment (the hop then answers
//!   with fragmentation-needed, MTU 1400, which the firewall drops but the TC programs see),
//!   the report narrows the 1388..=1403 bracket to 1400: 1400 - 60 = 1340
//!   (`tunnel_echo_icmp`).
//!
//! The first test reads off the wire which of the two the carriers do (one in-tunnel ping of a
//! full-size packet, captured on the client's veth): kernel WireGuard sends without
//! don't-fragment (the hop fragments, the relay's reply arrives in fragments), wireguard-go
//! 0.0.20220316 sends with it (the hop answers fragmentation-needed). The second makes the
//! carriers fragment on any implementation and expects 1328.
//!
//! boringtun 0.6.0 does not pad: its carriers are 60 + the inner size, so 1340 is the largest
//! clean size and both ways give 1340.
//!
//! Needs root, the lab tools and nft; without them the test prints why and passes, except with
//! CI=true. Run: `cargo test -p wirescope --test lab -- --test-threads=1 kernel::firewall::`.

use std::time::Duration;

use xtask::{
    agent::Agent,
    capture::Capture,
    lab::{CLIENT_PORT, GATEWAY_V4, Lab},
};

use crate::common::{Names, bin, lab_up, log_path, small_mtu_hop, val, wait_series};

/// True when `nft` is on PATH; otherwise fails with CI=true, else prints why and returns
/// false.
fn nft_available(test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nft").is_file()));
    if found {
        return true;
    }
    let why = "`nft` (nftables) is not on PATH (apt-get install nftables)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why} (CI=true, so this fails instead of being skipped)");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// The lab prefix of this module's tests.
const PREFIX: &str = "mfw";
const PATH_MTU: u32 = 1400;
const WG_MTU: u32 = 1420;
/// The fwmark the Mullvad daemon gives its WireGuard interface ("mole").
const MULLVAD_FWMARK: &str = "0x6d6f6c65";
/// One IPv4 WireGuard layer: outer IP 20 + UDP 8 + WireGuard header and tag 32.
const OVERHEAD: u32 = 60;

/// The ruleset, modelled on what talpid-core's Linux firewall installs in the connected
/// state (without the LAN, DNS-server and DHCP rules, which this lab has no use for).
fn mullvad_ruleset(relay: &str, port: u16, tun: &str) -> String {
    format!(
        "table inet mullvad {{
    chain prerouting {{
        type filter hook prerouting priority -199; policy accept;
        ip saddr {relay} udp sport {port} meta mark set {MULLVAD_FWMARK}
    }}
    chain output {{
        type filter hook output priority 0; policy drop;
        oif \"lo\" accept
        ip daddr {relay} udp dport {port} meta mark {MULLVAD_FWMARK} accept
        udp dport 53 reject
        tcp dport 53 reject with tcp reset
        oif \"{tun}\" accept
        reject with icmpx type port-unreachable
    }}
    chain input {{
        type filter hook input priority 0; policy drop;
        iif \"lo\" accept
        ip saddr {relay} udp sport {port} ct state established accept
        iif \"{tun}\" accept
    }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        oif \"{tun}\" accept
        iif \"{tun}\" ct state established accept
        reject with icmpx type port-unreachable
    }}
}}
"
    )
}

/// The lab with the hop's 1400-byte link, the client's interface marked and the
/// ruleset loaded; the handshake done through it, and echo to the relay shown refused.
/// `before_firewall` runs on the lab first. None where the test cannot run.
fn firewalled(test: &str, before_firewall: impl FnOnce(&Lab)) -> Option<Lab> {
    if !nft_available(test) {
        return None;
    }
    let lab = lab_up(test, small_mtu_hop(PREFIX, PATH_MTU, WG_MTU))?;
    before_firewall(&lab);
    let Names { cns, tun, .. } = Names::of(&lab);
    let relay = lab.entry_endpoint();
    let relay_ip = relay.ip().to_string();
    lab.exec(&cns, &["wg", "set", &tun, "fwmark", MULLVAD_FWMARK])
        .expect("fwmark on the client's interface");
    let rules = std::env::temp_dir().join(format!("wirescope-{PREFIX}-mullvad.nft"));
    std::fs::write(&rules, mullvad_ruleset(&relay_ip, relay.port(), &tun)).expect("ruleset");
    lab.exec(&cns, &["nft", "-f", &rules.display().to_string()])
        .expect("nft -f: the Mullvad-like ruleset");
    let _ = std::fs::remove_file(&rules);
    // The tunnel works through the firewall; echo to the relay itself does not.
    lab.handshake(Duration::from_secs(20))
        .expect("handshake through the firewall");
    assert!(
        lab.exec(&cns, &["ping", "-c", "1", "-W", "1", &relay_ip])
            .is_err(),
        "the firewall let an echo to the relay through"
    );
    Some(lab)
}

/// Whether the client's carriers leave with don't-fragment: one full-size in-tunnel packet
/// (1420 bytes, 1480 on the wire), captured on the client's veth; with don't-fragment the
/// hop answers fragmentation-needed with its MTU.
fn carriers_dont_fragment(lab: &Lab) -> bool {
    let Names { cns, veth, .. } = Names::of(lab);
    let cap = Capture::start(&cns, &veth, "icmp").expect("tcpdump");
    let gw = GATEWAY_V4.to_string();
    let full = (WG_MTU - 28).to_string();
    let _ = lab.exec(
        &cns,
        &["ping", "-c", "1", "-W", "2", "-M", "do", "-s", &full, &gw],
    );
    let lines = cap.stop().expect("tcpdump");
    lines
        .iter()
        .any(|l| l.contains("need to frag") && l.contains(&format!("(mtu {PATH_MTU})")))
}

/// Starts the agent probing the in-tunnel gateway through the tunnel and checks that the
/// recommendation is `want`, by `method`, and that it did not come from the endpoint.
fn expect_recommended(lab: &Lab, log: &str, want: u32, method: &str) {
    let Names { cns, tun, veth, .. } = Names::of(lab);
    let probe = format!("{GATEWAY_V4}@{tun}");
    let agent = Agent::start(
        bin(),
        &cns,
        &[
            "--probe",
            &probe,
            "--pmtu-interval",
            "1h",
            "--export-endpoints",
        ],
        &log_path(log),
    )
    .expect("agent starts");
    let l = [("interface", tun.as_str())];
    let m = wait_series(
        &agent,
        "wirescope_recommended_mtu_bytes",
        &l,
        Duration::from_secs(90),
    );
    let text = agent.log_text();
    // The underlay search got nothing: the value is the in-tunnel search's.
    let endpoint = format!("endpoint:{}", lab.entry_endpoint());
    assert!(
        m.select(
            "wirescope_path_mtu_bytes",
            &[("target", endpoint.as_str()), ("interface", veth.as_str())]
        )
        .next()
        .is_none(),
        "an echo search to the relay passed the firewall\n{text}"
    );
    assert_eq!(
        val(&m, "wirescope_recommended_mtu_bytes", &l),
        u64::from(want),
        "{text}"
    );
    assert_eq!(
        val(
            &m,
            "wirescope_recommended_mtu_info",
            &[("interface", tun.as_str()), ("method", method)]
        ),
        1,
        "{text}"
    );
    assert_eq!(
        m.select("wirescope_recommended_mtu_info", &l).count(),
        1,
        "one method per tunnel"
    );
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "{status:?}");
}

/// The largest inner size whose carrier (60 + the size padded to 16) fits the path: 1328;
/// 1340 where the implementation does not pad (boringtun: `WgImpl::pads`).
fn clean_inner(lab: &Lab) -> u32 {
    if lab.wireguard.pads() {
        ((PATH_MTU - OVERHEAD) / 16) * 16
    } else {
        PATH_MTU - OVERHEAD
    }
}

/// Whatever the implementation does: with don't-fragment carriers the hop's report gives
/// 1400 - 60 = 1340 (`tunnel_echo_icmp`), without them the clean echoes give 1328
/// (`tunnel_echo`).
#[test]
fn recommended_mtu_behind_the_mullvad_firewall() {
    let Some(lab) = firewalled("recommended_mtu_behind_the_mullvad_firewall", |_| {}) else {
        return;
    };
    let df = carriers_dont_fragment(&lab);
    let (want, method) = if df {
        (PATH_MTU - OVERHEAD, "tunnel_echo_icmp")
    } else {
        (clean_inner(&lab), "tunnel_echo")
    };
    println!(
        "{} carriers {} don't-fragment: expecting {want} by {method}",
        lab.wireguard,
        if df { "with" } else { "without" }
    );
    expect_recommended(&lab, "firewall", want, method);
    lab.teardown().expect("lab down");
}

/// Carriers without don't-fragment, as kernel WireGuard sends them, made on a userspace lab
/// too: `net.ipv4.ip_no_pmtu_disc=1` in the client's namespace makes new UDP sockets
/// IP_PMTUDISC_DONT, and a new listen port makes wireguard-go open a new one. The hop then
/// fragments the 1404-byte carriers, the relay's equally big replies arrive in fragments,
/// and only the clean echoes count: 1328 (`tunnel_echo`). (Kernel WireGuard sends no
/// don't-fragment anyway, where the first test already checks this.)
#[test]
fn recommended_mtu_behind_the_mullvad_firewall_fragmenting_carriers() {
    let test = "recommended_mtu_behind_the_mullvad_firewall_fragmenting_carriers";
    let Some(lab) = firewalled(test, |lab| {
        let Names { cns, tun, .. } = Names::of(lab);
        lab.exec(&cns, &["sysctl", "-qw", "net.ipv4.ip_no_pmtu_disc=1"])
            .expect("sysctl in the client's namespace");
        let port = (CLIENT_PORT + 10).to_string();
        lab.exec(&cns, &["wg", "set", &tun, "listen-port", &port])
            .expect("a new listen port: a new socket");
    }) else {
        return;
    };
    assert!(
        !carriers_dont_fragment(&lab),
        "the hop reported fragmentation-needed: the carriers still carry don't-fragment"
    );
    expect_recommended(&lab, "firewall-frag", clean_inner(&lab), "tunnel_echo");
    lab.teardown().expect("lab down");
}
