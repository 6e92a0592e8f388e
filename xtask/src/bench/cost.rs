//! Per-packet cost of the TC programs: the margin over an empty TC program.
//! (Being written: see the module docs of `bench`.)

use anyhow::{Result, bail};

use super::{Ctx, Figure};

/// Section names of the figures this part produces.
pub const SECTION_TEST_RUN: &str = "per-packet cost (test_run)";
pub const SECTION_LIVE: &str = "per-packet cost (live)";

pub fn run(_ctx: &Ctx) -> Result<Vec<Figure>> {
    bail!("not written yet")
}

/// The empty TC program attached beside the agent's programs while live load runs, with
/// `kernel.bpf_stats_enabled` on: [`LiveProbe::finish`] gives, per program of ours, its mean
/// run time per packet minus the empty program's over the same interval.
pub struct LiveProbe {}

impl LiveProbe {
    /// Attaches the empty program (ingress and egress) to `ifaces` in namespace `ns`, where
    /// the agent already runs, and snapshots the run statistics.
    pub fn start(_ctx: &Ctx, _ns: &str, _ifaces: &[&str]) -> Result<LiveProbe> {
        bail!("not written yet")
    }

    /// Detaches the empty program; figures named after `label` (e.g. "UDP 64 B through the
    /// tunnel").
    pub fn finish(self, _label: &str) -> Result<Vec<Figure>> {
        bail!("not written yet")
    }
}
