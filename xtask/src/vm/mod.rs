//! `cargo xtask vm-test`: the privileged test suites on Debian's generic kernels, each booted
//! under QEMU with the host's root filesystem by virtme-ng, with the test binaries built here.
//!
//! What it needs it installs, idempotently (nothing and well under a second when present):
//! - Debian `qemu-system-x86`, `busybox-static` (virtme-ng's initramfs) and `python3-venv`;
//!   qemu-system-x86 comes from `CODENAME-backports` when the installed `qemu-utils` does
//!   (the two must match);
//! - the generic kernel image of each series asked for: the version of `linux-image-amd64`
//!   that apt has for it, resolved to its `linux-image-VERSION-amd64` package. On bookworm,
//!   6.1 is in bookworm itself and 6.12 in bookworm-backports, which is added to apt's
//!   sources (`/etc/apt/sources.list.d/wirescope-backports.sources`) if no source has it yet
//!   and only if the archive answers;
//! - virtme-ng [`VNG_VERSION`] from PyPI in the virtualenv [`VENV`].
//!
//! Each kernel boots with `vng --run /boot/vmlinuz-RELEASE --disable-kvm` (software
//! emulation: /dev/kvm hangs on this machine). The guest sees the host's root filesystem
//! read-only with writable overlays (/tmp, /etc, /var, ...; /run is a tmpfs); the test
//! binaries and the agent run from copies in `target/vm/bin/`, which no cargo run on the
//! host relinks under the guest (see [`build_suites`]). The guest runs a script written to
//! `target/vm/SERIES/run.sh`: it loads tun, wireguard and sch_netem, mounts tracefs and
//! bpffs where missing, prints what the kernel has, then runs the test binary of each tier
//! of [`TIERS`] with `--test-threads=1` and the tier's filter from its package directory. Everything it prints goes to
//! `target/vm/SERIES/guest.log` (a writable share; the serial console lost output under
//! load), which is echoed here as it grows; the agent's logs (/tmp/wirescope-*.log) are
//! copied to `target/vm/SERIES/tmp/`, the VM's console goes to
//! `target/vm/SERIES/console.log`.
//! The guest always has CI=true (a test that skips in the VM proves nothing);
//! WIRESCOPE_LAB_WG is passed through.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};

use crate::testsuite::Counts;

mod guest;
mod install;
mod report;
mod suites;
#[cfg(test)]
mod tests;

pub use guest::{guest_script, run_vm};
pub use install::{
    Kernel, Tools, debian_codename, installed_kernels, is_generic, parse_image_dependency,
    parse_madison, policy_has_suite, prepare,
};
pub use report::{GuestRun, SuiteResult, VmReport, parse_guest_log};
pub use suites::{
    Artifact, Build, Suite, agent_binary, build_suites, parse_artifacts, pick_tiers, test_args,
};

/// virtme-ng from PyPI, pinned.
pub const VNG_VERSION: &str = "1.42";
/// The virtualenv that holds it.
pub const VENV: &str = "/opt/wirescope-vng";
/// Debian packages the VMs need besides the kernels (qemu-system-x86 is handled apart).
pub const APT_PACKAGES: &[&str] = &["busybox-static", "python3-venv"];
/// Where `vm-test` enables the backports suite when no apt source has it.
pub const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/wirescope-backports.sources";
/// Per kernel: CPUs and memory of the VM.
pub const VM_CPUS: u32 = 2;
pub const VM_MEMORY: &str = "2G";

/// A tier of tests the VM runs: one test binary, named as `cargo test -p PACKAGE --test
/// TEST` names it (`tests/TEST.rs` or `tests/TEST/main.rs`), and the libtest filter that
/// picks its tests when not all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// The package's directory in the workspace, e.g. `agent`.
    pub package: &'static str,
    /// The test target's name, e.g. `lab`.
    pub test: &'static str,
    /// Only the tests whose names contain this (a module path, e.g. `kernel::`).
    pub filter: Option<&'static str>,
}

impl Tier {
    /// How the guest log and the summary name it (no whitespace): `agent/tests/datapath`, or
    /// with a filter `agent/tests/lab[kernel::]`.
    pub fn label(&self) -> String {
        let Tier {
            package,
            test,
            filter,
        } = self;
        match filter {
            Some(f) => format!("{package}/tests/{test}[{f}]"),
            None => format!("{package}/tests/{test}"),
        }
    }
}

/// The lab tier's group of tests that depend on the kernel and its WireGuard: the module
/// `kernel` of `agent/tests/lab/main.rs`.
pub const LAB_KERNEL: &str = "kernel::";

