//! `cargo xtask bench`: what the agent costs, measured side by side in one run, written to
//! bench/REPORT.md and bench/report.json. Every figure is a ratio or a difference of two
//! measurements taken in the same run (with and without the agent, ours against an empty
//! program or against prometheus_wireguard_exporter), never an absolute time compared with
//! another run's.
//!
//! The parts, one module each:
//! - [`cost`]: per-packet cost of each TC program with `BPF_PROG_TEST_RUN` (repeat >= 1M) on
//!   fixture packets at 1, 100 and 10,000 peers, as the margin over an empty TC program on the
//!   same packet; and the same margin under live load from the kernel's run statistics
//!   ([`cost::LiveProbe`]).
//! - [`throughput`]: iperf3 packets per second over veth and through a wireguard-go tunnel,
//!   TCP and 64-byte UDP, alternating runs without and with the agent.
//! - [`scale`]: a wireguard-go interface with 1,000 and 10,000 peers: scrape latency, memory,
//!   peer sync time, beside prometheus_wireguard_exporter on the same interface; and the
//!   agent's CPU at rest.
//! - [`churn`]: 10,000 peers on a wireguard-go relay, 2,000 of them active (in-process
//!   WireGuard clients, [`crate::wgload`]) and 500 replaced a minute: exact per-peer counts,
//!   memory, series after churn, scrape latency, `/healthz` under a scrape storm.
//!
//! `--quick` runs every part with small counts (under 5 minutes, the churn part's minute of
//! churn included) and asserts only that every figure was produced: it is a step of `cargo
//! xtask test`.

pub mod churn;
pub mod cost;
pub mod report;
pub mod scale;
pub mod storm;
pub mod throughput;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::build;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Small counts, under 5 minutes; checks only that every figure is produced (writes to
    /// target/bench-quick unless --out is given).
    #[arg(long)]
    pub quick: bool,
    /// Where REPORT.md and report.json go [default: bench/, or target/bench-quick with
    /// --quick].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Run only these parts (cost, throughput, scale, churn); all by default.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// What every part gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub quick: bool,
    /// The release agent binary.
    pub agent_bin: PathBuf,
    /// The `bench_packet_cost` example of the agent crate (test_run and live run
    /// statistics; see agent/examples/bench_packet_cost.rs).
    pub cost_bin: PathBuf,
    /// A scratch directory for logs and configuration (under target/).
    pub work: PathBuf,
}

/// A goal a figure is held to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "limit", rename_all = "snake_case")]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    pub fn met(self, value: f64) -> bool {
        match self {
            Goal::AtMost(l) => value <= l,
            Goal::AtLeast(l) => value >= l,
        }
    }
}

/// One measured number.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The part and table it belongs to, e.g. "per-packet cost (test_run)".
    pub section: String,
    /// What it is, e.g. "ingress, wire, WireGuard data, 10000 peers".
    pub name: String,
    pub value: f64,
    /// "ns", "%", "ms", "MB", "s", "CPU s/min", ...
    pub unit: String,
    pub goal: Option<Goal>,
    /// How it was measured, or what stands behind it (shown beside the figure).
    pub note: String,
}

impl Figure {
    pub fn new(section: &str, name: impl Into<String>, value: f64, unit: &str) -> Self {
        Figure {
            section: section.to_string(),
            name: name.into(),
            value,
            unit: unit.to_string(),
            goal: None,
            note: String::new(),
        }
    }
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = Some(goal);
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
    pub fn met(&self) -> Option<bool> {
        self.goal.map(|g| g.met(self.value))
    }
}

/// The parts, in the order they run.
pub const PARTS: [&str; 4] = ["cost", "throughput", "scale", "churn"];

