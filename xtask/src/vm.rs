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
//! read-only with writable overlays (/tmp, /etc, /var, ...; /run is a tmpfs), so the test
//! binaries under target/ run where cargo built them. The guest runs a script written to
//! `target/vm/SERIES/run.sh`: it loads tun, wireguard and sch_netem, mounts tracefs and
//! bpffs where missing, prints what the kernel has, then runs the test binary of each tier
//! of [`TIERS`] with `--test-threads=1` and the tier's filter from its package directory. Everything it prints goes to
//! `target/vm/SERIES/guest.log` (a writable share; the serial console lost output under
//! load), which is echoed here as it grows; the agent's logs (/tmp/wirescope-*.log) are
//! copied to `target/vm/SERIES/tmp/`, the VM's console goes to
//! `target/vm/SERIES/console.log`.
//! The guest always has CI=true (a test that skips in the VM proves nothing);
//! WIRESCOPE_LAB_WG is passed through.

use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::build::cargo;
use crate::cmd;
use crate::lab::{WG_IMPL_ENV, attach_mode_for, parse_kernel_release};
use crate::setup::missing_apt_packages;
use crate::testsuite::{Counts, parse_result_line};

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
    #[arg(long, default_value_t = 1800)]
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
    let suites = build_suites(args.filter.as_deref())?;
    let mut reports = Vec::new();
    for k in &kernels {
        let report = run_vm(&tools, k, &suites, timeout(args.timeout))?;
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
    let res =
        build_suites(None).and_then(|suites| run_vm(&tools, &kernels[0], &suites, timeout(1800)));
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

/// What runs the VMs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The virtualenv's bin directory (vng calls virtme-run from PATH).
    pub bin: PathBuf,
}

impl Tools {
    pub fn vng(&self) -> PathBuf {
        self.bin.join("vng")
    }
}

/// An installed kernel image with its modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub series: &'static str,
    pub version: (u32, u32),
    /// `uname -r` inside, e.g. `6.1.0-56-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
}

/// Installs what is missing for these kernels and returns the tools and kernels, in order.
pub fn prepare(series: &[Series]) -> Result<(Tools, Vec<Kernel>)> {
    let start = Instant::now();
    let mut apt = Apt::default();
    let mut installed = Vec::new();
    ensure_apt_tools(&mut apt, &mut installed)?;
    let mut kernels = Vec::new();
    for s in series {
        kernels.push(ensure_kernel(&mut apt, *s, &mut installed)?);
    }
    let tools = ensure_vng(&mut installed)?;
    let took = start.elapsed().as_secs_f64();
    let ks: Vec<&str> = kernels.iter().map(|k| k.release.as_str()).collect();
    if installed.is_empty() {
        println!(
            "vm-test: qemu, virtme-ng {VNG_VERSION} and kernels {} present ({took:.2} s)",
            ks.join(", ")
        );
    } else {
        println!(
            "vm-test: installed {} ({took:.1} s); kernels {}",
            installed.join(", "),
            ks.join(", ")
        );
    }
    Ok((tools, kernels))
}

/// apt-get update at most once per run, and only when something must be installed.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn require_root(&self, what: &str) -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            bail!("installing {what} needs root (apt-get)");
        }
        Ok(())
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            println!("vm-test: apt-get update");
            cmd::run(apt_get().arg("update")).context("apt-get update")?;
            self.updated = true;
        }
        Ok(())
    }

    fn install(&mut self, pkgs: &[String], extra: &[&str]) -> Result<()> {
        self.require_root(&pkgs.join(" "))?;
        self.update()?;
        let args: Vec<&str> = extra
            .iter()
            .copied()
            .chain(pkgs.iter().map(String::as_str))
            .collect();
        println!("vm-test: apt-get install {}", args.join(" "));
        cmd::run(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(extra)
                .args(pkgs),
        )
        .with_context(|| format!("installing {}", pkgs.join(" ")))?;
        Ok(())
    }
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// VERSION_CODENAME of /etc/os-release, e.g. `bookworm`.
pub fn debian_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("/etc/os-release names no VERSION_CODENAME: is this Debian?"))
}

