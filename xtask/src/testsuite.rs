//! `cargo xtask test`: every test of the project, as a list of steps run in order. Each step
//! reports the tests it ran; the run ends with one summary line and fails if any step failed.
//! Add a step by adding an entry to [`steps`].
//!
//! The steps: everything on the host (its kernel: TCX, wireguard-go where it has no
//! WireGuard module); then the privileged suites again in a VM on Debian's 6.1 kernel
//! (clsact, kernel WireGuard, kprobes; see [`crate::vm`]), and beside it, on the host, each
//! fuzz target for a minute (see [`crate::fuzz`]) followed by `bench --quick` (see
//! [`crate::bench`]) and the lab tier's `kernel::` group once per further WireGuard
//! implementation (the current wireguard-go, boringtun: see [`crate::lab::impls`]). With
//! CI=true a VM, fuzzing, bench or implementation prerequisite that cannot be set up fails
//! the run; without, it is skipped and counted as 1 skipped.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::build::cargo;
use crate::lab::{WG_IMPL_ENV, WgImpl};

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

/// What a step runs: the tests it counted, and whether it succeeded.
pub type StepFn = fn() -> (Counts, Result<()>);

/// One step: what it ran, and whether it succeeded.
pub struct Step {
    pub name: &'static str,
    pub run: StepFn,
    /// Runs beside the steps after it (in a thread) instead of before them: the fuzzers and
    /// the bench smoke share the CPU with the VM's emulation rather than adding minutes of
    /// their own (consecutive background steps run one after another).
    pub background: bool,
}

/// The steps of `cargo xtask test`, in order.
pub fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "host tests: cargo test --workspace --exclude agent-ebpf (single-threaded: lab tests share namespaces)",
            // --no-fail-fast: a failure in one test binary must not hide the others' results.
            run: || {
                cargo_test(
                    &["--workspace", "--exclude", "agent-ebpf", "--no-fail-fast"],
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
            name: "bench smoke: every figure of cargo xtask bench is produced (small counts): cargo xtask bench --quick",
            run: crate::bench::test_step,
            background: true,
        },
        // After bench in the same background thread, so never beside it; the VM's labs are
        // in QEMU. Their lab prefixes (wsa, wsh, wsd, wsr, fx, lkt) differ from bench's.
        Step {
            name: "lab kernel:: tests whose counts depend on the implementation, on wireguard-go >= 0.0.20230223 (coalesced TUN writes): WIRESCOPE_LAB_WG=wireguard-go-current cargo test --workspace --exclude agent-ebpf --test lab (IMPLEMENTATION_TESTS)",
            run: || lab_kernel_on(WgImpl::WireguardGoCurrent),
            background: true,
        },
        Step {
            name: "lab kernel:: tests whose counts depend on the implementation, on boringtun: WIRESCOPE_LAB_WG=boringtun cargo test --workspace --exclude agent-ebpf --test lab (IMPLEMENTATION_TESTS)",
            run: || lab_kernel_on(WgImpl::Boringtun),
            background: true,
        },
        Step {
            name: "vm 6.1: the kernel-dependent tiers (xtask lab and impair, agent datapath, agent lab kernel::) in QEMU on Debian's 6.1 kernel (kernel WireGuard, clsact): cargo xtask vm-test --kernel 6.1",
            run: || crate::vm::test_step("6.1"),
            background: false,
        },
    ]
}

/// The tests of the lab tier's `kernel::` group whose counts depend on the WireGuard
/// implementation (libtest filters: a test runs when its name contains one): exact counts
/// per layer and under TCP (GSO, coalesced TUN writes, padding), peer changes and roaming,
/// handshakes and their retries, carriers' don't-fragment and size, inner packets dropped on
/// the tunnel's input, a device re-created. Left to the host step and the VM: the kernel's
/// drop reasons and UDP receive errors, leaks around the tunnel (the underlay's), and the
/// agent's SIGKILL restart (pins); 43 s of the group's 154 on boringtun here.
pub const IMPLEMENTATION_TESTS: &[&str] = &[
    "kernel::tunnel::",
    "kernel::health::",
    "kernel::firewall::",
    "kernel::path::",
    "kernel::drops::netfilter_drops_on_the_tunnel_input_count_exactly",
    "kernel::restart::interfaces_gone_while_down_keep_their_names",
];

/// [`IMPLEMENTATION_TESTS`] with the lab's interfaces run by `wireguard`. The tests
/// themselves fail under CI=true when it is not installed (see [`crate::lab::can_run`]).
///
/// Built as the host step builds (`--workspace`): `-p wirescope` unifies features
/// differently, so it would relink target/debug/wirescope while the VM step runs. xtask's
/// own `lab` target has no test these filters pick.
fn lab_kernel_on(wireguard: WgImpl) -> (Counts, Result<()>) {
    let mut args = IMPLEMENTATION_TESTS.to_vec();
    args.push("--test-threads=1");
    cargo_test_env(
        &["--workspace", "--exclude", "agent-ebpf", "--test", "lab"],
        &args,
        &[(WG_IMPL_ENV, wireguard.as_str())],
    )
}

