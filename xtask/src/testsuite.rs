//! `cargo xtask test`: every test of the project, as a list of steps run in order. Each step
//! reports the tests it ran; the run ends with one summary line and fails if any step failed.
//! Add a step by adding an entry to [`steps`].
//!
//! The steps: everything on the host (its kernel: TCX, wireguard-go where it has no
//! WireGuard module), then each fuzz target for a minute (see [`crate::fuzz`]), then the
//! privileged suites again in a VM on Debian's 6.1 kernel (clsact, kernel WireGuard,
//! kprobes; see [`crate::vm`]). With CI=true a VM or a fuzzing prerequisite that cannot be
//! set up fails the run; without, it is skipped and counted as 1 skipped.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::build::cargo;

/// Test counts, as libtest prints them in its `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

/// One step: what it ran, and whether it succeeded.
pub struct Step {
    pub name: &'static str,
    pub run: fn() -> (Counts, Result<()>),
    /// Runs beside the steps after it (in a thread) instead of before them: the fuzzers
    /// share the CPU with the VM's emulation rather than adding minutes of their own.
    pub background: bool,
}

/// The steps of `cargo xtask test`, in order.
pub fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "host tests: cargo test --workspace --exclude agent-ebpf (single-threaded: lab tests share namespaces)",
            run: || {
                cargo_test(
                    &["--workspace", "--exclude", "agent-ebpf"],
                    &["--test-threads=1"],
                )
            },
            background: false,
        },
        Step {
            name: "fuzz: every cargo-fuzz target for 60 s, two at a time: cargo xtask fuzz --seconds 60",
            run: crate::fuzz::test_step,
            background: true,
        },
        Step {
            name: "vm 6.1: lab suites and test_run in QEMU on Debian's 6.1 kernel (kernel WireGuard, clsact): cargo xtask vm-test --kernel 6.1",
            run: || crate::vm::test_step("6.1"),
            background: false,
        },
    ]
}

pub fn run() -> Result<()> {
    type Outcome = (&'static str, Counts, Result<()>, Duration);
    let mut results: Vec<Option<Outcome>> = Vec::new();
    let mut background = Vec::new();
    for step in steps() {
        println!(
            "==> {}{}",
            step.name,
            if step.background {
                " (in the background)"
            } else {
                ""
            }
        );
        let start = Instant::now();
        if step.background {
            let slot = results.len();
            results.push(None);
            let run = step.run;
            let handle = std::thread::spawn(move || {
                let (counts, res) = run();
                (counts, res, start.elapsed())
            });
            background.push((slot, step.name, handle));
            continue;
        }
        let (counts, res) = (step.run)();
        results.push(Some((step.name, counts, res, start.elapsed())));
    }
    for (slot, name, handle) in background {
        let outcome = match handle.join() {
            Ok((counts, res, took)) => (name, counts, res, took),
            Err(_) => (
                name,
                Counts::default(),
                Err(anyhow::anyhow!("the step panicked")),
                Duration::ZERO,
            ),
        };
        if let Some(r) = results.get_mut(slot) {
            *r = Some(outcome);
        }
    }
    let results: Vec<Outcome> = results.into_iter().flatten().collect();

    println!("\n==> summary");
    let mut total = Counts::default();
    let mut failed_steps = 0;
    for (name, counts, res, took) in &results {
        let mut counts = *counts;
        let status = match res {
            Ok(()) => "ok  ".to_owned(),
            Err(e) => {
                failed_steps += 1;
                // A step that failed without a failing test (a build error) counts as one.
                if counts.failed == 0 {
                    counts.failed = 1;
                }
                format!("FAIL ({e:#})")
            }
        };
        println!("  {status} {:>7} {name}: {counts}", secs(*took));
        total.add(counts);
    }
    println!("summary: {total}");
    if failed_steps > 0 {
        bail!("{failed_steps} of {} test steps failed", results.len());
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Runs `cargo test ARGS -- TEST_ARGS`, echoing its output and adding up its `test result:`
/// lines.
pub fn cargo_test(args: &[&str], test_args: &[&str]) -> (Counts, Result<()>) {
    let mut counts = Counts::default();
    let res = (|| -> Result<()> {
        let mut cmd = cargo();
        cmd.arg("test").args(args).arg("--").args(test_args);
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        let desc = crate::cmd::describe(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting `{desc}`"))?;
        let stdout = child.stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some(c) = parse_result_line(&line) {
                counts.add(c);
            }
        }
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{desc}`"))?;
        if !status.success() {
            return Err(anyhow!("`{desc}` failed ({status})"));
        }
        Ok(())
    })();
    (counts, res)
}

/// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`
pub fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, rest) = rest.split_once(". ")?;
    let mut c = Counts::default();
    for part in rest.split("; ") {
        let mut it = part.split_whitespace();
        let (Some(n), Some(what)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            _ => {}
        }
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_summaries() {
        assert_eq!(
            parse_result_line(
                "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some(Counts {
                passed: 3,
                failed: 0,
                ignored: 1
            })
        );
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
            ),
            Some(Counts {
                passed: 1,
                failed: 2,
                ignored: 0
            })
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }
}
