//! The values of single settings, from a flag or the config file: addresses, paths, log
//! levels, interface names, durations, percentages, probe targets, CIDRs and `on|off`
//! switches. Each error names the setting, where it came from and what is accepted.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;

use super::{ConfigError, Origin, ProbeTarget, RESERVED_PATHS};

/// IP:PORT, [IPv6]:PORT, localhost:PORT, or :PORT (every address: `[::]`, which on Linux
/// also accepts IPv4 unless IPv6 is off; the server then falls back to 0.0.0.0).
pub fn parse_listen_address(value: &str, origin: Origin) -> Result<SocketAddr, ConfigError> {
    let invalid = |problem: &str| {
        ConfigError::Invalid {
        key: "web.listen-address",
        origin: origin.clone(),
        value: value.to_owned(),
        problem: problem.to_owned(),
        accepted: "accepted: IP:PORT, [IPv6]:PORT, localhost:PORT or :PORT, e.g. 127.0.0.1:9586, [::1]:9586, :9586".into(),
    }
    };
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(invalid("has no :PORT"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| invalid("has no valid port (0-65535)"))?;
    let ip = match host {
        "" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h if h.parse::<Ipv6Addr>().is_ok() => {
            return Err(invalid("is an IPv6 address without brackets"));
        }
        _ => {
            return Err(invalid(
                "is not an IP address (host names are not resolved)",
            ));
        }
    };
    Ok(SocketAddr::new(ip, port))
}

pub(super) fn check_telemetry_path(value: &str, origin: Origin) -> Result<String, ConfigError> {
    let invalid = |problem: &str| ConfigError::Invalid {
        key: "web.telemetry-path",
        origin: origin.clone(),
        value: value.to_owned(),
        problem: problem.to_owned(),
        accepted: "accepted: a path starting with '/' made of printable ASCII without '?', '#' or \
                   spaces, other than /, /healthz and /api/v1/status, e.g. /metrics"
            .into(),
    };
    if !value.starts_with('/') {
        return Err(invalid("does not start with '/'"));
    }
    if value
        .bytes()
        .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#')
    {
        return Err(invalid("contains a character not allowed in a path"));
    }
    if RESERVED_PATHS.contains(&value) {
        return Err(invalid("is already served by wirescope"));
    }
    Ok(value.to_owned())
}

pub(super) fn parse_log_level(
    value: &str,
    origin: Origin,
) -> Result<log::LevelFilter, ConfigError> {
    use log::LevelFilter::*;
    Ok(match value.to_ascii_lowercase().as_str() {
        "error" => Error,
        "warn" => Warn,
        "info" => Info,
        "debug" => Debug,
        "trace" => Trace,
        _ => {
            return Err(ConfigError::Invalid {
                key: "log-level",
                origin,
                value: value.to_owned(),
                problem: "is not a log level".into(),
                accepted: "accepted: error, warn, info, debug, trace".into(),
            });
        }
    })
}

/// `--web.allowed-host` values: DNS names or IP literals (`[::1]` style for IPv6 too),
/// without a port; kept lower case without a trailing dot, as the Host check compares them.
pub(super) fn check_hosts(names: Vec<String>, origin: &Origin) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let norm = name.trim_end_matches('.').to_ascii_lowercase();
        let bracketed = norm.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        let bare = bracketed.unwrap_or(&norm);
        let is_ip = match bracketed {
            Some(inner) => inner.parse::<std::net::Ipv6Addr>().is_ok(),
            None => bare.parse::<std::net::IpAddr>().is_ok(),
        };
        let is_dns = !norm.is_empty()
            && norm.len() <= 253
            && norm.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !is_ip && !is_dns {
            return Err(ConfigError::Invalid {
                key: "web.allowed-host",
                origin: origin.clone(),
                value: name,
                problem: "is not a host name or IP address".into(),
                accepted: "accepted: a DNS name or an IP address without a port, e.g. \
                           metrics.example.net, 192.0.2.7 or ::1"
                    .into(),
            });
        }
        let norm = bare.to_owned();
        if !out.contains(&norm) {
            out.push(norm);
        }
    }
    Ok(out)
}

