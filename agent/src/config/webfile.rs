//! `--web.config.file`: the Prometheus exporter-toolkit's web configuration format, read and
//! checked. Every key the toolkit documents is taken; unknown keys are refused as the
//! toolkit refuses them (strict YAML). What each key does here, where it differs from Go:
//!
//! - `tls_server_config`: the certificate and key as files (`cert_file`, `key_file`) or
//!   inline PEM (`cert`, `key`); the client CA as `client_ca_file` or inline `client_ca`.
//!   Giving both forms of one is refused (the toolkit silently prefers the file).
//!   `cipher_suites` and `curve_preferences` take Go's names, mapped to rustls' (see
//!   [`crate::config::web`]); a name rustls lacks is refused, naming it.
//!   `prefer_server_cipher_suites` (default true) picks whose order wins.
//! - `http_server_config`: `http2` is accepted and changes nothing: the agent speaks
//!   HTTP/1.1 only (its TLS offers only `http/1.1`). `headers` takes the toolkit's five
//!   headers, with its checks of their values; any other header is refused.
//! - `rate_limit`: `interval` (a Go duration such as `1s`; 0 turns it off) and `burst`.
//! - `basic_auth_users`: user -> bcrypt hash.
//!
//! Relative paths are relative to the file's own directory, as in the toolkit.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, Origin, read_small};

/// `--web.config.file`, parsed and checked (certificates, keys and CAs read and matched).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebConfig {
    /// The file this came from: re-read when it changes.
    pub path: PathBuf,
    pub tls: Option<TlsConfig>,
    /// User -> bcrypt hash.
    pub basic_auth_users: BTreeMap<String, String>,
    /// Response headers, in the toolkit's spelling (name -> value); blank values dropped.
    pub headers: BTreeMap<String, String>,
    pub rate_limit: Option<RateLimit>,
}

/// PEM text: a file to read, or the text itself from the web config.
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(String),
}

// Inline PEM may be a private key: never printed.
impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::File(p) => write!(f, "File({})", p.display()),
            Pem::Inline(t) => write!(f, "Inline(<{} bytes>)", t.len()),
        }
    }
}

impl Pem {
    /// The PEM text; `key` is the config key, for the error.
    pub fn read(&self, key: &str) -> Result<Vec<u8>, String> {
        match self {
            Pem::File(p) => {
                std::fs::read(p).map_err(|e| format!("{key}_file {}: {e}", p.display()))
            }
            Pem::Inline(t) => Ok(t.clone().into_bytes()),
        }
    }

    /// `cert_file PATH` or `cert (inline)`, for messages.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Pem::File(p) => format!("{key}_file {}", p.display()),
            Pem::Inline(_) => format!("{key} (inline)"),
        }
    }

    pub fn file(&self) -> Option<&Path> {
        match self {
            Pem::File(p) => Some(p),
            Pem::Inline(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: Pem,
    pub key: Pem,
    pub client_auth_type: String,
    pub client_ca: Option<Pem>,
    pub min_version: Option<String>,
    pub max_version: Option<String>,
    /// Go names, in preference order; empty: rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// Go names, in preference order; empty: rustls' defaults.
    pub curve_preferences: Vec<String>,
    pub prefer_server_cipher_suites: bool,
}

impl TlsConfig {
    /// The files the configuration reads, so a change to any of them can be noticed.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(Pem::file)
    }
}

/// A token bucket: `burst` requests at once, one more per `interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub interval: Duration,
    pub burst: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    cert: Option<String>,
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_ca: Option<String>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    interval: Option<RawDuration>,
    burst: Option<i64>,
}

/// Go's YAML reads a duration from a string (`1s`) or a bare integer (nanoseconds).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Int(i64),
    Text(String),
}

const CLIENT_AUTH_TYPES: &[&str] = &[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
];
const TLS_VERSIONS: &[&str] = &["TLS10", "TLS11", "TLS12", "TLS13"];

/// The headers the toolkit lets a web config set, and the values it accepts for each
/// (none listed: any). Its names are matched exactly, as Go's map lookup does.
pub const HEADERS: &[(&str, &[&str])] = &[
    ("Content-Security-Policy", &[]),
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
];

