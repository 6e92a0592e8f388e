//! Key files: WireGuard configurations and keys readable by group or others.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use super::Finding;

/// Whether a mode lets group or others read or write the file.
pub fn mode_too_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

pub(super) fn check_key_files(f: &mut Vec<Finding>, dir: &Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            f.push(Finding::info(
                "key_files",
                format!("{}: {e} (nothing to check)", dir.display()),
            ));
            return;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf" || x == "key"))
        .collect();
    files.sort();
    let mut bad = 0;
    for p in &files {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode_too_open(mode) {
            bad += 1;
            f.push(Finding::problem(
                "key_files",
                format!(
                    "{} has mode {mode:04o}: group or others can read its private key",
                    p.display()
                ),
                format!("chmod 600 {}", shell_quote(&p.display().to_string())),
            ));
        }
    }
    if bad == 0 {
        f.push(Finding::ok(
            "key_files",
            format!(
                "{}: {} file{} readable by the owner only",
                dir.display(),
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
        ));
    }
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert!(!mode_too_open(0o600));
        assert!(!mode_too_open(0o400));
        assert!(mode_too_open(0o644));
        assert!(mode_too_open(0o640));
        assert!(mode_too_open(0o602));
        assert_eq!(
            shell_quote("/etc/wireguard/wg0.conf"),
            "/etc/wireguard/wg0.conf"
        );
        assert_eq!(shell_quote("/tmp/a b'c"), "'/tmp/a b'\\''c'");
    }
}
