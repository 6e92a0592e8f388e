//! Per-packet cost of the TC programs: the margin over an empty TC program
//! (`wirescope_baseline`), both measured the same way in the same run, by the
//! `bench_packet_cost` example of the agent (agent/examples/bench_packet_cost.rs).
//!
//! - test_run: `BPF_PROG_TEST_RUN` with a large repeat on fixture packets of each kind at 1,
//!   100 and 10,000 peers; the kernel times the loop as a whole, so this is the precise one.
//! - live: the kernel's run statistics (`kernel.bpf_stats_enabled`) of the agent's attached
//!   programs under real load, against an empty program attached beside them. Each run is
//!   bracketed by two clock reads there (~60 ns on this VM for an empty program), so only the
//!   margin means anything.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Deserialize;

use super::{Ctx, Figure, Goal};

/// Section names of the figures this part produces.
pub const SECTION_TEST_RUN: &str = "per-packet cost (test_run)";
pub const SECTION_TEST_RUN_TRANSIT_OFF: &str = "per-packet cost (test_run, --transit-time off)";
pub const SECTION_LIVE: &str = "per-packet cost (live)";
pub const SECTION_STEPS: &str = "per-packet cost: where it goes (test_run, 10000 peers)";

/// The steps of a data packet's path, each measured by a fixture that stops right after it
/// (agent/examples/bench_packet_cost.rs), per role: (kind measured, what the step adds,
/// transit time off). A step's figure is its margin minus the previous one's.
type Step = (&'static str, &'static str, bool);
const STEPS: [(&str, [Step; 4]); 2] = [
    (
        "tunnel",
        [
            (
                "not IP",
                "entry and interface configuration (not IP)",
                false,
            ),
            (
                "IPv4, no peer",
                "+ IPv4 parse and a peer lookup that misses",
                false,
            ),
            ("IPv4", "+ a found peer's counting (transit time off)", true),
            ("IPv4", "+ transit time", false),
        ],
    ),
    (
        "wire",
        [
            ("ARP", "entry and interface configuration (not IP)", false),
            (
                "WireGuard data, unknown endpoint",
                "+ headers and a data message whose peer lookup misses",
                false,
            ),
            (
                "WireGuard data",
                "+ a found peer's counting and health (transit time off)",
                true,
            ),
            ("WireGuard data", "+ transit time", false),
        ],
    ),
];

/// The goals of issue 7, per packet at 10,000 peers, as the margin over an empty program.
pub const GOAL_WIRE_DATA_NS: f64 = 40.0;
pub const GOAL_TUNNEL_NS: f64 = 30.0;
/// The peer count the goals are held at.
pub const GOAL_PEERS: u32 = 10_000;

/// Fewer runs than this behind a live figure and its note says it means little: the load
/// was not flowing through that program.
pub const LIVE_MIN_RUNS: u64 = 10_000;

/// The direction of a TC program, and so of the load its live figure needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    /// Which way the load flows, seen from the interfaces the probe is on.
    pub fn load_way(self) -> &'static str {
        match self {
            Hook::Ingress => "in",
            Hook::Egress => "out",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::Ingress => "wirescope_ingress",
            Hook::Egress => "wirescope_egress",
        }
    }
}

/// What `bench_packet_cost test-run` prints.
#[derive(Debug, Deserialize)]
struct TestRunReport {
    repeat: u32,
    rounds: u32,
    results: Vec<Measurement>,
}

#[derive(Debug, Deserialize)]
struct Measurement {
    peers: u32,
    kind: String,
    role: String,
    program: String,
    ns: f64,
    baseline_ns: f64,
    margin_ns: f64,
}

/// What `bench_packet_cost live` prints.
#[derive(Debug, Deserialize)]
struct LiveReport {
    ifaces: Vec<String>,
    seconds: f64,
    programs: Vec<LiveProgram>,
}

#[derive(Debug, Deserialize)]
struct LiveProgram {
    program: String,
    runs: u64,
    mean_ns: Option<f64>,
    baseline_runs: u64,
    baseline_mean_ns: Option<f64>,
    margin_ns: Option<f64>,
}

pub fn run(ctx: &Ctx) -> Result<Vec<Figure>> {
    let (repeat, rounds) = if ctx.quick {
        (100_000, 2)
    } else {
        (1_000_000, 5)
    };
    let on = test_run(ctx, repeat, rounds, "1,100,10000", false)?;
    // The same at the goals' peer count with transit timing off (`--transit-time off`):
    // what the rest of the work costs.
    let off = test_run(ctx, repeat, rounds, &GOAL_PEERS.to_string(), true)?;
    let mut figures = test_run_figures(&on, SECTION_TEST_RUN);
    figures.extend(test_run_figures(&off, SECTION_TEST_RUN_TRANSIT_OFF));
    figures.extend(step_figures(&on, &off));
    Ok(figures)
}

