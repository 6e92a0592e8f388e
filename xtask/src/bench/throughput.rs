//! Throughput impact of the agent: iperf3 over the lab's veth and through its wireguard-go
//! tunnel, TCP and 64-byte UDP, in runs alternating without and with the agent (A B A B ...,
//! per case); each case reports the median of the per-pair ratios with / without.
//!
//! The lab is a single-relay lab with prefix [`PREFIX`] and userspace WireGuard (the issue
//! asks for wireguard-go, also where kernel WireGuard would load). The iperf3 client runs in
//! the client namespace, a one-shot iperf3 server per run in the relay namespace: on the
//! relay's veth address for the veth cases (plain UDP/TCP over the client's underlay, which
//! the agent watches), on the in-tunnel gateway for the tunnel cases (the client's wg
//! interface, then WireGuard UDP over the same veth).
//!
//! "With" is the agent running in the client namespace on both interfaces (checked each time:
//! `wirescope_attach_info` for rx and tx on both, and in TCX mode the agent's own TCX links on
//! both ifindexes, ingress and egress, from /proc/PID/fdinfo). "Without" is the agent stopped:
//! its links go with its file descriptors (checked: none of its link ids is left in
//! `bpftool link show`); pinned maps stay, which costs nothing per packet. The agent is
//! started for every with-run and stopped after it (about 1.5 s each here), rather than
//! toggling attachment inside a running agent, which the agent has no clean way to do.
//!
//! Units: TCP is received Mbit/s (with GSO a "packet" on the TC hooks is up to 64 KiB, so
//! packets per second mean little); UDP is the packets per second the receiver got
//! (`packets - lost_packets` of iperf3's `sum_received`), 64-byte payloads.
//!
//! Beside each ratio, as context without a goal: the same ratio per CPU-second the flow's
//! processes got (iperf3's client and server, wireguard-go, the agent). On a machine shared
//! with other work, a run that lost CPU to other processes drops in rate but not in rate per
//! CPU-second; when the two ratios differ much, the machine was not quiet. On a quiet one they
//! agree.
//!
//! What makes the UDP figure mean something: the agent's cost must land on a CPU budget that
//! limits the rate, and the limit must be stable.
//! - veth: iperf3 -A pins sender and receiver to the same CPU (0), with `-b 0`. That one CPU
//!   then does all the flow's work (sendmsg, our TC egress program, the veth, the receive path
//!   that veth runs in the sender's softirq, recvmsg), and the receiver gets its share of it,
//!   so the sender cannot outrun it much (little loss): packets per second = 1 / per-packet CPU
//!   time, and our per-packet time shows in full. The other CPU takes whatever else runs.
//!   Sender and receiver on different CPUs was worse here: the receiver, woken across CPUs for
//!   every few packets, limits the rate at some 350 kpps while dropping 10 to 30 % of a sender
//!   that is faster, and noise decides how much.
//! - tunnel: wireguard-go (both ends, left to the scheduler with iperf3 on both CPUs) is the
//!   limit, and an iperf3 sender flooding at `-b 0` both starves it (the received rate drops
//!   to two thirds) and makes the figure blind: CPU our program takes in the sender's context
//!   is then CPU the sender no longer spends on packets wireguard-go would drop anyway. So the
//!   sender is paced "just above what fits": a calibration without the agent first runs
//!   `-b 0`, then a few offered rates above what the receiver got there, and keeps the offered
//!   rate that got the most packets through while still losing some (at least
//!   [`SATURATED_LOSS_PCT`]): the tunnel is saturated, and every nanosecond we spend comes out
//!   of a fixed budget of two CPUs. Past that peak the rate collapses (wireguard-go and the
//!   sender spend ever more on packets dropped later), and a with-run, whose own peak is
//!   lower, would sit further down that slope at the same offered rate and overstate our
//!   cost: so each measurement, with and without, is the best of short runs offered 0.85, 1
//!   and 1.15 times the calibrated rate ([`SWEEP`]), the packet rate the tunnel can carry.
//!
//! During one extra with-agent run of each UDP case, [`cost::LiveProbe`] measures the live
//! per-packet margin of our programs over an empty program on the same interfaces; its
//! figures are appended. That run is not one of the measured pairs (the probe's empty program
//! costs something itself). When the probe fails, its place in the report is a figure with
//! no value (NaN) whose note holds the error: the bench fails at the end naming it, and the
//! throughput figures measured before are kept.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Ctx, Figure, Goal, cost, median};
use crate::agent::Agent;
use crate::lab::{self, GATEWAY_V4, Lab, LabConfig, Topology, WgImpl};
use crate::procs::ChildGuard;
use crate::{netns, procs};