/// The tiers run in each VM: the tests whose results depend on the kernel, and no more (VM
/// time under software emulation is what a full run waits for). All need root; the lab ones
/// run the lab with the kernel's WireGuard where the module loads. xtask's own lab and
/// impairing relay (not its Prometheus end to end), the agent's whole datapath tier
/// (`BPF_PROG_TEST_RUN`), and of the agent's lab tier the modules under `kernel` (not the
/// commands, the endpoint, faults, failover, probes or Mullvad, which run on the host).
pub const TIERS: &[Tier] = &[
    Tier {
        package: "xtask",
        test: "lab",
        filter: None,
    },
    Tier {
        package: "xtask",
        test: "impair",
        filter: None,
    },
    Tier {
        package: "agent",
        test: "datapath",
        filter: None,
    },
    Tier {
        package: "agent",
        test: "lab",
        filter: Some(LAB_KERNEL),
    },
];

/// A kernel series `vm-test` knows how to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub version: (u32, u32),
}

/// Debian bookworm's kernel (6.1) and the one of bookworm-backports (6.12, Debian 13's).
pub const SERIES: [Series; 2] = [
    Series {
        name: "6.1",
        version: (6, 1),
    },
    Series {
        name: "6.12",
        version: (6, 12),
    },
];

pub fn series(name: &str) -> Result<Series> {
    SERIES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .ok_or_else(|| anyhow!("unknown kernel series {name:?}: use one of 6.1, 6.12"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelArg {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

impl KernelArg {
    pub fn series(self) -> Vec<Series> {
        match self {
            KernelArg::V6_1 => vec![SERIES[0]],
            KernelArg::V6_12 => vec![SERIES[1]],
            KernelArg::All => SERIES.to_vec(),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// Kernel series to boot.
    #[arg(long, value_enum, default_value = "6.1")]
    pub kernel: KernelArg,
    /// Give up on a VM after this many seconds (boot and every suite).
    #[arg(long, default_value_t = VM_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Only run tests whose name contains this (passed to each test binary; within a tier
    /// that has a filter of its own, the tests that match both).
    #[arg(long)]
    pub filter: Option<String>,
}

/// `cargo xtask vm-test`: installs what is missing, builds the suites, runs them in a VM per
/// kernel and prints a summary per kernel. Fails when anything could not be installed or
/// booted, or a test failed.
pub fn run(args: &VmArgs) -> Result<()> {
    let series = args.kernel.series();
    let (tools, kernels) = prepare(&series)?;
    let build = build_suites(args.filter.as_deref())?;
    let mut reports = Vec::new();
    for k in &kernels {
        let report = run_vm(&tools, k, &build, timeout(args.timeout))?;
        reports.push(report);
    }
    println!("\n==> vm-test summary");
    for r in &reports {
        print!("{}", r.summary());
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.series)
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// cargo's target directory: CARGO_TARGET_DIR or the workspace's `target/`.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::build::repo_root().join("target"))
}

/// The 6.1 VM's suites take ~21 min on an idle 2-core machine under software emulation
/// (1,270 s in a clean-clone CI run), and over 30 min on one busy with other builds (every
/// step of a CI run beside them took 2-2.5x as long): a hung guest is still caught well inside
/// CI's 90 minutes.
const VM_TIMEOUT_SECS: u64 = 2700;

fn timeout(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

/// The `cargo xtask test` step: the suites in a VM of `series`. A prerequisite that cannot
/// be installed fails the step with CI=true, and skips it (counted as 1 skipped) without.
pub fn test_step(series_name: &str) -> (Counts, Result<()>) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let prepared = series(series_name).and_then(|s| prepare(&[s]));
    let (tools, kernels) = match prepared {
        Ok(p) => p,
        Err(e) if ci => {
            return (
                Counts::default(),
                Err(e.context("a VM prerequisite is missing (CI=true, so this fails)")),
            );
        }
        Err(e) => {
            println!("skipping the {series_name} VM: {e:#}");
            return (
                Counts {
                    ignored: 1,
                    ..Counts::default()
                },
                Ok(()),
            );
        }
    };
    let res = build_suites(None)
        .and_then(|build| run_vm(&tools, &kernels[0], &build, timeout(VM_TIMEOUT_SECS)));
    match res {
        Ok(report) => {
            print!("{}", report.summary());
            let counts = report.counts();
            let res = if report.ok() {
                Ok(())
            } else {
                Err(anyhow!("{}", report.failure()))
            };
            (counts, res)
        }
        Err(e) => (Counts::default(), Err(e)),
    }
}
