//! The `peer` label of WireGuard traffic whose endpoint matches no known peer: the address
//! itself when `--export-endpoints` is set, otherwise a salted hash that is stable across
//! restarts but useless for recovering the address.

use std::{
    fs,
    io::{self, Write},
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use sha2::{Digest, Sha256};

const SALT_FILE: &str = "endpoint-salt";

#[derive(Clone)]
pub struct EndpointLabeler {
    export: bool,
    salt: [u8; 32],
}

impl std::fmt::Debug for EndpointLabeler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointLabeler")
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SaltError {
    #[error("state directory {dir}: {source} (create it or pass another with --state-dir)")]
    Dir { dir: String, source: io::Error },
    #[error("salt file {path}: {source} (delete it to have a new one made)")]
    File { path: String, source: io::Error },
    #[error("salt file {path} holds {len} bytes, not 32 (delete it to have a new one made)")]
    Size { path: String, len: usize },
    #[error("no randomness for a new salt: {0}")]
    Random(String),
}

impl EndpointLabeler {
    /// Reads the salt from `state_dir`, making one the first time (mode 0600).
    pub fn load(state_dir: &Path, export: bool) -> Result<Self, SaltError> {
        let dir = state_dir.display().to_string();
        fs::create_dir_all(state_dir).map_err(|source| SaltError::Dir {
            dir: dir.clone(),
            source,
        })?;
        let _ = fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700));
        let path = state_dir.join(SALT_FILE);
        let p = path.display().to_string();
        match fs::read(&path) {
            Ok(bytes) => {
                let salt: [u8; 32] = bytes.as_slice().try_into().map_err(|_| SaltError::Size {
                    path: p,
                    len: bytes.len(),
                })?;
                Ok(Self { export, salt })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut salt = [0u8; 32];
                getrandom::fill(&mut salt).map_err(|e| SaltError::Random(e.to_string()))?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|source| SaltError::File {
                        path: p.clone(),
                        source,
                    })?;
                f.write_all(&salt)
                    .map_err(|source| SaltError::File { path: p, source })?;
                Ok(Self { export, salt })
            }
            Err(source) => Err(SaltError::File { path: p, source }),
        }
    }

    pub fn with_salt(salt: [u8; 32], export: bool) -> Self {
        Self { export, salt }
    }

    pub fn label(&self, addr: SocketAddr) -> String {
        let text = addr.to_string();
        if self.export {
            return format!("endpoint:{text}");
        }
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(text.as_bytes());
        let digest = h.finalize();
        format!("endpoint:{}", &hex::encode(digest)[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_label_is_stable_salted_and_12_hex() {
        let a: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        let l1 = EndpointLabeler::with_salt([1; 32], false).label(a);
        let l2 = EndpointLabeler::with_salt([1; 32], false).label(a);
        let l3 = EndpointLabeler::with_salt([2; 32], false).label(a);
        assert_eq!(l1, l2);
        assert_ne!(l1, l3);
        let hex = l1.strip_prefix("endpoint:").unwrap();
        assert_eq!(hex.len(), 12);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(!l1.contains("192.0.2.7"));
    }

    #[test]
    fn exported_label_is_the_address() {
        let a: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(
            EndpointLabeler::with_salt([0; 32], true).label(a),
            "endpoint:[2001:db8::1]:51820"
        );
    }

    #[test]
    fn salt_persists_across_loads() {
        let dir = std::env::temp_dir().join(format!("wirescope-salt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        let l1 = EndpointLabeler::load(&dir, false).unwrap().label(a);
        let l2 = EndpointLabeler::load(&dir, false).unwrap().label(a);
        assert_eq!(l1, l2);
        fs::write(dir.join(SALT_FILE), b"short").unwrap();
        assert!(matches!(
            EndpointLabeler::load(&dir, false),
            Err(SaltError::Size { len: 5, .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