/// Installed version of a Debian package, None when not installed.
fn installed_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\\t${Version}", pkg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('\t')?;
    (status == "install ok installed").then(|| version.to_owned())
}

fn ensure_apt_tools(apt: &mut Apt, installed: &mut Vec<String>) -> Result<()> {
    let missing = missing_apt_packages(APT_PACKAGES)?;
    if !missing.is_empty() {
        apt.install(&missing, &[])?;
        installed.extend(missing);
    }
    if installed_version("qemu-system-x86").is_none() {
        // qemu-utils from backports Breaks the stable qemu-system-common: take qemu from
        // the same suite.
        let mut extra = Vec::new();
        let backports;
        if installed_version("qemu-utils").is_some_and(|v| v.contains("~bpo")) {
            backports = ensure_backports(apt)?;
            extra = vec!["-t", backports.as_str()];
        }
        apt.install(&["qemu-system-x86".to_owned()], &extra)?;
        installed.push("qemu-system-x86".into());
    }
    if !on_path("qemu-system-x86_64") {
        bail!("qemu-system-x86 is installed but qemu-system-x86_64 is not on PATH");
    }
    Ok(())
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Whether any apt source names `suite` (e.g. `bookworm-backports`).
fn apt_sources_have(suite: &str) -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
        );
    }
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == suite))
        })
    })
}

/// Makes sure apt knows `CODENAME-backports` and returns its name. Adds
/// [`BACKPORTS_SOURCES`] when no source names it, and keeps it only if apt could fetch the
/// suite's index.
fn ensure_backports(apt: &mut Apt) -> Result<String> {
    let codename = debian_codename()?;
    let suite = format!("{codename}-backports");
    if apt_sources_have(&suite) {
        return Ok(suite);
    }
    apt.require_root(&format!("{suite} in apt's sources"))?;
    println!("vm-test: adding {suite} to apt's sources ({BACKPORTS_SOURCES})");
    std::fs::write(
        BACKPORTS_SOURCES,
        format!(
            "# Added by `cargo xtask vm-test` (wirescope): newer kernels and qemu.\n\
             Types: deb\n\
             URIs: http://deb.debian.org/debian\n\
             Suites: {suite}\n\
             Components: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )
    .with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
    let update = cmd::run(apt_get().arg("update"));
    let policy = cmd::stdout("apt-cache", ["policy"]).unwrap_or_default();
    if update.is_err() || !policy_has_suite(&policy, &suite) {
        let _ = std::fs::remove_file(BACKPORTS_SOURCES);
        let _ = cmd::run(apt_get().arg("update"));
        let why = match update {
            Err(e) => format!("{e:#}"),
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
                .filter(|l| l.contains("backports") || l.starts_with("W:") || l.starts_with("E:"))
                .collect::<Vec<_>>()
                .join("; "),
        };
        bail!("{suite} is not reachable, so it was not added to apt's sources: {why}");
    }
    apt.updated = true;
    Ok(suite)
}

/// Whether `apt-cache policy` lists a release whose codename (`n=`) or archive (`a=`) is
/// `suite`: apt fetched its index. (bookworm is now `a=oldstable`, so the codename counts.)
pub fn policy_has_suite(policy: &str, suite: &str) -> bool {
    policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("release "))
        .any(|r| {
            r.split(',')
                .any(|f| f == format!("n={suite}") || f == format!("a={suite}"))
        })
}

/// Installed generic kernels (`/boot/vmlinuz-*-amd64` with /lib/modules), newest last.
pub fn installed_kernels() -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let release = name.strip_prefix("vmlinuz-")?.to_owned();
                    (is_generic(&release)
                        && Path::new("/lib/modules")
                            .join(&release)
                            .join("modules.dep")
                            .exists())
                    .then(|| (release, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|a| natural_key(&a.0));
    found
}

/// Debian's generic amd64 flavour: `6.1.0-56-amd64`, `6.12.95+deb12-amd64`; not `-cloud-amd64`
/// or `-rt-amd64`.
pub fn is_generic(release: &str) -> bool {
    release.ends_with("-amd64")
        && !release.ends_with("-cloud-amd64")
        && !release.ends_with("-rt-amd64")
}

/// Numbers compare as numbers: 6.1.0-9 < 6.1.0-56.
fn natural_key(s: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut num = String::new();
    let mut text = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                key.push((0, std::mem::take(&mut text)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                key.push((num.parse().unwrap_or(u64::MAX), String::new()));
                num.clear();
            }
            text.push(c);
        }
    }
    if !num.is_empty() {
        key.push((num.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !text.is_empty() {
        key.push((0, text));
    }
    key
}

fn find_installed(s: Series) -> Option<Kernel> {
    installed_kernels()
        .into_iter()
        .rfind(|(r, _)| parse_kernel_release(r) == Some(s.version))
        .map(|(release, vmlinuz)| Kernel {
            series: s.name,
            version: s.version,
            release,
            vmlinuz,
        })
}

/// `apt-cache madison linux-image-amd64`: (version, suite) of each version apt knows.
pub fn parse_madison(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(" | ").map(str::trim).collect();
            if f.len() < 3 {
                return None;
            }
            // "http://deb.debian.org/debian bookworm-backports/main amd64 Packages"
            let suite = f[2].split_whitespace().nth(1)?.split('/').next()?;
            Some((f[1].to_owned(), suite.to_owned()))
        })
        .collect()
}

/// The image package a version of `linux-image-amd64` depends on, from `apt-cache depends`.
pub fn parse_image_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
}