/// Lab prefix of this part: namespaces bt-cli and bt-relay.
pub const PREFIX: &str = "bt";
pub const SECTION: &str = "throughput (iperf3, with / without the agent)";

/// The iperf3 port (inside the lab's namespaces, so no clash with anything on the host).
const PORT: u16 = 5201;
/// UDP payload of the packet-rate cases.
const UDP_PAYLOAD: u32 = 64;
/// A UDP run losing at least this share of what was sent was limited by the path, not by the
/// sender.
pub const SATURATED_LOSS_PCT: f64 = 3.0;
/// The calibration's first offered rate, as a multiple of what the receiver got at `-b 0`;
/// each next one is this much higher, at most this many of them.
const CALIBRATION_FIRST: f64 = 1.2;
const CALIBRATION_STEP: f64 = 1.2;
const CALIBRATION_STEPS: usize = 8;
/// A paced case is measured at these multiples of its calibrated rate, each run the
/// best of them (see [`capacity`]).
const SWEEP: [f64; 3] = [0.85, 1.0, 1.15];
/// Largest UDP socket buffer asked of iperf3 (`-w`); less when net.core.rmem_max is smaller.
const UDP_BUFFER: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Between the veth addresses: plain IP over the client's underlay.
    Veth,
    /// Between the tunnel addresses: the client's wg interface, wireguard-go, the veth.
    Tunnel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    /// 64-byte payloads.
    Udp,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    way: Way,
    proto: Proto,
}

const CASES: [Case; 4] = [
    Case {
        way: Way::Veth,
        proto: Proto::Tcp,
    },
    Case {
        way: Way::Veth,
        proto: Proto::Udp,
    },
    Case {
        way: Way::Tunnel,
        proto: Proto::Tcp,
    },
    Case {
        way: Way::Tunnel,
        proto: Proto::Udp,
    },
];

impl Case {
    fn name(self) -> String {
        let way = match self.way {
            Way::Veth => "veth",
            Way::Tunnel => "wireguard-go tunnel",
        };
        match self.proto {
            Proto::Tcp => format!("TCP over {way}"),
            Proto::Udp => format!("UDP {UDP_PAYLOAD} B over {way}"),
        }
    }

    /// The issue's goals: 97 % of the packet rate on veth, 99 % through the tunnel; none on
    /// TCP.
    fn goal(self) -> Option<Goal> {
        match (self.proto, self.way) {
            (Proto::Tcp, _) => None,
            (Proto::Udp, Way::Veth) => Some(Goal::AtLeast(97.0)),
            (Proto::Udp, Way::Tunnel) => Some(Goal::AtLeast(99.0)),
        }
    }

    fn unit(self) -> &'static str {
        match self.proto {
            Proto::Tcp => "Mbit/s",
            Proto::Udp => "pps",
        }
    }

    /// Pin the iperf3 sender and receiver both to CPU 0 (`-A 0`). On veth this makes one CPU
    /// carry the whole flow (see the module docs). Through the tunnel wireguard-go is the
    /// limit and is better left to the scheduler with everything else.
    fn pinned(self) -> bool {
        self.way == Way::Veth
    }

    fn slug(self) -> &'static str {
        match (self.way, self.proto) {
            (Way::Veth, Proto::Tcp) => "veth-tcp",
            (Way::Veth, Proto::Udp) => "veth-udp",
            (Way::Tunnel, Proto::Tcp) => "tunnel-tcp",
            (Way::Tunnel, Proto::Udp) => "tunnel-udp",
        }
    }
}

/// How iperf3 loads a case.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// UDP offered rate in payload bits/s (`-b`); None is `-b 0` (as fast as the sender can).
    rate_bps: Option<u64>,
}

impl Load {
    fn describe(self) -> String {
        match self.rate_bps {
            None => "-b 0".to_string(),
            Some(b) => format!(
                "-b {:.1}M ({:.0} kpps offered)",
                b as f64 / 1e6,
                b as f64 / f64::from(UDP_PAYLOAD * 8) / 1e3
            ),
        }
    }
}

/// One iperf3 run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Received Mbit/s (TCP) or received packets per second (UDP).
    value: f64,
    /// UDP: packets per second sent, and the share lost (%).
    sent_pps: f64,
    loss_pct: f64,
    /// CPU time of the iperf3 client plus the server, % of the run (iperf3's
    /// `cpu_utilization_percent`, host_total + remote_total); NaN when not reported.
    cpu_pct: f64,
}

