//! A minimal Debian root file system with systemd, for running `deploy/wirescope.service`
//! under a real systemd as PID 1 ([`crate::nspawn`]): this host's own init is not
//! systemd, and the unit's sandboxing is only ever applied by systemd itself.
//!
//! Built once with debootstrap (about 80 s and 260 MB from deb.debian.org) into
//! `target/systemd-root/root`, and rebuilt only when [`stamp`] (the suite, the mirror and
//! the package list) changes: a build goes to `root.new` and is renamed into place, so an
//! interrupted one never leaves a half root behind, and a file lock keeps two builds from
//! racing. `cargo xtask setup` builds it; the test that boots it builds it when missing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The Debian release of the root (the one the project is built and tested on).
pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// On top of debootstrap's minbase: systemd as /sbin/init, and D-Bus, which systemctl and
/// logind expect on a Debian system.
pub const PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus"];
/// Units a container has no use for, masked: no getty holding the console, no timers
/// waking up during a test.
pub const MASKED: &[&str] = &[
    "console-getty.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
];
/// Bumped when [`finish`] changes what it does to a fresh root.
const RECIPE: u32 = 1;

/// What a root must have been built from to be reused.
pub fn stamp() -> String {
    format!(
        "wirescope systemd root, recipe {RECIPE}\nsuite {SUITE}\nmirror {MIRROR}\nvariant \
         minbase\npackages {}\nmasked {}\n",
        PACKAGES.join(","),
        MASKED.join(",")
    )
}

/// A root ready to boot.
#[derive(Debug, Clone)]
pub struct Sysroot {
    pub root: PathBuf,
    /// Whether this call built it (false: the cached one was current).
    pub built: bool,
    pub took: Duration,
}

/// `target/systemd-root`.
pub fn cache_dir() -> Result<PathBuf> {
    Ok(crate::build::target_dir()?.join("systemd-root"))
}

/// The cached root, built first when missing or out of date.
pub fn ensure() -> Result<Sysroot> {
    ensure_in(&cache_dir()?)
}

/// Whether `cache` holds a complete root built from [`stamp`].
pub fn is_current(cache: &Path) -> bool {
    fs::read_to_string(cache.join("stamp")).is_ok_and(|s| s == stamp())
        && cache.join("root/usr/lib/systemd/systemd").is_file()
}

/// Whether [`ensure`] can work here: the root is cached, or root and debootstrap are there
/// to build it.
pub fn prerequisites() -> Result<()> {
    let cache = cache_dir()?;
    if is_current(&cache) {
        return Ok(());
    }
    build_prerequisites(&cache)
}

fn build_prerequisites(cache: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "building the systemd root in {} needs root (debootstrap): run `cargo xtask setup` \
             as root",
            cache.display()
        );
    }
    if !crate::lab::on_path("debootstrap") {
        bail!(
            "debootstrap is not installed, so the systemd root cannot be built: `cargo xtask \
             setup` (or `apt-get install debootstrap`)"
        );
    }
    Ok(())
}

/// [`ensure`] with the cache in `cache`.
pub fn ensure_in(cache: &Path) -> Result<Sysroot> {
    let start = Instant::now();
    let root = cache.join("root");
    if is_current(cache) {
        return Ok(Sysroot {
            root,
            built: false,
            took: start.elapsed(),
        });
    }
    build_prerequisites(cache)?;
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock_path = cache.join("lock");
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    // Another process may have built it while this one waited for the lock.
    if is_current(cache) {
        return Ok(Sysroot {
            root,
            built: false,
            took: start.elapsed(),
        });
    }
    let stamp_path = cache.join("stamp");
    remove_if_present(&stamp_path)?;
    let new = cache.join("root.new");
    remove_if_present(&new)?;
    println!(
        "sysroot: debootstrap {SUITE} with {} into {} (about 80 s, once)",
        PACKAGES.join(","),
        new.display()
    );
    let log_path = cache.join("debootstrap.log");
    let log = crate::cmd::new_file(&log_path)?;
    let status = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&new)
        .arg(MIRROR)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running debootstrap")?;
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "debootstrap {SUITE} into {} failed ({status}); is {MIRROR} reachable? Its log \
             ({}) ends:\n{}",
            new.display(),
            log_path.display(),
            tail.join("\n")
        );
    }
    finish(&new)?;
    remove_if_present(&root)?;
    fs::rename(&new, &root)
        .with_context(|| format!("renaming {} to {}", new.display(), root.display()))?;
    fs::write(&stamp_path, stamp()).with_context(|| format!("writing {}", stamp_path.display()))?;
    let took = start.elapsed();
    println!(
        "sysroot: built {} in {:.0} s",
        root.display(),
        took.as_secs_f64()
    );
    Ok(Sysroot {
        root,
        built: true,
        took,
    })
}

/// What a fresh debootstrap root needs before it is booted: [`MASKED`] masked, the
/// downloaded packages removed (about 60 MB nobody reads again).
fn finish(root: &Path) -> Result<()> {
    let units = root.join("etc/systemd/system");
    fs::create_dir_all(&units).with_context(|| format!("creating {}", units.display()))?;
    for unit in MASKED {
        let link = units.join(unit);
        remove_if_present(&link)?;
        std::os::unix::fs::symlink("/dev/null", &link)
            .with_context(|| format!("masking {unit} in {}", root.display()))?;
    }
    let archives = root.join("var/cache/apt/archives");
    if let Ok(entries) = fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    res.with_context(|| format!("removing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("wirescope-sysroot-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn stamp_names_everything_the_root_is_built_from() {
        let s = stamp();
        assert!(s.contains("suite bookworm\n"), "{s}");
        assert!(s.contains("packages systemd,systemd-sysv,dbus\n"), "{s}");
        assert!(s.contains("masked console-getty.service,"), "{s}");
        assert!(s.contains(&format!("recipe {RECIPE}\n")), "{s}");
    }

    #[test]
    fn a_root_is_current_only_with_its_stamp_and_systemd() {
        let d = scratch("current");
        assert!(!is_current(&d), "empty");
        fs::create_dir_all(d.join("root/usr/lib/systemd")).unwrap();
        fs::write(d.join("root/usr/lib/systemd/systemd"), b"").unwrap();
        assert!(!is_current(&d), "no stamp: an interrupted build");
        fs::write(d.join("stamp"), "wirescope systemd root, recipe 0\n").unwrap();
        assert!(!is_current(&d), "another recipe's stamp");
        fs::write(d.join("stamp"), stamp()).unwrap();
        assert!(is_current(&d));
        fs::remove_file(d.join("root/usr/lib/systemd/systemd")).unwrap();
        assert!(!is_current(&d), "stamp without systemd");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn finish_masks_units_and_drops_downloaded_packages() {
        let d = scratch("finish");
        fs::create_dir_all(d.join("var/cache/apt/archives/partial")).unwrap();
        fs::write(d.join("var/cache/apt/archives/systemd_252_amd64.deb"), b"x").unwrap();
        fs::write(d.join("var/cache/apt/archives/lock"), b"").unwrap();
        finish(&d).unwrap();
        for unit in MASKED {
            let link = d.join("etc/systemd/system").join(unit);
            assert_eq!(
                fs::read_link(&link).unwrap(),
                Path::new("/dev/null"),
                "{unit}"
            );
        }
        assert!(
            !d.join("var/cache/apt/archives/systemd_252_amd64.deb")
                .exists()
        );
        assert!(d.join("var/cache/apt/archives/lock").exists());
        // Idempotent: finishing twice works.
        finish(&d).unwrap();
        let _ = fs::remove_dir_all(&d);
    }
}
