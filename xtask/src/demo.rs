//! `cargo xtask demo`: builds, brings the multihop lab up, runs the agent in the client
//! namespace, drives traffic and prints a per-hop summary read back from /metrics.
//! (Not written yet: another change fills this in.)

use anyhow::Result;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds instead of serving until Ctrl-C.
    #[arg(long, value_name = "S")]
    pub duration: Option<u64>,
}

pub fn run(_args: &DemoArgs) -> Result<()> {
    anyhow::bail!("not implemented yet")
}
