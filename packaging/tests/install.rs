//! The Debian package installed with dpkg in a fresh Debian bookworm root booted with
//! systemd 252 as PID 1 (the cached root of `xtask::sysroot`, in a systemd-nspawn
//! container of `xtask::nspawn` with its own network namespace and its own bpffs, its
//! writes on an overlay so the cache stays as built), then removed and purged:
//!
//! - `dpkg -L` is exactly the packaging definition's files and their directories, the
//!   conffiles are exactly its conffiles, and every installed file has the definition's bytes
//!   (the man pages and completions as generated, the unit as derived);
//! - `/usr/bin/wirescope --version` prints the version the package was built from; the man
//!   pages render without warnings (the host's `man`: the minimal root has none); the bash
//!   completion loads; `systemd-analyze verify` accepts the installed unit;
//! - the service is enabled and running after `dpkg -i`, with the shipped settings file,
//!   serves /metrics on 127.0.0.1:9586 and pins its maps under /sys/fs/bpf/wirescope;
//! - `dpkg -r` stops it and keeps the settings, the state and the pins; `dpkg --purge`
//!   removes /etc/wirescope, /var/lib/wirescope and /sys/fs/bpf/wirescope, and the root's
//!   file listing is then exactly what it was before the install, but for dpkg's own
//!   database and log and systemd's journal.
//!
//! The package is built from the debug agent (`cargo build -p wirescope`, which `cargo test
//! --workspace` does; or WIRESCOPE_BIN=path) with gzip: the release build would add minutes
//! to `cargo xtask test`, and xz a minute on a debug binary. Needs root, systemd-nspawn,
//! debootstrap and dpkg-dev (`cargo xtask setup`) and man; with CI=true a missing
//! prerequisite fails. Run: `cargo test -p packaging --test install`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use packaging::{
    contents::{self, File, Source},
    deb::{self, Compression},
};
use xtask::nspawn::{Boot, Container};

const MACHINE: &str = "wspkg";

fn skip_unless(test: &str, r: anyhow::Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {e:#} (CI=true, so this fails instead of being skipped)")
        }
        Err(e) => {
            eprintln!("skipping {test}: {e:#}");
            false
        }
    }
}

fn tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = ["dpkg-deb", "dpkg-shlibdeps", "man", "gzip", "md5sum"]
        .into_iter()
        .filter(|t| !xtask::lab::on_path(t))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{} (`cargo xtask setup`)",
            missing.join(", ")
        ))
    }
}

/// The debug agent, or WIRESCOPE_BIN.
fn agent_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WIRESCOPE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| xtask::build::repo_root().join("target"));
    let bin = target.join("debug/wirescope");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(anyhow::anyhow!(
            "the agent built (`cargo build -p wirescope`, or WIRESCOPE_BIN)"
        ))
    }
}

/// What `wirescope --version` prints for the agent this test was built with.
fn want_version() -> String {
    format!("wirescope {}", wirescope::config::cli::VERSION)
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

fn sh(c: &Container, script: &str) -> String {
    text(
        &c.exec(&["sh", "-c", script])
            .unwrap_or_else(|e| panic!("`{script}` in the container: {e:#}")),
    )
}

/// A path inside the container, as the host reaches it.
fn inside(c: &Container, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root{path}", c.leader()))
}

/// Every file, directory and link of the container's root file system (`find -xdev`: not
/// /proc, /sys, /dev, /run or other mounts), with type, mode, owner and a file's size or a
/// link's target, except what
/// changes by itself or is dpkg's record of what it did: dpkg's database and log, and
/// systemd's journal.
fn listing(c: &Container) -> BTreeSet<String> {
    // Sizes of files only: a directory's size is the file system's business (overlayfs
    // copies directories up when anything in them changes).
    let out = sh(
        c,
        "find / -xdev \\( -type f -printf '%p f %m %U:%G %s\\n' \\) -o \\( -type l \
         -printf '%p l %U:%G -> %l\\n' \\) -o -printf '%p %y %m %U:%G\\n'",
    );
    out.lines()
        .filter(|l| {
            let path = l.split(' ').next().unwrap_or_default();
            !(path.starts_with("/var/lib/dpkg/")
                || path == "/var/log/dpkg.log"
                || path.starts_with("/var/log/journal/"))
        })
        .map(str::to_owned)
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The bytes a file of the definition must have once installed.
fn want_bytes(f: &File) -> Vec<u8> {
    match &f.source {
        Source::Bytes(b) => b.clone(),
        Source::Binary(p) => std::fs::read(p).expect("the agent binary"),
    }
}

/// The package both tests read, built once per run from the debug agent into cargo's
/// scratch directory for tests (overwritten by the next run).
struct Built {
    bin: PathBuf,
    deb: PathBuf,
    took: Duration,
}

static BUILT: OnceLock<Built> = OnceLock::new();

/// The package, or None (the test skipped) when the tools or the agent are missing.
fn package(test: &str) -> Option<&'static Built> {
    let bin = agent_bin();
    if !skip_unless(test, tools())
        || !skip_unless(
            test,
            bin.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e}")),
        )
    {
        return None;
    }
    Some(BUILT.get_or_init(|| {
        let bin = bin.expect("checked");
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .expect("--version");
        assert_eq!(
            text(&version),
            want_version(),
            "{} is not the agent this test was built with: `cargo build -p wirescope`",
            bin.display()
        );
        let start = Instant::now();
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wirescope-deb");
        let deb = deb::build(&bin, &out_dir, Compression::Gzip).expect("the package builds");
        Built {
            bin,
            deb,
            took: start.elapsed(),
        }
    }))
}