pub fn run(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    crate::setup::run()?;
    for p in &args.only {
        if !PARTS.contains(&p.as_str()) {
            bail!(
                "--only {p}: no such part; the parts are {}",
                PARTS.join(", ")
            );
        }
    }
    let ctx = prepare(args.quick)?;
    let out = match &args.out {
        Some(d) => d.clone(),
        None if args.quick => build::target_dir()?.join("bench-quick"),
        None => build::repo_root().join("bench"),
    };
    let want = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let mut figures = Vec::new();
    let mut failures = Vec::new();
    // A part that fails does not stop the others: the report shows what was measured and
    // the run fails at the end naming what was not.
    type Part = fn(&Ctx) -> Result<Vec<Figure>>;
    let parts: [(&str, Part); 4] = [
        ("cost", cost::run),
        ("throughput", throughput::run),
        ("scale", scale::run),
        ("churn", churn::run),
    ];
    for (name, part) in parts {
        if !want(name) {
            continue;
        }
        println!("==> bench {name}");
        let t = Instant::now();
        match part(&ctx) {
            Ok(f) => {
                println!(
                    "bench {name}: {} figures in {:.0} s",
                    f.len(),
                    t.elapsed().as_secs_f64()
                );
                figures.extend(f);
            }
            Err(e) => {
                eprintln!("bench {name} failed: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    let bad: Vec<&Figure> = figures.iter().filter(|f| !f.value.is_finite()).collect();
    for f in &bad {
        failures.push(format!(
            "{} / {}: not a number ({})",
            f.section, f.name, f.value
        ));
    }
    let meta = report::Meta::collect(args.quick, started.elapsed())?;
    report::write(&out, &meta, &figures)?;
    // The README shows the latest full run of every part, written where the report is.
    if !args.quick && args.out.is_none() && args.only.is_empty() {
        report::update_readme(&build::repo_root().join("README.md"), &meta, &figures)?;
        println!("bench: README.md's table updated");
    }
    report::print_goals(&figures);
    println!(
        "bench: {} figures in {:.0} s; report in {}",
        figures.len(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    if !failures.is_empty() {
        bail!(
            "bench: {} part(s) produced no figures:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Builds the release agent and the cost example; makes the scratch directory.
fn prepare(quick: bool) -> Result<Ctx> {
    // Release builds, --quick too: in `cargo xtask test` the quick run goes beside the VM,
    // which runs target/debug's binaries; a dev build here would relink them under it (with
    // other features than `cargo test` unified), and the agent died of SIGSEGV in the VM.
    let args = [
        "build",
        "--release",
        "-p",
        build::AGENT_PACKAGE,
        "--bin",
        build::AGENT_PACKAGE,
        "--example",
        "bench_packet_cost",
    ];
    let status = build::cargo()
        .args(args)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!(
            "`cargo {}` failed ({status}); if the eBPF build is what failed, `cargo xtask setup` \
             installs bpf-linker and nightly rust-src",
            args.join(" ")
        );
    }
    let target = build::target_dir()?;
    let work = target.join("wirescope-bench");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    Ok(Ctx {
        quick,
        agent_bin: target.join("release").join(build::AGENT_PACKAGE),
        cost_bin: target
            .join("release")
            .join("examples")
            .join("bench_packet_cost"),
        work,
    })
}

/// The median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

/// The q-quantile of `v` (nearest rank, sorted in place); NaN when empty.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// `cargo xtask test`'s smoke step: `bench --quick`.
pub fn test_step() -> (crate::testsuite::Counts, Result<()>) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !nix::unistd::Uid::effective().is_root() && !ci {
        println!(
            "bench --quick: skipped (needs root for namespaces and BPF; CI=true makes this a failure)"
        );
        let counts = crate::testsuite::Counts {
            passed: 0,
            failed: 0,
            ignored: 1,
        };
        return (counts, Ok(()));
    }
    let args = BenchArgs {
        quick: true,
        out: None,
        only: Vec::new(),
    };
    let r = run(&args);
    let counts = crate::testsuite::Counts {
        passed: u64::from(r.is_ok()),
        failed: u64::from(r.is_err()),
        ignored: 0,
    };
    (counts, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(median(&mut v), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn goals() {
        assert!(Goal::AtMost(40.0).met(40.0));
        assert!(!Goal::AtMost(40.0).met(40.1));
        assert!(Goal::AtLeast(0.97).met(0.98));
        assert!(!Goal::AtLeast(0.97).met(0.96));
    }
}
