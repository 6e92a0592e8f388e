//! `--web.config.file` at work: TLS (rustls, ring), HTTP basic auth with bcrypt hashes,
//! response headers and a rate limit, as the Prometheus exporter-toolkit does them.
//!
//! - TLS: the certificate chain (leaf first) and key (PKCS#8, PKCS#1 or SEC1), from files
//!   or inline PEM; `min_version`/`max_version` pick among TLS 1.2 and 1.3 (rustls has
//!   nothing older: a minimum of TLS10 or TLS11 means TLS 1.2). Client certificates:
//!   `RequireAndVerifyClientCert` and `VerifyClientCertIfGiven` against the client CA; the
//!   two modes that take a certificate without verifying it are refused. A plain-HTTP
//!   request to a TLS listener gets a 400 and the connection closes.
//! - `cipher_suites`: Go's names mapped to rustls' suites ([`CIPHER_SUITES`]). Go applies
//!   the list to TLS 1.2 only; here the TLS 1.2 names restrict TLS 1.2 and the TLS 1.3
//!   names, if any, restrict TLS 1.3; a version none of whose suites is named keeps all of
//!   rustls' (so a list written for Go, which names TLS 1.2 suites, leaves TLS 1.3 as Go
//!   does). Go's CBC and RSA-key-exchange suites, which rustls does not implement, are
//!   refused by name with the list of those that work.
//! - `curve_preferences`: CurveP256, CurveP384 and X25519 map to rustls' key exchange
//!   groups, in the order given; CurveP521 (ring has no P-521) is refused by name.
//! - `prefer_server_cipher_suites` (the toolkit's default: true): the order of
//!   `cipher_suites` (or rustls' own) wins over the client's. rustls otherwise follows the
//!   client's order; Go has ignored this key since Go 1.17.
//! - Basic auth: every path needs a user of `basic_auth_users` and its password; a request
//!   without them, or with wrong ones, gets 401 with `WWW-Authenticate: Basic`. bcrypt runs
//!   on the blocking pool, one at a time, so a flood of wrong passwords takes one core and
//!   never both; an unknown user costs the same bcrypt as a known one. Successful checks are
//!   remembered for [`CACHE_TTL`] (keyed by a SHA-256 of user, hash and password, at most
//!   [`CACHE_MAX`] of them) so a scraper does not pay bcrypt on every scrape and does not
//!   queue behind such a flood.
//! - Headers: set on every response, 401 and 429 included.
//! - Rate limit: one [`TokenBucket`] for all requests, as `golang.org/x/time/rate` with
//!   `rate.Every(interval)` and `burst`: full at start, one token back per interval.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Instant,
};

use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use rustls::{
    RootCertStore, ServerConfig, SupportedCipherSuite, SupportedProtocolVersion,
    crypto::{CryptoProvider, SupportedKxGroup, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{RateLimit, TlsConfig, WebConfig};

/// Remembered successful logins; the set is emptied when full.
pub const CACHE_MAX: usize = 256;
/// How long a successful login is remembered: long past any scrape interval, short enough
/// that a password removed from the file stops working soon after the file is re-read.
pub const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(300);
/// bcrypt checks at once.
const BCRYPT_AT_ONCE: usize = 1;

/// What the server enforces: TLS, basic auth, headers and a rate limit, each optional.
#[derive(Clone, Default)]
pub struct WebSecurity {
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Option<Arc<BasicAuth>>,
    /// Added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub rate_limit: Option<Arc<TokenBucket>>,
}

impl std::fmt::Debug for WebSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSecurity")
            .field("tls", &self.tls.is_some())
            .field("auth_users", &self.auth.as_ref().map(|a| a.users.len()))
            .field("headers", &self.headers)
            .field("rate_limit", &self.rate_limit.as_ref().map(|r| r.limit))
            .finish()
    }
}

impl WebSecurity {
    /// Builds what `cfg` asks for; an error names the file or value at fault.
    pub fn from_config(cfg: &WebConfig) -> Result<WebSecurity, String> {
        Self::from_config_after(cfg, &WebSecurity::default())
    }

