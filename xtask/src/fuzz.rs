//! `cargo xtask fuzz --seconds N [--target NAME]`: builds the cargo-fuzz targets in fuzz/
//! (nightly, libFuzzer) and runs each for N seconds, two at a time (the machines have two
//! cores), starting from its corpus kept in the repo (fuzz/corpus/NAME, read only: what a
//! run finds goes to fuzz/target/corpus/NAME). A crash, a panic, a timeout or running out of
//! memory fails the run and leaves the input in fuzz/artifacts/NAME/.
//!
//! The targets: `packet` (agent-common's parse_ip/parse_l4/classify), `uapi` (the WireGuard
//! control-socket parser), `mullvad_json` (`mullvad status --json`), `config_toml` (the
//! `--config` loader). `cargo xtask test` runs each for [`TEST_SECONDS`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::setup::CARGO_FUZZ_VERSION;
use crate::testsuite::Counts;

/// The fuzz targets (fuzz/fuzz_targets/NAME.rs).
pub const TARGETS: &[&str] = &["packet", "uapi", "mullvad_json", "config_toml"];

/// How many run at once.
pub const PARALLEL: usize = 2;

/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 60;

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = TEST_SECONDS)]
    pub seconds: u64,
    /// Run only this target (packet, uapi, mullvad_json, config_toml).
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
}

/// What one target's run did.
#[derive(Debug)]
pub struct Outcome {
    pub target: String,
    /// Inputs executed (libFuzzer's `number_of_executed_units`), when it got that far.
    pub runs: Option<u64>,
    pub took: Duration,
    /// Why it failed: the fuzzer's exit and its first lines about it.
    pub failure: Option<String>,
    /// Its output.
    pub log: PathBuf,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("no fuzz target {t:?}; the targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    prerequisites()?;
    build()?;
    let outcomes = run_targets(&targets, args.seconds)?;
    print_summary(&outcomes);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.failure.is_some())
        .map(|o| o.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The `cargo xtask test` step: every target for [`TEST_SECONDS`]. Without the nightly
/// toolchain or cargo-fuzz it is skipped (1 skipped), unless CI=true, where that fails.
pub fn test_step() -> (Counts, Result<()>) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if let Err(e) = prerequisites() {
        if ci {
            return (
                Counts::default(),
                Err(e.context("a fuzzing prerequisite is missing (CI=true, so this fails)")),
            );
        }
        println!("skipping the fuzz targets: {e:#}");
        return (
            Counts {
                ignored: 1,
                ..Counts::default()
            },
            Ok(()),
        );
    }
    if let Err(e) = build() {
        return (Counts::default(), Err(e));
    }
    let outcomes = match run_targets(TARGETS, TEST_SECONDS) {
        Ok(o) => o,
        Err(e) => return (Counts::default(), Err(e)),
    };
    print_summary(&outcomes);
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count() as u64;
    let counts = Counts {
        passed: outcomes.len() as u64 - failed,
        failed,
        ignored: 0,
    };
    let res = if failed == 0 {
        Ok(())
    } else {
        Err(anyhow!(
            "{failed} of {} fuzz targets failed",
            outcomes.len()
        ))
    };
    (counts, res)
}

fn fuzz_dir() -> PathBuf {
    crate::build::repo_root().join("fuzz")
}

/// `rustup run nightly PROGRAM`, without the variables of the cargo that runs xtask (stable),
/// which would otherwise be the cargo cargo-fuzz calls.
fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(crate::build::repo_root())
        .stdin(Stdio::null());
    cmd
}

