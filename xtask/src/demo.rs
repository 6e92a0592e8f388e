//! `cargo xtask demo`: builds the agent, brings the multihop lab up, runs the agent in the
//! client namespace, drives traffic through both hops and prints a per-hop summary read back
//! from /metrics; then leaves the agent serving until Ctrl-C (or `--duration`), stops it and
//! tears the lab down.
//!
//! The traffic, in order:
//! 1. pings to the in-tunnel gateway 10.64.0.1 until both peers (entry and exit) have
//!    handshaken;
//! 2. exactly [`UDP_COUNT`] UDP datagrams per size in [`UDP_PAYLOADS`], echoed by a server on
//!    10.64.0.1 in the exit relay, measured as the difference of two scrapes, so that every
//!    layer's overhead is exact and checked against the formula of docs/CONTRACT.md;
//! 3. [`IPERF_SECONDS`] of iperf3 TCP from the client to an iperf3 server on 10.64.0.1.
//!
//! How the multihop counters fit together (all on the client): the exit peer (hop 2) has its
//! inner packets (`wirescope_tunnel_*`) and its WireGuard messages (`wirescope_wire_*`) both
//! on the wg interface; the exit layer's messages are the entry peer's (hop 1) inner packets on
//! that same interface, and the entry layer's messages are on the veth (the underlay).
//!
//! Exit status: non-zero when a step failed, the UDP figures differ from the formula, or the
//! agent did not stop cleanly. Ctrl-C (SIGINT) or SIGTERM at any point stops the agent and
//! tears the lab down; during the traffic it is an error, while serving it is the normal end.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent_common::wireguard::data_wire_len;
use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::agent::{self, Agent};
use crate::lab::{GATEWAY_V4, Lab, LabConfig, Topology};
use crate::procs::ChildGuard;
use crate::scrape::Metrics;
use crate::{build, netns, udp};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop by itself S seconds after the demo started (building, traffic and summary
    /// included; the summary is always printed first, even when that takes longer).
    /// Without it, the agent serves until Ctrl-C.
    #[arg(long, value_name = "S")]
    pub duration: Option<u64>,
}

/// Lab prefix: namespaces demo-cli, demo-entry, demo-exit.
pub const PREFIX: &str = "demo";
/// Datagrams per payload size in the exact UDP phase.
pub const UDP_COUNT: usize = 200;
/// UDP payload sizes (bytes) of the exact phase: inner IPv4 packets of 128 and 1028 bytes.
pub const UDP_PAYLOADS: [usize; 2] = [100, 1000];
/// Where the echo server listens, in the exit relay.
const UDP_PORT: u16 = 7000;
/// Datagrams in flight at once (the sender waits for their echoes before sending more), so
/// that none is dropped and the counts stay exact.
const UDP_BATCH: usize = 20;
pub const IPERF_SECONDS: u32 = 3;
const IPERF_PORT: u16 = 5201;
/// Outer IPv4 header: the lab's underlay, and the exit layer's address, are IPv4.
const IPV4_HEADER: u32 = 20;
const UDP_HEADER: u32 = 8;
/// Per-packet bounds of one layer's overhead over IPv4: 20 + 8 + 32 plus 0 to 15 of padding.
const MIN_OVERHEAD: f64 = 60.0;
const MAX_OVERHEAD: f64 = 75.0;

pub fn run(args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    install_signal_handlers()?;

    build::run()?;
    let target = build::target_dir()?;
    let bin = target.join("release").join(build::AGENT_PACKAGE);
    let logs = target.join("wirescope-demo");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    check_interrupt()?;

    step(&format!("bringing up the multihop lab `{PREFIX}`"));
    let lab =
        Lab::up(LabConfig::new(Topology::Multihop, PREFIX)).inspect_err(|_| close_failed_step())?;
    done("ok");
    let outcome = with_lab(&lab, &bin, &logs, deadline);
    let teardown = lab.teardown();
    match &teardown {
        Ok(()) => println!("lab `{PREFIX}` torn down"),
        Err(e) => eprintln!("tearing down lab `{PREFIX}`: {e:#}"),
    }
    outcome?;
    teardown.with_context(|| format!("`cargo xtask lab down --prefix {PREFIX}` retries it"))
}

