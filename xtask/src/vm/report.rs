//! What a VM run says: the guest log parsed back (its marker lines, libtest's `test result:`
//! lines and the names of failed tests) into counts per suite, and the report per kernel
//! with its summary and what failed.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use super::guest::MARK;
use crate::lab::{WG_IMPL_ENV, attach_mode_for, parse_kernel_release};
use crate::testsuite::{Counts, parse_result_line};

/// One suite's outcome in a VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuiteResult {
    pub label: String,
    pub counts: Counts,
    /// The binary's exit status; None when the VM stopped before it ended.
    pub exit: Option<i32>,
    pub failed_tests: Vec<String>,
    pub secs: f64,
    /// Each test's wall time in the guest, in the order run (from the script's `t` markers:
    /// the end of one test is the start of the next).
    pub tests: Vec<(String, f64)>,
}

impl SuiteResult {
    /// The `n` slowest tests, slowest first.
    pub fn slowest(&self, n: usize) -> Vec<(String, f64)> {
        let mut t = self.tests.clone();
        t.sort_by(|a, b| b.1.total_cmp(&a.1));
        t.truncate(n);
        t
    }
}

/// What the guest log says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestRun {
    pub release: Option<String>,
    /// Guest uptime when the script started, seconds.
    pub booted_at: Option<f64>,
    pub facts: Vec<(String, String)>,
    pub suites: Vec<SuiteResult>,
    pub done: bool,
}

impl GuestRun {
    pub fn fact(&self, key: &str) -> Option<&str> {
        self.facts
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the guest log: markers, libtest `test result:` lines and failed test names (from
/// `test NAME ... FAILED` and from libtest's closing `failures:` list, since a test's own
/// output can split the first), and per-test times from the `t` markers.
pub fn parse_guest_log(text: &str) -> GuestRun {
    let mut run = GuestRun::default();
    let mut started: Option<f64> = None;
    // The latest time mark of the suite, and the test that began at it (ended by the next
    // `test NAME ...` line, the result line or the suite's end, at the latest mark then).
    let mut mark: Option<f64> = None;
    let mut running: Option<(String, f64)> = None;
    let close = |run: &mut GuestRun, running: &mut Option<(String, f64)>, mark: Option<f64>| {
        if let (Some((name, start)), Some(end), Some(s)) =
            (running.take(), mark, run.suites.last_mut())
        {
            s.tests.push((name, end - start));
        }
    };
    // Right after a `failures:` line: the list of names, if that is what follows.
    let mut in_failures = false;
    for line in text.lines() {
        let after_failures = std::mem::replace(&mut in_failures, false);
        if let Some(rest) = line.strip_prefix(MARK).map(str::trim) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            match f.as_slice() {
                ["booted", release, up] => {
                    run.release = Some((*release).to_owned());
                    run.booted_at = up.parse().ok();
                }
                ["fact", k, v] => run.facts.push(((*k).to_owned(), (*v).to_owned())),
                ["suite-start", label, up] => {
                    started = up.parse().ok();
                    mark = started;
                    running = None;
                    run.suites.push(SuiteResult {
                        label: (*label).to_owned(),
                        ..SuiteResult::default()
                    });
                }
                ["t", up] => mark = up.parse().ok().or(mark),
                ["suite-end", label, rc, up] => {
                    close(&mut run, &mut running, mark);
                    if let Some(s) = run.suites.last_mut().filter(|s| s.label == *label) {
                        s.exit = rc.parse().ok();
                        if let (Some(a), Ok(b)) = (started, up.parse::<f64>()) {
                            s.secs = b - a;
                        }
                    }
                }
                ["done"] => run.done = true,
                _ => {}
            }
            continue;
        }
        if run.suites.last().is_none_or(|s| s.exit.is_some()) {
            continue;
        }
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|r| r.split_once(" ... "))
            .map(|(n, _)| n)
        {
            close(&mut run, &mut running, mark);
            running = mark.map(|m| (name.to_owned(), m));
        } else if line.starts_with("test result: ") {
            close(&mut run, &mut running, mark);
        }
        let Some(current) = run.suites.last_mut().filter(|s| s.exit.is_none()) else {
            continue;
        };
        let mut failed = None;
        if let Some(c) = parse_result_line(line) {
            current.counts.passed += c.passed;
            current.counts.failed += c.failed;
            current.counts.ignored += c.ignored;
        } else if line == "failures:" {
            in_failures = true;
        } else if after_failures
            && let Some(name) = line.strip_prefix("    ")
            && !name.starts_with(' ')
            && !name.is_empty()
        {
            in_failures = true;
            failed = Some(name.trim());
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|r| r.strip_suffix(" ... FAILED"))
        {
            failed = Some(name);
        }
        if let Some(name) = failed
            && !current.failed_tests.iter().any(|t| t == name)
        {
            current.failed_tests.push(name.to_owned());
        }
    }
    run
}

/// One kernel's VM run.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub series: &'static str,
    pub release: String,
    /// From starting vng to the guest script's first line.
    pub boot: Option<Duration>,
    pub total: Duration,
    pub guest: GuestRun,
    /// Why the VM run as a whole failed (did not boot, timed out, stopped early).
    pub error: Option<String>,
    pub out_dir: PathBuf,
    pub expected_suites: Vec<String>,
}