/// The nightly toolchain and cargo-fuzz are there (`cargo xtask setup` installs both).
pub fn prerequisites() -> Result<()> {
    let out = nightly("cargo")
        .args(["fuzz", "--version"])
        .output()
        .context("running `rustup run nightly cargo fuzz --version`: is rustup installed?")?;
    if !out.status.success() {
        bail!(
            "`rustup run nightly cargo fuzz --version` failed ({}): {}; `cargo xtask setup` \
             installs the nightly toolchain and cargo-fuzz {CARGO_FUZZ_VERSION}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The flags of every build: no sanitizer (the parsers are safe Rust; this doubles the
/// executions), overflow checks and debug assertions on, 16 codegen units (the agent's
/// dependencies build in minutes, not tens of minutes, on two cores).
const BUILD_FLAGS: &[&str] = &[
    "--sanitizer",
    "none",
    "--debug-assertions",
    "--codegen-units",
    "16",
];

/// Builds every target, with the main workspace's Cargo.lock (copied to fuzz/, which is its
/// own workspace), so the agent is fuzzed with the dependency versions it ships with.
/// agent/build.rs builds the eBPF object into fuzz/target once (the agent library embeds
/// it; the targets never load it).
pub fn build() -> Result<()> {
    let lock = crate::build::repo_root().join("Cargo.lock");
    fs::copy(&lock, fuzz_dir().join("Cargo.lock"))
        .with_context(|| format!("copying {} to fuzz/", lock.display()))?;
    let mut cmd = nightly("cargo");
    cmd.args(["fuzz", "build"]).args(BUILD_FLAGS);
    let desc = crate::cmd::describe(&cmd);
    println!("fuzz: {desc}");
    let status = cmd.status().with_context(|| format!("running `{desc}`"))?;
    if !status.success() {
        bail!("`{desc}` failed ({status})");
    }
    Ok(())
}

/// The host triple cargo-fuzz builds for (its default `--target`).
fn host_triple() -> Result<String> {
    let out = nightly("rustc")
        .arg("-vV")
        .output()
        .context("running `rustc -vV`")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("`rustc -vV` printed no host line"))
}

/// Runs the built targets for `seconds` each, [`PARALLEL`] at a time.
pub fn run_targets(targets: &[&str], seconds: u64) -> Result<Vec<Outcome>> {
    let dir = fuzz_dir();
    let bin_dir = dir.join("target").join(host_triple()?).join("release");
    let mut outcomes = Vec::new();
    for batch in targets.chunks(PARALLEL) {
        let mut running = Vec::new();
        for &target in batch {
            running.push(start(&dir, &bin_dir, target, seconds)?);
        }
        for r in running {
            outcomes.push(r.finish(seconds)?);
        }
    }
    Ok(outcomes)
}

struct Running {
    target: String,
    child: Child,
    log: PathBuf,
    tmp: PathBuf,
    started: Instant,
}

fn start(dir: &Path, bin_dir: &Path, target: &str, seconds: u64) -> Result<Running> {
    let bin = bin_dir.join(target);
    if !bin.is_file() {
        bail!("{} is missing: did the fuzz build run?", bin.display());
    }
    let seeds = dir.join("corpus").join(target);
    let scratch = dir.join("target").join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = dir.join("target").join("logs");
    // TMPDIR for what a target writes (config_toml's files), emptied for each run.
    let tmp = dir.join("target").join("tmp").join(target);
    let _ = fs::remove_dir_all(&tmp);
    for d in [&scratch, &artifacts, &logs, &tmp] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(&bin);
    // New inputs go to the first directory; the repo's corpus is only read.
    cmd.arg(&scratch)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        // One input taking this long is a hang.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .env("TMPDIR", &tmp)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    println!("fuzz: {target}: {seconds} s (log {})", log.display());
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Running {
        target: target.to_owned(),
        child,
        log,
        tmp,
        started: Instant::now(),
    })
}

impl Running {
    fn finish(mut self, seconds: u64) -> Result<Outcome> {
        // libFuzzer stops itself after -max_total_time (plus the last input and its final
        // stats); a process still there well after that is hung.
        let grace = Duration::from_secs(seconds + 60);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break Some(status);
            }
            if self.started.elapsed() > grace {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let took = self.started.elapsed();
        let _ = fs::remove_dir_all(&self.tmp);
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let runs = parse_runs(&text);
        let failure = match status {
            Some(s) if s.success() => None,
            Some(s) => Some(format!("{s}: {}", failure_lines(&text))),
            None => Some(format!("still running after {} s, killed", grace.as_secs())),
        };
        if let Some(f) = &failure {
            println!(
                "fuzz: {} FAILED: {f}\n  the input is in fuzz/artifacts/{}/; replay it with \
                 `fuzz/target/*/release/{} fuzz/artifacts/{}/<file>`; log {}",
                self.target,
                self.target,
                self.target,
                self.target,
                self.log.display()
            );
        }
        Ok(Outcome {
            target: self.target,
            runs,
            took,
            failure,
            log: self.log,
        })
    }
}

/// `stat::number_of_executed_units: N` (-print_final_stats), else `Done N runs in S second(s)`.
pub fn parse_runs(log: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .or_else(|| {
            log.lines()
                .find_map(|l| l.strip_prefix("Done "))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
}

/// The lines that say what went wrong: the panic message and libFuzzer's summary.
fn failure_lines(log: &str) -> String {
    let mut out = Vec::new();
    let mut lines = log.lines();
    while let Some(l) = lines.next() {
        if l.contains("panicked at") {
            out.push(l.trim().to_owned());
            if let Some(msg) = lines.next() {
                out.push(msg.trim().chars().take(300).collect());
            }
        } else if l.starts_with("SUMMARY:") || l.contains("ERROR: libFuzzer") {
            out.push(l.trim().to_owned());
        }
    }
    if out.is_empty() {
        "see the log".into()
    } else {
        out.join(" | ")
    }
}

fn print_summary(outcomes: &[Outcome]) {
    println!("fuzz summary:");
    for o in outcomes {
        let runs = o.runs.map_or_else(|| "?".to_owned(), |n| n.to_string());
        let status = if o.failure.is_some() { "FAIL" } else { "ok  " };
        println!(
            "  {status} {:<13} {runs:>10} inputs in {:.0} s",
            o.target,
            o.took.as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_counts() {
        let log = "#4505046\tDONE   cov: 120 ft: 300\nDone 4505046 runs in 9 second(s)\n\
                   stat::number_of_executed_units: 4505046\nstat::average_exec_per_sec:     500560\n";
        assert_eq!(parse_runs(log), Some(4_505_046));
        assert_eq!(parse_runs("Done 12 runs in 1 second(s)\n"), Some(12));
        assert_eq!(parse_runs("INFO: Seed: 1\n"), None);
    }

    #[test]
    fn failure_names_the_panic() {
        let log = "thread '<unnamed>' (1) panicked at fuzz_targets/uapi.rs:18:13:\n\
                   accepted without errno=0\nstack backtrace:\n\
                   ==1== ERROR: libFuzzer: deadly signal\nSUMMARY: libFuzzer: deadly signal\n";
        let f = failure_lines(log);
        assert!(
            f.contains("uapi.rs:18:13") && f.contains("accepted without errno=0"),
            "{f}"
        );
        assert!(f.contains("SUMMARY: libFuzzer: deadly signal"), "{f}");
    }

    #[test]
    fn every_target_has_a_source_and_a_corpus() {
        let dir = fuzz_dir();
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(dir.join(format!("fuzz_targets/{t}.rs")).is_file(), "{t}");
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
            let seeds = fs::read_dir(dir.join("corpus").join(t)).unwrap().count();
            assert!(seeds > 0, "{t} has no seeds");
        }
    }
}