/// Counts and lengths of one run of the part.
struct Plan {
    pairs: usize,
    seconds: u32,
    calibration_seconds: u32,
    /// Length of each run of a [`SWEEP`].
    sweep_seconds: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                pairs: 1,
                seconds: 2,
                calibration_seconds: 1,
                sweep_seconds: 1,
            }
        } else {
            Plan {
                pairs: 5,
                seconds: 5,
                calibration_seconds: 2,
                sweep_seconds: 3,
            }
        }
    }
}

pub fn run(ctx: &Ctx) -> Result<Vec<Figure>> {
    let dir = ctx.work.join("throughput");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Built by hand rather than with LabConfig::new, which panics on a bad WIRESCOPE_LAB_WG:
    // this part always wants wireguard-go.
    let cfg = LabConfig {
        topology: Topology::Single,
        prefix: PREFIX.to_string(),
        wg_mtu: lab::plan::DEFAULT_WG_MTU,
        veth_mtu: lab::plan::DEFAULT_VETH_MTU,
        hop: false,
        path_mtu: None,
        wireguard: WgImpl::Userspace,
    };
    // Dropping the lab on an error below tears it down too; teardown() reports failure.
    let lab = Lab::up(cfg).with_context(|| format!("bringing up the lab `{PREFIX}`"))?;
    let outcome = measure(ctx, &lab, &dir);
    let teardown = lab.teardown();
    let figures = outcome?;
    teardown.with_context(|| {
        format!("tearing down the lab `{PREFIX}` (`cargo xtask lab down --prefix {PREFIX}`)")
    })?;
    Ok(figures)
}

/// Everything between lab up and lab down.
fn measure(ctx: &Ctx, lab: &Lab, dir: &Path) -> Result<Vec<Figure>> {
    let plan = Plan::new(ctx.quick);
    let env = Env::new(ctx, lab, dir)?;
    lab.handshake(Duration::from_secs(15))?;
    println!(
        "throughput: {} pair(s) of {} s per case; UDP socket buffer {} KiB; attach mode {}",
        plan.pairs,
        plan.seconds,
        env.udp_buffer / 1024,
        env.attach_mode
    );
    let mut figures = Vec::new();
    for case in CASES {
        figures.extend(
            measure_case(&env, case, &plan)
                .with_context(|| format!("throughput case {}", case.name()))?,
        );
    }
    Ok(figures)
}

/// What every run needs to know about the lab.
struct Env<'a> {
    ctx: &'a Ctx,
    dir: &'a Path,
    client_ns: String,
    relay_ns: String,
    wg: String,
    veth: String,
    veth_dst: String,
    udp_buffer: u64,
    attach_mode: &'static str,
}

impl<'a> Env<'a> {
    fn new(ctx: &'a Ctx, lab: &Lab, dir: &'a Path) -> Result<Env<'a>> {
        let client = lab.client();
        let wg = client
            .wg
            .as_ref()
            .map(|w| w.iface.clone())
            .context("the lab's client has no WireGuard interface")?;
        let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(212_992);
        Ok(Env {
            ctx,
            dir,
            client_ns: client.netns.clone(),
            relay_ns: lab.exit().netns.clone(),
            wg,
            veth: client.underlay().name.clone(),
            veth_dst: client.underlay().peer_address.to_string(),
            udp_buffer: UDP_BUFFER.min(rmem_max),
            attach_mode: lab::attach_mode_for(lab::kernel_version()?),
        })
    }

    fn dst(&self, case: Case) -> String {
        match case.way {
            Way::Veth => self.veth_dst.clone(),
            Way::Tunnel => GATEWAY_V4.to_string(),
        }
    }

    /// The interfaces a case's packets cross in the client namespace (for the live probe).
    fn ifaces(&self, case: Case) -> Vec<&str> {
        match case.way {
            Way::Veth => vec![self.veth.as_str()],
            Way::Tunnel => vec![self.wg.as_str(), self.veth.as_str()],
        }
    }
}

