//! `cargo xtask package`: the release agent, then its Debian package,
//! target/debian/wirescope_VERSION_ARCH.deb, built by the `packaging` crate (which links the
//! agent's command line for the man pages, completions and config file, so it cannot live in
//! xtask: xtask must build before `cargo xtask setup` has installed the eBPF toolchain).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::build::{self, cargo};

/// The package crate's name (packaging/).
pub const PACKAGING_CRATE: &str = "packaging";

/// `cargo` arguments that build the .deb of `target/release/wirescope` into
/// `target/debian`.
pub fn packaging_args(target: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["run", "--release", "--quiet", "-p", PACKAGING_CRATE, "--"]
        .map(OsString::from)
        .into();
    a.push("--binary".into());
    a.push(target.join("release").join(build::AGENT_PACKAGE).into());
    a.push("--out-dir".into());
    a.push(target.join("debian").into());
    a
}

/// Builds the release agent and its package; returns the .deb's path.
pub fn run() -> Result<PathBuf> {
    build::run()?;
    let target = build::target_dir()?;
    let mut cmd = cargo();
    cmd.args(packaging_args(&target));
    let desc = crate::cmd::describe(&cmd);
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{desc}`"))?;
    if !out.status.success() {
        bail!(
            "`{desc}` failed ({}): its message is above; `cargo xtask setup` installs \
             dpkg-dev (dpkg-shlibdeps) if that is what is missing",
            out.status
        );
    }
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    println!("package: {}", deb.display());
    Ok(deb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_is_built_from_the_release_binary_into_target_debian() {
        let a = packaging_args(Path::new("/w/target"));
        assert_eq!(
            a,
            [
                "run",
                "--release",
                "--quiet",
                "-p",
                "packaging",
                "--",
                "--binary",
                "/w/target/release/wirescope",
                "--out-dir",
                "/w/target/debian"
            ]
            .map(OsString::from)
        );
    }
}