#[test]
fn install_verify_remove_and_purge_in_a_fresh_debian() {
    let test = "install_verify_remove_and_purge_in_a_fresh_debian";
    if !skip_unless(test, xtask::nspawn::prerequisites())
        || !skip_unless(test, xtask::sysroot::prerequisites())
    {
        return;
    }
    let Some(Built { bin, deb, took }) = package(test) else {
        return;
    };
    let start = Instant::now();
    let files = contents::files(bin).expect("the packaging definition");
    let root = xtask::sysroot::ensure().expect("the Debian root with systemd (debootstrap)");

    let boot = Instant::now();
    let c = Container::boot(
        &Boot {
            root: root.root.clone(),
            machine: MACHINE.into(),
            netns: None,
            // What the unit grants the agent must be in the container's bounding set.
            capabilities: ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
                .map(String::from)
                .into(),
            system_calls: ["bpf", "perf_event_open"].map(String::from).into(),
            bind: vec![],
            bind_ro: vec![],
            log: std::env::temp_dir().join("wirescope-package-container.log"),
        },
        Duration::from_secs(60),
    )
    .expect("the container boots");
    let booted = boot.elapsed();
    // A bpffs of the container's own (a new instance, not the host's /sys/fs/bpf), where
    // systemd mounts one on a host: the agent pins there and the purge must clean it.
    // nspawn's /sys is a read-only tmpfs without fs/bpf: the mount point is made first.
    let fs = sh(
        &c,
        "mount -o remount,rw /sys && mkdir /sys/fs/bpf && mount -o remount,ro /sys && mount \
         -t bpf bpf /sys/fs/bpf && stat -f -c %T /sys/fs/bpf",
    );
    assert_eq!(fs, "bpf_fs");
    std::fs::copy(deb, inside(&c, "/run/wirescope.deb")).expect("the .deb into the container");
    let before = listing(&c);

    let phase = Instant::now();
    let dpkg = c
        .exec(&["dpkg", "-i", "/run/wirescope.deb"])
        .expect("dpkg -i");
    eprintln!("dpkg -i:\n{}", text(&dpkg));

    // Exactly the definition's files, with the definition's bytes.
    let listed: BTreeSet<String> = sh(&c, "dpkg -L wirescope")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, contents::expected_dpkg_list(&files));
    let conffiles: BTreeSet<String> = sh(&c, "dpkg-query -W -f='${Conffiles}' wirescope")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let want_conffiles: BTreeSet<String> = files
        .iter()
        .filter(|f| f.conffile)
        .map(|f| f.path.clone())
        .collect();
    assert_eq!(conffiles, want_conffiles);
    for f in &files {
        let got = std::fs::read(inside(&c, &f.path))
            .unwrap_or_else(|e| panic!("{} installed: {e}", f.path));
        assert!(got == want_bytes(f), "{}: not the packaged bytes", f.path);
        let mode = sh(&c, &format!("stat -c %a:%U:%G {}", f.path));
        assert_eq!(mode, format!("{:o}:root:root", f.mode), "{}", f.path);
    }

    // The binary runs from its packaged place.
    assert_eq!(sh(&c, "/usr/bin/wirescope --version"), want_version());
    // Man pages render without a warning (the root has no man: the host's reads them).
    for f in files
        .iter()
        .filter(|f| f.path.starts_with(contents::MAN_DIR))
    {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(inside(&c, &f.path))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .expect("man");
        assert!(out.status.success(), "man -l {}", f.path);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "",
            "man warnings for {}",
            f.path
        );
        let page = String::from_utf8_lossy(&out.stdout);
        assert!(page.contains("wirescope"), "{}:\n{page}", f.path);
    }
    let run_page = Command::new("man")
        .arg("-l")
        .arg(inside(
            &c,
            &format!("{}/wirescope-run.1.gz", contents::MAN_DIR),
        ))
        .env("MANWIDTH", "80")
        .output()
        .expect("man");
    assert!(
        String::from_utf8_lossy(&run_page.stdout).contains("--web.listen-address"),
        "wirescope-run(1) documents the options"
    );
    // The bash completion loads and completes `wirescope`.
    let complete = c
        .exec(&[
            "bash",
            "-c",
            ". /usr/share/bash-completion/completions/wirescope && complete -p wirescope",
        ])
        .expect("the bash completion loads");
    let complete = text(&complete);
    assert_eq!(
        complete,
        "complete -o bashdefault -o default -o nosort -F _wirescope wirescope"
    );
    // The unit as installed: systemd accepts it (ExecStart names an existing binary).
    let verify = c
        .command("systemd-analyze")
        .args(["verify", contents::UNIT_PATH])
        .output()
        .expect("systemd-analyze verify");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify {}: {}{}",
        contents::UNIT_PATH,
        text(&verify),
        String::from_utf8_lossy(&verify.stderr)
    );

    // Enabled and started on install, as Debian does for daemons, with the shipped settings.
    assert_eq!(sh(&c, "systemctl is-enabled wirescope"), "enabled");
    wait_for(
        "the service serving /metrics",
        Duration::from_secs(30),
        || {
            c.exec(&[
                "bash",
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/9586 && printf 'GET /metrics HTTP/1.0\\r\\nHost: \
             localhost\\r\\n\\r\\n' >&3 && cat <&3 | grep -q '^wirescope_build_info{version=\"'",
            ])
            .is_ok()
        },
    );
    assert_eq!(sh(&c, "systemctl is-active wirescope"), "active");
    let status = sh(
        &c,
        "systemctl status wirescope --no-pager --lines=0 || true",
    );
    assert!(
        status.contains("/usr/bin/wirescope run --config /etc/wirescope/wirescope.toml"),
        "{status}"
    );
    wait_for("the maps pinned", Duration::from_secs(10), || {
        inside(&c, "/sys/fs/bpf/wirescope").is_dir()
    });
    assert!(inside(&c, "/var/lib/wirescope").is_dir());
    let installed = phase.elapsed();

    // Remove: stopped, settings, state and counters kept for a reinstall.
    let phase = Instant::now();
    c.exec(&["dpkg", "-r", "wirescope"]).expect("dpkg -r");
    assert_eq!(sh(&c, "systemctl is-active wirescope || true"), "inactive");
    assert!(!inside(&c, "/usr/bin/wirescope").exists());
    for kept in [
        contents::CONFIG_PATH,
        contents::DEFAULT_PATH,
        "/var/lib/wirescope",
        "/sys/fs/bpf/wirescope",
    ] {
        assert!(inside(&c, kept).exists(), "{kept} kept by dpkg -r");
    }
    assert_eq!(
        sh(&c, "dpkg-query -W -f='${db:Status-Abbrev}' wirescope"),
        "rc"
    );

    // Purge: nothing of the package left.
    c.exec(&["dpkg", "--purge", "wirescope"])
        .expect("dpkg --purge");
    for gone in [
        "/etc/wirescope",
        "/var/lib/wirescope",
        "/sys/fs/bpf/wirescope",
    ] {
        assert!(!inside(&c, gone).exists(), "{gone} left after purge");
    }
    let after = listing(&c);
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "the root after purge differs from before the install:\nadded {added:#?}\nremoved \
         {removed:#?}"
    );
    assert!(
        c.command("dpkg-query")
            .args(["-W", "wirescope"])
            .output()
            .is_ok_and(|o| !o.status.success()),
        "dpkg still knows wirescope"
    );
    let removed_took = phase.elapsed();
    c.poweroff().expect("the container powers off");
    eprintln!(
        "{test}: package built in {:.1} s ({} bytes), root {} in {:.1} s, booted in {:.1} s, \
         installed and checked in {:.1} s, removed and purged in {:.1} s; {:.1} s in all \
         after the build",
        took.as_secs_f64(),
        std::fs::metadata(deb).map(|m| m.len()).unwrap_or_default(),
        if root.built { "built" } else { "cached" },
        root.took.as_secs_f64(),
        booted.as_secs_f64(),
        installed.as_secs_f64(),
        removed_took.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn the_expected_list_is_what_dpkg_deb_puts_in_the_package() {
    // The .deb's own table of contents against the definition, without a container: a
    // cheap check that runs wherever dpkg-deb does.
    let test = "the_expected_list_is_what_dpkg_deb_puts_in_the_package";
    let Some(Built { bin, deb, .. }) = package(test) else {
        return;
    };
    let toc = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(deb)
        .output()
        .expect("dpkg-deb --contents");
    // `drwxr-xr-x root/root 0 2026-01-01 00:00 ./usr/bin/`
    let paths: BTreeSet<String> = String::from_utf8_lossy(&toc.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| match p.trim_start_matches('.').trim_end_matches('/') {
            "" => "/.".to_owned(),
            p => p.to_owned(),
        })
        .collect();
    let files = contents::files(bin).expect("definition");
    assert_eq!(paths, contents::expected_dpkg_list(&files));
    let owners: BTreeSet<String> = String::from_utf8_lossy(&toc.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert_eq!(owners, BTreeSet::from(["root/root".to_owned()]));
    let field = |f: &str| {
        let out = Command::new("dpkg-deb")
            .args(["--field"])
            .arg(deb)
            .arg(f)
            .output()
            .expect("dpkg-deb --field");
        text(&out)
    };
    assert_eq!(field("Package"), "wirescope");
    assert_eq!(field("Version"), deb::version());
    assert!(
        field("Depends").starts_with("libc6 (>= "),
        "{}",
        field("Depends")
    );
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(deb::file_name(&deb::architecture().expect("arch")).as_str())
    );
}
