//! The test binaries of [`TIERS`](super::TIERS): built on the host as `cargo test
//! --workspace` builds them, found in cargo's JSON messages by package directory and test
//! target name, and given the libtest arguments that pick each tier's tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{TIERS, Tier};
use crate::build::cargo;
use crate::cmd;

/// An integration test binary cargo built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The package's directory relative to the workspace, e.g. `agent`.
    pub package: String,
    /// The test target's name, e.g. `lab`.
    pub test: String,
    pub exe: PathBuf,
    /// The package's directory (cargo runs tests there).
    pub cwd: PathBuf,
}

/// A test binary to run in the VM: a tier's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suite {
    /// The tier's [`Tier::label`], e.g. `agent/tests/lab[kernel::]`.
    pub label: String,
    pub exe: PathBuf,
    /// The package's directory (cargo runs tests there).
    pub cwd: PathBuf,
    /// The libtest arguments after `--test-threads=1` that pick its tests (filters, or
    /// `--exact` and names).
    pub args: Vec<String>,
}

/// What the VMs run: the suites and the agent binary their tests start, each a copy under
/// `target/vm/bin/` (see [`build_suites`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub suites: Vec<Suite>,
    /// The `wirescope` binary the guest's tests start, passed as [`crate::agent::AGENT_BIN_ENV`].
    pub agent: PathBuf,
}

/// Builds every test binary as the host's `cargo test --workspace` does (so nothing is
/// rebuilt after it) and returns those of [`TIERS`], each with the arguments that pick its
/// tests: the tier's filter and `filter` (see [`test_args`]).
///
/// The binaries are copied to `target/vm/bin/` and the guest runs the copies: the guest
/// reads the host's files through 9p, and a cargo run on the host that relinks
/// `target/debug/wirescope` while a VM runs (`cargo test -p wirescope` unifies features
/// differently from `--workspace`, so it relinks it) made every later agent start in the
/// guest die with SIGSEGV before its first log line.
pub fn build_suites(filter: Option<&str>) -> Result<Build> {
    println!("vm-test: building the test binaries on the host");
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--no-run",
        "--message-format=json",
    ])
    .stdin(Stdio::null())
    .stderr(Stdio::inherit());
    let out = c.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("`{}` failed ({})", cmd::describe(&c), out.status);
    }
    let root = crate::build::repo_root();
    let json = String::from_utf8_lossy(&out.stdout);
    let artifacts = parse_artifacts(&json, &root);
    let agent = agent_binary(&json).ok_or_else(|| {
        anyhow!("cargo test --workspace --no-run built no `wirescope` binary for the VM's tests")
    })?;
    let snapshot = super::target_dir().join("vm").join("bin");
    if snapshot.exists() {
        std::fs::remove_dir_all(&snapshot)
            .with_context(|| format!("clearing {}", snapshot.display()))?;
    }
    std::fs::create_dir_all(&snapshot)
        .with_context(|| format!("creating {}", snapshot.display()))?;
    let copy = |exe: &Path| -> Result<PathBuf> {
        let name = exe.file_name().ok_or_else(|| {
            anyhow!(
                "cargo named a binary without a file name: {}",
                exe.display()
            )
        })?;
        let to = snapshot.join(name);
        std::fs::copy(exe, &to)
            .with_context(|| format!("copying {} to {}", exe.display(), to.display()))?;
        Ok(to)
    };
    let mut suites = Vec::new();
    for (tier, a) in pick_tiers(TIERS, &artifacts)? {
        let args = test_args(tier, filter, || list_tests(a))?;
        suites.push(Suite {
            label: tier.label(),
            exe: copy(&a.exe)?,
            cwd: a.cwd.clone(),
            args,
        });
    }
    let agent = copy(&agent)?;
    // A wrong pick (e.g. the bin target's unit-test harness) would fail every agent start
    // in the guest, minutes later and far from here.
    let mut c = Command::new(&agent);
    c.arg("--version").stdin(Stdio::null());
    let out = c
        .output()
        .with_context(|| format!("running `{}`", cmd::describe(&c)))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !version.starts_with("wirescope ") {
        bail!(
            "{} is not the agent: `--version` gave {} {:?}",
            agent.display(),
            out.status,
            version.trim()
        );
    }
    Ok(Build { suites, agent })
}