/// Everything between lab up and lab down: the agent's life.
fn with_lab(lab: &Lab, bin: &Path, logs: &Path, deadline: Option<Instant>) -> Result<()> {
    check_interrupt()?;
    let client = &lab.client().netns;
    let log = logs.join("agent.log");
    step(&format!("starting the agent in {client}"));
    let agent = Agent::start(bin, client, &[], &log).inspect_err(|_| close_failed_step())?;
    done(&format!("ok (log: {})", log.display()));

    let outcome = traffic_and_summary(lab, &agent, logs).and_then(|formula_ok| {
        serve(lab, &agent, deadline)?;
        Ok(formula_ok)
    });
    close_failed_step();

    step("stopping the agent (SIGINT)");
    let stopped = agent.stop();
    let stop_result = match stopped {
        Ok(status) if status.success() => {
            done("ok: exit 0, programs detached");
            Ok(())
        }
        Ok(status) => {
            done("FAILED");
            Err(anyhow!(
                "the agent exited with {status} instead of 0 (clean detach); its log is {}",
                log.display()
            ))
        }
        Err(e) => {
            done("FAILED");
            Err(e)
        }
    };
    let formula_ok = match (outcome, stop_result) {
        (Ok(ok), stopped) => {
            stopped?;
            ok
        }
        (Err(e), stopped) => {
            if let Err(stop_error) = stopped {
                eprintln!("error: {stop_error:#}");
            }
            return Err(e);
        }
    };
    if !formula_ok {
        bail!("the measured UDP overhead DIFFERS from the formula (see the table above)");
    }
    Ok(())
}

/// Drives the traffic and prints the summary. Ok(false) when the exact UDP figures differ
/// from the formula.
fn traffic_and_summary(lab: &Lab, agent: &Agent, logs: &Path) -> Result<bool> {
    let client = lab.client();
    let exit = lab.exit();
    let gw = GATEWAY_V4.to_string();

    step(&format!("[1/3] handshakes: ping {gw} through both hops"));
    lab.handshake(Duration::from_secs(15))?;
    let out = lab.exec(
        &client.netns,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-q", &gw],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    done(&format!(
        "ok, {}",
        text.lines()
            .find(|l| l.starts_with("rtt"))
            .unwrap_or("replies received")
    ));
    check_interrupt()?;

    let before = agent.scrape()?;
    let hops = Hop::all(lab, &before)?;

    step(&format!(
        "[2/3] UDP: {UDP_COUNT} datagrams each of {} bytes echoed off {gw}:{UDP_PORT}",
        join(UDP_PAYLOADS.iter().map(|p| p.to_string()), " and ")
    ));
    let dst = SocketAddr::new(GATEWAY_V4.into(), UDP_PORT);
    let echo = udp::UdpEcho::start(
        &exit.netns,
        dst,
        UDP_COUNT * UDP_PAYLOADS.len(),
        Duration::from_secs(60),
    )?;
    let sock = udp::bind_in(&client.netns, "0.0.0.0:0".parse()?)?;
    let mut phases = Vec::new();
    let mut last = before;
    for payload in UDP_PAYLOADS {
        echo_exactly(&sock, dst, payload, UDP_COUNT)?;
        let now = agent.scrape()?;
        phases.push((payload, last, now.clone()));
        last = now;
    }
    let echoed = echo.stop()?;
    if echoed != UDP_COUNT * UDP_PAYLOADS.len() {
        bail!(
            "the echo server echoed {echoed} datagrams, expected {}",
            UDP_COUNT * UDP_PAYLOADS.len()
        );
    }
    done("ok, all echoed");
    check_interrupt()?;

    step(&format!(
        "[3/3] iperf3: {IPERF_SECONDS} s of TCP to {gw}:{IPERF_PORT}"
    ));
    let iperf = iperf3(lab, logs)?;
    done(&format!("ok, {iperf}"));
    let totals = agent.scrape()?;

    println!();
    print_header(lab);
    print_peers(&hops);
    let formula_ok = print_udp(&hops, &phases)?;
    print_totals(&hops, &totals)?;
    let udp_start = phases.first().map(|p| &p.1).unwrap_or(&totals);
    print_health(&hops, (udp_start, &last), &totals);
    print_control(&hops, &totals)?;
    Ok(formula_ok)
}