fn measure_case(env: &Env, case: Case, plan: &Plan) -> Result<Vec<Figure>> {
    // Only the tunnel's UDP is paced (see the module docs); TCP and veth UDP go flat out.
    let (load, how) = match (case.proto, case.way) {
        (Proto::Udp, Way::Tunnel) => calibrate(env, case, plan.calibration_seconds)?,
        _ => (Load { rate_bps: None }, String::new()),
    };
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut ratios = Vec::new();
    let mut stats_on = 0;
    let mut live = Vec::new();
    for pair in 0..plan.pairs {
        let a = capacity(env, case, load, plan, "without")?;
        let agent = Running::start(env)?;
        if bpf_stats_enabled() {
            stats_on += 1;
        }
        let b = capacity(env, case, load, plan, "with");
        // The live probe's run: an extra one, after the last measured pair's.
        let probe = match (&b, case.proto) {
            (Ok(_), Proto::Udp) if pair + 1 == plan.pairs => {
                Some(live_probe(env, case, load, plan.seconds))
            }
            _ => None,
        };
        let stopped = agent.stop();
        let b = b?;
        stopped?;
        if let Some(p) = probe {
            live.extend(p?);
        }
        println!(
            "throughput: {} pair {}: without {:.0}, with {:.0} {} ({:.1} %){}",
            case.name(),
            pair + 1,
            a.value,
            b.value,
            case.unit(),
            100.0 * b.value / a.value,
            match case.proto {
                Proto::Udp => format!(
                    "; sent {:.0} / {:.0} pps, lost {:.1} / {:.1} %",
                    a.sent_pps, b.sent_pps, a.loss_pct, b.loss_pct
                ),
                Proto::Tcp => String::new(),
            }
        );
        ratios.push(100.0 * b.value / a.value);
        without.push(a);
        with.push(b);
    }
    Ok(figures(
        env, case, plan, load, &how, &without, &with, ratios, stats_on, live,
    ))
}

#[allow(clippy::too_many_arguments)]
fn figures(
    env: &Env,
    case: Case,
    plan: &Plan,
    load: Load,
    how: &str,
    without: &[Sample],
    with: &[Sample],
    mut ratios: Vec<f64>,
    stats_on: usize,
    live: Vec<Figure>,
) -> Vec<Figure> {
    let n = ratios.len();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), r| {
            (l.min(*r), h.max(*r))
        });
    let ratio = median(&mut ratios);
    let vals = |s: &[Sample]| median(&mut s.iter().map(|x| x.value).collect::<Vec<_>>());
    let (a, b) = (vals(without), vals(with));
    let unit = case.unit();
    let runs = match load.rate_bps {
        None => format!("{} s runs", plan.seconds),
        Some(_) => format!(
            "measurements (each the best of {} s runs offered {} x the calibrated rate)",
            plan.sweep_seconds,
            SWEEP.map(|f| f.to_string()).join(", ")
        ),
    };
    let mut how_run = format!(
        "{n} pair(s) of {runs}, without then with the agent (started for each with-run, \
         stopped after it); ratio = with / without within a pair; per-pair ratios {lo:.1} to \
         {hi:.1} %"
    );
    match case.proto {
        Proto::Udp => {
            let loss = |s: &[Sample]| median(&mut s.iter().map(|x| x.loss_pct).collect::<Vec<_>>());
            how_run.push_str(&format!(
                "; received packets/s, iperf3 -u -l {UDP_PAYLOAD} {}{}, -w {} KiB; median loss \
                 {:.1} % without, {:.1} % with{}",
                load.describe(),
                if case.pinned() {
                    ", -A 0 on both sender and receiver (one CPU)"
                } else {
                    ""
                },
                env.udp_buffer / 1024,
                loss(without),
                loss(with),
                if how.is_empty() {
                    String::new()
                } else {
                    format!("; {how}")
                }
            ));
        }
        Proto::Tcp => {
            how_run.push_str(&format!(
                "; received Mbit/s of one TCP stream{}",
                if case.pinned() {
                    ", -A 0 on both sender and receiver (one CPU)"
                } else {
                    ""
                }
            ));
        }
    }
    how_run.push_str(&format!(
        "; medians {a:.0} {unit} without, {b:.0} {unit} with"
    ));
    // The machine may be shared: time other processes take from the flow's processes lowers
    // the rate of that run alone. The rate per CPU-second those processes got discounts it (a
    // check on noise beside the ratio, not the issue's figure).
    let mut per_cpu: Vec<f64> = without
        .iter()
        .zip(with)
        .map(|(a, b)| 100.0 * (b.value / b.cpu_pct) / (a.value / a.cpu_pct))
        .filter(|r| r.is_finite())
        .collect();
    let per_cpu_fig = if per_cpu.len() == n {
        let (lo, hi) = per_cpu
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), r| {
                (l.min(*r), h.max(*r))
            });
        let m = median(&mut per_cpu);
        how_run.push_str(&format!(
            "; per CPU-second of the flow's processes the median ratio is {m:.1} % ({lo:.1} \
             to {hi:.1} %)"
        ));
        Some(
            Figure::new(
                SECTION,
                format!(
                    "{}: with / without the agent, per CPU-second of the flow",
                    case.name()
                ),
                m,
                "%",
            )
            .note(format!(
                "context, robust to other load on the machine: {unit} divided by the CPU time \
                 of iperf3's client and server plus every process in the lab's namespaces \
                 (wireguard-go at both ends, the agent when it runs), median of the per-pair \
                 ratios ({lo:.1} to {hi:.1} %); kernel work done in those processes' context \
                 (our TC programs included) counts, softirq work done elsewhere does not"
            )),
        )
    } else {
        None
    };
    if stats_on > 0 {
        how_run.push_str(&format!(
            "; kernel.bpf_stats_enabled was on during {stats_on} of {n} with-runs (set by \
             something else; it adds time to every program run)"
        ));
    }
    let mut ratio_fig = Figure::new(
        SECTION,
        format!("{}: with / without the agent", case.name()),
        ratio,
        "%",
    )
    .note(how_run);
    if let Some(g) = case.goal() {
        ratio_fig = ratio_fig.goal(g);
    }
    let mut out = vec![
        ratio_fig,
        Figure::new(
            SECTION,
            format!("{}: without the agent (median)", case.name()),
            a,
            unit,
        )
        .note("context for the ratio: absolute rates vary with the machine and its load"),
        Figure::new(
            SECTION,
            format!("{}: with the agent (median)", case.name()),
            b,
            unit,
        )
        .note("context for the ratio: absolute rates vary with the machine and its load"),
    ];
    out.extend(per_cpu_fig);
    out.extend(live);
    out
}

