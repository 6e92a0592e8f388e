//! `--web.config.file` at work: TLS (rustls, ring) and HTTP basic auth with bcrypt hashes,
//! as the Prometheus exporter-toolkit does them.
//!
//! - TLS: `cert_file` (a PEM chain, leaf first) and `key_file` (PEM, PKCS#8, PKCS#1 or
//!   SEC1) are read once at start; `min_version`/`max_version` pick among TLS 1.2 and 1.3
//!   (rustls has nothing older: a minimum of TLS10 or TLS11 means TLS 1.2). Client
//!   certificates: `RequireAndVerifyClientCert` and `VerifyClientCertIfGiven` against
//!   `client_ca_file`; the two modes that take a certificate without verifying it are
//!   refused. A plain-HTTP request to a TLS listener gets a 400 and the connection closes.
//! - Basic auth: every path needs a user of `basic_auth_users` and its password; a request
//!   without them, or with wrong ones, gets 401 with `WWW-Authenticate: Basic`. bcrypt runs
//!   on the blocking pool, one at a time, so a flood of wrong passwords takes one core and
//!   never both; an unknown user costs the same bcrypt as a known one. Successful checks are
//!   remembered for [`CACHE_TTL`] (keyed by a SHA-256 of user, hash and password, at most
//!   [`CACHE_MAX`] of them) so a scraper does not pay bcrypt on every scrape and does not
//!   queue behind such a flood.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use rustls::{
    RootCertStore, ServerConfig, SupportedProtocolVersion,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{TlsConfig, WebConfig};

/// Remembered successful logins; the set is emptied when full.
pub const CACHE_MAX: usize = 256;
/// How long a successful login is remembered: long past any scrape interval, short enough
/// that a password removed from the file stops working soon after the file is re-read.
pub const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(300);
/// bcrypt checks at once.
const BCRYPT_AT_ONCE: usize = 1;

/// What the server enforces: TLS and/or basic auth, each optional.
#[derive(Clone, Default)]
pub struct WebSecurity {
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Option<Arc<BasicAuth>>,
}

impl std::fmt::Debug for WebSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSecurity")
            .field("tls", &self.tls.is_some())
            .field("auth_users", &self.auth.as_ref().map(|a| a.users.len()))
            .finish()
    }
}

impl WebSecurity {
    /// Builds what `cfg` asks for; an error names the file or value at fault.
    pub fn from_config(cfg: &WebConfig) -> Result<WebSecurity, String> {
        let tls = cfg
            .tls
            .as_ref()
            .map(|t| server_config(t).map(Arc::new))
            .transpose()?;
        let auth = (!cfg.basic_auth_users.is_empty())
            .then(|| BasicAuth::new(cfg.basic_auth_users.clone()).map(Arc::new))
            .transpose()?;
        Ok(WebSecurity { tls, auth })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// exporter-toolkit's version names, in order; rustls has only the last two.
fn version_rank(v: &str) -> Option<u8> {
    match v {
        "TLS10" => Some(0),
        "TLS11" => Some(1),
        "TLS12" => Some(2),
        "TLS13" => Some(3),
        _ => None,
    }
}

/// The rustls server configuration for `t`: certificate chain and key read and checked to
/// belong together, protocol versions, client certificate verification.
pub fn server_config(t: &TlsConfig) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .map_err(|e| format!("cert_file {}: {e}", t.cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert_file {}: {e}", t.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            t.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|e| {
        format!(
            "key_file {}: {e} (a PEM private key is expected: PKCS#8, PKCS#1 or SEC1)",
            t.key_file.display()
        )
    })?;

    let min = t.min_version.as_deref().map_or(Some(2), version_rank);
    let max = t.max_version.as_deref().map_or(Some(3), version_rank);
    let (Some(min), Some(max)) = (min, max) else {
        return Err("min_version/max_version: accepted: TLS10, TLS11, TLS12, TLS13".into());
    };
    let versions: Vec<&'static SupportedProtocolVersion> = [
        (2u8, &rustls::version::TLS12),
        (3u8, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(r, _)| (min..=max).contains(r))
    .map(|(_, v)| v)
    .collect();
    if versions.is_empty() {
        return Err(format!(
            "min_version {} / max_version {} leave no TLS version this agent speaks (TLS12 and TLS13)",
            t.min_version.as_deref().unwrap_or("TLS12"),
            t.max_version.as_deref().unwrap_or("TLS13"),
        ));
    }

    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match t.client_auth_type.as_str() {
        "NoClientCert" => builder.with_no_client_auth(),
        kind @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven") => {
            let Some(ca) = &t.client_ca_file else {
                return Err(format!("client_auth_type {kind} needs client_ca_file"));
            };
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "client_ca_file {}: no PEM certificate in it",
                    ca.display()
                ));
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if kind == "VerifyClientCertIfGiven" {
                v = v.allow_unauthenticated();
            }
            let v = v
                .build()
                .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
        other => {
            return Err(format!(
                "client_auth_type {other} (a client certificate taken without verification) is not supported; accepted: NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"
            ));
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "cert_file {} and key_file {}: {e} (does the key belong to the certificate?)",
            t.cert_file.display(),
            t.key_file.display()
        )
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Basic auth against bcrypt hashes.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// Checked against when the user is unknown, so the answer takes as long as for a known
    /// user with a wrong password.
    dummy: String,
    ok_cache: Mutex<HashMap<[u8; 32], std::time::Instant>>,
    gate: Semaphore,
}

