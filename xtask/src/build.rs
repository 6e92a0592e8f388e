//! `cargo xtask build`: the release agent binary, with the eBPF object built by agent/build.rs.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Package name of the agent.
pub const AGENT_PACKAGE: &str = "wirescope";

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn run() -> Result<()> {
    let status = cargo()
        .args(["build", "--release", "-p", AGENT_PACKAGE])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!(
            "`cargo build --release -p {AGENT_PACKAGE}` failed ({status}); if the eBPF build \
             is what failed, `cargo xtask setup` installs bpf-linker and nightly rust-src"
        );
    }
    println!("build: target/release/{AGENT_PACKAGE}");
    Ok(())
}