/// Where the margin of a data packet at [`GOAL_PEERS`] goes, step by step: each step's
/// figure is the margin of the fixture that stops after it minus the previous one's.
fn step_figures(on: &TestRunReport, off: &TestRunReport) -> Vec<Figure> {
    let margin = |r: &TestRunReport, role: &str, program: &str, kind: &str| {
        r.results
            .iter()
            .find(|m| {
                m.peers == GOAL_PEERS && m.role == role && m.program == program && m.kind == kind
            })
            .map(|m| m.margin_ns)
    };
    let mut figures = Vec::new();
    for (role, steps) in STEPS {
        for program in ["wirescope_ingress", "wirescope_egress"] {
            let mut before = 0.0;
            for (i, (kind, what, transit_off)) in steps.iter().enumerate() {
                let report = if *transit_off { off } else { on };
                let Some(m) = margin(report, role, program, kind) else {
                    // An older example without the step fixtures: no breakdown, no error.
                    break;
                };
                figures.push(
                    Figure::new(
                        SECTION_STEPS,
                        format!("{}, {}. {what}", program_label(role, program), i + 1),
                        m - before,
                        "ns",
                    )
                    .note(format!("{m:.0} ns margin up to here ({kind})")),
                );
                before = m;
            }
        }
    }
    figures
}

/// One `bench_packet_cost test-run`.
fn test_run(
    ctx: &Ctx,
    repeat: u32,
    rounds: u32,
    peers: &str,
    transit_off: bool,
) -> Result<TestRunReport> {
    let mut cmd = Command::new(&ctx.cost_bin);
    cmd.args([
        "test-run",
        "--repeat",
        &repeat.to_string(),
        "--rounds",
        &rounds.to_string(),
        "--peers",
        peers,
    ]);
    if transit_off {
        cmd.arg("--transit-time-off");
    }
    let out = crate::cmd::run(&mut cmd)?;
    let report: TestRunReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing what `{} test-run` printed", ctx.cost_bin.display()))?;
    if report.results.is_empty() {
        bail!("`bench_packet_cost test-run` measured nothing");
    }
    Ok(report)
}

/// "wire ingress" / "tunnel egress": the role of the interface and the program's hook.
fn program_label(role: &str, program: &str) -> String {
    let hook = program.strip_prefix("wirescope_").unwrap_or(program);
    format!("{role} {hook}")
}

fn peers_label(n: u32) -> String {
    if n == 1 {
        "1 peer".to_string()
    } else {
        format!("{n} peers")
    }
}

fn test_run_figures(r: &TestRunReport, section: &str) -> Vec<Figure> {
    r.results
        .iter()
        .map(|m| {
            let name = format!(
                "{}, {}, {}",
                program_label(&m.role, &m.program),
                m.kind,
                peers_label(m.peers)
            );
            let goal = match (m.role.as_str(), m.kind.as_str()) {
                _ if m.peers != GOAL_PEERS => None,
                ("wire", "WireGuard data") => Some(Goal::AtMost(GOAL_WIRE_DATA_NS)),
                ("tunnel", "IPv4" | "IPv6") => Some(Goal::AtMost(GOAL_TUNNEL_NS)),
                _ => None,
            };
            // The figure is the median of the per-round differences; the two absolute
            // times are medians of their own, shown so the empty program's is on record.
            let fig = Figure::new(section, name, m.margin_ns, "ns").note(format!(
                "ours {:.0} ns, empty program {:.0} ns (medians of {} rounds of {} runs)",
                m.ns, m.baseline_ns, r.rounds, r.repeat
            ));
            match goal {
                Some(g) => fig.goal(g),
                None => fig,
            }
        })
        .collect()
}

/// The empty TC program attached beside the agent's programs while live load runs, with
/// `kernel.bpf_stats_enabled` on: [`LiveProbe::finish`] gives, per program of ours, its mean
/// run time per packet minus the empty program's over the same interval.
///
/// It is `bench_packet_cost live` running in the namespace: it attaches the empty program
/// (one per direction) to every interface the agent's programs are on there, and turns the
/// statistics on (reference-counted; off again when it exits, however it exits).
pub struct LiveProbe {
    child: Child,
    ns: String,
    /// stderr after the `ready` line, collected by a thread (for error messages).
    stderr: mpsc::Receiver<String>,
}

