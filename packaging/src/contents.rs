//! The packaging definition: every file of the Debian package, where it goes, its mode and
//! whether it is a conffile (kept on remove, asked about on upgrade, gone on purge). The
//! install test compares `dpkg -L wirescope` with [`expected_dpkg_list`] of this.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{config_file, generate};

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The agent binary being packaged.
    Binary(PathBuf),
    /// Bytes made here (generated, or a repository file compiled in).
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Absolute path on the installed system.
    pub path: String,
    pub mode: u32,
    pub conffile: bool,
    pub source: Source,
}

fn file(path: &str, mode: u32, bytes: impl Into<Vec<u8>>) -> File {
    File {
        path: path.to_owned(),
        mode,
        conffile: false,
        source: Source::Bytes(bytes.into()),
    }
}

fn conffile(path: &str, bytes: impl Into<Vec<u8>>) -> File {
    File {
        conffile: true,
        ..file(path, 0o644, bytes)
    }
}

/// Bookworm's place for packaged units (the /usr/lib move is trixie's).
pub const UNIT_PATH: &str = "/lib/systemd/system/wirescope.service";
pub const CONFIG_PATH: &str = "/etc/wirescope/wirescope.toml";
pub const DEFAULT_PATH: &str = "/etc/default/wirescope";
pub const SHARE_DIR: &str = "/usr/share/wirescope";
pub const MAN_DIR: &str = "/usr/share/man/man1";

/// deploy/ files shipped as they are, for Prometheus and Grafana to use from
/// /usr/share/wirescope (rules_test.yml finds rules.yml beside it).
const SHARED: &[(&str, &str)] = &[
    ("rules.yml", include_str!("../../deploy/rules.yml")),
    (
        "rules_test.yml",
        include_str!("../../deploy/rules_test.yml"),
    ),
    (
        "prometheus.yml",
        include_str!("../../deploy/prometheus.yml"),
    ),
    (
        "grafana-dashboard.json",
        include_str!("../../deploy/grafana-dashboard.json"),
    ),
];

/// Every file of the package for the agent binary `binary`, in path order.
pub fn files(binary: &Path) -> Result<Vec<File>> {
    let cmd = generate::command();
    let mut files = vec![
        File {
            path: "/usr/bin/wirescope".into(),
            mode: 0o755,
            conffile: false,
            source: Source::Binary(binary.to_owned()),
        },
        file(
            UNIT_PATH,
            0o644,
            generate::packaged_unit(generate::UNIT_SOURCE)?,
        ),
        conffile(
            CONFIG_PATH,
            config_file::generate().context("generating /etc/wirescope/wirescope.toml")?,
        ),
        conffile(DEFAULT_PATH, include_str!("../../deploy/debian/default")),
        file(
            "/usr/share/doc/wirescope/copyright",
            0o644,
            include_str!("../../deploy/debian/copyright"),
        ),
    ];
    for (name, text) in SHARED {
        files.push(file(&format!("{SHARE_DIR}/{name}"), 0o644, *text));
    }
    for page in generate::man_pages(cmd.clone())? {
        files.push(file(
            &format!("{MAN_DIR}/{}.gz", page.name),
            0o644,
            gzip(&page.roff)?,
        ));
    }
    for (shell, path) in generate::SHELLS {
        files.push(file(path, 0o644, generate::completion(&cmd, *shell)));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// What `dpkg -L` lists for a package of `files`: `/.`, every directory leading to a file,
/// and the files.
pub fn expected_dpkg_list(files: &[File]) -> BTreeSet<String> {
    let mut out = BTreeSet::from(["/.".to_owned()]);
    for f in files {
        let mut p = Path::new(&f.path);
        out.insert(f.path.clone());
        while let Some(parent) = p.parent() {
            if parent != Path::new("/") {
                out.insert(parent.display().to_string());
            }
            p = parent;
        }
    }
    out
}

/// `gzip -9n` (no name or time stamp in the header, so the bytes depend only on the page),
/// as Debian compresses man pages.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let out = crate::cmd::run(std::process::Command::new("gzip").arg("-9nc"), Some(data))
        .context("compressing a man page with gzip")?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The package's files, exactly: a change to the definition shows here.
    #[test]
    fn the_package_holds_exactly_these_files() {
        let files = files(Path::new("/nonexistent/wirescope")).expect("contents");
        let got: Vec<(&str, u32, bool)> = files
            .iter()
            .map(|f| (f.path.as_str(), f.mode, f.conffile))
            .collect();
        assert_eq!(
            got,
            [
                ("/etc/default/wirescope", 0o644, true),
                ("/etc/wirescope/wirescope.toml", 0o644, true),
                ("/lib/systemd/system/wirescope.service", 0o644, false),
                ("/usr/bin/wirescope", 0o755, false),
                (
                    "/usr/share/bash-completion/completions/wirescope",
                    0o644,
                    false
                ),
                ("/usr/share/doc/wirescope/copyright", 0o644, false),
                (
                    "/usr/share/fish/vendor_completions.d/wirescope.fish",
                    0o644,
                    false
                ),
                ("/usr/share/man/man1/wirescope-doctor.1.gz", 0o644, false),
                ("/usr/share/man/man1/wirescope-run.1.gz", 0o644, false),
                ("/usr/share/man/man1/wirescope-status.1.gz", 0o644, false),
                ("/usr/share/man/man1/wirescope.1.gz", 0o644, false),
                ("/usr/share/wirescope/grafana-dashboard.json", 0o644, false),
                ("/usr/share/wirescope/prometheus.yml", 0o644, false),
                ("/usr/share/wirescope/rules.yml", 0o644, false),
                ("/usr/share/wirescope/rules_test.yml", 0o644, false),
                ("/usr/share/zsh/vendor-completions/_wirescope", 0o644, false),
            ]
        );
        assert_eq!(
            files[3].source,
            Source::Binary("/nonexistent/wirescope".into())
        );
    }

    #[test]
    fn dpkg_lists_every_directory_leading_to_a_file() {
        let f = |p: &str| file(p, 0o644, "");
        let list = expected_dpkg_list(&[f("/usr/bin/wirescope"), f("/etc/default/wirescope")]);
        assert_eq!(
            list.into_iter().collect::<Vec<_>>(),
            [
                "/.",
                "/etc",
                "/etc/default",
                "/etc/default/wirescope",
                "/usr",
                "/usr/bin",
                "/usr/bin/wirescope"
            ]
        );
    }

    #[test]
    fn man_pages_are_gzipped_reproducibly() {
        let a = gzip(b".TH wirescope 1\n").expect("gzip");
        assert_eq!(&a[..2], &[0x1f, 0x8b], "gzip magic");
        // No time stamp (bytes 4..8 zero) and no file name (FLG without FNAME).
        assert_eq!(&a[3..8], &[0, 0, 0, 0, 0]);
        assert_eq!(gzip(b".TH wirescope 1\n").expect("gzip"), a);
    }
}