    /// The same, for a re-read file: what has not changed is kept from `old` (remembered
    /// logins, and the rate limit's tokens, so rewriting the file does not refill them).
    pub fn from_config_after(cfg: &WebConfig, old: &WebSecurity) -> Result<WebSecurity, String> {
        let tls = cfg
            .tls
            .as_ref()
            .map(|t| server_config(t).map(Arc::new))
            .transpose()?;
        let auth = match &old.auth {
            _ if cfg.basic_auth_users.is_empty() => None,
            Some(a) if a.users == cfg.basic_auth_users => Some(a.clone()),
            _ => Some(Arc::new(BasicAuth::new(cfg.basic_auth_users.clone())?)),
        };
        let mut headers = Vec::with_capacity(cfg.headers.len());
        for (name, value) in &cfg.headers {
            let n = HeaderName::try_from(name.as_str())
                .map_err(|e| format!("http_server_config.headers: {name}: {e}"))?;
            let v = HeaderValue::try_from(value.as_str())
                .map_err(|e| format!("http_server_config.headers: {name}: {e}"))?;
            headers.push((n, v));
        }
        let rate_limit = match (cfg.rate_limit, &old.rate_limit) {
            (None, _) => None,
            (Some(l), Some(b)) if b.limit == l => Some(b.clone()),
            (Some(l), _) => Some(Arc::new(TokenBucket::new(l))),
        };
        Ok(WebSecurity {
            tls,
            auth,
            headers,
            rate_limit,
        })
    }
}

/// `golang.org/x/time/rate`'s limiter as the toolkit uses it (`Allow()` only): up to
/// `burst` tokens, one back every `interval`, a request takes one or gets 429. Counted in
/// whole nanoseconds of credit so that the arithmetic is exact.
#[derive(Debug)]
pub struct TokenBucket {
    pub limit: RateLimit,
    /// (credit in ns, when it was last updated): a token is `interval` of credit.
    state: Mutex<(u128, Instant)>,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> TokenBucket {
        let full = limit.interval.as_nanos() * u128::from(limit.burst);
        TokenBucket {
            limit,
            state: Mutex::new((full, Instant::now())),
        }
    }