/// How long the probe may take to load and attach.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl LiveProbe {
    /// Attaches the empty program (ingress and egress) to `ifaces` in namespace `ns`, where
    /// the agent already runs, and snapshots the run statistics.
    pub fn start(ctx: &Ctx, ns: &str, ifaces: &[&str]) -> Result<LiveProbe> {
        let mut cmd = crate::netns::command(ns, &ctx.cost_bin.to_string_lossy());
        cmd.arg("live");
        for i in ifaces {
            cmd.args(["--iface", i]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", crate::cmd::describe(&cmd)))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("live probe: no stderr pipe"))?;
        // Lines until `ready` go to the first channel; the rest of stderr is kept for the
        // error message at the end.
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (rest_tx, rest_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut before = String::new();
            let mut lines = BufReader::new(stderr).lines();
            let mut ready = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if line.trim() == "ready" {
                    ready = true;
                    let _ = ready_tx.send(Ok(()));
                    break;
                }
                before.push_str(&line);
                before.push('\n');
            }
            if !ready {
                let _ = ready_tx.send(Err(before.clone()));
            }
            let mut rest = before;
            for line in lines.map_while(Result::ok) {
                rest.push_str(&line);
                rest.push('\n');
            }
            let _ = rest_tx.send(rest);
        });
        let outcome = ready_rx.recv_timeout(READY_TIMEOUT);
        let fail = |child: &mut Child, why: String| -> anyhow::Error {
            // Our own child: ending it is safe and leaves no empty program attached (its
            // links go with it).
            let _ = child.kill();
            let _ = child.wait();
            anyhow!("live probe in {ns}: {why}")
        };
        match outcome {
            Ok(Ok(())) => Ok(LiveProbe {
                child,
                ns: ns.to_string(),
                stderr: rest_rx,
            }),
            Ok(Err(stderr)) => Err(fail(
                &mut child,
                format!("exited before ready: {}", stderr.trim()),
            )),
            Err(_) => Err(fail(
                &mut child,
                format!("not ready within {} s", READY_TIMEOUT.as_secs()),
            )),
        }
    }

    /// Detaches the empty program; figures named after `label` (e.g. "UDP 64 B through the
    /// tunnel"), of the programs of `hook` only when given (the direction the load flowed).
    pub fn finish(mut self, label: &str, hook: Option<Hook>) -> Result<Vec<Figure>> {
        if let Some(mut stdin) = self.child.stdin.take() {
            // A closed pipe (the probe already gone) shows in its exit status below.
            let _ = stdin.write_all(b"\n");
        }
        let out = self
            .child
            .wait_with_output()
            .with_context(|| format!("waiting for the live probe in {}", self.ns))?;
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        if !out.status.success() {
            bail!(
                "live probe in {} failed ({}): {}",
                self.ns,
                out.status,
                stderr.trim()
            );
        }
        let report: LiveReport = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing the live probe's output in {}", self.ns))?;
        Ok(live_figures(&report, label, hook))
    }
}