/// One measurement of a case: one run; or, when the load is paced, the run that got the
/// most through among [`SWEEP`] around the calibrated rate (so that a with-run whose peak
/// lies lower is measured at its own peak, not past it where wireguard-go collapses).
fn capacity(env: &Env, case: Case, load: Load, plan: &Plan, tag: &str) -> Result<Sample> {
    let Some(rate) = load.rate_bps else {
        return iperf(env, case, load, plan.seconds, tag);
    };
    let mut best: Option<Sample> = None;
    for f in SWEEP {
        let at = Load {
            rate_bps: Some((rate as f64 * f) as u64),
        };
        let s = iperf(env, case, at, plan.sweep_seconds, tag)?;
        if best.is_none_or(|b| s.value > b.value) {
            best = Some(s);
        }
    }
    best.context("an empty sweep")
}

/// UDP: the offered rate for this case (see the module docs) and how it was chosen.
fn calibrate(env: &Env, case: Case, seconds: u32) -> Result<(Load, String)> {
    let flood = Load { rate_bps: None };
    let s0 = iperf(env, case, flood, seconds, "calibrate")?;
    println!(
        "throughput: {} calibration -b 0: sent {:.0} pps, received {:.0} pps, lost {:.1} %",
        case.name(),
        s0.sent_pps,
        s0.value,
        s0.loss_pct
    );
    if s0.loss_pct < SATURATED_LOSS_PCT {
        return Ok((
            flood,
            format!(
                "calibration: at -b 0 the receiver got {:.1} % of what was sent, so the sender \
                 is the limit",
                100.0 - s0.loss_pct
            ),
        ));
    }
    let bits = f64::from(UDP_PAYLOAD * 8);
    let mut best: Option<(Load, Sample)> = None;
    let mut tried = vec![format!(
        "-b 0: {:.0} pps, {:.0} % lost",
        s0.value, s0.loss_pct
    )];
    // Up from a little above what got through while flooding, until past the peak (saturated
    // and getting less through than the best so far), or as fast as the flood itself went.
    let mut pps = s0.value * CALIBRATION_FIRST;
    for _ in 0..CALIBRATION_STEPS {
        if pps >= s0.sent_pps {
            break;
        }
        let load = Load {
            rate_bps: Some((pps * bits) as u64),
        };
        let s = iperf(env, case, load, seconds, "calibrate")?;
        println!(
            "throughput: {} calibration {}: received {:.0} pps, lost {:.1} %",
            case.name(),
            load.describe(),
            s.value,
            s.loss_pct
        );
        tried.push(format!(
            "{:.0} kpps: {:.0} pps, {:.0} % lost",
            s.sent_pps / 1e3,
            s.value,
            s.loss_pct
        ));
        let saturated = s.loss_pct >= SATURATED_LOSS_PCT;
        match best {
            Some((_, b)) if saturated && s.value < b.value => break,
            Some((_, b)) if s.value <= b.value => {}
            _ if saturated => best = Some((load, s)),
            _ => {}
        }
        pps *= CALIBRATION_STEP;
    }
    Ok(match best {
        Some((load, _)) => (
            load,
            format!(
                "offered rate: the saturated one (>= {SATURATED_LOSS_PCT} % lost) that got the \
                 most through in a calibration without the agent ({})",
                tried.join(", ")
            ),
        ),
        // Every paced rate fitted, up to what the flood sent: the sender is the limit.
        None => (
            flood,
            format!(
                "calibration: every paced rate up to the flood's fitted ({}), so -b 0",
                tried.join(", ")
            ),
        ),
    })
}