impl VmReport {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.guest.suites {
            c.passed += s.counts.passed;
            c.failed += s.counts.failed;
            c.ignored += s.counts.ignored;
        }
        c
    }

    fn suite_ok(s: &SuiteResult) -> bool {
        s.exit == Some(0) && s.counts.failed == 0
    }

    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self.guest.done
            && self.guest.suites.len() == self.expected_suites.len()
            && self.guest.suites.iter().all(Self::suite_ok)
    }

    /// One line saying what failed.
    pub fn failure(&self) -> String {
        if let Some(e) = &self.error {
            return format!("vm {}: {e}", self.series);
        }
        let bad: Vec<String> = self
            .guest
            .suites
            .iter()
            .filter(|s| !Self::suite_ok(s))
            .map(|s| {
                if s.failed_tests.is_empty() {
                    format!("{} (exit {:?})", s.label, s.exit)
                } else {
                    format!("{}: {}", s.label, s.failed_tests.join(", "))
                }
            })
            .collect();
        if bad.is_empty() {
            format!(
                "vm {}: the guest stopped before running every suite",
                self.series
            )
        } else {
            format!("vm {}: failed {}", self.series, bad.join("; "))
        }
    }

    /// What the kernel offered the lab: its WireGuard and the agent's expected hook.
    pub fn headline(&self) -> String {
        let wg = match std::env::var(WG_IMPL_ENV) {
            Ok(v) if !v.trim().is_empty() => format!("{} WireGuard ({WG_IMPL_ENV})", v.trim()),
            _ => match self.guest.fact("kernel_wireguard") {
                Some("yes") => "kernel WireGuard".to_owned(),
                Some(_) => "wireguard-go (no kernel module)".to_owned(),
                None => "WireGuard unknown".to_owned(),
            },
        };
        let version = parse_kernel_release(&self.release).unwrap_or((0, 0));
        format!("{wg}, {} expected", attach_mode_for(version))
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let status = if self.ok() { "ok  " } else { "FAIL" };
        let boot = self.boot.map_or("did not boot".to_owned(), |b| {
            format!("boot {:.1} s", b.as_secs_f64())
        });
        let _ = writeln!(
            s,
            "  {status} vm {} ({}): {}; {boot}, total {:.1} s: {}",
            self.series,
            self.release,
            self.headline(),
            self.total.as_secs_f64(),
            self.counts()
        );
        let facts: Vec<String> = self
            .guest
            .facts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !facts.is_empty() {
            let _ = writeln!(s, "         kernel: {}", facts.join(" "));
        }
        for want in &self.expected_suites {
            match self.guest.suites.iter().find(|r| &r.label == want) {
                Some(r) => {
                    let st = if Self::suite_ok(r) { "ok  " } else { "FAIL" };
                    let _ = write!(
                        s,
                        "         {st} {}: {} ({:.1} s)",
                        r.label, r.counts, r.secs
                    );
                    if r.exit.is_none() {
                        s += ", did not finish";
                    } else if r.exit != Some(0) && r.failed_tests.is_empty() {
                        let _ = write!(s, ", exit {}", r.exit.unwrap_or(-1));
                    }
                    s += "\n";
                    let slow: Vec<String> = r
                        .slowest(5)
                        .iter()
                        .map(|(n, t)| format!("{n} {t:.1} s"))
                        .collect();
                    if !slow.is_empty() {
                        let _ = writeln!(s, "              slowest: {}", slow.join(", "));
                    }
                    for t in &r.failed_tests {
                        let _ = writeln!(s, "              failed: {t}");
                    }
                }
                None => {
                    let _ = writeln!(s, "         FAIL {want}: not run");
                }
            }
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "         error: {e}");
        }
        if !self.ok() {
            let _ = writeln!(
                s,
                "         logs: {} (guest.log, console.log, tmp/)",
                self.out_dir.display()
            );
        }
        s
    }
}