impl WebConfig {
    pub fn load(path: &Path, origin: Origin) -> Result<WebConfig, ConfigError> {
        let bad = |message: String| ConfigError::WebConfig {
            origin: origin.clone(),
            message: format!("{}: {message}", path.display()),
        };
        let text = read_small("web config file", path)?;
        // An empty file is a valid exporter-toolkit config that turns nothing on.
        let raw: RawWebConfig = if text.trim().is_empty() {
            RawWebConfig::default()
        } else {
            serde_norway::from_str(&text).map_err(|e| bad(e.to_string()))?
        };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut cfg = WebConfig {
            path: path.to_owned(),
            ..WebConfig::default()
        };
        if let Some(t) = raw.tls_server_config {
            let tls = tls_config(t, &dir).map_err(bad)?;
            // Certificate, key, versions, suites, curves and client CA as the server will
            // use them.
            crate::config::web::server_config(&tls).map_err(bad)?;
            cfg.tls = Some(tls);
        }
        if let Some(h) = raw.http_server_config {
            // http2: HTTP/1.1 is all this server speaks, whatever it says.
            let _ = h.http2;
            cfg.headers = headers(h.headers.unwrap_or_default()).map_err(bad)?;
        }
        if let Some(r) = raw.rate_limit {
            cfg.rate_limit = rate_limit(r).map_err(bad)?;
        }
        for (user, hash) in raw.basic_auth_users.unwrap_or_default() {
            if !is_bcrypt_hash(&hash) {
                return Err(bad(format!(
                    "basic_auth_users: the password of {user:?} is not a bcrypt hash ($2a$, $2b$ or $2y$, 60 characters; make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                )));
            }
            cfg.basic_auth_users.insert(user, hash);
        }
        Ok(cfg)
    }

    /// Every file this configuration depends on: itself, then its certificate, key and CA.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.path.clone()];
        if let Some(t) = &self.tls {
            out.extend(t.files().map(Path::to_path_buf));
        }
        out
    }
}

/// One PEM from its file key or its inline key, not both.
fn pem(
    key: &str,
    file: Option<PathBuf>,
    inline: Option<String>,
    dir: &Path,
) -> Result<Option<Pem>, String> {
    match (file, inline) {
        (Some(_), Some(_)) => Err(format!(
            "{key}_file and {key} are both set: give the PEM either as a file or inline, not both"
        )),
        (Some(p), None) => {
            let full = dir.join(p);
            std::fs::File::open(&full)
                .map_err(|e| format!("{key}_file {}: {e}", full.display()))?;
            Ok(Some(Pem::File(full)))
        }
        (None, Some(t)) if t.trim().is_empty() => Ok(None),
        (None, Some(t)) => Ok(Some(Pem::Inline(t))),
        (None, None) => Ok(None),
    }
}

fn tls_config(t: RawTls, dir: &Path) -> Result<TlsConfig, String> {
    let cert = pem("cert", t.cert_file, t.cert, dir)?;
    let key = pem("key", t.key_file, t.key, dir)?;
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(
            "tls_server_config needs a certificate and its key: cert_file (or cert) and key_file (or key)"
                .into(),
        );
    };
    let client_auth_type = t.client_auth_type.unwrap_or_else(|| "NoClientCert".into());
    if !CLIENT_AUTH_TYPES.contains(&client_auth_type.as_str()) {
        return Err(format!(
            "client_auth_type {client_auth_type:?} is not one of {}",
            CLIENT_AUTH_TYPES.join(", ")
        ));
    }
    for v in [&t.min_version, &t.max_version].into_iter().flatten() {
        if !TLS_VERSIONS.contains(&v.as_str()) {
            return Err(format!(
                "TLS version {v:?} is not one of {}",
                TLS_VERSIONS.join(", ")
            ));
        }
    }
    let client_ca = pem("client_ca", t.client_ca_file, t.client_ca, dir)?;
    if client_auth_type == "RequireAndVerifyClientCert" && client_ca.is_none() {
        return Err(
            "client_auth_type RequireAndVerifyClientCert needs client_ca_file (or client_ca)"
                .into(),
        );
    }
    // As the toolkit: a CA that nothing would check against is a mistake, not a no-op.
    if client_ca.is_some() && client_auth_type == "NoClientCert" {
        return Err("a client CA (client_ca_file or client_ca) is set but client_auth_type is NoClientCert: set client_auth_type to RequireAndVerifyClientCert (or VerifyClientCertIfGiven), or remove the CA".into());
    }
    // A restriction that would silently not apply: refused.
    if t.client_allowed_sans
        .as_ref()
        .is_some_and(|s| !s.is_empty())
    {
        return Err(
            "client_allowed_sans is not supported: every certificate client_ca_file verifies is accepted; remove it or use a CA that signs only the allowed clients".into(),
        );
    }
    Ok(TlsConfig {
        cert,
        key,
        client_auth_type,
        client_ca,
        min_version: t.min_version,
        max_version: t.max_version,
        cipher_suites: t.cipher_suites.unwrap_or_default(),
        curve_preferences: t.curve_preferences.unwrap_or_default(),
        // The toolkit's default.
        prefer_server_cipher_suites: t.prefer_server_cipher_suites.unwrap_or(true),
    })
}

/// The toolkit's header check: only [`HEADERS`], and for those with a fixed set of values
/// one of them (exact, case included). Values must also be valid in an HTTP header.
fn headers(raw: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        let Some((_, allowed)) = HEADERS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = HEADERS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "http_server_config.headers: HTTP header {name:?} can not be configured; allowed: {}",
                names.join(", ")
            ));
        };
        if !allowed.is_empty() && !allowed.contains(&value.as_str()) {
            return Err(format!(
                "http_server_config.headers: invalid value for {name}: expected one of {allowed:?}, got {value:?}"
            ));
        }
        if hyper::header::HeaderValue::from_str(&value).is_err() {
            return Err(format!(
                "http_server_config.headers: the value of {name} is not valid in an HTTP header (control characters or line breaks): {value:?}"
            ));
        }
        // "Unset if blank", as the toolkit documents it.
        if !value.trim().is_empty() {
            out.insert(name, value);
        }
    }
    Ok(out)
}

