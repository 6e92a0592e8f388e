//! `cargo xtask setup`: installs what a fresh Debian machine lacks for building, the lab and
//! the tests, and nothing when everything is there (then it only asks dpkg, rustup,
//! bpf-linker, cargo-fuzz, prometheus_wireguard_exporter, boringtun-cli and the current
//! wireguard-go for their versions, and reads the systemd root's stamp, in well under a
//! second).

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Debian packages the lab, the demo and the tests use. iputils-ping is not in a minimal
/// Debian image and the lab tests ping through the tunnels; tmux drives `wirescope status
/// --watch` in a real terminal; systemd provides `systemd-analyze verify` for the unit;
/// debootstrap and systemd-container (systemd-nspawn) build and boot the Debian root the unit
/// is tested in under a real systemd ([`crate::sysroot`]); shadowsocks-libev is the lab's real
/// obfuscator ([`crate::lab::shadowsocks`]); dpkg-dev has dpkg-shlibdeps, which gives `cargo
/// xtask package` the Debian package's library dependencies, and man-db the `man` the
/// package's install test renders its man pages with (minimal images lack it).
pub const APT_PACKAGES: &[&str] = &[
    "wireguard-go",
    "wireguard-tools",
    "iproute2",
    "nftables",
    "iperf3",
    "prometheus",
    "bpftool",
    "tcpdump",
    "iputils-ping",
    "tmux",
    "systemd",
    "debootstrap",
    "systemd-container",
    "shadowsocks-libev",
    "dpkg-dev",
    "man-db",
];

/// bpf-linker must use the nightly's LLVM; 0.10.x loads the Rust toolchain's own libLLVM.
pub const BPF_LINKER_VERSION: &str = "0.10.4";

/// cargo-fuzz for the fuzz targets in fuzz/ (`cargo xtask fuzz`); built with the stable
/// toolchain, it drives the nightly one.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// prometheus_wireguard_exporter, which `cargo xtask bench` scrapes beside the agent on the
/// same interface (the agent is drop-in compatible with this version's metrics).
pub const EXPORTER_VERSION: &str = "3.6.6";
pub const EXPORTER_BIN: &str = "prometheus_wireguard_exporter";

/// Installs whatever is missing; prints one line per thing installed.
pub fn run() -> Result<()> {
    let start = Instant::now();
    let mut installed = Vec::new();
    ensure_apt_packages(&mut installed)?;
    ensure_nightly_rust_src(&mut installed)?;
    ensure_bpf_linker(&mut installed)?;
    ensure_cargo_fuzz(&mut installed)?;
    ensure_wireguard_exporter(&mut installed)?;
    ensure_systemd_root(&mut installed)?;
    ensure_wireguard_go_current(&mut installed)?;
    ensure_boringtun(&mut installed)?;
    let took = start.elapsed().as_secs_f64();
    if installed.is_empty() {
        println!("setup: everything present ({took:.2} s)");
    } else {
        println!("setup: done, {} installed ({took:.1} s)", installed.len());
    }
    Ok(())
}

/// Packages of `wanted` that dpkg does not list as installed.
pub fn missing_apt_packages(wanted: &[&str]) -> Result<Vec<String>> {
    // Exits 1 when some package is unknown to dpkg; what it prints is still right.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(wanted)
        .output()
        .context("running dpkg-query: is this Debian? (`cargo xtask setup` needs dpkg and apt)")?;
    let status = parse_dpkg_status(&String::from_utf8_lossy(&out.stdout));
    Ok(wanted
        .iter()
        .filter(|p| status.get(**p).map(String::as_str) != Some("install ok installed"))
        .map(|p| p.to_string())
        .collect())
}

/// `PACKAGE STATUS...` lines into a map (an arch suffix like `:amd64` is dropped).
fn parse_dpkg_status(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, s)| {
            let p = p.split(':').next().unwrap_or(p);
            (p.to_owned(), s.trim().to_owned())
        })
        .collect()
}

