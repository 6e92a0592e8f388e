//! The lab, checked as a person would by hand: both topologies come up, the in-tunnel
//! gateway answers over IPv4 and IPv6, UDP of exact sizes goes through and back, multihop
//! puts the exit layer inside the entry layer, and tearing down (also after a crash) leaves
//! nothing behind. Needs root; see `xtask::lab::can_run` for what happens without it.
//!
//! The labs use the default WireGuard implementation (kernel where the module loads,
//! wireguard-go elsewhere, or what WIRESCOPE_LAB_WG says); one test forces wireguard-go, so
//! that in a VM with kernel WireGuard both are covered.
//!
//! The tests share one prefix, so they must not run in parallel: `--test-threads=1`
//! (`cargo xtask test` does that).

use std::net::SocketAddr;
use std::time::Duration;

use xtask::capture::{Capture, parse_udp_line};
use xtask::lab::{self, GATEWAY_V4, GATEWAY_V6, Lab, LabConfig, Role, Topology, WgImpl};
use xtask::udp::{UdpEcho, recv_sizes, send_udp};
use xtask::{procs, wg};

const PREFIX: &str = "wst";

fn up(topology: Topology) -> Lab {
    Lab::up(LabConfig::new(topology, PREFIX)).expect("lab up")
}

fn ping(lab: &Lab, args: &[&str]) -> String {
    let mut all = vec!["ping", "-c", "3", "-W", "2"];
    all.extend_from_slice(args);
    let out = lab
        .exec(&lab.client().netns, &all)
        .expect("ping through the tunnel");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nothing of the lab is left: namespaces, live processes, sockets, state file.
fn assert_gone(pids: &[u32]) {
    let left = lab::leftovers(PREFIX).unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    for &pid in pids {
        assert!(!procs::is_alive(pid), "wireguard-go {pid} still runs");
    }
    let daemons = procs::wireguard_go_pids(|i| i.starts_with(PREFIX)).unwrap();
    assert!(daemons.is_empty(), "wireguard-go still runs: {daemons:?}");
}

/// The wireguard-go daemons (none with kernel WireGuard).
fn wg_pids(lab: &Lab) -> Vec<u32> {
    lab.hosts()
        .iter()
        .filter_map(|h| h.wg.as_ref())
        .map(|w| w.pid)
        .filter(|pid| *pid != 0)
        .collect()
}

/// Echoes datagrams of these sizes off the gateway and checks they all come back intact.
fn udp_round_trip(lab: &Lab, dst: SocketAddr, sizes: &[usize]) {
    let echo = UdpEcho::start(&lab.exit().netns, dst, sizes.len(), Duration::from_secs(10))
        .expect("echo server on the gateway");
    let sock = send_udp(&lab.client().netns, None, dst, sizes).expect("send");
    let got = recv_sizes(&sock, sizes.len(), Duration::from_secs(5)).expect("receive");
    assert_eq!(got, sizes, "echoed sizes from {dst}");
    assert_eq!(echo.join().unwrap(), sizes.len());
}

fn check_state_file(lab: &Lab) {
    let loaded = Lab::load(PREFIX).expect("state file");
    assert_eq!(loaded.hosts, lab.hosts);
    assert_eq!(loaded.topology, lab.topology);
    assert_eq!(loaded.wireguard, lab.wireguard);
    for h in lab.hosts() {
        if let Some(w) = &h.wg {
            assert_eq!(w.public_key.len(), 44, "base64 key of {}", w.iface);
            let kind = wg::link_kind(&h.netns, &w.iface).unwrap();
            match lab.wireguard {
                i if i.is_userspace() => {
                    assert!(procs::is_alive(w.pid), "{} pid {}", w.iface, w.pid);
                    assert!(wg::socket_path(&w.iface).exists());
                    assert_eq!(kind.as_deref(), Some("tun"), "{} is {i}'s", w.iface);
                }
                _ => {
                    assert_eq!(w.pid, 0, "{}: no daemon", w.iface);
                    assert!(!wg::socket_path(&w.iface).exists());
                    assert_eq!(
                        kind.as_deref(),
                        Some("wireguard"),
                        "{} is the kernel's",
                        w.iface
                    );
                }
            }
        }
    }
}

#[test]
fn single_hop_tunnel() {
    if !lab::can_run("single_hop_tunnel") {
        return;
    }
    let lab = up(Topology::Single);
    assert_eq!(lab.wireguard, WgImpl::auto().unwrap());
    check_state_file(&lab);
    let c = lab.client();
    assert_eq!(c.netns, "wst-cli");
    assert_eq!(c.wg().iface, "wstc0");
    assert_eq!(lab.exit().netns, "wst-relay");

    let out = ping(&lab, &[&GATEWAY_V4.to_string()]);
    assert!(out.contains("3 received"), "{out}");
    let out = ping(&lab, &["-6", &GATEWAY_V6.to_string()]);
    assert!(out.contains("3 received"), "{out}");

    udp_round_trip(
        &lab,
        SocketAddr::new(GATEWAY_V4.into(), 7000),
        &[0, 1, 100, 1392],
    );
    udp_round_trip(&lab, SocketAddr::new(GATEWAY_V6.into(), 7000), &[1, 1372]);

    // Both ends see each other, with traffic, as `wg show dump` reports it.
    let cd = lab.wg_dump(Role::Client).unwrap();
    assert_eq!(cd.listen_port, lab::CLIENT_PORT);
    let relay = cd.peer(&lab.exit().wg().public_key).expect("relay peer");
    assert_eq!(relay.endpoint, Some(lab.exit_endpoint()));
    assert_eq!(relay.allowed_ips, ["0.0.0.0/0", "::/0"]);
    assert!(relay.latest_handshake > 0 && relay.rx_bytes > 0 && relay.tx_bytes > 0);
    let rd = lab.wg_dump(Role::Relay).unwrap();
    let client = rd.peer(&c.wg().public_key).expect("client peer");
    assert_eq!(
        client.endpoint,
        Some(SocketAddr::new(c.address().into(), lab::CLIENT_PORT))
    );
    assert_eq!(client.rx_bytes, relay.tx_bytes);

    let pids = wg_pids(&lab);
    lab.teardown().unwrap();
    assert_gone(&pids);
}

#[test]
fn multihop_wraps_exit_layer_in_entry_layer() {
    if !lab::can_run("multihop_wraps_exit_layer_in_entry_layer") {
        return;
    }
    let lab = up(Topology::Multihop);
    check_state_file(&lab);
    let (c, entry, exit) = (lab.client(), lab.entry().unwrap(), lab.exit());
    assert_eq!(lab.namespaces(), ["wst-cli", "wst-entry", "wst-exit"]);
    let cw = c.wg();
    assert_eq!(cw.peers.len(), 2);
    assert_eq!(
        cw.peer(Role::Entry).unwrap().allowed_ips,
        [format!("{}/32", exit.address())]
    );

    lab.handshake(Duration::from_secs(15)).unwrap();
    let veth = Capture::start(&c.netns, &c.underlay().name, "udp").unwrap();
    let tun = Capture::start(&c.netns, &cw.iface, "").unwrap();
    let out = ping(&lab, &[&GATEWAY_V4.to_string()]);
    assert!(out.contains("3 received"), "{out}");
    let out = ping(&lab, &["-6", &GATEWAY_V6.to_string()]);
    assert!(out.contains("3 received"), "{out}");
    let veth = veth.stop().unwrap();
    let tun = tun.stop().unwrap();

    // The veth carries only WireGuard between the client and the entry relay.
    let entry_ep = lab.entry_endpoint();
    let client_ep = SocketAddr::new(c.address().into(), lab::CLIENT_PORT);
    let veth_udp: Vec<_> = veth.iter().filter_map(|l| parse_udp_line(l)).collect();
    assert!(veth_udp.len() >= 12, "{veth:#?}");
    assert_eq!(
        veth_udp.len(),
        veth.len(),
        "non-UDP-parsed lines: {veth:#?}"
    );
    for p in &veth_udp {
        assert!(
            (p.src, p.dst) == (client_ep, entry_ep) || (p.src, p.dst) == (entry_ep, client_ep),
            "unexpected packet on the veth: {p:?}"
        );
    }
    // The wg interface carries the pings and the exit layer's WireGuard UDP to EXIT_IP:51820.
    let tunnel_ep = SocketAddr::new(lab::CLIENT_TUNNEL_V4.into(), lab::CLIENT_PORT);
    let exit_ep = lab.exit_endpoint();
    let tun_udp: Vec<_> = tun.iter().filter_map(|l| parse_udp_line(l)).collect();
    let out_n = tun_udp
        .iter()
        .filter(|p| (p.src, p.dst) == (tunnel_ep, exit_ep))
        .count();
    let in_n = tun_udp
        .iter()
        .filter(|p| (p.src, p.dst) == (exit_ep, tunnel_ep))
        .count();
    assert!(out_n >= 6 && in_n >= 6, "{tun:#?}");
    assert_eq!(out_n + in_n, tun_udp.len(), "{tun:#?}");
    assert!(
        tun.iter()
            .filter(|l| l.contains("ICMP echo request"))
            .count()
            == 3,
        "{tun:#?}"
    );
    // Each exit-layer message is one entry-layer message, 32 bytes of UDP payload bigger
    // plus the 28 bytes of the inner IPv4 and UDP headers padded to 16.
    assert_eq!(veth_udp.len(), tun_udp.len());

    udp_round_trip(
        &lab,
        SocketAddr::new(GATEWAY_V4.into(), 7000),
        &[0, 1, 100, 1000],
    );

    // The entry peer carried everything the exit peer did, and more.
    let d = lab.wg_dump(Role::Client).unwrap();
    let ep = d.peer(&entry.wg().public_key).unwrap();
    let xp = d.peer(&exit.wg().public_key).unwrap();
    assert_eq!(ep.endpoint, Some(entry_ep));
    assert_eq!(xp.endpoint, Some(exit_ep));
    assert!(
        ep.tx_bytes > xp.tx_bytes && ep.rx_bytes > xp.rx_bytes,
        "{d:?}"
    );
    // The exit relay learned the client's tunnel address as its endpoint.
    let xd = lab.wg_dump(Role::Exit).unwrap();
    assert_eq!(xd.peers[0].endpoint, Some(tunnel_ep));

    let pids = wg_pids(&lab);
    drop(lab);
    assert_gone(&pids);
}

#[test]
fn down_cleans_up_after_a_crash() {
    if !lab::can_run("down_cleans_up_after_a_crash") {
        return;
    }
    let lab = up(Topology::Multihop);
    let pids = wg_pids(&lab);
    let exit_ns = lab.exit().netns.clone();
    let client_pid = lab.client().wg().pid;
    let wireguard = lab.wireguard;
    // A crash: no teardown, a namespace gone (with wireguard-go, while its daemon still
    // runs), and a daemon killed hard (its socket stays) or, with kernel WireGuard, a stray
    // interface of the lab's in the root namespace.
    std::mem::forget(lab);
    if wireguard.is_userspace() {
        assert!(procs::terminate(&[client_pid], Duration::from_secs(2)).is_empty());
    } else {
        xtask::cmd::ip(&["link", "add", "wstx0", "type", "wireguard"]).unwrap();
    }
    xtask::cmd::ip(&["netns", "del", &exit_ns]).unwrap();
    assert!(!lab::leftovers(PREFIX).unwrap().is_empty());

    // `up` starts from a clean slate with the same names.
    let lab = up(Topology::Single);
    let out = ping(&lab, &[&GATEWAY_V4.to_string()]);
    assert!(out.contains("3 received"), "{out}");
    std::mem::forget(lab);

    let removed = lab::down(PREFIX).unwrap();
    assert!(removed.iter().any(|r| r.contains("wst-cli")), "{removed:?}");
    assert_gone(&pids);
    assert!(lab::down(PREFIX).unwrap().is_empty(), "down is idempotent");
}

#[test]
fn hop_between_client_and_entry_forwards() {
    if !lab::can_run("hop_between_client_and_entry_forwards") {
        return;
    }
    let lab = Lab::up(LabConfig {
        hop: true,
        wg_mtu: 1380,
        ..LabConfig::new(Topology::Multihop, PREFIX)
    })
    .unwrap();
    assert_eq!(
        lab.namespaces(),
        ["wst-cli", "wst-hop", "wst-entry", "wst-exit"]
    );
    let link = lab
        .exec(&lab.client().netns, &["ip", "link", "show", "wstc0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains("mtu 1380"));
    let out = ping(&lab, &[&GATEWAY_V4.to_string()]);
    assert!(out.contains("3 received"), "{out}");
    udp_round_trip(&lab, SocketAddr::new(GATEWAY_V4.into(), 7000), &[1, 1352]);
    let pids = wg_pids(&lab);
    lab.teardown().unwrap();
    assert_gone(&pids);
}

/// wireguard-go when asked for, whatever the default: in a VM with kernel WireGuard the other
/// tests cover the kernel's, this one the userspace implementation.
#[test]
fn userspace_when_asked() {
    if !lab::can_run_for("userspace_when_asked", WgImpl::Userspace) {
        return;
    }
    let lab = Lab::up(LabConfig {
        wireguard: WgImpl::Userspace,
        ..LabConfig::new(Topology::Single, PREFIX)
    })
    .unwrap();
    assert_eq!(lab.wireguard, WgImpl::Userspace);
    check_state_file(&lab);
    let out = ping(&lab, &[&GATEWAY_V4.to_string()]);
    assert!(out.contains("3 received"), "{out}");
    udp_round_trip(&lab, SocketAddr::new(GATEWAY_V4.into(), 7000), &[1, 1392]);
    let pids = wg_pids(&lab);
    assert_eq!(pids.len(), 2, "a daemon each for the client and the relay");
    lab.teardown().unwrap();
    assert_gone(&pids);
}