/// The extra with-agent run of a UDP case under [`cost::LiveProbe`]. Err only for what
/// breaks this part (iperf3); the probe's own failure becomes a figure without a value.
fn live_probe(env: &Env, case: Case, load: Load, seconds: u32) -> Result<Vec<Figure>> {
    let label = case.name();
    let ifaces = env.ifaces(case);
    let failed = |what: &str, e: anyhow::Error| {
        eprintln!("throughput: live probe {what} for {label}: {e:#}");
        vec![
            Figure::new(
                cost::SECTION_LIVE,
                format!("{label}: live probe"),
                f64::NAN,
                "ns",
            )
            .note(format!("LiveProbe {what} failed: {e:#}")),
        ]
    };
    let probe = match cost::LiveProbe::start(env.ctx, &env.client_ns, &ifaces) {
        Ok(p) => p,
        Err(e) => return Ok(failed("start", e)),
    };
    // The probe is dropped (detached by its owner's Drop, if any) should iperf3 fail here.
    iperf(env, case, load, seconds, "probe")?;
    Ok(probe.finish(&label).unwrap_or_else(|e| failed("finish", e)))
}

/// The agent running in the client namespace, attached to both interfaces.
struct Running {
    agent: Agent,
    pid: u32,
    /// Its TCX link ids (none in clsact mode).
    links: Vec<u32>,
}

impl Running {
    fn start(env: &Env) -> Result<Running> {
        let log = env.dir.join("agent.log");
        let state = env.dir.join("agent-state");
        let state = state.to_string_lossy();
        let args = [
            "--tunnel",
            &env.wg,
            "--underlay",
            &env.veth,
            "--state-dir",
            &state,
        ];
        let agent = Agent::start(&env.ctx.agent_bin, &env.client_ns, &args, &log)?;
        let pid = agent_pid(env)?;
        let mut running = Running {
            agent,
            pid,
            links: Vec::new(),
        };
        running.check_attached(env)?;
        Ok(running)
    }

    /// Waits (up to 10 s) until /metrics shows rx and tx attached on both interfaces in the
    /// expected mode and the relay as a peer (so that the programs have their maps filled);
    /// in TCX mode also reads the agent's own links: one ingress and one egress per ifindex.
    fn check_attached(&mut self, env: &Env) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut missing;
        loop {
            let m = self.agent.scrape()?;
            missing = Vec::new();
            for iface in [&env.wg, &env.veth] {
                for dir in ["rx", "tx"] {
                    let v = m.get(
                        "wirescope_attach_info",
                        &[
                            ("interface", iface),
                            ("direction", dir),
                            ("mode", env.attach_mode),
                        ],
                    )?;
                    if v != 1.0 {
                        missing.push(format!("{iface} {dir}"));
                    }
                }
            }
            if m.sum("wirescope_peer_info", &[("interface", &env.wg)]) < 1.0 {
                missing.push(format!("the relay peer on {}", env.wg));
            }
            if missing.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent has not attached ({} missing in /metrics after 10 s); its log:\n{}",
                    missing.join(", "),
                    self.agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if env.attach_mode != "tcx" {
            return Ok(());
        }
        let links = tcx_links(self.pid)?;
        for iface in [&env.wg, &env.veth] {
            let index = ifindex(&env.client_ns, iface)?;
            for dir in ["ingress", "egress"] {
                if !links
                    .iter()
                    .any(|l| l.ifindex == index && l.attach_type.contains(dir))
                {
                    bail!(
                        "the agent (pid {}) holds no TCX {dir} link on {iface} (ifindex {index}); \
                         its links: {links:?}",
                        self.pid
                    );
                }
            }
        }
        self.links = links.iter().map(|l| l.id).collect();
        Ok(())
    }