/// Leaves the agent serving until the deadline or a signal, checking it stays healthy.
fn serve(lab: &Lab, agent: &Agent, deadline: Option<Instant>) -> Result<()> {
    let ns = &lab.client().netns;
    println!();
    println!(
        "The agent keeps serving http://{}/metrics in {ns}; scrape it yourself with",
        agent::LISTEN
    );
    println!("  {}", scrape_command(ns));
    match deadline {
        Some(d) => println!(
            "It stops in {} s (--duration counts from the start of the demo); Ctrl-C stops it now.",
            d.saturating_duration_since(Instant::now()).as_secs()
        ),
        None => println!("Press Ctrl-C to stop it and tear the lab down."),
    }
    let mut next_check = Instant::now() + Duration::from_secs(2);
    while !interrupted() && deadline.is_none_or(|d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() >= next_check && !interrupted() {
            match agent.get("/healthz") {
                Ok((200, _)) => {}
                Ok((code, body)) => bail!("the agent's /healthz answered {code}: {body}"),
                Err(e) => return Err(e.context("the agent stopped answering")),
            }
            next_check = Instant::now() + Duration::from_secs(2);
        }
    }
    if interrupted() {
        println!();
        println!("interrupted");
    }
    Ok(())
}

/// One peer of the client's wg interface, as `wirescope_peer_info` describes it.
struct Hop {
    hop: u32,
    /// "entry" or "exit", from the lab's keys.
    role: &'static str,
    peer: String,
    /// An underlay interface (hop 1) or the public key of the carrying peer.
    via: String,
    /// Where its inner packets are counted: the client's wg interface.
    tunnel_if: String,
    /// Where its WireGuard messages are counted: the underlay for hop 1, the wg interface
    /// itself for a peer reached through another peer's tunnel.
    wire_if: String,
    /// wg MTU of the sender of each direction (padding stops at it).
    tx_mtu: u32,
    rx_mtu: u32,
}

impl Hop {
    /// The client's peers, outermost (hop 1) first.
    fn all(lab: &Lab, m: &Metrics) -> Result<Vec<Hop>> {
        let cw = lab.client().wg();
        let mut hops = Vec::new();
        for (labels, _) in m.select("wirescope_peer_info", &[("interface", &cw.iface)]) {
            let field = |k: &str| {
                labels
                    .get(k)
                    .cloned()
                    .ok_or_else(|| anyhow!("wirescope_peer_info without `{k}`: {labels:?}"))
            };
            let peer = field("peer")?;
            let hop = field("hop")?
                .parse()
                .with_context(|| format!("hop label of {labels:?}"))?;
            let via = field("via")?;
            let relay = lab
                .hosts()
                .iter()
                .find(|h| h.wg.as_ref().is_some_and(|w| w.public_key == peer))
                .ok_or_else(|| anyhow!("peer {peer} is none of the lab's relays"))?;
            let role = match relay.role {
                crate::Role::Entry => "entry",
                crate::Role::Exit => "exit",
                _ => "relay",
            };
            let via_peer = cw.peers.iter().any(|p| p.public_key == via);
            hops.push(Hop {
                hop,
                role,
                wire_if: if via_peer {
                    cw.iface.clone()
                } else {
                    via.clone()
                },
                peer,
                via,
                tunnel_if: cw.iface.clone(),
                tx_mtu: cw.mtu,
                rx_mtu: relay.wg().mtu,
            });
        }
        hops.sort_by_key(|h| h.hop);
        let got: Vec<u32> = hops.iter().map(|h| h.hop).collect();
        if got != [1, 2] {
            bail!(
                "expected peers at hop 1 (entry) and hop 2 (exit) in wirescope_peer_info of {}, \
                 got hops {got:?}",
                cw.iface
            );
        }
        Ok(hops)
    }

    fn name(&self) -> String {
        format!("{:<5} {}", self.role, short_key(&self.peer))
    }