fn ensure_apt_packages(installed: &mut Vec<String>) -> Result<()> {
    let missing = missing_apt_packages(APT_PACKAGES)?;
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root, or `apt-get install -y \
             --no-install-recommends {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    println!("setup: apt-get update (missing: {})", missing.join(" "));
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get update")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))?;
    let still = missing_apt_packages(APT_PACKAGES)?;
    if !still.is_empty() {
        bail!("apt-get install did not install {}", still.join(" "));
    }
    for p in missing {
        println!("setup: installed {p} (apt)");
        installed.push(p);
    }
    Ok(())
}

fn rustup(args: &[&str]) -> Result<String> {
    cmd::stdout("rustup", args)
        .context("rustup is needed for the nightly toolchain (https://rustup.rs)")
}

fn ensure_nightly_rust_src(installed: &mut Vec<String>) -> Result<()> {
    let toolchains = rustup(&["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        rustup(&["toolchain", "install", "nightly", "--profile", "minimal"])
            .context("installing the nightly toolchain (the eBPF crate needs it)")?;
        println!("setup: installed the nightly toolchain (rustup)");
        installed.push("nightly".into());
    }
    let components = rustup(&["component", "list", "--toolchain", "nightly", "--installed"])?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        rustup(&["component", "add", "rust-src", "--toolchain", "nightly"])
            .context("adding rust-src to nightly (build-std for the BPF target needs it)")?;
        println!("setup: installed rust-src for nightly (rustup)");
        installed.push("rust-src".into());
    }
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "bpf-linker 0.10.4"
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn ensure_bpf_linker(installed: &mut Vec<String>) -> Result<()> {
    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    println!("setup: cargo install bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .status()
        .with_context(|| format!("running `{cargo} install bpf-linker`"))?;
    if !status.success() {
        bail!(
            "`cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked` failed ({status}); \
             it needs the nightly toolchain's LLVM (see the NOTES on bpf-linker)"
        );
    }
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {}
        other => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but `bpf-linker --version` reports \
             {other:?}: is another bpf-linker earlier on PATH? (`which -a bpf-linker`)"
        ),
    }
    println!("setup: installed bpf-linker {BPF_LINKER_VERSION} (cargo install)");
    installed.push("bpf-linker".into());
    Ok(())
}

fn cargo_fuzz_version() -> Option<String> {
    let out = Command::new("cargo-fuzz").arg("--version").output().ok()?;
    // "cargo-fuzz 0.13.2"
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn ensure_cargo_fuzz(installed: &mut Vec<String>) -> Result<()> {
    if cargo_fuzz_version().as_deref() == Some(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    println!("setup: cargo install cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ])
        .status()
        .with_context(|| format!("running `{cargo} install cargo-fuzz`"))?;
    if !status.success() {
        bail!(
            "`cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked` failed ({status})"
        );
    }
    match cargo_fuzz_version() {
        Some(v) if v == CARGO_FUZZ_VERSION => {}
        other => bail!(
            "installed cargo-fuzz {CARGO_FUZZ_VERSION}, but `cargo-fuzz --version` reports \
             {other:?}: is another cargo-fuzz earlier on PATH? (`which -a cargo-fuzz`)"
        ),
    }
    println!("setup: installed cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install)");
    installed.push("cargo-fuzz".into());
    Ok(())
}

/// The version a `prometheus_wireguard_exporter` binary reports
/// (`prometheus_wireguard_exporter 3.6.6`), None when it does not run.
fn exporter_version(bin: &std::path::Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// Where `cargo install` puts binaries: $CARGO_HOME/bin, else ~/.cargo/bin.
pub fn cargo_bin_dir() -> Option<std::path::PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Some(std::path::PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo").join("bin"))
}

/// prometheus_wireguard_exporter [`EXPORTER_VERSION`]: on PATH or in cargo's bin directory
/// (which `sudo` or a service manager may leave off PATH), None when neither has that
/// version.
pub fn wireguard_exporter() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(cargo_bin_dir())
        .map(|d| d.join(EXPORTER_BIN))
        .filter(|b| b.is_file())
        .find(|b| exporter_version(b).as_deref() == Some(EXPORTER_VERSION))
}

fn ensure_wireguard_exporter(installed: &mut Vec<String>) -> Result<()> {
    if wireguard_exporter().is_some() {
        return Ok(());
    }
    println!(
        "setup: cargo install {EXPORTER_BIN} {EXPORTER_VERSION} (about 80 s; the bench \
         compares the agent with it)"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "install",
            EXPORTER_BIN,
            "--version",
            EXPORTER_VERSION,
            "--locked",
        ])
        .status()
        .with_context(|| format!("running `{cargo} install {EXPORTER_BIN}`"))?;
    if !status.success() {
        bail!(
            "`cargo install {EXPORTER_BIN} --version {EXPORTER_VERSION} --locked` failed ({status})"
        );
    }
    if wireguard_exporter().is_none() {
        bail!(
            "installed {EXPORTER_BIN} {EXPORTER_VERSION}, but no binary of that version is on \
             PATH or in {}: is CARGO_INSTALL_ROOT set elsewhere?",
            cargo_bin_dir().map_or("cargo's bin directory".into(), |d| d.display().to_string())
        );
    }
    println!("setup: installed {EXPORTER_BIN} {EXPORTER_VERSION} (cargo install)");
    installed.push(EXPORTER_BIN.into());
    Ok(())
}

/// The Debian root with systemd that the unit's test boots (built once, about 80 s; then
/// only its stamp is read).
fn ensure_systemd_root(installed: &mut Vec<String>) -> Result<()> {
    let root = crate::sysroot::ensure().context("building the systemd root")?;
    if root.built {
        println!(
            "setup: built the systemd root {} (debootstrap)",
            root.root.display()
        );
        installed.push("systemd root".into());
    }
    Ok(())
}

/// The Debian suite whose wireguard-go is new enough (bookworm's is 0.0.20220316). Only
/// that one package is fetched from it, with apt's lists kept in a temporary directory, so
/// the system's apt sources stay as they are.
pub const WG_GO_CURRENT_SUITE: &str = "trixie";

fn ensure_wireguard_go_current(installed: &mut Vec<String>) -> Result<()> {
    use crate::lab::impls::{WG_GO_CURRENT, WG_GO_GSO_SINCE, wireguard_go_version};
    let target = std::path::Path::new(WG_GO_CURRENT);
    if wireguard_go_version(target).is_some_and(|v| v >= WG_GO_GSO_SINCE) {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "installing wireguard-go to {WG_GO_CURRENT} needs root: run `cargo xtask setup` as root"
        );
    }
    println!(
        "setup: wireguard-go from Debian {WG_GO_CURRENT_SUITE} into {WG_GO_CURRENT} (the lab's \
         `wireguard-go-current`; bookworm's predates coalesced TUN writes)"
    );
    let tmp = std::env::temp_dir().join(format!("wirescope-wg-go-{}", std::process::id()));
    let res = fetch_wireguard_go(&tmp, target);
    let _ = std::fs::remove_dir_all(&tmp);
    res?;
    match wireguard_go_version(target) {
        Some(v) if v >= WG_GO_GSO_SINCE => {
            println!("setup: installed wireguard-go 0.0.{v} ({WG_GO_CURRENT_SUITE} package)");
            installed.push("wireguard-go-current".into());
            Ok(())
        }
        other => bail!(
            "{WG_GO_CURRENT} from Debian {WG_GO_CURRENT_SUITE} reports version {other:?}, not \
             0.0.{WG_GO_GSO_SINCE} or later: the lab's wireguard-go-current would not coalesce"
        ),
    }
}

/// `apt-get download wireguard-go` from [`WG_GO_CURRENT_SUITE`] into `tmp`, and its binary
/// (statically linked Go but for libc) to `target`.
fn fetch_wireguard_go(tmp: &std::path::Path, target: &std::path::Path) -> Result<()> {
    let lists = tmp.join("lists");
    let cache = tmp.join("cache");
    for d in [lists.join("partial"), cache.join("archives/partial")] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let sources = tmp.join("sources.list");
    std::fs::write(
        &sources,
        format!("deb http://deb.debian.org/debian {WG_GO_CURRENT_SUITE} main\n"),
    )
    .with_context(|| format!("writing {}", sources.display()))?;
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.arg("-q")
            .arg(format!("-oDir::Etc::SourceList={}", sources.display()))
            .arg("-oDir::Etc::SourceParts=/dev/null")
            .arg(format!("-oDir::State::Lists={}", lists.display()))
            .arg(format!("-oDir::Cache={}", cache.display()))
            .args(args)
            .current_dir(tmp)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    cmd::run(&mut apt(&["update"])).with_context(|| {
        format!("apt-get update for Debian {WG_GO_CURRENT_SUITE} (deb.debian.org)")
    })?;
    cmd::run(&mut apt(&["download", "wireguard-go"]))
        .with_context(|| format!("apt-get download wireguard-go from {WG_GO_CURRENT_SUITE}"))?;
    let deb = std::fs::read_dir(tmp)
        .with_context(|| format!("listing {}", tmp.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", tmp.display()))?;
    let root = tmp.join("root");
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
        .with_context(|| format!("extracting {}", deb.display()))?;
    let bin = root.join("usr/bin/wireguard-go");
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(&bin, target)
        .with_context(|| format!("copying {} to {}", bin.display(), target.display()))?;
    Ok(())
}

fn ensure_boringtun(installed: &mut Vec<String>) -> Result<()> {
    use crate::lab::impls::{BORINGTUN_BIN, BORINGTUN_VERSION, boringtun};
    if boringtun().is_some() {
        return Ok(());
    }
    println!("setup: cargo install {BORINGTUN_BIN} {BORINGTUN_VERSION} (about two minutes)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "install",
            BORINGTUN_BIN,
            "--version",
            BORINGTUN_VERSION,
            "--locked",
        ])
        .status()
        .with_context(|| format!("running `{cargo} install {BORINGTUN_BIN}`"))?;
    if !status.success() {
        bail!(
            "`cargo install {BORINGTUN_BIN} --version {BORINGTUN_VERSION} --locked` failed ({status})"
        );
    }
    if boringtun().is_none() {
        bail!(
            "installed {BORINGTUN_BIN} {BORINGTUN_VERSION}, but no binary of that version is on \
             PATH or in {}",
            cargo_bin_dir().map_or("cargo's bin directory".into(), |d| d.display().to_string())
        );
    }
    println!("setup: installed {BORINGTUN_BIN} {BORINGTUN_VERSION} (cargo install)");
    installed.push(BORINGTUN_BIN.into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dpkg_query() {
        let m = parse_dpkg_status(
            "iproute2 install ok installed\nnftables:amd64 deinstall ok config-files\n",
        );
        assert_eq!(m["iproute2"], "install ok installed");
        assert_eq!(m["nftables"], "deinstall ok config-files");
    }
}
