//! How `wirescope status` and `wirescope doctor` reach a running agent: plain HTTP, or HTTPS
//! when the agent serves TLS (`tls_server_config` in its `--web.config.file`), with its
//! certificate or the CA that signed it trusted, and its basic-auth user.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::config::cli::AgentAddr;

/// Where the password for `--web.user` comes from: the environment, since a command line is
/// visible to every user through `ps`.
pub const PASSWORD_ENV: &str = "WIRESCOPE_WEB_PASSWORD";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a request could not even be made or answered; each names the fix.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--web.listen-address {0}")]
    BadAddress(String),
    #[error("--web.ca-file {path}: {cause}")]
    CaFile { path: String, cause: String },
    #[error(
        "--web.user {0}: the password goes in the environment variable {PASSWORD_ENV} (not on the command line, where ps shows it), and it is not set"
    )]
    NoPassword(String),
    #[error("cannot reach the agent at {addr}: {cause}: {hint}")]
    Unreachable {
        addr: String,
        cause: String,
        hint: String,
    },
}

/// A client for one agent.
pub struct AgentClient {
    /// `http://HOST:PORT` or `https://HOST:PORT`, loopback for an unspecified address.
    base: String,
    tls: bool,
    agent: ureq::Agent,
    authorization: Option<String>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the Authorization header: it carries the password.
        f.debug_struct("AgentClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// `ADDR` as `status` and `doctor` take it, split into (https?, host:port to put in a URL):
/// the forms `run` accepts (IP:PORT, [IPv6]:PORT, host:PORT, :PORT), an unspecified address
/// meaning this host's loopback, and an optional http:// or https:// in front.
pub fn parse_addr(addr: &str) -> Result<(bool, String), String> {
    let a = addr.trim().trim_end_matches('/');
    let (tls, a) = if let Some(rest) = a.strip_prefix("https://") {
        (true, rest)
    } else {
        (false, a.strip_prefix("http://").unwrap_or(a))
    };
    let a = if a.starts_with(':') {
        format!("127.0.0.1{a}")
    } else {
        a.to_string()
    };
    let bad = |e: String| {
        format!(
            "{addr:?} is not an address: {e} (use IP:PORT, [IPv6]:PORT, HOST:PORT or :PORT, \
             with https:// in front for an agent serving TLS)"
        )
    };
    if let Ok(mut s) = a.parse::<SocketAddr>() {
        if s.ip().is_unspecified() {
            s.set_ip(match s.ip() {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        return Ok((tls, s.to_string()));
    }
    // A host name stays a name (the certificate names it); it must resolve.
    let n = a.to_socket_addrs().map_err(|e| bad(e.to_string()))?.count();
    if n == 0 {
        return Err(format!("{addr:?} names no address"));
    }
    Ok((tls, a))
}

/// The certificates of a PEM file, for `--web.ca-file`.
fn read_ca_file(path: &PathBuf) -> Result<Vec<Certificate<'static>>, ClientError> {
    let err = |cause: String| ClientError::CaFile {
        path: path.display().to_string(),
        cause,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c.to_owned()),
            Ok(_) => {}
            Err(e) => return Err(err(format!("not PEM: {e}"))),
        }
    }
    if certs.is_empty() {
        return Err(err(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it: give the agent's cert_file or its CA's certificate"
                .into(),
        ));
    }
    Ok(certs)
}

impl AgentClient {
    pub fn new(a: &AgentAddr) -> Result<AgentClient, ClientError> {
        let (https, hostport) = parse_addr(&a.listen_address).map_err(ClientError::BadAddress)?;
        let tls = https || a.ca_file.is_some();
        let mut tls_config = TlsConfig::builder();
        if let Some(path) = &a.ca_file {
            tls_config = tls_config.root_certs(RootCerts::Specific(Arc::new(read_ca_file(path)?)));
        }
        let authorization = match &a.user {
            None => None,
            Some(user) => {
                let password = std::env::var(PASSWORD_ENV)
                    .map_err(|_| ClientError::NoPassword(user.clone()))?;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Some(format!("Basic {token}"))
            }
        };
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(TOTAL_TIMEOUT))
            // 401 and 404 are answers to explain, not transport errors.
            .http_status_as_error(false)
            // The agent is local or on the operator's network: an HTTP(S)_PROXY from the
            // environment would only send the request (and the password) elsewhere.
            .proxy(None)
            .tls_config(tls_config.build())
            .build();
        Ok(AgentClient {
            base: format!("{}://{hostport}", if tls { "https" } else { "http" }),
            tls,
            agent: config.into(),
            authorization,
        })
    }

    /// The agent's address as shown in messages (`http://127.0.0.1:9586`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET `path` with `Accept: accept`: (status, body of at most `limit` bytes).
    pub fn get(&self, path: &str, accept: &str, limit: u64) -> Result<(u16, Vec<u8>), ClientError> {
        let mut req = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Accept", accept)
            .header(
                "User-Agent",
                concat!("wirescope/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.authorization {
            req = req.header("Authorization", auth);
        }
        let unreachable = |e: ureq::Error| ClientError::Unreachable {
            addr: self.base.clone(),
            hint: self.hint(&e),
            cause: e.to_string(),
        };
        let mut resp = req.call().map_err(unreachable)?;
        let code = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(unreachable)?;
        Ok((code, body))
    }

    /// What to try after `e`.
    fn hint(&self, e: &ureq::Error) -> String {
        let running = "is `wirescope run` running there? try --web.listen-address ADDR";
        match e {
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) if self.tls => {
                "the agent's certificate is not trusted or does not name this address: give \
                 --web.ca-file its cert_file or CA, and an address its certificate names (or the \
                 agent speaks plain HTTP: drop https://)"
                    .into()
            }
            ureq::Error::Io(io) if self.tls && io.kind() == std::io::ErrorKind::InvalidData => {
                "no TLS there: if the agent speaks plain HTTP, drop https:// and --web.ca-file"
                    .into()
            }
            ureq::Error::Protocol(_) if !self.tls => {
                "no plain HTTP answer: if the agent serves TLS, use https://ADDR with --web.ca-file"
                    .into()
            }
            ureq::Error::BodyExceedsLimit(_) => "the answer is too large for a status".into(),
            _ => running.into(),
        }
    }

    /// What an HTTP status other than 200 most likely means, for messages.
    pub fn status_hint(&self, code: u16) -> &'static str {
        match code {
            401 if self.authorization.is_some() => {
                "the agent refused the user or password: check --web.user and WIRESCOPE_WEB_PASSWORD"
            }
            401 => {
                "the agent wants basic auth: give --web.user USER and the password in WIRESCOPE_WEB_PASSWORD"
            }
            400 if !self.tls => "if the agent serves TLS, use https://ADDR with --web.ca-file",
            _ => "is it a wirescope agent? try --web.listen-address ADDR",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr(":9586").unwrap(),
            (false, "127.0.0.1:9586".into())
        );
        assert_eq!(
            parse_addr("0.0.0.0:1").unwrap(),
            (false, "127.0.0.1:1".into())
        );
        assert_eq!(parse_addr("[::]:1").unwrap(), (false, "[::1]:1".into()));
        assert_eq!(
            parse_addr("https://127.0.0.1:2/").unwrap(),
            (true, "127.0.0.1:2".into())
        );
        assert_eq!(
            parse_addr("http://[::1]:3").unwrap(),
            (false, "[::1]:3".into())
        );
        assert_eq!(
            parse_addr("localhost:4").unwrap(),
            (false, "localhost:4".into())
        );
        let e = parse_addr("nonsense").unwrap_err();
        assert!(e.starts_with("\"nonsense\" is not an address"), "{e}");
    }