fn rate_limit(r: RawRateLimit) -> Result<Option<RateLimit>, String> {
    let interval = match r.interval {
        None | Some(RawDuration::Int(0)) => Duration::ZERO,
        Some(RawDuration::Int(n)) => {
            return Err(format!(
                "rate_limit.interval {n} has no unit (Go would read it as {n} nanoseconds); write a duration such as 1s or 100ms"
            ));
        }
        Some(RawDuration::Text(t)) => parse_go_duration(&t).map_err(|why| {
            format!(
                "rate_limit.interval {t:?} {why}; accepted: a Go duration such as 1s, 100ms, 1m30s or 0 (off)"
            )
        })?,
    };
    if interval.is_zero() {
        // The toolkit's switch: no limiter, whatever burst says.
        return Ok(None);
    }
    let burst = r.burst.unwrap_or(0);
    let burst = u32::try_from(burst).ok().filter(|b| *b >= 1).ok_or_else(|| {
        format!(
            "rate_limit.burst {burst}: with an interval set it must be at least 1 (with 0 every request would get 429); set burst to the requests allowed at once, or interval to 0 to turn the limit off"
        )
    })?;
    Ok(Some(RateLimit { interval, burst }))
}

/// Go's `time.ParseDuration`, without the sign (a negative interval means nothing here):
/// one or more decimal numbers, each with a unit (ns, us, µs, ms, s, m, h), or a bare `0`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    const UNITS: &[(&str, u128)] = &[
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let not = || "is not a duration".to_string();
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err("is negative".into());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return Err(not());
    }
    // Whole nanoseconds, as Go counts them (a fraction below 1 ns is dropped).
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(not());
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(if unit.is_empty() {
                "has a number without a unit".into()
            } else {
                format!("has an unknown unit {unit:?} (ns, us, ms, s, m, h)")
            });
        };
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| not())?
        };
        let mut part = int.checked_mul(scale).ok_or_else(not)?;
        let mut place = scale;
        for d in frac.bytes() {
            place /= 10;
            part += u128::from(d - b'0') * place;
        }
        nanos = nanos.checked_add(part).ok_or_else(not)?;
        rest = tail;
    }
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| "is out of range".to_string())
}

fn is_bcrypt_hash(h: &str) -> bool {
    let b = h.as_bytes();
    b.len() == 60
        && (h.starts_with("$2a$") || h.starts_with("$2b$") || h.starts_with("$2y$"))
        && b[4].is_ascii_digit()
        && b[5].is_ascii_digit()
        && b[6] == b'$'
        && b[7..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'/')
}