    /// SIGINT; fails unless the agent exits 0 and, in TCX mode, its links are gone.
    fn stop(self) -> Result<()> {
        let status = self.agent.stop()?;
        if !status.success() {
            bail!("the agent exited with {status} instead of 0 (clean detach)");
        }
        if self.links.is_empty() {
            return Ok(());
        }
        let out = crate::cmd::stdout("bpftool", ["-j", "link", "show"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("parsing `bpftool -j link show`")?;
        let left: Vec<u32> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["id"].as_u64())
            .filter_map(|id| u32::try_from(id).ok())
            .filter(|id| self.links.contains(id))
            .collect();
        if !left.is_empty() {
            bail!("the stopped agent's TCX links {left:?} are still there");
        }
        Ok(())
    }
}

/// The agent's pid: `ip netns exec` execs it, but Agent keeps its Child private, so it is
/// found among the namespace's processes by its argv.
fn agent_pid(env: &Env) -> Result<u32> {
    let bin = env.ctx.agent_bin.to_string_lossy();
    procs::netns_pids(&env.client_ns)?
        .into_iter()
        .find(|&pid| procs::argv(pid).is_some_and(|a| a.first().is_some_and(|p| *p == bin)))
        .ok_or_else(|| anyhow!("no {bin} process in {}", env.client_ns))
}

#[derive(Debug)]
struct TcxLink {
    id: u32,
    ifindex: u32,
    /// e.g. "46 (ingress)"
    attach_type: String,
}

/// The TCX links a process holds, from /proc/PID/fdinfo (link_type, link_id, ifindex,
/// attach_type: what the kernel prints for a TCX link fd since 6.6).
fn tcx_links(pid: u32) -> Result<Vec<TcxLink>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut links = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let Ok(entry) = entry else { continue };
        // A descriptor may close between the listing and the read: skip it.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_string())
        };
        if field("link_type").as_deref() != Some("tcx") {
            continue;
        }
        let num = |k: &str| field(k).and_then(|v| v.parse::<u32>().ok());
        if let (Some(id), Some(ifindex), Some(attach_type)) =
            (num("link_id"), num("ifindex"), field("attach_type"))
        {
            links.push(TcxLink {
                id,
                ifindex,
                attach_type,
            });
        }
    }
    Ok(links)
}

/// An interface's index in a namespace (`ip -o link show dev IFACE`: "3: btc0: ...").
fn ifindex(ns: &str, iface: &str) -> Result<u32> {
    let out = crate::cmd::stdout("ip", ["-n", ns, "-o", "link", "show", "dev", iface])?;
    out.split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| anyhow!("no ifindex in `ip -n {ns} -o link show dev {iface}`: {out:?}"))
}

fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() != "0")
}

/// One iperf3 run of `seconds` against a fresh one-shot server; both processes are gone when
/// this returns, also on error.
fn iperf(env: &Env, case: Case, load: Load, seconds: u32, tag: &str) -> Result<Sample> {
    let dst = env.dst(case);
    let port = PORT.to_string();
    let base = env.dir.join(format!("{}-{tag}", case.slug()));
    let server_log = base.with_extension("server.log");
    let out = crate::cmd::new_file(&server_log)?;
    let mut server_cmd = netns::command(&env.relay_ns, "iperf3");
    server_cmd.args(["-s", "-1", "-B", &dst, "-p", &port]);
    if case.pinned() {
        server_cmd.args(["-A", "0"]);
    }
    let mut server = ChildGuard(
        server_cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the iperf3 server (is iperf3 installed? `cargo xtask setup`)")?,
    );
    wait_listening(
        &env.relay_ns,
        &format!("{dst}:{port}"),
        &mut server.0,
        &server_log,
    )?;

    let json_path = base.with_extension("json");
    let secs = seconds.to_string();
    let mut client_cmd = netns::command(&env.client_ns, "iperf3");
    client_cmd.args([
        "-c",
        &dst,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    let (len, buf) = (UDP_PAYLOAD.to_string(), env.udp_buffer.to_string());
    let rate = load.rate_bps.unwrap_or(0).to_string();
    if case.proto == Proto::Udp {
        client_cmd.args(["-u", "-l", &len, "-b", &rate, "-w", &buf]);
    }
    if case.pinned() {
        client_cmd.args(["-A", "0"]);
    }
    let lab_cpu = LabCpu::snapshot(&[&env.client_ns, &env.relay_ns])?;
    let started = Instant::now();
    let mut client = ChildGuard(
        client_cmd
            .stdin(Stdio::null())
            .stdout(crate::cmd::new_file(&json_path)?)
            .stderr(crate::cmd::new_file(&base.with_extension("client.err"))?)
            .spawn()
            .context("starting the iperf3 client")?,
    );
    // iperf3 itself stops after -t; this bounds a hung one (connect, or a lost end message).
    let limit = Duration::from_secs(u64::from(seconds) + 15);
    let status = wait_exit(&mut client.0, limit)
        .with_context(|| format!("the iperf3 client ({})", env.client_ns))?;
    let lab_cpu_pct = 100.0 * lab_cpu.seconds_since() / started.elapsed().as_secs_f64();
    // The one-shot server exits after its client; give it a moment, then the guard kills it.
    let _ = wait_exit(&mut server.0, Duration::from_secs(3));
    let json = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("iperf3 printed no JSON ({})", json_path.display()))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 to {dst} failed: {err}");
    }
    if !status.success() {
        bail!("iperf3 exited with {status}; see {}", json_path.display());
    }
    let mut sample =
        parse_sample(&v, case.proto).with_context(|| format!("reading {}", json_path.display()))?;
    sample.cpu_pct += lab_cpu_pct;
    Ok(sample)
}

