//! The .deb: [`crate::contents::files`] staged in a directory tree with DEBIAN/ beside it
//! (control, conffiles, md5sums, the maintainer scripts of deploy/debian/), then
//! `dpkg-deb --build`. Plain dpkg-deb rather than cargo-deb: nothing to compile or pin
//! beyond dpkg itself, the file list is the one table in [`crate::contents`], which the
//! install test reads as well, and the generated files come from this crate, which
//! cargo-deb's asset list could only name once they exist.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    PACKAGE, cmd,
    contents::{self, File, Source},
};

/// How dpkg-deb compresses data.tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// dpkg-deb's default: smallest, slowest.
    Xz,
    /// Much faster on a large debug binary (the install test).
    Gzip,
}

impl Compression {
    fn flag(self) -> &'static str {
        match self {
            Compression::Xz => "-Zxz",
            Compression::Gzip => "-Zgzip",
        }
    }
}

/// The maintainer scripts, in DEBIAN/ with mode 0755.
pub const SCRIPTS: &[(&str, &str)] = &[
    ("postinst", include_str!("../../deploy/debian/postinst")),
    ("prerm", include_str!("../../deploy/debian/prerm")),
    ("postrm", include_str!("../../deploy/debian/postrm")),
];

const MAINTAINER: &str = "wirescope contributors <packaging@wirescope.invalid>";

const DESCRIPTION: &str = "\
eBPF agent and Prometheus exporter for WireGuard tunnels
 wirescope hooks TC programs to WireGuard interfaces and to the interfaces under them, and
 counts per peer the inner traffic and every WireGuard message on the wire: the exact
 encapsulation overhead of each hop (Mullvad multihop included), handshake round trips,
 loss, reordering, fragments, leaks and kernel drops. It reads the peers from kernel
 WireGuard over netlink or from userspace implementations' UAPI sockets, and serves
 Prometheus metrics on 127.0.0.1:9586, its peer counters drop-in compatible with
 prometheus_wireguard_exporter.";

/// The agent's version (`0.1.0` of `0.1.0 (revision ..., built ...)`).
pub fn version() -> &'static str {
    let v = wirescope::config::cli::VERSION;
    v.split_once(' ').map_or(v, |(v, _)| v)
}

/// `dpkg --print-architecture`.
pub fn architecture() -> Result<String> {
    let out = cmd::run(Command::new("dpkg").arg("--print-architecture"), None)
        .context("asking dpkg for the architecture: is this Debian?")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `wirescope_VERSION_ARCH.deb`.
pub fn file_name(arch: &str) -> String {
    format!("{PACKAGE}_{}_{arch}.deb", version())
}

/// Builds the package of `binary` into `out_dir`; returns the .deb's path.
pub fn build(binary: &Path, out_dir: &Path, compression: Compression) -> Result<PathBuf> {
    if !binary.is_file() {
        bail!(
            "the agent binary {} does not exist: build it first (`cargo build --release -p \
             wirescope`; `cargo xtask package` does both)",
            binary.display()
        );
    }
    let arch = architecture()?;
    let files = contents::files(binary)?;
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stage = out_dir.join(format!("{PACKAGE}_{}_{arch}", version()));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for f in &files {
        stage_file(&stage, f)?;
    }
    let depends = shlib_depends(binary, out_dir)?;
    let control = control(&arch, installed_size_kib(&stage)?, &depends);
    let debian = stage.join("DEBIAN");
    write(&debian.join("control"), control.as_bytes(), 0o644)?;
    let conffiles: String = files
        .iter()
        .filter(|f| f.conffile)
        .map(|f| format!("{}\n", f.path))
        .collect();
    write(&debian.join("conffiles"), conffiles.as_bytes(), 0o644)?;
    write(&debian.join("md5sums"), &md5sums(&stage, &files)?, 0o644)?;
    for (name, text) in SCRIPTS {
        write(&debian.join(name), text.as_bytes(), 0o755)?;
    }
    let deb = out_dir.join(file_name(&arch));
    let mut dpkg_deb = Command::new("dpkg-deb");
    dpkg_deb
        .arg("--root-owner-group")
        .arg(compression.flag())
        .arg("--build")
        .arg(&stage)
        .arg(&deb);
    cmd::run(&mut dpkg_deb, None)?;
    fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    Ok(deb)
}

/// DEBIAN/control.
pub fn control(arch: &str, installed_kib: u64, depends: &str) -> String {
    format!(
        "Package: {PACKAGE}\nVersion: {}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\nDepends: {depends}\nSection: net\nPriority: \
         optional\nDescription: {DESCRIPTION}\n",
        version()
    )
}

fn stage_file(stage: &Path, f: &File) -> Result<()> {
    let dest = stage.join(f.path.trim_start_matches('/'));
    match &f.source {
        Source::Bytes(b) => write(&dest, b, f.mode),
        Source::Binary(src) => {
            create_parents(&dest)?;
            fs::copy(src, &dest)
                .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
            chmod(&dest, f.mode)
        }
    }
}

/// Parent directories with mode 0755 whatever the umask, as dpkg-deb records them.
fn create_parents(path: &Path) -> Result<()> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    if parent.is_dir() {
        return Ok(());
    }
    create_parents(parent)?;
    fs::create_dir(parent).with_context(|| format!("creating {}", parent.display()))?;
    chmod(parent, 0o755)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    create_parents(path)?;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    chmod(path, mode)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Installed-Size as dpkg-gencontrol computes it: each file's size in KiB rounded up, and
/// 1 for each directory.
fn installed_size_kib(dir: &Path) -> Result<u64> {
    let mut kib = 0;
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_dir() {
            kib += 1 + installed_size_kib(&e.path())?;
        } else {
            kib += meta.len().div_ceil(1024);
        }
    }
    Ok(kib)
}