impl BasicAuth {
    pub fn new(users: BTreeMap<String, String>) -> Result<BasicAuth, String> {
        // The dummy has the cost of the most expensive user's hash, so timing tells nothing.
        let cost = users
            .values()
            .filter_map(|h| h.get(4..6).and_then(|c| c.parse::<u32>().ok()))
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST)
            .clamp(bcrypt::DEFAULT_COST.min(4), 31);
        let dummy = bcrypt::hash("wirescope: no such user", cost)
            .map_err(|e| format!("basic_auth_users: {e}"))?;
        Ok(BasicAuth {
            users,
            dummy,
            ok_cache: Mutex::new(HashMap::new()),
            gate: Semaphore::new(BCRYPT_AT_ONCE),
        })
    }

    /// Whether `authorization` (the request's Authorization header, if any) names a user
    /// and its password.
    pub async fn check(self: &Arc<Self>, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let (known, hash) = match self.users.get(&user) {
            Some(h) => (true, h.clone()),
            None => (false, self.dummy.clone()),
        };
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(user.as_bytes());
            h.update([0]);
            h.update(hash.as_bytes());
            h.update([0]);
            h.update(&password);
            h.finalize().into()
        };
        if known
            && self
                .ok_cache
                .lock()
                .is_ok_and(|c| c.get(&key).is_some_and(|at| at.elapsed() < CACHE_TTL))
        {
            return true;
        }
        let Ok(_permit) = self.gate.acquire().await else {
            return false;
        };
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        let ok = ok && known;
        if ok && let Ok(mut c) = self.ok_cache.lock() {
            if c.len() >= CACHE_MAX {
                c.retain(|_, at| at.elapsed() < CACHE_TTL);
                if c.len() >= CACHE_MAX {
                    c.clear();
                }
            }
            c.insert(key, std::time::Instant::now());
        }
        ok
    }

    /// Forgets every remembered login (tests: as if CACHE_TTL had passed).
    #[cfg(test)]
    fn age_cache(&self, by: std::time::Duration) {
        if let Ok(mut c) = self.ok_cache.lock() {
            for at in c.values_mut() {
                *at = at.checked_sub(by).unwrap_or(*at);
            }
        }
    }
}

/// `Basic base64(user:password)` -> (user, password bytes). The user must be UTF-8 (the
/// config's keys are); the password may be any bytes.
fn parse_basic(h: &[u8]) -> Option<(String, Vec<u8>)> {
    let h = std::str::from_utf8(h).ok()?.trim();
    let (scheme, rest) = h.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let colon = raw.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(raw[..colon].to_vec()).ok()?;
    Some((user, raw[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_parsing() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            parse_basic(format!("Basic {}", b64("alice:s3cr:et")).as_bytes()),
            Some(("alice".into(), b"s3cr:et".to_vec()))
        );
        assert_eq!(
            parse_basic(format!("basic  {}", b64("bob:")).as_bytes()),
            Some(("bob".into(), vec![]))
        );
        assert_eq!(parse_basic(b"Bearer abc"), None);
        assert_eq!(parse_basic(b"Basic !!!"), None);
        assert_eq!(
            parse_basic(format!("Basic {}", b64("nocolon")).as_bytes()),
            None
        );
        assert_eq!(parse_basic(b"Basic"), None);
    }

    #[tokio::test]
    async fn bcrypt_users() {
        let hash = bcrypt::hash("right", 4).unwrap();
        let auth = Arc::new(BasicAuth::new(BTreeMap::from([("alice".to_string(), hash)])).unwrap());
        let hdr = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        assert!(auth.check(Some(hdr("alice", "right").as_bytes())).await);
        // Again, from the cache.
        assert!(auth.check(Some(hdr("alice", "right").as_bytes())).await);
        assert!(!auth.check(Some(hdr("alice", "wrong").as_bytes())).await);
        assert!(!auth.check(Some(hdr("mallory", "right").as_bytes())).await);
        assert!(
            !auth
                .check(Some(hdr("mallory", "wirescope: no such user").as_bytes()))
                .await,
            "the dummy hash's password logs nobody in"
        );
        assert!(!auth.check(None).await);
    }

    /// While the one bcrypt permit is taken (a flood of wrong passwords), a remembered login
    /// is answered at once and a new one waits; past CACHE_TTL the remembered one waits too.
    #[tokio::test]
    async fn remembered_logins_do_not_queue_behind_bcrypt() {
        let hash = bcrypt::hash("right", 4).unwrap();
        let auth = Arc::new(
            BasicAuth::new(BTreeMap::from([
                ("alice".to_string(), hash.clone()),
                ("bob".to_string(), hash),
            ]))
            .unwrap(),
        );
        let hdr = |u: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:right"))
            )
        };
        assert!(auth.check(Some(hdr("alice").as_bytes())).await);
        assert_eq!(auth.gate.available_permits(), BCRYPT_AT_ONCE);
        let flood = auth.gate.acquire().await.unwrap();
        let quick = std::time::Duration::from_millis(200);
        let (a, b) = (hdr("alice"), hdr("bob"));
        let cached = tokio::time::timeout(quick, auth.check(Some(a.as_bytes()))).await;
        assert_eq!(cached.ok(), Some(true), "remembered: no bcrypt");
        let fresh = tokio::time::timeout(quick, auth.check(Some(b.as_bytes()))).await;
        assert!(fresh.is_err(), "a new login waits for the bcrypt permit");
        auth.age_cache(CACHE_TTL);
        let expired = tokio::time::timeout(quick, auth.check(Some(a.as_bytes()))).await;
        assert!(
            expired.is_err(),
            "past CACHE_TTL the login is checked again"
        );
        drop(flood);
        assert!(auth.check(Some(a.as_bytes())).await);
    }
}
