//! `cargo xtask build`: the release agent binary, with the eBPF object built by agent/build.rs.

use std::process::Command;

use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow, bail};

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

/// The repository's root (xtask/ lies in it): where README.md, bench/ and deploy/ are.
pub fn repo_root() -> PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.join(".."), std::path::Path::to_path_buf)
}

/// The cargo target directory (`cargo metadata`), where the release agent is built.
pub fn target_dir() -> Result<PathBuf> {
    let out = crate::cmd::run(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `cargo metadata`")?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`cargo metadata` printed no target_directory"))
}