/// DEBIAN/md5sums of the files that are not conffiles (dpkg keeps conffiles' sums in its
/// status instead), as `md5sum` prints them with paths relative to the root.
fn md5sums(stage: &Path, files: &[File]) -> Result<Vec<u8>> {
    let rel: Vec<&str> = files
        .iter()
        .filter(|f| !f.conffile)
        .map(|f| f.path.trim_start_matches('/'))
        .collect();
    let out = cmd::run(Command::new("md5sum").args(&rel).current_dir(stage), None)
        .context("md5sum of the staged files")?;
    Ok(out.stdout)
}

/// The Depends line for the libraries `binary` links (libc6, libgcc-s1), from
/// dpkg-shlibdeps, which needs a debian/control to run in: a scratch one in `scratch`.
fn shlib_depends(binary: &Path, scratch: &Path) -> Result<String> {
    let dir = scratch.join("shlibdeps");
    write(
        &dir.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n").as_bytes(),
        0o644,
    )?;
    let bin =
        fs::canonicalize(binary).with_context(|| format!("resolving {}", binary.display()))?;
    let mut shlibdeps = Command::new("dpkg-shlibdeps");
    shlibdeps
        .arg("-O")
        .arg(format!("-e{}", bin.display()))
        .current_dir(&dir);
    let out = cmd::run(&mut shlibdeps, None).context(
        "dpkg-shlibdeps (package dpkg-dev, which `cargo xtask setup` installs) computes the \
         library dependencies",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let depends = parse_shlibdeps(&text).with_context(|| {
        format!(
            "dpkg-shlibdeps printed no shlibs:Depends line for {}: {text}",
            bin.display()
        )
    })?;
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(depends)
}

/// `shlibs:Depends=libc6 (>= 2.34), libgcc-s1 (>= 4.2)` -> the list.
fn parse_shlibdeps(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(|d| d.trim().to_owned())
        .filter(|d| !d.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_names_the_package_version_and_dependencies() {
        let c = control("amd64", 12345, "libc6 (>= 2.34)");
        let fields: Vec<&str> = c
            .lines()
            .filter(|l| !l.starts_with(' '))
            .map(|l| l.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            fields,
            [
                "Package",
                "Version",
                "Architecture",
                "Maintainer",
                "Installed-Size",
                "Depends",
                "Section",
                "Priority",
                "Description"
            ]
        );
        assert!(c.starts_with(&format!(
            "Package: wirescope\nVersion: {}\nArchitecture: amd64\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(c.contains("\nInstalled-Size: 12345\nDepends: libc6 (>= 2.34)\n"));
        // Every description line after the synopsis is indented, none empty.
        assert!(
            c.lines()
                .skip_while(|l| !l.starts_with("Description:"))
                .skip(1)
                .all(|l| l.starts_with(' ') && l.len() > 1)
        );
        assert_eq!(
            file_name("amd64"),
            format!("wirescope_{}_amd64.deb", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn shlibdeps_output_is_read() {
        assert_eq!(
            parse_shlibdeps("shlibs:Depends=libc6 (>= 2.34), libgcc-s1 (>= 4.2)\n").as_deref(),
            Some("libc6 (>= 2.34), libgcc-s1 (>= 4.2)")
        );
        assert_eq!(parse_shlibdeps("dpkg-shlibdeps: warning: x\n"), None);
        assert_eq!(parse_shlibdeps("shlibs:Depends=\n"), None);
    }

    #[test]
    fn a_missing_binary_is_named_with_the_fix() {
        let e = build(
            Path::new("/nonexistent/wirescope"),
            &std::env::temp_dir(),
            Compression::Gzip,
        )
        .expect_err("no binary")
        .to_string();
        assert_eq!(
            e,
            "the agent binary /nonexistent/wirescope does not exist: build it first (`cargo \
             build --release -p wirescope`; `cargo xtask package` does both)"
        );
    }

    #[test]
    fn installed_size_counts_kib_rounded_up_and_directories() {
        let d = std::env::temp_dir().join(format!("wirescope-isize-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        write(&d.join("a/b"), &[0; 1025], 0o644).expect("a/b");
        write(&d.join("c"), &[0; 1], 0o644).expect("c");
        write(&d.join("e"), &[], 0o644).expect("e");
        // a/ (1) + a/b (2) + c (1) + e (0)
        assert_eq!(installed_size_kib(&d).expect("size"), 4);
        let _ = fs::remove_dir_all(&d);
    }
}
