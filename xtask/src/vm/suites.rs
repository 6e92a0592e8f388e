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

/// Builds every test binary as the host's `cargo test --workspace` does (so nothing is
/// rebuilt after it) and returns those of [`TIERS`], each with the arguments that pick its
/// tests: the tier's filter and `filter` (see [`test_args`]).
pub fn build_suites(filter: Option<&str>) -> Result<Vec<Suite>> {
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
    let artifacts = parse_artifacts(&String::from_utf8_lossy(&out.stdout), &root);
    let mut suites = Vec::new();
    for (tier, a) in pick_tiers(TIERS, &artifacts)? {
        let args = test_args(tier, filter, || list_tests(a))?;
        suites.push(Suite {
            label: tier.label(),
            exe: a.exe.clone(),
            cwd: a.cwd.clone(),
            args,
        });
    }
    Ok(suites)
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
    let skip = tier
        .skip
        .iter()
        .flat_map(|n| ["--skip".to_owned(), (*n).to_owned()]);
    Ok(match (tier.filter, filter) {
        (None, None) => skip.collect(),
        (Some(f), None) | (None, Some(f)) => std::iter::once(f.to_owned()).chain(skip).collect(),
        (Some(t), Some(u)) => {
            let names: Vec<String> = list()?
                .lines()
                .filter_map(|l| l.strip_suffix(": test"))
                .filter(|n| n.contains(t) && n.contains(u) && !tier.skip.contains(n))
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