    /// Whether a request arriving now may pass.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// Whether a request arriving at `now` may pass (takes its token if so).
    pub fn allow_at(&self, now: Instant) -> bool {
        let per = self.limit.interval.as_nanos().max(1);
        let full = per * u128::from(self.limit.burst);
        let Ok(mut st) = self.state.lock() else {
            return true;
        };
        let (credit, at) = *st;
        let credit = (credit + now.saturating_duration_since(at).as_nanos()).min(full);
        // An earlier `now` (two requests racing) leaves the clock where it is.
        let at = at.max(now);
        if credit >= per {
            *st = (credit - per, at);
            true
        } else {
            *st = (credit, at);
            false
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
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

/// Go's cipher suite names (those of `tls.CipherSuites()`, which the toolkit accepts) that
/// rustls implements, and the suite each is.
pub const CIPHER_SUITES: &[(&str, SupportedCipherSuite)] = &[
    (
        "TLS_AES_128_GCM_SHA256",
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ),
    (
        "TLS_AES_256_GCM_SHA384",
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        ring::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// Go's other suite names (`tls.CipherSuites()` and `tls.InsecureCipherSuites()`): CBC,
/// RC4, 3DES and RSA key exchange, none of which rustls implements.
const GO_ONLY_CIPHER_SUITES: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// The toolkit's curve names that rustls (ring) has, and the group each is.
pub const CURVES: &[(&str, &dyn SupportedKxGroup)] = &[
    ("CurveP256", ring::kx_group::SECP256R1),
    ("CurveP384", ring::kx_group::SECP384R1),
    ("X25519", ring::kx_group::X25519),
];

/// The suite Go calls `name`, or why there is none.
pub fn cipher_suite(name: &str) -> Result<SupportedCipherSuite, String> {
    if let Some((_, s)) = CIPHER_SUITES.iter().find(|(n, _)| *n == name) {
        return Ok(*s);
    }
    let supported: Vec<&str> = CIPHER_SUITES.iter().map(|(n, _)| *n).collect();
    let why = if GO_ONLY_CIPHER_SUITES.contains(&name) {
        "is a Go cipher suite that rustls does not implement (CBC, RC4, 3DES or RSA key exchange)"
    } else {
        "is not a cipher suite name Go or rustls knows"
    };
    Err(format!(
        "cipher_suites: {name:?} {why}; supported: {}",
        supported.join(", ")
    ))
}

/// The key exchange group the toolkit calls `name`, or why there is none.
pub fn curve(name: &str) -> Result<&'static dyn SupportedKxGroup, String> {
    if let Some((_, g)) = CURVES.iter().find(|(n, _)| *n == name) {
        return Ok(*g);
    }
    let supported: Vec<&str> = CURVES.iter().map(|(n, _)| *n).collect();
    let why = if name == "CurveP521" {
        "is a Go curve that rustls (ring) does not implement"
    } else {
        "is not a curve name Go or rustls knows"
    };
    Err(format!(
        "curve_preferences: {name:?} {why}; supported: {}",
        supported.join(", ")
    ))
}

/// The crypto provider `t` asks for: its suites and curves in its order, rustls' defaults
/// for what it leaves out (see the module documentation for TLS 1.3).
fn provider_for(t: &TlsConfig) -> Result<CryptoProvider, String> {
    let mut p = ring::default_provider();
    if !t.cipher_suites.is_empty() {
        let named = t
            .cipher_suites
            .iter()
            .map(|n| cipher_suite(n))
            .collect::<Result<Vec<_>, _>>()?;
        let is13 = |s: &SupportedCipherSuite| matches!(s, SupportedCipherSuite::Tls13(_));
        let mut suites = Vec::new();
        for tls13 in [true, false] {
            let mine: Vec<_> = named.iter().filter(|s| is13(s) == tls13).copied().collect();
            if mine.is_empty() {
                suites.extend(p.cipher_suites.iter().filter(|s| is13(s) == tls13).copied());
            } else {
                for s in mine {
                    if !suites.contains(&s) {
                        suites.push(s);
                    }
                }
            }
        }
        p.cipher_suites = suites;
    }
    if !t.curve_preferences.is_empty() {
        let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
        for n in &t.curve_preferences {
            let g = curve(n)?;
            if !groups.iter().any(|h| h.name() == g.name()) {
                groups.push(g);
            }
        }
        p.kx_groups = groups;
    }
    Ok(p)
}

fn certs_of(pem: &crate::config::Pem, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = pem.read(key)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", pem.describe(key)))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            pem.describe(key)
        ));
    }
    Ok(certs)
}

/// The rustls server configuration for `t`: certificate chain and key read and checked to
/// belong together, protocol versions, suites and curves, client certificate verification.
pub fn server_config(t: &TlsConfig) -> Result<ServerConfig, String> {
    let certs = certs_of(&t.cert, "cert")?;
    let key_text = t.key.read("key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| {
        format!(
            "{}: {e} (a PEM private key is expected: PKCS#8, PKCS#1 or SEC1)",
            t.key.describe("key")
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

    let builder = ServerConfig::builder_with_provider(Arc::new(provider_for(t)?))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions with cipher_suites and curve_preferences: {e}"))?;
    let builder = match t.client_auth_type.as_str() {
        "NoClientCert" => builder.with_no_client_auth(),
        kind @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven") => {
            let Some(ca) = &t.client_ca else {
                return Err(format!(
                    "client_auth_type {kind} needs client_ca_file (or client_ca)"
                ));
            };
            let mut roots = RootCertStore::empty();
            for c in certs_of(ca, "client_ca")? {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", ca.describe("client_ca")))?;
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if kind == "VerifyClientCertIfGiven" {
                v = v.allow_unauthenticated();
            }
            let v = v
                .build()
                .map_err(|e| format!("{}: {e}", ca.describe("client_ca")))?;
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
            "{} and {}: {e} (does the key belong to the certificate?)",
            t.cert.describe("cert"),
            t.key.describe("key")
        )
    })?;
    cfg.ignore_client_order = t.prefer_server_cipher_suites;
    // HTTP/1.1 only: `http2` in the file is accepted, but this server has no HTTP/2.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Basic auth against bcrypt hashes.
pub struct BasicAuth {
    pub(crate) users: BTreeMap<String, String>,
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

    /// x/time/rate's Allow() with rate.Every(1s) and burst 3: three at once, the fourth
    /// refused; one back per whole second, never more than three.
    #[test]
    fn token_bucket_exact() {
        use std::time::Duration;
        let b = TokenBucket::new(RateLimit {
            interval: Duration::from_secs(1),
            burst: 3,
        });
        let t0 = b.state.lock().unwrap().1;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let run = |ms: u64, n: usize| (0..n).map(|_| b.allow_at(at(ms))).collect::<Vec<_>>();
        assert_eq!(run(0, 4), [true, true, true, false]);
        assert_eq!(run(999, 1), [false]);
        assert_eq!(run(1000, 2), [true, false]);
        // 1.5 s later: one token and half of the next.
        assert_eq!(run(2500, 2), [true, false]);
        assert_eq!(run(3000, 2), [true, false]);
        // A long pause refills to the burst, not beyond.
        assert_eq!(run(60_000, 4), [true, true, true, false]);
        // A request stamped before the last one (a race) takes no credit from the past.
        assert_eq!(run(59_000, 1), [false]);
        assert_eq!(run(61_000, 2), [true, false]);
    }

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