fn madison_for(s: Series) -> Result<Vec<(String, String)>> {
    let out = cmd::stdout("apt-cache", ["madison", "linux-image-amd64"])?;
    Ok(parse_madison(&out)
        .into_iter()
        .filter(|(v, _)| parse_kernel_release(v) == Some(s.version))
        .collect())
}

fn ensure_kernel(apt: &mut Apt, s: Series, installed: &mut Vec<String>) -> Result<Kernel> {
    if let Some(k) = find_installed(s) {
        return Ok(k);
    }
    let cannot = |why: String| anyhow!("cannot install a {} kernel: {why}", s.name);
    apt.require_root(&format!("the {} kernel", s.name))
        .map_err(|e| cannot(format!("{e:#}")))?;
    apt.update().map_err(|e| cannot(format!("{e:#}")))?;
    let mut versions = madison_for(s)?;
    if versions.is_empty() {
        let backports = ensure_backports(apt).map_err(|e| cannot(format!("{e:#}")))?;
        versions = madison_for(s)?;
        if versions.is_empty() {
            let all = cmd::stdout("apt-cache", ["madison", "linux-image-amd64"])?;
            let known: Vec<String> = parse_madison(&all)
                .into_iter()
                .map(|(v, suite)| format!("{v} ({suite})"))
                .collect();
            return Err(cannot(format!(
                "apt's sources, {backports} included, have no linux-image-amd64 {}.x \
                 (it has: {})",
                s.name,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    versions.sort_by_key(|a| natural_key(&a.0));
    let (version, suite) = versions.last().expect("not empty").clone();
    let deps = cmd::stdout(
        "apt-cache",
        ["depends", &format!("linux-image-amd64={version}")],
    )?;
    let image = parse_image_dependency(&deps).ok_or_else(|| {
        cannot(format!(
            "linux-image-amd64 {version} ({suite}) depends on no linux-image package: {deps}"
        ))
    })?;
    apt.install(std::slice::from_ref(&image), &[])
        .map_err(|e| cannot(format!("{e:#}")))?;
    installed.push(format!("{image} ({suite})"));
    find_installed(s).ok_or_else(|| {
        cannot(format!(
            "{image} is installed, but no /boot/vmlinuz-{}.*-amd64 with its /lib/modules",
            s.name
        ))
    })
}

fn vng_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin.join("vng"))
        .arg("--version")
        .env("PATH", path_with(bin))
        .stdin(Stdio::null())
        .output()
        .ok()?;
    // "virtme-ng 1.42"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

fn path_with(bin: &Path) -> std::ffi::OsString {
    let mut paths = vec![bin.to_path_buf()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn ensure_vng(installed: &mut Vec<String>) -> Result<Tools> {
    let bin = Path::new(VENV).join("bin");
    if vng_version(&bin).as_deref() == Some(VNG_VERSION) {
        return Ok(Tools { bin });
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("installing virtme-ng in {VENV} needs root");
    }
    println!("vm-test: virtme-ng {VNG_VERSION} from PyPI into {VENV}");
    // Debian's python3 (with python3-venv), not whichever python3 is first on PATH.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    cmd::run(Command::new(python).args(["-m", "venv", "--clear", VENV]))
        .with_context(|| format!("creating the virtualenv {VENV}"))?;
    cmd::run(Command::new(bin.join("pip")).args([
        "install",
        "--disable-pip-version-check",
        "--quiet",
        &format!("virtme-ng=={VNG_VERSION}"),
    ]))
    .with_context(|| format!("pip install virtme-ng=={VNG_VERSION} into {VENV}"))?;
    match vng_version(&bin) {
        Some(v) if v == VNG_VERSION => {}
        other => bail!("installed virtme-ng {VNG_VERSION} in {VENV}, but vng reports {other:?}"),
    }
    installed.push(format!("virtme-ng {VNG_VERSION} (pip, {VENV})"));
    Ok(Tools { bin })
}

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

/// Marker lines the guest script prints, `@@wirescope-vm KIND ARGS...`.
const MARK: &str = "@@wirescope-vm";

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs.
pub fn guest_script(out: &Path, suites: &[Suite], env: &[(&str, String)]) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "#!/bin/sh\n# Written by `cargo xtask vm-test`; runs inside the VM."
    );
    let _ = writeln!(s, "exec >>{} 2>&1", q(&out.join("guest.log")));
    let _ = writeln!(
        s,
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    // TMPDIR stays /tmp (an overlay on tmpfs): iperf3 cannot use an unlinked temporary
    // file on the 9p share. The agent's logs are copied out after each suite.
    let _ = writeln!(s, "export RUST_BACKTRACE=1");
    // The host's own agent logs show through the /tmp overlay: not this run's.
    let _ = writeln!(s, "rm -f /tmp/wirescope-*.log");
    for (k, v) in env {
        let _ = writeln!(s, "export {k}={}", shell_quote(v));
    }
    let _ = writeln!(
        s,
        r#"echo "{MARK} booted $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
fact() {{ echo "{MARK} fact $1 $2"; }}
yesno() {{ if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }}
modprobe tun 2>/dev/null
fact kernel_wireguard "$(yesno modprobe wireguard)"
fact netem "$(yesno modprobe sch_netem)"
[ -e /sys/kernel/tracing/kprobe_events ] || mount -t tracefs nodev /sys/kernel/tracing
fact kprobe_events "$(yesno test -e /sys/kernel/tracing/kprobe_events)"
fact btf "$(yesno test -e /sys/kernel/btf/vmlinux)"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
fact tun "$(yesno test -e /dev/net/tun)"
ulimit -l unlimited 2>/dev/null"#
    );
    for suite in suites {
        let label = &suite.label;
        let args: String = suite
            .args
            .iter()
            .map(|a| format!(" {}", shell_quote(a)))
            .collect();
        let _ = writeln!(
            s,
            r#"echo "{MARK} suite-start {label} $(cut -d' ' -f1 /proc/uptime)"
cd {cwd} && {exe} --test-threads=1{args}
rc=$?
cp -f /tmp/wirescope-*.log {tmp}/ 2>/dev/null
echo "{MARK} suite-end {label} $rc $(cut -d' ' -f1 /proc/uptime)""#,
            cwd = q(&suite.cwd),
            exe = q(&suite.exe),
            tmp = q(&out.join("tmp")),
        );
    }
    let _ = writeln!(s, "echo \"{MARK} done\"\nexit 0");
    s
}

/// One suite's outcome in a VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuiteResult {
    pub label: String,
    pub counts: Counts,
    /// The binary's exit status; None when the VM stopped before it ended.
    pub exit: Option<i32>,
    pub failed_tests: Vec<String>,
    pub secs: f64,
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
/// output can split the first).
pub fn parse_guest_log(text: &str) -> GuestRun {
    let mut run = GuestRun::default();
    let mut started: Option<f64> = None;
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
                    run.suites.push(SuiteResult {
                        label: (*label).to_owned(),
                        ..SuiteResult::default()
                    });
                }
                ["suite-end", label, rc, up] => {
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

/// Boots `kernel`, runs the suites in it and returns what happened. Errs only when the VM
/// could not be started at all.
pub fn run_vm(
    tools: &Tools,
    kernel: &Kernel,
    suites: &[Suite],
    timeout: Duration,
) -> Result<VmReport> {
    let root = crate::build::repo_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out = target.join("vm").join(kernel.series);
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("tmp"))
        .with_context(|| format!("creating {}", out.display()))?;
    // CI=true inside whatever the host has: a suite that skips in the VM proves nothing.
    let mut env = vec![("CI", "true".to_owned())];
    if let Ok(v) = std::env::var(WG_IMPL_ENV) {
        env.push((WG_IMPL_ENV, v));
    }
    let script = out.join("run.sh");
    std::fs::write(&script, guest_script(&out, suites, &env))
        .with_context(|| format!("writing {}", script.display()))?;
    let guest_log = out.join("guest.log");
    std::fs::write(&guest_log, "").with_context(|| format!("creating {}", guest_log.display()))?;
    let console = std::fs::File::create(out.join("console.log"))
        .with_context(|| format!("creating {}/console.log", out.display()))?;

    let mut c = Command::new(tools.vng());
    c.arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--disable-kvm", "--cpus", &VM_CPUS.to_string()])
        .args(["--memory", VM_MEMORY])
        .arg("--rwdir")
        .arg(&out)
        .arg("--exec")
        .arg(format!("sh {}", shell_quote(&script.display().to_string())))
        .current_dir(&root)
        .env("PATH", path_with(&tools.bin))
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .process_group(0);
    println!(
        "==> vm {} ({}): booting with {} CPUs, {VM_MEMORY}, software emulation",
        kernel.series, kernel.release, VM_CPUS
    );
    let start = Instant::now();
    let mut child = c
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::describe(&c)))?;
    let mut tail = Tail::new(&guest_log);
    let mut boot = None;
    let mut error = None;
    loop {
        let exited = child.try_wait().context("waiting for vng")?;
        for line in tail.read_lines() {
            if boot.is_none() && line.starts_with(&format!("{MARK} booted")) {
                boot = Some(start.elapsed());
                println!(
                    "vm {}: booted in {:.1} s",
                    kernel.series,
                    start.elapsed().as_secs_f64()
                );
            }
            if !line.starts_with(MARK) {
                println!("{line}");
            }
        }
        if let Some(status) = exited {
            for line in tail.finish() {
                if !line.starts_with(MARK) {
                    println!("{line}");
                }
            }
            if !status.success() {
                error = Some(format!("vng exited with {status}"));
            }
            break;
        }
        if start.elapsed() > timeout {
            // vng runs QEMU in its own process group (process_group(0) above).
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            error = Some(format!("timed out after {} s", timeout.as_secs()));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let total = start.elapsed();
    let text = std::fs::read_to_string(&guest_log).unwrap_or_default();
    let guest = parse_guest_log(&text);
    if error.is_none() && !guest.done {
        error = Some(if boot.is_none() {
            format!(
                "the guest never started the script; console:\n{}",
                console_tail(&out)
            )
        } else {
            format!("the guest stopped early; console:\n{}", console_tail(&out))
        });
    }
    Ok(VmReport {
        series: kernel.series,
        release: guest
            .release
            .clone()
            .unwrap_or_else(|| kernel.release.clone()),
        boot,
        total,
        guest,
        error,
        out_dir: out,
        expected_suites: suites.iter().map(|s| s.label.clone()).collect(),
    })
}

fn console_tail(out: &Path) -> String {
    let text = std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Reads the lines appended to a file since the last call.
struct Tail {
    path: PathBuf,
    pos: u64,
    partial: String,
}

impl Tail {
    fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            pos: 0,
            partial: String::new(),
        }
    }

    fn read_new(&mut self) -> String {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return String::new();
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return String::new();
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return String::new();
        }
        self.pos += buf.len() as u64;
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Complete new lines.
    fn read_lines(&mut self) -> Vec<String> {
        let new = self.read_new();
        self.partial.push_str(&new);
        let Some(end) = self.partial.rfind('\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        done.lines().map(str::to_owned).collect()
    }

    /// Everything left, the last line even without its newline.
    fn finish(&mut self) -> Vec<String> {
        let mut lines = self.read_lines();
        if !self.partial.is_empty() {
            lines.push(std::mem::take(&mut self.partial));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madison_lines() {
        let text = "linux-image-amd64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages\n\
                    linux-image-amd64 | 6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n\
                    linux-image-amd64 | 6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages\n";
        let m = parse_madison(text);
        assert_eq!(
            m,
            [
                (
                    "6.12.95-1~bpo12+1".to_owned(),
                    "bookworm-backports".to_owned()
                ),
                ("6.1.192-2".to_owned(), "bookworm-security".to_owned()),
                ("6.1.176-1".to_owned(), "bookworm".to_owned()),
            ]
        );
        assert_eq!(parse_kernel_release(&m[0].0), Some((6, 12)));
        assert_eq!(parse_kernel_release(&m[1].0), Some((6, 1)));
    }

    #[test]
    fn policy_suites() {
        let policy = "Package files:\n 100 /var/lib/dpkg/status\n     release a=now\n \
            100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages\n     \
            release o=Debian Backports,a=oldstable-backports,n=bookworm-backports,l=Debian Backports,c=main,b=amd64\n";
        assert!(policy_has_suite(policy, "bookworm-backports"));
        assert!(policy_has_suite(policy, "oldstable-backports"));
        assert!(!policy_has_suite(policy, "bookworm"));
        assert!(!policy_has_suite(policy, "trixie-backports"));
    }

    #[test]
    fn image_dependency() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n";
        assert_eq!(
            parse_image_dependency(text).as_deref(),
            Some("linux-image-6.12.95+deb12-amd64")
        );
        assert_eq!(parse_image_dependency("linux-image-amd64\n"), None);
    }

    #[test]
    fn generic_flavour_and_order() {
        assert!(is_generic("6.1.0-56-amd64"));
        assert!(is_generic("6.12.95+deb12-amd64"));
        assert!(!is_generic("6.1.0-56-cloud-amd64"));
        assert!(!is_generic("6.1.0-56-rt-amd64"));
        assert!(natural_key("6.1.0-9-amd64") < natural_key("6.1.0-56-amd64"));
        assert!(natural_key("6.12.9+deb12-amd64") < natural_key("6.12.95+deb12-amd64"));
    }

    #[test]
    fn kernel_args() {
        assert_eq!(KernelArg::V6_1.series(), [SERIES[0]]);
        assert_eq!(KernelArg::All.series().len(), 2);
        assert_eq!(series("6.12").unwrap().version, (6, 12));
        assert!(series("5.10").is_err());
    }

    /// cargo's messages for both layouts of a test target (`tests/NAME/main.rs`,
    /// `tests/NAME.rs`), a unit-test binary and a plain binary.
    const ARTIFACTS: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/agent#wirescope@0.1.0","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["test"],"name":"lab","src_path":"/w/agent/tests/lab/main.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/lab-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/agent#wirescope@0.1.0","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["test"],"name":"datapath","src_path":"/w/agent/tests/datapath/main.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/datapath-2"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["test"],"name":"lab","src_path":"/w/xtask/tests/lab.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/lab-3"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["test"],"name":"impair","src_path":"/w/xtask/tests/impair.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/impair-4"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["lib"],"name":"xtask","src_path":"/w/xtask/src/lib.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/xtask-5"}
{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["bin"],"name":"wirescope","src_path":"/w/agent/src/main.rs"},"profile":{"test":false},"executable":"/w/target/debug/wirescope"}
{"reason":"build-finished","success":true}"#;

    #[test]
    fn artifacts() {
        let a = parse_artifacts(ARTIFACTS, Path::new("/w"));
        let names: Vec<(&str, &str)> = a
            .iter()
            .map(|a| (a.package.as_str(), a.test.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("agent", "lab"),
                ("agent", "datapath"),
                ("xtask", "lab"),
                ("xtask", "impair")
            ],
            "test targets only, by package directory"
        );
        assert_eq!(a[0].exe, Path::new("/w/target/debug/deps/lab-1"));
        assert_eq!(a[0].cwd, Path::new("/w/agent"));
    }

    #[test]
    fn tiers() {
        let labels: Vec<String> = TIERS.iter().map(Tier::label).collect();
        assert_eq!(
            labels,
            [
                "xtask/tests/lab",
                "xtask/tests/impair",
                "agent/tests/datapath",
                "agent/tests/lab[kernel::]"
            ]
        );
        // The guest log's markers split on whitespace.
        assert!(labels.iter().all(|l| !l.contains(char::is_whitespace)));
        let a = parse_artifacts(ARTIFACTS, Path::new("/w"));
        let picked = pick_tiers(TIERS, &a).unwrap();
        let exes: Vec<&Path> = picked.iter().map(|(_, a)| a.exe.as_path()).collect();
        assert_eq!(
            exes,
            [
                "/w/target/debug/deps/lab-3",
                "/w/target/debug/deps/impair-4",
                "/w/target/debug/deps/datapath-2",
                "/w/target/debug/deps/lab-1"
            ]
            .map(Path::new)
        );
        let e = pick_tiers(TIERS, &a[1..]).unwrap_err().to_string();
        assert!(e.contains("agent/tests/lab[kernel::]"), "{e}");
    }

    #[test]
    fn tier_filters() {
        let lab = TIERS[3];
        let datapath = TIERS[2];
        let list = "kernel::health::rtt_with_40ms_delay_each_way: test\n\
                    kernel::tunnel::single_hop_counts_are_exact: test\n\
                    doctor::missing_capabilities: test\n\
                    probe::probes_and_path_mtu_through_a_small_mtu_hop: test\n\
                    \n\
                    4 tests, 0 benchmarks\n";
        let unlisted = || -> Result<String> { panic!("listed without need") };
        let listed = || Ok(list.to_owned());
        assert_eq!(
            test_args(&datapath, None, unlisted).unwrap(),
            [] as [&str; 0]
        );
        assert_eq!(
            test_args(&datapath, Some("wire::"), unlisted).unwrap(),
            ["wire::"]
        );
        assert_eq!(test_args(&lab, None, unlisted).unwrap(), ["kernel::"]);
        // Both: the tier's tests that match the user's filter, exactly.
        assert_eq!(
            test_args(&lab, Some("rtt"), listed).unwrap(),
            ["--exact", "kernel::health::rtt_with_40ms_delay_each_way"]
        );
        assert_eq!(
            test_args(&lab, Some("_"), listed).unwrap(),
            [
                "--exact",
                "kernel::health::rtt_with_40ms_delay_each_way",
                "kernel::tunnel::single_hop_counts_are_exact"
            ]
        );
        // None of them: a name no test has.
        assert_eq!(
            test_args(&lab, Some("probe"), listed).unwrap(),
            ["--exact", "kernel::"]
        );
    }

    #[test]
    fn guest_log() {
        let log = "@@wirescope-vm booted 6.1.0-56-amd64 9.81\n\
                   @@wirescope-vm fact kernel_wireguard yes\n\
                   @@wirescope-vm suite-start xtask/tests/lab 10.00\n\
                   running 2 tests\n\
                   test a ... ok\n\
                   test b ... FAILED\n\
                   test c ... server says hi\n\
                   FAILED\n\
                   \n\
                   failures:\n\
                   \n\
                   ---- b stdout ----\n\
                   thread 'b' panicked\n\
                   \n\
                   failures:\n\
                   \x20   b\n\
                   \x20   c\n\
                   \n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n\
                   @@wirescope-vm suite-end xtask/tests/lab 101 12.50\n\
                   @@wirescope-vm suite-start agent/tests/lab[kernel::] 12.50\n\
                   test result: ok. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.00s\n";
        let r = parse_guest_log(log);
        assert_eq!(r.release.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(r.booted_at, Some(9.81));
        assert_eq!(r.fact("kernel_wireguard"), Some("yes"));
        assert!(!r.done);
        assert_eq!(r.suites.len(), 2);
        let x = &r.suites[0];
        assert_eq!((x.counts.passed, x.counts.failed), (1, 2));
        assert_eq!(x.exit, Some(101));
        assert_eq!(x.failed_tests, ["b", "c"]);
        assert!((x.secs - 2.5).abs() < 1e-9);
        assert_eq!(
            r.suites[1].exit, None,
            "the VM stopped during the second suite"
        );
        assert_eq!(r.suites[1].counts.ignored, 1);

        let report = VmReport {
            series: "6.1",
            release: "6.1.0-56-amd64".into(),
            boot: Some(Duration::from_secs(14)),
            total: Duration::from_secs(60),
            guest: r,
            error: None,
            out_dir: PathBuf::from("/w/target/vm/6.1"),
            expected_suites: vec!["xtask/tests/lab".into(), "agent/tests/lab[kernel::]".into()],
        };
        assert!(!report.ok());
        assert_eq!(report.counts().passed, 5);
        assert_eq!(report.counts().failed, 2);
        let s = report.summary();
        assert!(s.contains("clsact expected"), "{s}");
        assert!(s.contains("failed: b"), "{s}");
        assert!(s.contains("did not finish"), "{s}");
    }

    #[test]
    fn script_runs_every_suite() {
        let suites = [
            Suite {
                label: "agent/tests/datapath".into(),
                exe: "/w/target/debug/deps/datapath-2".into(),
                cwd: "/w/agent".into(),
                args: Vec::new(),
            },
            Suite {
                label: "agent/tests/lab[kernel::]".into(),
                exe: "/w/target/debug/deps/lab-1".into(),
                cwd: "/w/agent".into(),
                args: vec!["kernel::".into()],
            },
        ];
        let s = guest_script(
            Path::new("/w/target/vm/6.1"),
            &suites,
            &[("CI", "true".into())],
        );
        assert!(
            s.contains("exec >>'/w/target/vm/6.1/guest.log' 2>&1"),
            "{s}"
        );
        assert!(s.contains("export CI='true'"), "{s}");
        assert!(
            s.contains("cd '/w/agent' && '/w/target/debug/deps/datapath-2' --test-threads=1\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "cd '/w/agent' && '/w/target/debug/deps/lab-1' --test-threads=1 'kernel::'\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("@@wirescope-vm suite-start agent/tests/lab[kernel::] $(cut"),
            "{s}"
        );
        let r = parse_guest_log(
            "@@wirescope-vm suite-start agent/tests/lab[kernel::] 1.0\n\
             @@wirescope-vm suite-end agent/tests/lab[kernel::] 0 2.0\n",
        );
        assert_eq!(r.suites[0].label, "agent/tests/lab[kernel::]");
        assert!(s.contains("@@wirescope-vm done"), "{s}");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn tail_reads_whole_lines() {
        let dir = std::env::temp_dir().join(format!("wirescope-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log");
        std::fs::write(&p, "one\ntw").unwrap();
        let mut t = Tail::new(&p);
        assert_eq!(t.read_lines(), ["one"]);
        std::fs::write(&p, "one\ntwo\nthree").unwrap();
        assert_eq!(t.read_lines(), ["two"]);
        assert_eq!(t.finish(), ["three"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
