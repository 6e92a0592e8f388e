//! Friendly peer names from wg-quick style files (`--wg-config`), the convention
//! prometheus_wireguard_exporter users already have in their configs:
//!
//! ```text
//! [Peer]
//! # friendly_name = laptop
//! PublicKey = mDxDGAVBTKDEfGUqmcNYb09lq8QouG6gXvOqIDzLmTQ=
//! AllowedIPs = 10.64.0.2/32
//! ```
//!
//! The comment may come anywhere in the peer's block. Section names and keys are matched
//! case-insensitively, as `wg` does; `[WireGuardPeer]` (systemd-networkd .netdev files) counts
//! as a peer block too, as it does for that exporter. Lines this module does not know are
//! ignored: these files are mainly for wg-quick, not for us.

use std::{
    collections::HashMap,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

use base64::Engine as _;

/// A config file bigger than this is not a wg-quick file (and may be a device or a pipe
/// given by mistake): refuse it rather than read it all.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FriendlyError {
    #[error("cannot read WireGuard config {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("WireGuard config {} is larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("WireGuard config {} is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error(
        "WireGuard config {}, line {line_no}: PublicKey {value:?} is not a base64 WireGuard key (44 characters)",
        path.display()
    )]
    BadKey {
        path: PathBuf,
        line_no: usize,
        value: String,
    },
}

/// Reads every file and merges their names; a key named in several files gets the name from
/// the last one.
pub fn load(paths: &[PathBuf]) -> Result<HashMap<String, String>, FriendlyError> {
    let mut names = HashMap::new();
    for path in paths {
        names.extend(load_file(path)?);
    }
    Ok(names)
}

/// Base64 public key -> friendly name, from one file.
pub fn load_file(path: &Path) -> Result<HashMap<String, String>, FriendlyError> {
    let read_err = |source| FriendlyError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(FriendlyError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| FriendlyError::NotUtf8 {
        path: path.to_owned(),
    })?;
    parse(&text).map_err(|(line_no, value)| FriendlyError::BadKey {
        path: path.to_owned(),
        line_no,
        value,
    })
}

/// Parses one file's text. The error is (line number, value) of a PublicKey that is not a
/// key: a typo there would silently lose the name, so it is reported instead.
pub fn parse(text: &str) -> Result<HashMap<String, String>, (usize, String)> {
    #[derive(Default)]
    struct Block {
        key: Option<String>,
        name: Option<String>,
    }
    let mut names = HashMap::new();
    let mut block: Option<Block> = None;
    let close = |block: Option<Block>, names: &mut HashMap<String, String>| {
        if let Some(Block {
            key: Some(key),
            name: Some(name),
        }) = block
        {
            names.insert(key, name);
        }
    };

    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            close(block.take(), &mut names);
            let section = line.trim_start_matches('[').trim_end_matches(']').trim();
            if section.eq_ignore_ascii_case("peer") || section.eq_ignore_ascii_case("wireguardpeer")
            {
                block = Some(Block::default());
            }
            continue;
        }
        let Some(b) = block.as_mut() else { continue };
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((k, v)) = comment.split_once('=')
                && k.trim() == "friendly_name"
            {
                let v = v.trim();
                if !v.is_empty() {
                    // Last one wins, as in prometheus_wireguard_exporter.
                    b.name = Some(v.to_owned());
                }
            }
            continue;
        }
        // `wg` strips everything after '#' on a line; base64 never contains one.
        let content = line.split('#').next().unwrap_or("");
        if let Some((k, v)) = content.split_once('=')
            && k.trim().eq_ignore_ascii_case("publickey")
        {
            // The key's own trailing '=' padding is part of the value: split at the first '='.
            let v = v.trim();
            if !is_wg_key(v) {
                return Err((idx + 1, v.to_owned()));
            }
            b.key = Some(v.to_owned());
        }
    }
    close(block, &mut names);
    Ok(names)
}