    #[test]
    fn ca_file_and_password_errors_name_the_fix() {
        let dir = std::env::temp_dir().join(format!("wirescope-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("empty.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let a = AgentAddr {
            ca_file: Some(f.clone()),
            ..AgentAddr::plain(":9586")
        };
        let e = AgentClient::new(&a).unwrap_err().to_string();
        assert!(
            e.contains("--web.ca-file") && e.contains("no PEM certificate"),
            "{e}"
        );
        let missing = AgentAddr {
            ca_file: Some(dir.join("missing.pem")),
            ..AgentAddr::plain(":9586")
        };
        let e = AgentClient::new(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);

        // SAFETY (edition 2024: set_var is unsafe): no other test of this crate reads or
        // writes this variable.
        unsafe { std::env::remove_var(PASSWORD_ENV) };
        let a = AgentAddr {
            user: Some("prometheus".into()),
            ..AgentAddr::plain(":9586")
        };
        let e = AgentClient::new(&a).unwrap_err().to_string();
        assert!(
            e.contains(PASSWORD_ENV) && e.contains("--web.user prometheus"),
            "{e}"
        );
    }

    #[test]
    fn a_ca_file_means_https_and_the_password_is_never_shown() {
        let dir = std::env::temp_dir().join(format!("wirescope-client2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Any well-formed certificate will do for building the client.
        let f = dir.join("ca.pem");
        std::fs::write(&f, TEST_CERT).unwrap();
        let a = AgentAddr {
            ca_file: Some(f),
            ..AgentAddr::plain("127.0.0.1:9586")
        };
        let c = AgentClient::new(&a).unwrap();
        assert_eq!(c.base(), "https://127.0.0.1:9586");
        assert!(!format!("{c:?}").contains("Basic"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A self-signed certificate (`openssl req -x509 -newkey ec ... -subj /CN=wirescope`),
    /// only parsed here.
    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBfTCCASOgAwIBAgIUT7GCwmGEluyuDptDblSNrnMug5gwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJd2lyZXNjb3BlMB4XDTI2MTEyNjA2MjgwM1oXDTM2MTEyMzA2
MjgwM1owFDESMBAGA1UEAwwJd2lyZXNjb3BlMFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAETJg0qfG9O20vEGGmgtYAfBp8aaTSx1lA7ki1QLA1pIJRPEJalVO131QD
u3Ahl7PGwLRn3IKGMqY77MrxpqWiiaNTMFEwHQYDVR0OBBYEFLbbDEwKrRoRd82G
snj0KY8oBDr0MB8GA1UdIwQYMBaAFLbbDEwKrRoRd82Gsnj0KY8oBDr0MA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgJecBYkpCBGlVP+d2depyqc3Y
ELuWG5g2LScSy+MypZUCIQD7lCOC3aBDN+/BB3svcXB0lrctGv41KxkOIah8rXz2
Mw==
-----END CERTIFICATE-----
";
}