/// CPU time of the processes in some namespaces (wireguard-go, the agent), iperf3 left out
/// (it reports its own): a snapshot, and the CPU-seconds the same processes used since.
struct LabCpu {
    ticks: Vec<(u32, u64)>,
}

impl LabCpu {
    fn snapshot(namespaces: &[&str]) -> Result<LabCpu> {
        let mut ticks = Vec::new();
        for ns in namespaces {
            for pid in procs::netns_pids(ns)? {
                let iperf = procs::argv(pid)
                    .is_some_and(|a| a.first().is_some_and(|p| p.ends_with("iperf3")));
                if let (false, Some(t)) = (iperf, cpu_ticks(pid)) {
                    ticks.push((pid, t));
                }
            }
        }
        Ok(LabCpu { ticks })
    }

    /// CPU-seconds used since the snapshot by the processes it saw (one that exited in
    /// between counts nothing).
    fn seconds_since(&self) -> f64 {
        let used: u64 = self
            .ticks
            .iter()
            .filter_map(|(pid, t0)| cpu_ticks(*pid).map(|t| t.saturating_sub(*t0)))
            .sum();
        used as f64 / USER_HZ
    }
}

/// Clock ticks per second in /proc/PID/stat: USER_HZ, which the kernel exports as 100 on
/// every architecture Linux runs this agent on (whatever its internal HZ).
const USER_HZ: f64 = 100.0;

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15); None when it
/// is gone.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name (which may contain spaces), from the
    // state (field 3) on.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The figures of one run out of iperf3's JSON (`end.sum_received`, `end.sum_sent`).
fn parse_sample(v: &serde_json::Value, proto: Proto) -> Result<Sample> {
    let num = |x: &serde_json::Value, k: &str| {
        x[k].as_f64()
            .ok_or_else(|| anyhow!("iperf3 JSON has no number {k}"))
    };
    let rx = &v["end"]["sum_received"];
    let tx = &v["end"]["sum_sent"];
    let cpu = &v["end"]["cpu_utilization_percent"];
    let cpu_pct = match (cpu["host_total"].as_f64(), cpu["remote_total"].as_f64()) {
        (Some(h), Some(r)) => h + r,
        _ => f64::NAN,
    };
    match proto {
        Proto::Tcp => Ok(Sample {
            value: num(rx, "bits_per_second")? / 1e6,
            sent_pps: f64::NAN,
            loss_pct: f64::NAN,
            cpu_pct,
        }),
        Proto::Udp => {
            let secs = num(rx, "seconds")?;
            let sent_secs = num(tx, "seconds")?;
            if secs <= 0.0 || sent_secs <= 0.0 {
                bail!("iperf3 ran for no time");
            }
            let got = num(rx, "packets")? - num(rx, "lost_packets")?;
            let sent = num(tx, "packets")?;
            Ok(Sample {
                value: got / secs,
                sent_pps: sent / sent_secs,
                loss_pct: if sent > 0.0 {
                    100.0 * (1.0 - got / sent).max(0.0)
                } else {
                    0.0
                },
                cpu_pct,
            })
        }
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something listens on TCP `addr` in `ns`, failing early if `server` exits.
fn wait_listening(ns: &str, addr: &str, server: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.try_wait()? {
            bail!(
                "the iperf3 server exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        let out = netns::exec(ns, &["ss", "-Hltn"])?;
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some(addr))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the iperf3 server does not listen on {addr} in {ns} after 5 s");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_sample_is_received_packets_per_second() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"end":{"sum_sent":{"seconds":2.0,"packets":1000},
                       "sum_received":{"seconds":2.0,"packets":1000,"lost_packets":100}}}"#,
        )
        .unwrap();
        let s = parse_sample(&v, Proto::Udp).unwrap();
        assert_eq!(s.value, 450.0);
        assert_eq!(s.sent_pps, 500.0);
        assert!((s.loss_pct - 10.0).abs() < 1e-9);
        assert!(parse_sample(&serde_json::json!({"end": {}}), Proto::Udp).is_err());
    }

    #[test]
    fn goals_only_on_udp() {
        let goals: Vec<Option<Goal>> = CASES.iter().map(|c| c.goal()).collect();
        assert_eq!(
            goals,
            [
                None,
                Some(Goal::AtLeast(97.0)),
                None,
                Some(Goal::AtLeast(99.0))
            ]
        );
    }
}
