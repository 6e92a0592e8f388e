//! Installing what the VMs need, idempotently: Debian's qemu, busybox-static and
//! python3-venv through apt (qemu-system-x86 from backports when qemu-utils is), the generic
//! kernel image of each series (enabling bookworm-backports for 6.12 when the archive
//! answers), and virtme-ng from PyPI in its virtualenv; and finding the installed kernels.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};

use super::{APT_PACKAGES, BACKPORTS_SOURCES, Series, VENV, VNG_VERSION};
use crate::cmd;
use crate::lab::parse_kernel_release;
use crate::setup::missing_apt_packages;

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
pub(super) fn natural_key(s: &str) -> Vec<(u64, String)> {
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

pub(super) fn path_with(bin: &Path) -> std::ffi::OsString {
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