/// The `wirescope` binary in cargo's JSON messages (the agent's bin target, not its unit
/// tests).
pub fn agent_binary(json_lines: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        // Not the unit tests of the bin target: the same name, with profile.test set.
        .filter(|v| {
            v["reason"] == "compiler-artifact"
                && v["target"]["name"] == "wirescope"
                && v["profile"]["test"] == false
        })
        .filter(|v| {
            v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
}

/// The integration test executables (test targets, not the unit tests of a library or
/// binary) in cargo's JSON messages, by package directory relative to `root` and target
/// name: `tests/NAME.rs` and `tests/NAME/main.rs` alike.
pub fn parse_artifacts(json_lines: &str, root: &Path) -> Vec<Artifact> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .filter(|v| {
            v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|v| {
            let exe = PathBuf::from(v["executable"].as_str()?);
            let test = v["target"]["name"].as_str()?.to_owned();
            let cwd = Path::new(v["manifest_path"].as_str()?)
                .parent()?
                .to_path_buf();
            let package = cwd.strip_prefix(root).unwrap_or(&cwd).display().to_string();
            Some(Artifact {
                package,
                test,
                exe,
                cwd,
            })
        })
        .collect()
}

/// The built binary of each tier, in the tiers' order; fails naming a tier cargo built no
/// binary for.
pub fn pick_tiers<'a>(
    tiers: &'a [Tier],
    artifacts: &'a [Artifact],
) -> Result<Vec<(&'a Tier, &'a Artifact)>> {
    tiers
        .iter()
        .map(|t| {
            artifacts
                .iter()
                .find(|a| a.package == t.package && a.test == t.test)
                .map(|a| (t, a))
                .ok_or_else(|| {
                    anyhow!(
                        "cargo built no test binary for {} (`cargo test -p {} --test {}`)",
                        t.label(),
                        t.package,
                        t.test
                    )
                })
        })
        .collect()
}

/// The libtest arguments that pick a tier's tests, given the user's `filter`: the tier's
/// filter or the user's (libtest takes either as a substring of the test's name), none for
/// all. With both, libtest would run the tests matching either, so the tier's binary lists
/// its tests on the host (`list`: its `--list` output) and the arguments are `--exact` and
/// the names that contain both; when no name does, `--exact` and the tier's filter, which
/// names no test (a module path), so the binary runs none.
pub fn test_args(
    tier: &Tier,
    filter: Option<&str>,
    list: impl FnOnce() -> Result<String>,
) -> Result<Vec<String>> {
    Ok(match (tier.filter, filter) {
        (None, None) => Vec::new(),
        (Some(f), None) | (None, Some(f)) => vec![f.to_owned()],
        (Some(t), Some(u)) => {
            let names: Vec<String> = list()?
                .lines()
                .filter_map(|l| l.strip_suffix(": test"))
                .filter(|n| n.contains(t) && n.contains(u))
                .map(str::to_owned)
                .collect();
            let mut args = vec!["--exact".to_owned()];
            if names.is_empty() {
                args.push(t.to_owned());
            }
            args.extend(names);
            args
        }
    })
}

/// `EXE --list` of a test binary, run on the host in its package directory.
fn list_tests(a: &Artifact) -> Result<String> {
    let mut c = Command::new(&a.exe);
    c.arg("--list").current_dir(&a.cwd).stdin(Stdio::null());
    let out = c
        .output()
        .with_context(|| format!("running `{}`", cmd::describe(&c)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", cmd::describe(&c), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