pub fn run() -> Result<()> {
    type Outcome = (&'static str, Counts, Result<()>, Duration);
    type GroupResult = Vec<(Counts, Result<()>, Duration)>;
    type Group = (
        Vec<(usize, &'static str)>,
        std::thread::JoinHandle<GroupResult>,
    );
    preflight_disk()?;
    let mut results: Vec<Option<Outcome>> = Vec::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut steps = steps().into_iter().peekable();
    while let Some(step) = steps.next() {
        if !step.background {
            println!("==> {}", step.name);
            let start = Instant::now();
            let (counts, res) = (step.run)();
            results.push(Some((step.name, counts, res, start.elapsed())));
            continue;
        }
        // Consecutive background steps run one after another in one thread: they share the
        // CPU with the foreground steps, not with each other.
        let mut group = vec![step];
        while let Some(next) = steps.next_if(|s| s.background) {
            group.push(next);
        }
        let mut slots = Vec::new();
        for s in &group {
            println!("==> {} (in the background)", s.name);
            slots.push((results.len(), s.name));
            results.push(None);
        }
        let runs: Vec<StepFn> = group.iter().map(|s| s.run).collect();
        let handle = std::thread::spawn(move || {
            runs.into_iter()
                .map(|run| {
                    let start = Instant::now();
                    let (counts, res) = run();
                    (counts, res, start.elapsed())
                })
                .collect()
        });
        groups.push((slots, handle));
    }
    for (slots, handle) in groups {
        let outcomes: GroupResult = handle.join().unwrap_or_default();
        let mut outcomes = outcomes.into_iter();
        for (slot, name) in slots {
            let outcome = match outcomes.next() {
                Some((counts, res, took)) => (name, counts, res, took),
                None => (
                    name,
                    Counts::default(),
                    Err(anyhow::anyhow!(
                        "the background thread panicked before this step ended"
                    )),
                    Duration::ZERO,
                ),
            };
            if let Some(r) = results.get_mut(slot) {
                *r = Some(outcome);
            }
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

/// Space a full run needs on the target directory's file system: a clean clone after a full
/// run held 5.7 GB (target/ 4.2: host and VM test binaries 2.9, the bench's release build 0.9,
/// the systemd root and the VM's copies 0.4; fuzz/ 1.5). A machine had 6.8 GB free when this
/// asked for 8 and refused a run that would have fitted.
const DISK_NEEDED_GB: f64 = 6.0;

/// Fails early, naming the fix, when the disk cannot hold a run: a full disk otherwise shows
/// up minutes later as a compile error in whichever step ran out first.
fn preflight_disk() -> Result<()> {
    let target = crate::build::target_dir()?;
    let probe = if target.exists() {
        target.clone()
    } else {
        std::env::current_dir()?
    };
    let st = nix::sys::statvfs::statvfs(&probe)
        .with_context(|| format!("statvfs {}", probe.display()))?;
    let free_gb = st.blocks_available() as f64 * st.fragment_size() as f64 / 1e9;
    println!("test: {free_gb:.1} GB free for {}", target.display());
    if free_gb < DISK_NEEDED_GB {
        bail!(
            "only {free_gb:.1} GB free on the file system of {}; a full run needs about \
             {DISK_NEEDED_GB:.0} GB: free space (old target/ directories, `cargo clean` in other \
             clones) and run again",
            target.display()
        );
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Runs `cargo test ARGS -- TEST_ARGS`, echoing its output and adding up its `test result:`
/// lines.
pub fn cargo_test(args: &[&str], test_args: &[&str]) -> (Counts, Result<()>) {
    cargo_test_env(args, test_args, &[])
}

/// [`cargo_test`] with these environment variables set for cargo and the tests.
pub fn cargo_test_env(
    args: &[&str],
    test_args: &[&str],
    env: &[(&str, &str)],
) -> (Counts, Result<()>) {
    let mut counts = Counts::default();
    let res = (|| -> Result<()> {
        let mut cmd = cargo();
        cmd.arg("test").args(args).arg("--").args(test_args);
        cmd.envs(env.iter().copied());
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

    /// Each further implementation has its step, in the background group that runs beside
    /// the VM step (after bench, so no two host labs overlap).
    #[test]
    fn implementation_steps_run_beside_the_vm() {
        let steps = steps();
        let pos = |needle: &str| {
            steps
                .iter()
                .position(|s| s.name.contains(needle))
                .unwrap_or_else(|| panic!("no step {needle}"))
        };
        let bench = pos("bench smoke");
        let vm = pos("vm 6.1");
        for i in ["wireguard-go-current", "boringtun"] {
            let at = pos(&format!("WIRESCOPE_LAB_WG={i} "));
            assert!(steps[at].background, "{i}");
            assert!(bench < at && at < vm, "{i} at {at}, bench {bench}, vm {vm}");
            assert!(steps[bench..at].iter().all(|s| s.background), "{i}");
        }
    }

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