    /// `via` for people: the carrying peer's role, or the interface.
    fn via_name(&self, hops: &[Hop]) -> String {
        hops.iter()
            .find(|h| h.peer == self.via)
            .map_or_else(|| self.via.clone(), |h| h.role.to_owned())
    }

    fn mtu(&self, dir: &str) -> u32 {
        if dir == "tx" {
            self.tx_mtu
        } else {
            self.rx_mtu
        }
    }

    fn counts(&self, m: &Metrics, dir: &str) -> Result<Counts> {
        let tunnel = [
            ("interface", self.tunnel_if.as_str()),
            ("peer", &self.peer),
            ("direction", dir),
        ];
        let wire = [
            ("interface", self.wire_if.as_str()),
            ("peer", &self.peer),
            ("direction", dir),
            ("message", "data"),
        ];
        Ok(Counts {
            tunnel_pkts: m.get("wirescope_tunnel_packets_total", &tunnel)?,
            tunnel_bytes: m.get("wirescope_tunnel_bytes_total", &tunnel)?,
            wire_pkts: m.get("wirescope_wire_packets_total", &wire)?,
            wire_bytes: m.get("wirescope_wire_bytes_total", &wire)?,
        })
    }

    /// Packets of `message` on the wire interface, in `dir`.
    fn messages(&self, m: &Metrics, message: &str, dir: &str) -> Result<f64> {
        m.get(
            "wirescope_wire_packets_total",
            &[
                ("interface", self.wire_if.as_str()),
                ("peer", &self.peer),
                ("direction", dir),
                ("message", message),
            ],
        )
    }
}

/// One peer's counters in one direction: inner packets and its data messages.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    tunnel_pkts: f64,
    tunnel_bytes: f64,
    wire_pkts: f64,
    wire_bytes: f64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            tunnel_pkts: self.tunnel_pkts - o.tunnel_pkts,
            tunnel_bytes: self.tunnel_bytes - o.tunnel_bytes,
            wire_pkts: self.wire_pkts - o.wire_pkts,
            wire_bytes: self.wire_bytes - o.wire_bytes,
        }
    }
}

impl Counts {
    fn overhead(&self) -> f64 {
        self.wire_bytes - self.tunnel_bytes
    }

    fn per_packet(&self, v: f64) -> f64 {
        if self.tunnel_pkts > 0.0 {
            v / self.tunnel_pkts
        } else {
            0.0
        }
    }

    fn percent(&self) -> f64 {
        if self.tunnel_bytes > 0.0 {
            100.0 * self.overhead() / self.tunnel_bytes
        } else {
            0.0
        }
    }
}

const DIRS: [&str; 2] = ["tx", "rx"];

fn print_header(lab: &Lab) {
    let c = lab.client();
    println!(
        "wirescope demo: Mullvad-style multihop, client wg MTU {} ({} in {}, underlay {})",
        c.wg().mtu,
        c.wg().iface,
        c.netns,
        c.underlay().name
    );
    println!(
        "  client --{}--> entry relay {} --veth--> exit relay {} (owns {GATEWAY_V4})",
        c.underlay().name,
        lab.entry_endpoint(),
        lab.exit_endpoint()
    );
}

fn print_peers(hops: &[Hop]) {
    println!();
    println!("Peers (wirescope_peer_info):");
    println!(
        "{:<4} {:<17} {:<10} {:<16} tunnel counted on / wire counted on",
        "hop", "peer", "interface", "via"
    );
    for h in hops {
        let via = if h.via == h.via_name(hops) {
            h.via.clone()
        } else {
            format!("{} peer", h.via_name(hops))
        };
        println!(
            "{:<4} {:<17} {:<10} {:<16} {} / {}",
            h.hop,
            h.name(),
            h.tunnel_if,
            via,
            h.tunnel_if,
            h.wire_if
        );
    }
}