fn live_figures(r: &LiveReport, label: &str, hook: Option<Hook>) -> Vec<Figure> {
    let nan = f64::NAN;
    r.programs
        .iter()
        .filter(|p| hook.is_none_or(|h| p.program == h.program()))
        .map(|p| {
            let hook = p.program.strip_prefix("wirescope_").unwrap_or(&p.program);
            Figure::new(
                SECTION_LIVE,
                format!("{hook}, {label}"),
                p.margin_ns.unwrap_or(nan),
                "ns",
            )
            .note(format!(
                "{:.0} ns over {} runs - empty program {:.0} ns over {} runs; {:.0} s on {}{}",
                p.mean_ns.unwrap_or(nan),
                p.runs,
                p.baseline_mean_ns.unwrap_or(nan),
                p.baseline_runs,
                r.seconds,
                r.ifaces.join(", "),
                if p.runs.min(p.baseline_runs) < LIVE_MIN_RUNS {
                    format!("; fewer than {LIVE_MIN_RUNS} runs: means little")
                } else {
                    String::new()
                }
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_sit_on_the_10000_peer_figures() {
        let m = |peers, role: &str, kind: &str, program: &str| Measurement {
            peers,
            kind: kind.into(),
            role: role.into(),
            program: program.into(),
            ns: 100.0,
            baseline_ns: 60.0,
            margin_ns: 40.0,
        };
        let r = TestRunReport {
            repeat: 1000,
            rounds: 3,
            results: vec![
                m(10_000, "wire", "WireGuard data", "wirescope_ingress"),
                m(10_000, "wire", "WireGuard data", "wirescope_egress"),
                m(100, "wire", "WireGuard data", "wirescope_egress"),
                m(10_000, "tunnel", "IPv6", "wirescope_egress"),
                m(10_000, "wire", "keepalive", "wirescope_ingress"),
                m(1, "tunnel", "IPv4", "wirescope_ingress"),
            ],
        };
        let f = test_run_figures(&r, SECTION_TEST_RUN);
        assert_eq!(f[0].name, "wire ingress, WireGuard data, 10000 peers");
        assert_eq!(f[0].goal, Some(Goal::AtMost(40.0)));
        assert_eq!(f[1].goal, Some(Goal::AtMost(40.0)));
        assert_eq!(f[2].goal, None);
        assert_eq!(f[3].goal, Some(Goal::AtMost(30.0)));
        assert_eq!(f[4].goal, None);
        assert_eq!(f[5].name, "tunnel ingress, IPv4, 1 peer");
        assert_eq!(f[5].goal, None);
        assert!(f[0].note.contains("ours 100 ns, empty program 60 ns"));
    }

    #[test]
    fn steps_are_the_differences_of_the_fixtures_that_stop_after_them() {
        let m = |kind: &str, margin_ns, peers| Measurement {
            peers,
            kind: kind.into(),
            role: "tunnel".into(),
            program: "wirescope_ingress".into(),
            ns: 0.0,
            baseline_ns: 0.0,
            margin_ns,
        };
        let report = |results| TestRunReport {
            repeat: 1,
            rounds: 1,
            results,
        };
        let on = report(vec![
            m("not IP", 9.0, 10_000),
            m("IPv4, no peer", 21.0, 10_000),
            m("IPv4", 70.0, 10_000),
            // Another peer count is not the goals' and is left out.
            m("IPv4", 500.0, 1),
        ]);
        let off = report(vec![m("IPv4", 40.0, 10_000)]);
        let f = step_figures(&on, &off);
        let got: Vec<(&str, f64)> = f.iter().map(|f| (f.name.as_str(), f.value)).collect();
        assert_eq!(
            got,
            [
                (
                    "tunnel ingress, 1. entry and interface configuration (not IP)",
                    9.0
                ),
                (
                    "tunnel ingress, 2. + IPv4 parse and a peer lookup that misses",
                    12.0
                ),
                (
                    "tunnel ingress, 3. + a found peer's counting (transit time off)",
                    19.0
                ),
                ("tunnel ingress, 4. + transit time", 30.0),
            ]
        );
        assert!(f.iter().all(|f| f.section == SECTION_STEPS));
        assert_eq!(f[3].note, "70 ns margin up to here (IPv4)");
    }

    #[test]
    fn live_output_parses_with_nan_as_null() {
        let json = r#"{"ifaces":["wg0","eth0"],"seconds":3.0,"programs":[
            {"program":"wirescope_ingress","ids":[7],"runs":10,"mean_ns":90.0,
             "baseline_runs":10,"baseline_mean_ns":60.0,"margin_ns":30.0},
            {"program":"wirescope_egress","ids":[8],"runs":0,"mean_ns":null,
             "baseline_runs":0,"baseline_mean_ns":null,"margin_ns":null}]}"#;
        let r: LiveReport = serde_json::from_str(json).expect("parses");
        let f = live_figures(&r, "UDP 64 B", None);
        assert_eq!(f[0].name, "ingress, UDP 64 B");
        assert_eq!(f[0].value, 30.0);
        assert!(f[0].note.contains("over 10 runs") && f[0].note.contains("means little"));
        assert!(f[1].value.is_nan());
    }

    #[test]
    fn a_live_run_keeps_the_direction_its_load_flowed() {
        let json = r#"{"ifaces":["wg0"],"seconds":3.0,"programs":[
            {"program":"wirescope_ingress","ids":[7],"runs":15,"mean_ns":90.0,
             "baseline_runs":15,"baseline_mean_ns":60.0,"margin_ns":30.0},
            {"program":"wirescope_egress","ids":[8],"runs":200000,"mean_ns":150.0,
             "baseline_runs":200000,"baseline_mean_ns":60.0,"margin_ns":90.0}]}"#;
        let r: LiveReport = serde_json::from_str(json).expect("parses");
        let f = live_figures(&r, "UDP 64 B, load out", Some(Hook::Egress));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].name, "egress, UDP 64 B, load out");
        assert_eq!(f[0].value, 90.0);
        assert!(f[0].note.contains("over 200000 runs") && !f[0].note.contains("means little"));
        let f = live_figures(&r, "UDP 64 B, load in", Some(Hook::Ingress));
        assert_eq!((f.len(), f[0].value), (1, 30.0));
    }
}
