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
//! During two extra with-agent runs of each UDP case, [`cost::LiveProbe`] measures the live
//! per-packet margin of our programs over an empty program on the same interfaces: the
//! egress programs with the load leaving the client, the ingress ones with it coming back
//! (iperf3 `-R`), each figure with its number of runs; its figures are appended. Those runs
//! are not among the measured pairs (the probe's empty program
//! costs something itself). When the probe fails, its place in the report is a figure with
//! no value (NaN) whose note holds the error: the bench fails at the end naming it, and the
//! throughput figures measured before are kept.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::{Ctx, Figure, Goal, cost, median};
use crate::lab::{self, GATEWAY_V4, Lab, LabConfig, Topology, WgImpl};

mod agent;
mod iperf;
#[cfg(test)]
mod tests;

use agent::{Running, bpf_stats_enabled};
use iperf::{iperf, iperf_way};

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

    /// The goals: 97 % of the packet rate on veth, 99 % through the tunnel; none on
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
    // check on noise beside the ratio, not the figure).
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

/// The extra with-agent runs of a UDP case under [`cost::LiveProbe`], one per direction:
/// the egress programs are measured while the load leaves the client, the ingress ones while
/// it comes back (iperf3 `-R`), so each figure is from the packets of the load and not from
/// the few control packets flowing the other way. Err only for what breaks this part
/// (iperf3); the probe's own failure becomes a figure without a value.
fn live_probe(env: &Env, case: Case, load: Load, seconds: u32) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for (reverse, hook) in [(false, cost::Hook::Egress), (true, cost::Hook::Ingress)] {
        let label = format!("{}, load {}", case.name(), hook.load_way());
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
        let probe = match cost::LiveProbe::start(env.ctx, &env.client_ns, &env.ifaces(case)) {
            Ok(p) => p,
            Err(e) => {
                figures.extend(failed("start", e));
                continue;
            }
        };
        // The probe is dropped (detached by its owner's Drop, if any) should iperf3 fail here.
        iperf_way(env, case, load, seconds, "probe", reverse)?;
        figures.extend(
            probe
                .finish(&label, Some(hook))
                .unwrap_or_else(|e| failed("finish", e)),
        );
    }
    Ok(figures)
}