fn is_wg_key(s: &str) -> bool {
    s.len() == 44
        && base64::engine::general_purpose::STANDARD
            .decode(s)
            .is_ok_and(|k| k.len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "mDxDGAVBTKDEfGUqmcNYb09lq8QouG6gXvOqIDzLmTQ=";
    const K2: &str = "fcdwbwHNhMIN9lTT7avBhrH8oOl+7SQncENhL65WXyQ=";
    const K3: &str = "cffdg57ujukDb49QG0SRN/ZtT/9C/BXGTBUZYPW+rmI=";

    #[test]
    fn names_peers_in_any_order_within_their_block() {
        let text = format!(
            "[Interface]\n# friendly_name = not-a-peer\nPrivateKey = {K3}\nAddress = 10.0.0.1/24\n\n\
             [Peer]\n# friendly_name = laptop\nPublicKey = {K1}\nAllowedIPs = 10.0.0.2/32\n\n\
             [Peer]\nPublicKey={K2} # the phone\nAllowedIPs = 10.0.0.3/32\n  #friendly_name=phone with spaces  \n\n\
             [Peer]\nPublicKey = {K3}\n"
        );
        let names = parse(&text).unwrap();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[K1], "laptop");
        assert_eq!(names[K2], "phone with spaces");
    }

    #[test]
    fn section_and_key_case_and_networkd_blocks() {
        let text = format!(
            "[peer]\npublickey = {K1}\n# friendly_name = a\n[WireGuardPeer]\nPublicKey={K2}\n# friendly_name = b\n"
        );
        let names = parse(&text).unwrap();
        assert_eq!(names[K1], "a");
        assert_eq!(names[K2], "b");
    }

    #[test]
    fn a_name_does_not_leak_into_the_next_block() {
        let text = format!("[Peer]\n# friendly_name = orphan\n[Peer]\nPublicKey = {K1}\n");
        assert!(parse(&text).unwrap().is_empty());
    }

    #[test]
    fn unknown_lines_and_other_comments_are_ignored() {
        let text = format!(
            "garbage before any section\n[Peer]\nPublicKey = {K1}\nwhatever\n# other = x\n# no equals\n# friendly_name = ok\nPostUp = echo = hi\n"
        );
        let names = parse(&text).unwrap();
        assert_eq!(names.len(), 1);
        assert_eq!(names[K1], "ok");
    }

    #[test]
    fn last_name_wins_and_empty_names_are_skipped() {
        let text = format!(
            "[Peer]\n# friendly_name = one\n# friendly_name = two\n# friendly_name =\nPublicKey = {K1}\n"
        );
        assert_eq!(parse(&text).unwrap()[K1], "two");
    }

    #[test]
    fn a_bad_public_key_is_reported_with_its_line() {
        let text = "[Peer]\n# friendly_name = x\nPublicKey = not-a-key\n";
        assert_eq!(parse(text), Err((3, "not-a-key".to_owned())));
    }

    #[test]
    fn files_merge_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("wirescope-friendly-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.conf");
        let b = dir.join("b.conf");
        std::fs::write(
            &a,
            format!("[Peer]\nPublicKey = {K1}\n# friendly_name = from-a\n"),
        )
        .unwrap();
        std::fs::write(&b, format!("[Peer]\nPublicKey = {K1}\n# friendly_name = from-b\n[Peer]\nPublicKey = {K2}\n# friendly_name = two\n")).unwrap();
        let names = load(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(names[K1], "from-b");
        assert_eq!(names[K2], "two");

        let missing = dir.join("missing.conf");
        let err = load(&[a.clone(), missing.clone()]).unwrap_err();
        assert!(matches!(err, FriendlyError::Read { .. }));
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let bad = dir.join("bad.conf");
        std::fs::write(&bad, b"[Peer]\nPublicKey = \xff\xfe\n").unwrap();
        let err = load_file(&bad).unwrap_err();
        assert!(
            matches!(err, FriendlyError::NotUtf8 { .. }) && err.to_string().contains("bad.conf"),
            "{err}"
        );

        std::fs::write(&bad, "[Peer]\nPublicKey = short\n").unwrap();
        let err = load_file(&bad).unwrap_err();
        assert!(err.to_string().contains("bad.conf, line 2"), "{err}");

        let err = load_file(&dir).unwrap_err();
        assert!(
            matches!(err, FriendlyError::Read { .. }),
            "a directory: {err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