/// The exact UDP phases against the formula; true when everything matches.
fn print_udp(hops: &[Hop], phases: &[(usize, Metrics, Metrics)]) -> Result<bool> {
    println!();
    println!(
        "UDP, exact: deltas of two scrapes around {UDP_COUNT} echoed datagrams per payload size."
    );
    println!(
        "Formula (docs/CONTRACT.md): a layer turns a packet of L bytes into 20 + 8 + 32 + pad16(L) \
         bytes; the exit layer wraps the app's packet, the entry layer the exit layer's."
    );
    println!(
        "{:<8} {:<4} {:<17} {:<3} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8} {:>9}  check",
        "payload",
        "hop",
        "peer",
        "dir",
        "tun",
        "wire",
        "tun B/p",
        "wire B/p",
        "ovh B/p",
        "formula",
        "ovh %"
    );
    let mut all_ok = true;
    for (payload, before, after) in phases {
        let app_len = IPV4_HEADER + UDP_HEADER + *payload as u32;
        for dir in DIRS {
            // Inner length per hop: the innermost (highest) hop carries the app's packet,
            // each hop below carries the wire packet of the one above.
            let mut expected = Vec::new();
            let mut inner = app_len;
            for h in hops.iter().rev() {
                let wire = data_wire_len(inner, h.mtu(dir), IPV4_HEADER);
                expected.push((h.hop, inner, wire));
                inner = wire;
            }
            for h in hops {
                let (_, inner, wire) = expected
                    .iter()
                    .find(|(hop, _, _)| *hop == h.hop)
                    .copied()
                    .ok_or_else(|| anyhow!("no prediction for hop {}", h.hop))?;
                let d = h.counts(after, dir)? - h.counts(before, dir)?;
                let n = UDP_COUNT as f64;
                let formula = f64::from(wire - inner);
                let ok = d.tunnel_pkts == n
                    && d.wire_pkts == n
                    && d.tunnel_bytes == n * f64::from(inner)
                    && d.wire_bytes == n * f64::from(wire);
                all_ok &= ok;
                println!(
                    "{:<8} {:<4} {:<17} {:<3} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8.1}%  {}",
                    format!("{payload} B"),
                    h.hop,
                    h.name(),
                    dir,
                    d.tunnel_pkts,
                    d.wire_pkts,
                    num(d.per_packet(d.tunnel_bytes)),
                    num(d.per_packet(d.wire_bytes)),
                    num(d.per_packet(d.overhead())),
                    formula,
                    d.percent(),
                    if ok {
                        "matches".to_owned()
                    } else {
                        format!("DIFFERS (expected {UDP_COUNT} packets of {inner} -> {wire} bytes)")
                    }
                );
            }
        }
    }
    println!(
        "(tun/wire: inner packets and WireGuard data messages of that layer; B/p: bytes per \
         packet; ovh: wire - tunnel)"
    );
    Ok(all_ok)
}