pub(super) fn check_ifaces(
    key: &'static str,
    names: Vec<String>,
    origin: &Origin,
) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !is_ifname(&name) {
            return Err(ConfigError::Invalid {
                key,
                origin: origin.clone(),
                value: name,
                problem: "is not an interface name".into(),
                accepted: "accepted: 1 to 15 bytes without '/', ':', spaces or NUL, e.g. wg0"
                    .into(),
            });
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

/// A positive duration such as `500ms`, `5s`, `2m` or `1h 30m`.
pub fn parse_duration(
    key: &'static str,
    value: &str,
    origin: Origin,
) -> Result<Duration, ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        key,
        origin: origin.clone(),
        value: value.to_owned(),
        problem,
        accepted: "accepted: a number with a unit (ms, s, m, h), e.g. 500ms, 5s, 2m".into(),
    };
    let d = humantime::parse_duration(value.trim())
        .map_err(|e| invalid(format!("is not a duration ({e})")))?;
    if d.is_zero() {
        return Err(invalid("is zero".into()));
    }
    Ok(d)
}

/// A percentage in [0, 100].
pub(super) fn parse_percent(
    key: &'static str,
    value: &str,
    origin: Origin,
) -> Result<f64, ConfigError> {
    match value.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(ConfigError::Invalid {
            key,
            origin,
            value: value.to_owned(),
            problem: "is not a percentage".into(),
            accepted: "accepted: a number from 0 to 100, e.g. 2 or 0.5".into(),
        }),
    }
}

/// TARGET[@IFACE]: an IPv4 or IPv6 address, optionally the interface to probe through.
pub(super) fn parse_probe(value: &str, origin: &Origin) -> Result<ProbeTarget, ConfigError> {
    let invalid = |problem: &str| {
        ConfigError::Invalid {
        key: "probe",
        origin: origin.clone(),
        value: value.to_owned(),
        problem: problem.to_owned(),
        accepted: "accepted: ADDRESS or ADDRESS@IFACE, e.g. 10.64.0.1@wg0-mullvad or fc00:bbbb:bbbb:bb01::1".into(),
    }
    };
    let (addr, iface) = match value.trim().split_once('@') {
        Some((a, i)) => (a, Some(i)),
        None => (value.trim(), None),
    };
    let target = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map_err(|_| invalid("is not an IP address (host names are not resolved)"))?;
    let iface = match iface {
        Some(i) if i.is_empty() || i.len() > 15 || i.contains(['/', ' ']) => {
            return Err(invalid("has no valid interface name after @"));
        }
        Some(i) => Some(i.to_owned()),
        None => None,
    };
    Ok(ProbeTarget { target, iface })
}

/// CIDRs (`192.168.0.0/16`, `fd00::/8`) or single addresses (a /32 or /128). Host bits
/// are cleared; duplicates dropped.
pub(super) fn parse_cidrs(
    key: &'static str,
    values: Vec<String>,
    origin: &Origin,
) -> Result<Vec<IpNet>, ConfigError> {
    let mut out: Vec<IpNet> = Vec::with_capacity(values.len());
    for v in values {
        let net = match v.trim().parse::<IpNet>() {
            Ok(n) => n.trunc(),
            Err(_) => match v.trim().parse::<IpAddr>() {
                Ok(a) => IpNet::from(a),
                Err(_) => {
                    return Err(ConfigError::Invalid {
                        key,
                        origin: origin.clone(),
                        value: v,
                        problem: "is not a CIDR".into(),
                        accepted: "accepted: an IPv4 or IPv6 network ADDRESS/PREFIX or a single address, e.g. 192.168.0.0/16, fd00::/8, 10.0.0.1"
                            .into(),
                    });
                }
            },
        };
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// The longest Linux interface name (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = 15;

/// Whether `name` can be a Linux interface name. Checked before a name is used in a path
/// (a UAPI socket is /var/run/wireguard/NAME.sock), so no name can point outside it.
pub fn is_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// An `on|off` setting (`key` names it in errors), on when unset.
pub(super) fn on_off(
    key: &'static str,
    (value, origin): (Option<String>, Origin),
) -> Result<bool, ConfigError> {
    match value {
        None => Ok(true),
        Some(v) => match v.trim() {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                key,
                origin,
                value: v,
                problem: "is neither on nor off".into(),
                accepted: "accepted: on (the default) or off".into(),
            }),
        },
    }
}