/// Totals since the agent started, per layer and end to end.
fn print_totals(hops: &[Hop], m: &Metrics) -> Result<()> {
    println!();
    println!(
        "Totals since the agent started (pings, UDP and {IPERF_SECONDS} s of iperf3 TCP), \
         data messages only:"
    );
    println!(
        "{:<4} {:<17} {:<8} {:<9} {:<3} {:>8} {:>12} {:>8} {:>12} {:>10} {:>7} {:>7}  60..75 B/pkt",
        "hop",
        "peer",
        "via",
        "wire on",
        "dir",
        "tun pkts",
        "tunnel bytes",
        "wire pkt",
        "wire bytes",
        "overhead B",
        "B/pkt",
        "ovh %",
    );
    for h in hops {
        for dir in DIRS {
            let c = h.counts(m, dir)?;
            let per = c.per_packet(c.overhead());
            println!(
                "{:<4} {:<17} {:<8} {:<9} {:<3} {:>8} {:>12} {:>8} {:>12} {:>10} {:>7.2} {:>6.2}%  {}",
                h.hop,
                h.name(),
                h.via_name(hops),
                h.wire_if,
                dir,
                c.tunnel_pkts,
                c.tunnel_bytes,
                c.wire_pkts,
                c.wire_bytes,
                c.overhead(),
                per,
                c.percent(),
                if (MIN_OVERHEAD..=MAX_OVERHEAD).contains(&per) {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }
    // End to end: the app's packets (the innermost peer's tunnel bytes) against what the
    // outermost peer put on the underlay.
    let (outer, inner) = (&hops[0], &hops[hops.len() - 1]);
    for dir in DIRS {
        let app = inner.counts(m, dir)?.tunnel_bytes;
        let wire = outer.counts(m, dir)?.wire_bytes;
        let pct = if app > 0.0 {
            100.0 * (wire - app) / app
        } else {
            0.0
        };
        println!(
            "end to end {dir}: {app} app bytes ({} tunnel) took {wire} bytes on {} ({} data): \
             +{} bytes, {pct:.2}%",
            inner.role,
            outer.wire_if,
            outer.role,
            wire - app
        );
    }
    println!(
        "(the entry layer's tunnel packets are the exit layer's messages, handshakes included; \
         exit-layer datagrams over the client's MTU leave as two IP fragments, each wrapped \
         by the entry layer)"
    );
    Ok(())
}

/// Mean of a histogram's observations between two scrapes, in microseconds, and their count.
fn hist_mean_us(b: &Metrics, a: &Metrics, name: &str, labels: &[(&str, &str)]) -> (f64, f64) {
    let count = a.sum(&format!("{name}_count"), labels) - b.sum(&format!("{name}_count"), labels);
    let sum = a.sum(&format!("{name}_sum"), labels) - b.sum(&format!("{name}_sum"), labels);
    if count > 0.0 {
        (sum / count * 1e6, count)
    } else {
        (f64::NAN, 0.0)
    }
}

/// Wire health per hop, next to the overhead: handshake round trips and timeouts, loss and
/// reordering from the counter sequence, and transit time through WireGuard at rest (the
/// UDP echoes) and under load (iperf3).
fn print_health(hops: &[Hop], (udp_b, udp_a): (&Metrics, &Metrics), totals: &Metrics) {
    let empty = Metrics::default();
    println!();
    println!(
        "Wire health per hop (wirescope_handshake_rtt_seconds, _handshake_timeouts_total, \
         _rx_counter_gaps_total, _rx_late_packets_total, _tunnel_transit_seconds):"
    );
    println!(
        "{:<4} {:<17} {:<9} {:>11} {:>8} {:>6} {:>5} {:>7}  {:>21}  {:>21}",
        "hop",
        "peer",
        "wire on",
        "hs RTT ms",
        "timeouts",
        "gaps",
        "late",
        "loss %",
        "tx transit us rest/load",
        "rx transit us rest/load",
    );
    for h in hops {
        let wire = [("interface", h.wire_if.as_str()), ("peer", h.peer.as_str())];
        let (rtt_us, handshakes) =
            hist_mean_us(&empty, totals, "wirescope_handshake_rtt_seconds", &wire);
        let timeouts = totals.sum("wirescope_handshake_timeouts_total", &wire);
        let gaps = totals.sum("wirescope_rx_counter_gaps_total", &wire);
        let late = totals.sum("wirescope_rx_late_packets_total", &wire);
        let rx_data = totals.sum(
            "wirescope_wire_packets_total",
            &[
                ("interface", h.wire_if.as_str()),
                ("peer", h.peer.as_str()),
                ("direction", "rx"),
                ("message", "data"),
            ],
        );
        // Gaps minus late: what never arrived, against what was expected.
        let lost = (gaps - late).max(0.0);
        let loss = if rx_data + lost > 0.0 {
            100.0 * lost / (rx_data + lost)
        } else {
            0.0
        };
        let transit = |dir: &str| {
            let l = [
                ("interface", h.tunnel_if.as_str()),
                ("peer", h.peer.as_str()),
                ("direction", dir),
            ];
            let (rest, _) = hist_mean_us(udp_b, udp_a, "wirescope_tunnel_transit_seconds", &l);
            let (load, _) = hist_mean_us(udp_a, totals, "wirescope_tunnel_transit_seconds", &l);
            format!("{rest:.0} / {load:.0}")
        };
        println!(
            "{:<4} {:<17} {:<9} {:>11} {:>8} {:>6} {:>5} {:>7.3}  {:>21}  {:>21}",
            h.hop,
            h.name(),
            h.wire_if,
            format!("{:.2} ({handshakes})", rtt_us / 1e3),
            timeouts,
            gaps,
            late,
            loss,
            transit("tx"),
            transit("rx"),
        );
    }
    println!(
        "(hs RTT: mean over the handshakes seen, their count in brackets; the exit's RTT \
         includes the entry hop. Transit: from the packet on {} to its message on the \
         carrying interface (tx) and back (rx), mean over the UDP echoes / over iperf3)",
        hops.first().map_or("the tunnel", |h| h.tunnel_if.as_str())
    );
}

/// Handshake and keepalive messages per peer.
fn print_control(hops: &[Hop], m: &Metrics) -> Result<()> {
    const KINDS: [(&str, &str); 4] = [
        ("handshake_initiation", "initiation"),
        ("handshake_response", "response"),
        ("cookie_reply", "cookie"),
        ("keepalive", "keepalive"),
    ];
    println!();
    println!("WireGuard control messages (wirescope_wire_packets_total, tx/rx):");
    print!("{:<4} {:<17} {:<9}", "hop", "peer", "wire on");
    for (_, short) in KINDS {
        print!(" {short:>11}");
    }
    println!();
    for h in hops {
        print!("{:<4} {:<17} {:<9}", h.hop, h.name(), h.wire_if);
        for (kind, _) in KINDS {
            let tx = h.messages(m, kind, "tx")?;
            let rx = h.messages(m, kind, "rx")?;
            print!(" {:>11}", format!("{tx}/{rx}"));
        }
        println!();
    }
    Ok(())
}

/// Sends `count` datagrams of `payload` bytes to `dst` and waits for every echo, at most
/// [`UDP_BATCH`] in flight.
fn echo_exactly(
    sock: &std::net::UdpSocket,
    dst: SocketAddr,
    payload: usize,
    count: usize,
) -> Result<()> {
    let mut left = count;
    while left > 0 {
        check_interrupt()?;
        let n = left.min(UDP_BATCH);
        udp::send_sizes(sock, dst, &vec![payload; n])?;
        let got = udp::recv_sizes(sock, n, Duration::from_secs(5))?;
        if got.len() != n || got.iter().any(|&s| s != payload) {
            bail!(
                "sent {n} datagrams of {payload} bytes to {dst}, {} came back ({got:?}): \
                 the counts would not be exact",
                got.len()
            );
        }
        left -= n;
    }
    Ok(())
}

/// Runs iperf3 TCP from the client to a one-shot server in the exit relay; returns a line
/// about the result. Both processes are gone when this returns.
fn iperf3(lab: &Lab, logs: &Path) -> Result<String> {
    let (client, exit) = (&lab.client().netns, &lab.exit().netns);
    let gw = GATEWAY_V4.to_string();
    let port = IPERF_PORT.to_string();
    let server_log = logs.join("iperf3-server.log");
    let server_out = crate::cmd::new_file(&server_log)?;
    let mut server = ChildGuard(
        netns::command(exit, "iperf3")
            .args(["-s", "-1", "-B", &gw, "-p", &port])
            .stdin(Stdio::null())
            .stdout(server_out.try_clone()?)
            .stderr(server_out)
            .spawn()
            .context("starting the iperf3 server (is iperf3 installed? `cargo xtask setup`)")?,
    );
    wait_tcp_listening(exit, &format!("{gw}:{port}"), &mut server.0, &server_log)?;

    let out_path = logs.join("iperf3-client.json");
    let seconds = IPERF_SECONDS.to_string();
    let mut client_proc = ChildGuard(
        netns::command(client, "iperf3")
            .args(["-c", &gw, "-p", &port, "-t", &seconds, "-J"])
            .stdin(Stdio::null())
            .stdout(crate::cmd::new_file(&out_path)?)
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the iperf3 client")?,
    );
    let limit = Instant::now() + Duration::from_secs(u64::from(IPERF_SECONDS) + 15);
    let status = loop {
        check_interrupt()?;
        if let Some(s) = client_proc.0.try_wait()? {
            break s;
        }
        if Instant::now() > limit {
            bail!("iperf3 did not finish within {} s", IPERF_SECONDS + 15);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let json = std::fs::read_to_string(&out_path)
        .with_context(|| format!("reading {}", out_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("iperf3 printed no JSON ({})", out_path.display()))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 failed: {err}");
    }
    if !status.success() {
        bail!("iperf3 exited with {status}; see {}", out_path.display());
    }
    let sent = &v["end"]["sum_sent"];
    let received = &v["end"]["sum_received"];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    Ok(format!(
        "{:.1} MB sent at {:.0} Mbit/s ({} retransmits), {:.0} Mbit/s received",
        f(&sent["bytes"]) / 1e6,
        f(&sent["bits_per_second"]) / 1e6,
        f(&sent["retransmits"]),
        f(&received["bits_per_second"]) / 1e6
    ))
}

/// Waits until something listens on TCP `addr` in `ns` (`ss`), failing early if `server`
/// exits.
fn wait_tcp_listening(ns: &str, addr: &str, server: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        check_interrupt()?;
        if let Some(status) = server.try_wait()? {
            bail!(
                "the iperf3 server exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        let out = netns::exec(ns, &["ss", "-Hltn"])?;
        let listening = String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some(addr));
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the iperf3 server does not listen on {addr} in {ns} after 5 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command that prints the agent's metrics from inside `ns`, with whichever HTTP client
/// this machine has.
fn scrape_command(ns: &str) -> String {
    let url = format!("http://{}/metrics", agent::LISTEN);
    if on_path("curl") {
        format!("ip netns exec {ns} curl -s {url}")
    } else if on_path("wget") {
        format!("ip netns exec {ns} wget -qO- {url}")
    } else {
        let (host, port) = agent::LISTEN
            .split_once(':')
            .unwrap_or(("127.0.0.1", "9586"));
        format!(
            "ip netns exec {ns} bash -c 'exec 3<>/dev/tcp/{host}/{port}; \
             printf \"GET /metrics HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'"
        )
    }
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// True while a progress line started by [`step`] waits for its result.
static STEP_OPEN: AtomicBool = AtomicBool::new(false);

/// Prints the start of a progress line; [`done`] ends it.
fn step(what: &str) {
    print!("{what} ... ");
    let _ = std::io::stdout().flush();
    STEP_OPEN.store(true, Ordering::Relaxed);
}

fn done(result: &str) {
    println!("{result}");
    STEP_OPEN.store(false, Ordering::Relaxed);
}

/// Ends a progress line left open by a step that failed.
fn close_failed_step() {
    if STEP_OPEN.swap(false, Ordering::Relaxed) {
        println!(
            "{}",
            if interrupted() {
                "interrupted"
            } else {
                "FAILED"
            }
        );
    }
}

fn short_key(key: &str) -> String {
    match key.get(..8) {
        Some(head) if key.len() > 8 => format!("{head}..."),
        _ => key.to_owned(),
    }
}

/// A count per packet: whole numbers without decimals.
fn num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.2}")
    }
}

fn join(items: impl Iterator<Item = String>, sep: &str) -> String {
    items.collect::<Vec<_>>().join(sep)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag that every wait of the demo checks, so that the agent is
/// stopped and the lab torn down. The handler is one-shot (SA_RESETHAND): a second Ctrl-C
/// kills at once (then `cargo xtask lab down --prefix demo` cleans up).
fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART | SaFlags::SA_RESETHAND,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_per_layer_for_the_demo_sizes() {
        // 100-byte payload: app packet 128 -> exit layer 188 -> entry layer 252.
        assert_eq!(data_wire_len(128, 1420, 20), 188);
        assert_eq!(data_wire_len(188, 1420, 20), 252);
        // 1000-byte payload: 1028 -> 1100 -> 1164.
        assert_eq!(data_wire_len(1028, 1420, 20), 1100);
        assert_eq!(data_wire_len(1100, 1420, 20), 1164);
    }

    #[test]
    fn helpers() {
        assert_eq!(short_key("V09ukmjzcRSow+xLp3WbLFQZ="), "V09ukmjz...");
        assert_eq!(short_key("abc"), "abc");
        assert_eq!(num(64.0), "64");
        assert_eq!(num(64.5), "64.50");
        assert!(scrape_command("x-cli").starts_with("ip netns exec x-cli "));
    }
}
