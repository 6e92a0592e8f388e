//! The Mullvad daemon's view of the tunnel: `mullvad status --json`, polled every
//! `--mullvad-interval`, parsed tolerantly into [`MullvadStatus`] and kept in [`MullvadState`]
//! for the collector (`mullvad_*` metrics), the prober ([`MullvadState::probe_target`]) and
//! whoever names the entry and exit peers ([`MullvadState::relay_roles`]).
//!
//! The JSON shape (CONTRACT.md, "Facts") is read from the client's source, not captured live,
//! so nothing here insists on more than `state`: unknown fields are ignored, every other field
//! is optional, a field of an unexpected type is left out and noted in
//! [`MullvadStatus::unreadable`], and a state this code does not know keeps its name
//! ([`TunnelState::Other`]).
//!
//! Failures never stop the agent: a missing command means Mullvad is off (`mullvad_up` 0,
//! logged once, polled every [`NOT_FOUND_INTERVAL`] in case it gets installed); a non-zero
//! exit, unreadable output or a call that hangs past the timeout (killed, with everything it
//! started) make `mullvad_up` 0 until the next good call. Each distinct failure is logged
//! once, not on every poll.

use std::{
    fmt,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Stdio,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use log::{info, warn};
use serde::Deserialize;
use serde_json::Value;
use tokio::{io::AsyncReadExt as _, process::Command, sync::watch, task::JoinHandle};

use crate::config::{MullvadConfig, ProbeTarget};

/// Mullvad's in-tunnel gateway (CONTRACT.md): the default probe target while connected.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
/// Mullvad's tunnel interface on Linux, when the daemon does not name it.
pub const DEFAULT_TUNNEL_INTERFACE: &str = "wg0-mullvad";
/// How often a command that was not found is looked for again (never more often than the
/// configured interval): Mullvad may get installed while the agent runs.
pub const NOT_FOUND_INTERVAL: Duration = Duration::from_secs(60);
/// More output than this is not a status: reading stops there (and the call then times out).
const MAX_OUTPUT: u64 = 1 << 20;

/// The tunnel states of `mullvad status --json`, and any other one it may print in future.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelState {
    Connected,
    Connecting,
    Disconnected,
    Disconnecting,
    Error,
    /// A state this agent does not know, by its name.
    Other(String),
}

impl TunnelState {
    /// The states CONTRACT.md names, each with its own `mullvad_tunnel_state` series.
    pub const KNOWN: [TunnelState; 5] = [
        TunnelState::Connected,
        TunnelState::Connecting,
        TunnelState::Disconnected,
        TunnelState::Disconnecting,
        TunnelState::Error,
    ];

    pub fn from_name(name: &str) -> TunnelState {
        match name {
            "connected" => TunnelState::Connected,
            "connecting" => TunnelState::Connecting,
            "disconnected" => TunnelState::Disconnected,
            "disconnecting" => TunnelState::Disconnecting,
            "error" => TunnelState::Error,
            other => TunnelState::Other(other.to_owned()),
        }
    }

    /// The `state` label: the daemon's own name.
    pub fn name(&self) -> &str {
        match self {
            TunnelState::Connected => "connected",
            TunnelState::Connecting => "connecting",
            TunnelState::Disconnected => "disconnected",
            TunnelState::Disconnecting => "disconnecting",
            TunnelState::Error => "error",
            TunnelState::Other(s) => s,
        }
    }
}

impl fmt::Display for TunnelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `details.endpoint` of a connected or connecting tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The relay WireGuard talks to last: the exit relay in multihop, the only one otherwise.
    pub address: Option<SocketAddr>,
    pub protocol: Option<String>,
    /// The entry relay in multihop.
    pub entry_address: Option<SocketAddr>,
    pub quantum_resistant: bool,
    /// The obfuscation type (`udp2tcp`, `shadowsocks`, ...); None when off.
    pub obfuscation: Option<String>,
    pub daita: bool,
    pub tunnel_interface: Option<String>,
}

/// `details.location`: where the daemon says the relays are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub hostname: Option<String>,
    pub city: Option<String>,
    pub country: Option<String>,
    pub entry_hostname: Option<String>,
    pub entry_city: Option<String>,
    pub entry_country: Option<String>,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    pub mullvad_exit_ip: Option<bool>,
}

/// One parsed `mullvad status --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MullvadStatus {
    pub state: TunnelState,
    /// Connected and connecting.
    pub endpoint: Option<Endpoint>,
    /// Any state that has one.
    pub location: Option<Location>,
    /// e.g. `Multihop`, `Daita`, `QuantumResistance`.
    pub feature_indicators: Vec<String>,
    /// Disconnected: whether the kill switch blocks traffic ("lockdown mode").
    pub locked_down: Option<bool>,
    /// Disconnecting: what follows (`nothing`, `block`, `reconnect`).
    pub after_disconnect: Option<String>,
    /// Error: the cause's `reason` (e.g. `auth_failed`).
    pub error_cause: Option<String>,
    /// Error: whether the firewall still blocks traffic (no `block_failure`).
    pub blocking: Option<bool>,
    /// What was there but could not be read, as `path: why` (logged, never fatal).
    pub unreadable: Vec<String>,
}

impl MullvadStatus {
    /// Connected or connecting: the relays are chosen.
    pub fn has_relays(&self) -> bool {
        matches!(self.state, TunnelState::Connected | TunnelState::Connecting)
    }

    /// Multihop: an entry endpoint, or the daemon's `Multihop` indicator.
    pub fn multihop(&self) -> bool {
        self.endpoint
            .as_ref()
            .is_some_and(|e| e.entry_address.is_some())
            || self.feature("Multihop")
    }

    /// DAITA: the endpoint's flag or a `Daita`/`DaitaMultihop` indicator.
    pub fn daita(&self) -> bool {
        self.endpoint.as_ref().is_some_and(|e| e.daita)
            || self.feature("Daita")
            || self.feature("DaitaMultihop")
    }

    /// Quantum-resistant tunnel: the endpoint's flag or the `QuantumResistance` indicator.
    pub fn quantum_resistant(&self) -> bool {
        self.endpoint.as_ref().is_some_and(|e| e.quantum_resistant)
            || self.feature("QuantumResistance")
    }

    fn feature(&self, name: &str) -> bool {
        self.feature_indicators.iter().any(|f| f == name)
    }
}

/// Why `mullvad status --json` output could not be read at all.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("the output is empty")]
    Empty,
    #[error(
        "the output ends in the middle of the JSON (truncated at line {line}, column {column})"
    )]
    Truncated { line: usize, column: usize },
    #[error("the output is not JSON ({0})")]
    NotJson(String),
    #[error("the JSON has no string `state` field (got {0})")]
    NoState(String),
}

impl ParseError {
    /// What fixes it.
    pub fn hint(&self) -> &'static str {
        match self {
            ParseError::Empty | ParseError::Truncated { .. } => {
                "the CLI stopped early; run `mullvad status --json` by hand, and restart the \
                 daemon (`systemctl restart mullvad-daemon`) if it fails there too"
            }
            ParseError::NotJson(_) => {
                "`--json` needs Mullvad 2024.5 or newer: update the app, or point --mullvad-cli \
                 at the real `mullvad`"
            }
            ParseError::NoState(_) => {
                "this Mullvad version prints a shape the agent does not know: please report it \
                 with the output of `mullvad status --json`"
            }
        }
    }
}

/// Why a poll failed. Each message names the problem and what fixes it.
#[derive(Debug, thiserror::Error)]
pub enum MullvadError {
    #[error(
        "`{cli}` was not found, so Mullvad counts as off (mullvad_up 0); install the Mullvad \
         app, or give the CLI's path with --mullvad-cli"
    )]
    NotFound { cli: String },
    #[error(
        "could not run `{cli} status --json`: {source}; check that the file is an executable \
         the agent's user may run, or fix --mullvad-cli"
    )]
    Spawn {
        cli: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{cli} status --json` failed with {status}: {stderr}; is the daemon running? \
         (`systemctl status mullvad-daemon`, then `systemctl restart mullvad-daemon`)"
    )]
    Exit {
        cli: String,
        status: String,
        /// The first line of its stderr, or "no message".
        stderr: String,
    },
    #[error(
        "`{cli} status --json` did not finish within {timeout:?} and was killed; the daemon may \
         be hung: `systemctl restart mullvad-daemon`"
    )]
    Timeout { cli: String, timeout: Duration },
    #[error(
        "`{cli} status --json` printed something unreadable: {error}; {hint} (output began {start:?})"
    )]
    Parse {
        cli: String,
        error: ParseError,
        /// What to do about it, from [`ParseError::hint`].
        hint: &'static str,
        /// The first characters of the output, for the log.
        start: String,
    },
    #[error("`{cli} status --json`: reading its output: {source}")]
    Read {
        cli: String,
        #[source]
        source: std::io::Error,
    },
}

impl MullvadError {
    /// The command is not installed: Mullvad is off.
    pub fn is_not_found(&self) -> bool {
        matches!(self, MullvadError::NotFound { .. })
    }
}

/// What the agent knows about Mullvad, written by the poller.
#[derive(Clone, Debug, Default)]
pub struct MullvadState {
    /// The last call succeeded and its output was read.
    pub up: bool,
    /// What the last call reported; None while `up` is false (a failed call says nothing
    /// about the tunnel, and stale relays must not be exported).
    pub status: Option<MullvadStatus>,
    /// Why the last call failed; None after a good one.
    pub last_error: Option<String>,
    /// The command was not found (Mullvad is off).
    pub off: bool,
    /// When the last call ended.
    pub polled_at: Option<SystemTime>,
}

/// One relay the daemon says the tunnel uses, for naming a WireGuard peer by its endpoint.
pub type RelayRole = (IpAddr, &'static str, String, String, String);

impl MullvadState {
    /// Records one poll's outcome.
    pub fn record(&mut self, result: Result<MullvadStatus, &MullvadError>) {
        self.polled_at = Some(SystemTime::now());
        match result {
            Ok(status) => {
                self.up = true;
                self.off = false;
                self.status = Some(status);
                self.last_error = None;
            }
            Err(e) => {
                // Not installed means Mullvad is off, not a failed read.
                if !e.is_not_found() {
                    crate::sources::errors::record(crate::sources::errors::MULLVAD);
                }
                self.up = false;
                self.off = e.is_not_found();
                self.status = None;
                self.last_error = Some(e.to_string());
            }
        }
    }

    /// The current status, when the last call succeeded.
    pub fn current(&self) -> Option<&MullvadStatus> {
        self.status.as_ref().filter(|_| self.up)
    }

    /// The default probe while connected: the in-tunnel gateway 10.64.0.1 through the
    /// daemon's tunnel interface (`wg0-mullvad` when it does not say).
    pub fn probe_target(&self) -> Option<ProbeTarget> {
        let s = self.current()?;
        if s.state != TunnelState::Connected {
            return None;
        }
        let iface = s
            .endpoint
            .as_ref()
            .and_then(|e| e.tunnel_interface.clone())
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| DEFAULT_TUNNEL_INTERFACE.to_owned());
        Some(ProbeTarget {
            target: IpAddr::V4(GATEWAY_V4),
            iface: Some(iface),
        })
    }

    /// The relays in use, connected or connecting, each as (address, role, hostname, country,
    /// city): `entry` from `entry_endpoint` and the `entry_*` location fields (multihop only),
    /// `exit` from `endpoint` and `hostname`/`country`/`city`. Unknown names are empty.
    /// A WireGuard peer whose endpoint IP is one of these addresses is that relay.
    pub fn relay_roles(&self) -> Vec<RelayRole> {
        let Some(s) = self.current().filter(|s| s.has_relays()) else {
            return Vec::new();
        };
        let Some(ep) = &s.endpoint else {
            return Vec::new();
        };
        let loc = s.location.clone().unwrap_or_default();
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let mut out = Vec::new();
        if let Some(a) = ep.entry_address {
            out.push((
                a.ip().to_canonical(),
                "entry",
                text(&loc.entry_hostname),
                text(&loc.entry_country),
                text(&loc.entry_city),
            ));
        }
        if let Some(a) = ep.address {
            out.push((
                a.ip().to_canonical(),
                "exit",
                text(&loc.hostname),
                text(&loc.country),
                text(&loc.city),
            ));
        }
        out
    }
}

// The JSON as serde reads it. Every field is optional and unknown ones are ignored; the parts
// are read one by one from `Value`s so that one odd part leaves the others readable.

#[derive(Deserialize)]
struct RawStatus {
    state: Value,
    #[serde(default)]
    details: Value,
}

#[derive(Deserialize, Default)]
struct RawDetails {
    endpoint: Option<Value>,
    location: Option<Value>,
    feature_indicators: Option<Value>,
    locked_down: Option<Value>,
    cause: Option<Value>,
    block_failure: Option<Value>,
}

#[derive(Deserialize)]
struct RawEndpoint {
    address: Option<String>,
    protocol: Option<String>,
    quantum_resistant: Option<bool>,
    obfuscation: Option<Value>,
    entry_endpoint: Option<Value>,
    tunnel_interface: Option<String>,
    daita: Option<Value>,
}

#[derive(Deserialize)]
struct RawLocation {
    hostname: Option<String>,
    city: Option<String>,
    country: Option<String>,
    entry_hostname: Option<String>,
    entry_city: Option<String>,
    entry_country: Option<String>,
    ipv4: Option<String>,
    ipv6: Option<String>,
    mullvad_exit_ip: Option<bool>,
}

/// Parses `mullvad status --json` output. Only a missing or non-string `state` (or output that
/// is not JSON) is an error; everything else that cannot be read is noted in `unreadable`.
pub fn parse_status(text: &str) -> Result<MullvadStatus, ParseError> {
    if text.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    // Without the trailing newline, output cut inside a string reads as ended (EOF), not as
    // a string with a control character in it.
    let raw: RawStatus = serde_json::from_str(text.trim_end()).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => ParseError::Truncated {
            line: e.line(),
            column: e.column(),
        },
        // A JSON value of the wrong shape (e.g. no `state`, or an array).
        serde_json::error::Category::Data => ParseError::NoState(e.to_string()),
        _ => ParseError::NotJson(e.to_string()),
    })?;
    // serde also reads a struct from a JSON array (`["connected"]` would be state
    // "connected"); the status is an object, so valid JSON starting with `[` is an array.
    if text.trim_start().starts_with('[') {
        return Err(ParseError::NoState(format!(
            "an array: {}",
            short(text.trim())
        )));
    }
    let state = match &raw.state {
        Value::String(s) if !s.is_empty() => TunnelState::from_name(s),
        other => return Err(ParseError::NoState(short(&other.to_string()))),
    };
    let mut status = MullvadStatus {
        state,
        endpoint: None,
        location: None,
        feature_indicators: Vec::new(),
        locked_down: None,
        after_disconnect: None,
        error_cause: None,
        blocking: None,
        unreadable: Vec::new(),
    };
    let notes = &mut status.unreadable;
    // Disconnecting's details are a bare string (what follows); the others an object.
    if status.state == TunnelState::Disconnecting {
        match &raw.details {
            Value::String(s) => status.after_disconnect = Some(s.clone()),
            Value::Null => {}
            other => notes.push(format!(
                "details: not a string: {}",
                short(&other.to_string())
            )),
        }
        return Ok(status);
    }
    if let TunnelState::Other(_) = status.state {
        // Nothing is known about an unknown state's details: not read, not an error.
        return Ok(status);
    }
    let details: RawDetails = match raw.details {
        Value::Null => RawDetails::default(),
        v @ Value::Object(_) => read(v, "details", notes).unwrap_or_default(),
        other => {
            notes.push(format!(
                "details: not an object: {}",
                short(&other.to_string())
            ));
            RawDetails::default()
        }
    };
    if let Some(v) = details.location.filter(|v| !v.is_null()) {
        status.location = read::<RawLocation>(v, "details.location", notes).map(|l| Location {
            hostname: l.hostname,
            city: l.city,
            country: l.country,
            entry_hostname: l.entry_hostname,
            entry_city: l.entry_city,
            entry_country: l.entry_country,
            ipv4: l.ipv4,
            ipv6: l.ipv6,
            mullvad_exit_ip: l.mullvad_exit_ip,
        });
    }
    if let Some(v) = details.feature_indicators.filter(|v| !v.is_null()) {
        status.feature_indicators =
            read::<Vec<String>>(v, "details.feature_indicators", notes).unwrap_or_default();
    }
    match status.state {
        TunnelState::Connected | TunnelState::Connecting => {
            if let Some(v) = details.endpoint.filter(|v| !v.is_null()) {
                status.endpoint =
                    read::<RawEndpoint>(v, "details.endpoint", notes).map(|e| endpoint(e, notes));
            }
        }
        TunnelState::Disconnected => {
            status.locked_down = match details.locked_down {
                Some(Value::Bool(b)) => Some(b),
                None | Some(Value::Null) => None,
                Some(other) => {
                    notes.push(format!("details.locked_down: not a boolean: {other}"));
                    None
                }
            };
        }
        TunnelState::Error => {
            status.error_cause = details.cause.as_ref().and_then(|c| match c {
                Value::String(s) => Some(s.clone()),
                Value::Object(m) => m.get("reason").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            });
            if details.cause.as_ref().is_some_and(|c| !c.is_null()) && status.error_cause.is_none()
            {
                notes.push("details.cause: no `reason`".into());
            }
            status.blocking = Some(details.block_failure.is_none_or(|b| b.is_null()));
        }
        TunnelState::Disconnecting | TunnelState::Other(_) => {}
    }
    Ok(status)
}

/// Reads `v` as a `T`, or notes at `path` why it could not.
fn read<T: for<'de> Deserialize<'de>>(v: Value, path: &str, notes: &mut Vec<String>) -> Option<T> {
    match serde_json::from_value(v) {
        Ok(t) => Some(t),
        Err(e) => {
            notes.push(format!("{path}: {e}"));
            None
        }
    }
}

fn endpoint(e: RawEndpoint, notes: &mut Vec<String>) -> Endpoint {
    let address = e
        .address
        .as_deref()
        .and_then(|a| socket_addr(a, "details.endpoint.address", notes));
    let entry_address = match e.entry_endpoint {
        None | Some(Value::Null) => None,
        // `{"address": "IP:PORT", "protocol": "udp"}`, or a bare "IP:PORT".
        Some(Value::Object(m)) => match m.get("address") {
            Some(Value::String(a)) => {
                socket_addr(a, "details.endpoint.entry_endpoint.address", notes)
            }
            _ => {
                notes.push("details.endpoint.entry_endpoint: no string `address`".into());
                None
            }
        },
        Some(Value::String(a)) => socket_addr(&a, "details.endpoint.entry_endpoint", notes),
        Some(other) => {
            notes.push(format!(
                "details.endpoint.entry_endpoint: neither an object nor a string: {}",
                short(&other.to_string())
            ));
            None
        }
    };
    // null is off; `{"obfuscation_type": "udp2tcp", "endpoint": {...}}` or a bare type name.
    let obfuscation = match e.obfuscation {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Object(m)) => Some(
            m.get("obfuscation_type")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
        ),
        Some(other) => {
            notes.push(format!(
                "details.endpoint.obfuscation: {}",
                short(&other.to_string())
            ));
            Some("unknown".into())
        }
    };
    // The app's source has a boolean; CONTRACT.md shows an object (settings): an object
    // counts as on unless it says `"enabled": false`.
    let daita = match e.daita {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(Value::Object(m)) => m.get("enabled").and_then(Value::as_bool).unwrap_or(true),
        Some(other) => {
            notes.push(format!(
                "details.endpoint.daita: {}",
                short(&other.to_string())
            ));
            false
        }
    };
    Endpoint {
        address,
        protocol: e.protocol,
        entry_address,
        quantum_resistant: e.quantum_resistant.unwrap_or(false),
        obfuscation,
        daita,
        tunnel_interface: e.tunnel_interface,
    }
}

/// "IP:PORT" (IPv6 in brackets); a bare IP gets port 0.
fn socket_addr(s: &str, path: &str, notes: &mut Vec<String>) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    notes.push(format!("{path}: {s:?} is not IP:PORT"));
    None
}

/// At most 80 characters of `s`, for messages.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Runs `<cli> status --json` once, killing it (and everything it started, by its process
/// group) when it takes longer than `cfg.timeout`.
pub async fn poll_once(cfg: &MullvadConfig) -> Result<MullvadStatus, MullvadError> {
    let cli = cfg.cli.clone();
    let mut cmd = Command::new(&cfg.cli);
    cmd.args(["status", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills what a wrapper script started too.
        .process_group(0)
        // Also killed when this future is dropped (the agent stopping mid-call).
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(MullvadError::NotFound { cli }),
        Err(source) => return Err(MullvadError::Spawn { cli, source }),
    };
    let pid = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let outcome = tokio::time::timeout(cfg.timeout, async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            match stdout {
                Some(s) => s.take(MAX_OUTPUT).read_to_end(&mut out).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let read_err = async {
            match stderr {
                Some(s) => s.take(MAX_OUTPUT).read_to_end(&mut err).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let (o, e, status) = tokio::join!(read_out, read_err, child.wait());
        o.and(e).and(status.map(|s| (s, out, err)))
    })
    .await;
    let (status, out, err) = match outcome {
        Ok(Ok(v)) => v,
        Ok(Err(source)) => return Err(MullvadError::Read { cli, source }),
        Err(_elapsed) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) with a negative pid signals that process group; the group
                // is the child's own (process_group(0) above), still unreaped, so its id
                // cannot have been reused.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            // Kills the child itself if the group kill failed, and reaps it.
            let _ = child.kill().await;
            return Err(MullvadError::Timeout {
                cli,
                timeout: cfg.timeout,
            });
        }
    };
    if !status.success() {
        let text = String::from_utf8_lossy(&err);
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(short)
            .unwrap_or_else(|| "no message".to_owned());
        let status = match status.code() {
            Some(c) => format!("exit status {c}"),
            None => status.to_string(),
        };
        return Err(MullvadError::Exit {
            cli,
            status,
            stderr: first,
        });
    }
    let text = String::from_utf8_lossy(&out);
    parse_status(&text).map_err(|error| MullvadError::Parse {
        cli,
        hint: error.hint(),
        error,
        start: short(text.trim()),
    })
}

/// Polls `<cli> status --json` every `cfg.interval` (every [`NOT_FOUND_INTERVAL`] while the
/// command is not installed) into `state`, until `stop` turns true or its sender goes.
pub fn spawn(
    cfg: MullvadConfig,
    state: Arc<RwLock<MullvadState>>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_logged: Option<String> = None;
        let mut last_state: Option<String> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            let result = tokio::select! {
                r = poll_once(&cfg) => r,
                // Dropping the call kills the command (kill_on_drop).
                _ = stop.changed() => return,
            };
            log_outcome(&cfg, &result, &mut last_logged, &mut last_state);
            let not_found = matches!(&result, Err(e) if e.is_not_found());
            {
                // A poisoned lock only means a reader panicked; the state is replaced
                // wholesale here, so carrying on with it is sound.
                let mut s = state.write().unwrap_or_else(|p| p.into_inner());
                s.record(result.as_ref().map(Clone::clone));
            }
            let wait = if not_found {
                cfg.interval.max(NOT_FOUND_INTERVAL)
            } else {
                cfg.interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    })
}

/// Logs a failure once per distinct message, a recovery, state changes and what could not
/// be read, instead of every poll.
fn log_outcome(
    cfg: &MullvadConfig,
    result: &Result<MullvadStatus, MullvadError>,
    last_logged: &mut Option<String>,
    last_state: &mut Option<String>,
) {
    match result {
        Ok(s) => {
            if last_logged.take().is_some() {
                info!("Mullvad: `{} status --json` works again", cfg.cli);
            }
            let summary = format!("{} {:?}", s.state, s.unreadable);
            if last_state.as_deref() != Some(summary.as_str()) {
                match &s.state {
                    TunnelState::Other(name) => warn!(
                        "Mullvad: unknown tunnel state {name:?}, exported as mullvad_tunnel_state{{state=\"{name}\"}}"
                    ),
                    st => info!("Mullvad: tunnel {st}"),
                }
                if !s.unreadable.is_empty() {
                    warn!(
                        "Mullvad: parts of `{} status --json` could not be read: {}",
                        cfg.cli,
                        s.unreadable.join("; ")
                    );
                }
                *last_state = Some(summary);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            if last_logged.as_deref() != Some(msg.as_str()) {
                if e.is_not_found() {
                    info!("Mullvad: {msg}");
                } else {
                    warn!("Mullvad: {msg}");
                }
                *last_logged = Some(msg);
            }
            *last_state = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/mullvad/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn parse(name: &str) -> MullvadStatus {
        parse_status(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    fn up(status: MullvadStatus) -> MullvadState {
        let mut st = MullvadState::default();
        st.record(Ok(status));
        st
    }

    #[test]
    fn connected_single_hop() {
        let s = parse("connected_single.json");
        assert_eq!(
            s,
            MullvadStatus {
                state: TunnelState::Connected,
                endpoint: Some(Endpoint {
                    address: sa("185.213.154.68:51820"),
                    protocol: some("udp"),
                    entry_address: None,
                    quantum_resistant: false,
                    obfuscation: None,
                    daita: false,
                    tunnel_interface: some("wg0-mullvad"),
                }),
                location: Some(Location {
                    hostname: some("se-got-wg-001"),
                    city: some("Gothenburg"),
                    country: some("Sweden"),
                    entry_hostname: None,
                    entry_city: None,
                    entry_country: None,
                    ipv4: some("185.213.154.69"),
                    ipv6: some("2a03:1b20:5:f011::a01f"),
                    mullvad_exit_ip: Some(true),
                }),
                feature_indicators: vec![],
                locked_down: None,
                after_disconnect: None,
                error_cause: None,
                blocking: None,
                unreadable: vec![],
            }
        );
        assert!(!s.multihop() && !s.daita() && !s.quantum_resistant());
        let st = up(s);
        assert_eq!(
            st.probe_target(),
            Some(ProbeTarget {
                target: "10.64.0.1".parse().unwrap(),
                iface: some("wg0-mullvad"),
            })
        );
        assert_eq!(
            st.relay_roles(),
            vec![(
                "185.213.154.68".parse().unwrap(),
                "exit",
                "se-got-wg-001".into(),
                "Sweden".into(),
                "Gothenburg".into()
            )]
        );
    }

    #[test]
    fn connected_multihop_daita_quantum_resistant() {
        let s = parse("connected_multihop.json");
        assert_eq!(
            s,
            MullvadStatus {
                state: TunnelState::Connected,
                endpoint: Some(Endpoint {
                    address: sa("185.213.154.69:51820"),
                    protocol: some("udp"),
                    entry_address: sa("185.65.135.117:3228"),
                    quantum_resistant: true,
                    obfuscation: None,
                    daita: true,
                    tunnel_interface: some("wg0-mullvad"),
                }),
                location: Some(Location {
                    hostname: some("se-got-wg-101"),
                    city: some("Gothenburg"),
                    country: some("Sweden"),
                    entry_hostname: some("de-fra-wg-001"),
                    entry_city: some("Frankfurt"),
                    entry_country: some("Germany"),
                    ipv4: some("185.213.154.70"),
                    ipv6: None,
                    mullvad_exit_ip: Some(true),
                }),
                feature_indicators: vec![
                    "Multihop".into(),
                    "Daita".into(),
                    "QuantumResistance".into()
                ],
                locked_down: None,
                after_disconnect: None,
                error_cause: None,
                blocking: None,
                unreadable: vec![],
            }
        );
        assert!(s.multihop() && s.daita() && s.quantum_resistant());
        let st = up(s);
        assert_eq!(
            st.relay_roles(),
            vec![
                (
                    "185.65.135.117".parse().unwrap(),
                    "entry",
                    "de-fra-wg-001".into(),
                    "Germany".into(),
                    "Frankfurt".into()
                ),
                (
                    "185.213.154.69".parse().unwrap(),
                    "exit",
                    "se-got-wg-101".into(),
                    "Sweden".into(),
                    "Gothenburg".into()
                ),
            ]
        );
        assert_eq!(st.probe_target().and_then(|t| t.iface), some("wg0-mullvad"));
    }

    #[test]
    fn connecting() {
        let s = parse("connecting.json");
        assert_eq!(s.state, TunnelState::Connecting);
        let ep = s.endpoint.clone().unwrap();
        assert_eq!(ep.address, sa("[2a03:1b20:5:f011::aaaf]:51820"));
        assert_eq!(ep.obfuscation, some("udp2tcp"));
        assert_eq!(ep.tunnel_interface, None);
        assert!(!ep.daita && !ep.quantum_resistant && ep.entry_address.is_none());
        assert_eq!(s.location, None);
        assert_eq!(s.feature_indicators, vec!["Udp2Tcp".to_string()]);
        assert!(s.unreadable.is_empty());
        let st = up(s);
        // Not connected yet: no probe; the relay is chosen though.
        assert_eq!(st.probe_target(), None);
        assert_eq!(
            st.relay_roles(),
            vec![(
                "2a03:1b20:5:f011::aaaf".parse().unwrap(),
                "exit",
                String::new(),
                String::new(),
                String::new()
            )]
        );
    }

    #[test]
    fn disconnected_locked_down() {
        let s = parse("disconnected_locked.json");
        assert_eq!(s.state, TunnelState::Disconnected);
        assert_eq!(s.locked_down, Some(true));
        assert_eq!(s.endpoint, None);
        let loc = s.location.clone().unwrap();
        assert_eq!(
            (loc.country, loc.city, loc.hostname, loc.mullvad_exit_ip),
            (some("Germany"), some("Berlin"), None, Some(false))
        );
        assert!(s.unreadable.is_empty());
        let st = up(s);
        assert_eq!(st.probe_target(), None);
        assert!(st.relay_roles().is_empty());
    }

    #[test]
    fn error_state() {
        let s = parse("error.json");
        assert_eq!(s.state, TunnelState::Error);
        assert_eq!(s.error_cause, some("auth_failed"));
        assert_eq!(s.blocking, Some(true));
        assert_eq!(s.endpoint, None);
        assert!(s.unreadable.is_empty());
        assert_eq!(up(s).probe_target(), None);
    }

    #[test]
    fn disconnecting() {
        let s = parse_status(r#"{"state":"disconnecting","details":"reconnect"}"#).unwrap();
        assert_eq!(s.state, TunnelState::Disconnecting);
        assert_eq!(s.after_disconnect, some("reconnect"));
    }

    #[test]
    fn future_fields_are_ignored() {
        let s = parse("connected_future_fields.json");
        assert_eq!(s.state, TunnelState::Connected);
        let ep = s.endpoint.clone().unwrap();
        assert_eq!(ep.address, sa("185.213.154.69:51820"));
        assert_eq!(ep.entry_address, sa("185.65.135.117:3228"));
        assert_eq!(ep.obfuscation, some("shadowsocks"));
        assert!(ep.daita && ep.quantum_resistant);
        assert_eq!(ep.tunnel_interface, some("wg1-mullvad"));
        let loc = s.location.clone().unwrap();
        assert_eq!(loc.hostname, some("se-got-wg-101"));
        assert_eq!(loc.entry_city, some("Frankfurt"));
        assert_eq!(
            s.feature_indicators,
            vec!["Multihop".to_string(), "TeleportationV2".to_string()]
        );
        assert!(s.unreadable.is_empty(), "{:?}", s.unreadable);
        // The daemon names the interface: the probe goes through it.
        assert_eq!(
            up(s).probe_target().and_then(|t| t.iface),
            some("wg1-mullvad")
        );
    }

    #[test]
    fn unknown_state_keeps_its_name() {
        let s = parse("unknown_state.json");
        assert_eq!(s.state, TunnelState::Other("hibernating".into()));
        assert_eq!(s.state.name(), "hibernating");
        assert_eq!(s.endpoint, None);
        assert!(s.unreadable.is_empty());
        let st = up(s);
        assert_eq!(st.probe_target(), None);
        assert!(st.relay_roles().is_empty());
    }

    #[test]
    fn truncated() {
        let err = parse_status(&fixture("truncated.json")).unwrap_err();
        assert!(matches!(err, ParseError::Truncated { .. }), "{err:?}");
        assert!(err.to_string().contains("truncated"), "{err}");
        // Cut inside a string, then the usual newline.
        let err = parse_status(&format!("{}\n", fixture("truncated.json"))).unwrap_err();
        assert!(matches!(err, ParseError::Truncated { .. }), "{err:?}");
    }

    #[test]
    fn odd_parts_are_noted_not_fatal() {
        let s = parse_status(
            r#"{"state":"connected","details":{"endpoint":{"address":"nowhere","entry_endpoint":7,
                "quantum_resistant":true},"location":"Sweden","feature_indicators":["Daita"]}}"#,
        )
        .unwrap();
        assert_eq!(s.state, TunnelState::Connected);
        let ep = s.endpoint.clone().unwrap();
        assert_eq!((ep.address, ep.entry_address), (None, None));
        assert!(ep.quantum_resistant);
        assert_eq!(s.location, None);
        assert!(s.daita());
        assert_eq!(s.unreadable.len(), 3, "{:?}", s.unreadable);
        assert!(
            s.unreadable[0].starts_with("details.location: "),
            "{:?}",
            s.unreadable
        );
        assert_eq!(
            s.unreadable[1],
            "details.endpoint.address: \"nowhere\" is not IP:PORT"
        );
        assert!(s.unreadable[2].starts_with("details.endpoint.entry_endpoint: "));
    }

    #[test]
    fn unreadable_output() {
        assert_eq!(parse_status(""), Err(ParseError::Empty));
        assert_eq!(parse_status(" \n"), Err(ParseError::Empty));
        assert!(matches!(
            parse_status("Connected to se-got-wg-001 in Gothenburg, Sweden"),
            Err(ParseError::NotJson(_))
        ));
        assert!(matches!(parse_status("[1,2]"), Err(ParseError::NoState(_))));
        // Found by the fuzzer (fuzz/fuzz_targets/mullvad_json.rs): an array was read as
        // the fields in order.
        assert!(matches!(
            parse_status(r#"["connected"]"#),
            Err(ParseError::NoState(_))
        ));
        assert!(matches!(
            parse_status(r#"{"details":{}}"#),
            Err(ParseError::NoState(_))
        ));
        assert!(matches!(
            parse_status(r#"{"state":3}"#),
            Err(ParseError::NoState(_))
        ));
    }

    #[test]
    fn failures_clear_the_status() {
        let mut st = up(parse("connected_single.json"));
        assert!(st.probe_target().is_some());
        let e = MullvadError::Timeout {
            cli: "mullvad".into(),
            timeout: Duration::from_secs(5),
        };
        st.record(Err(&e));
        assert!(!st.up && !st.off && st.status.is_none());
        assert_eq!(st.probe_target(), None);
        assert!(st.relay_roles().is_empty());
        let e = MullvadError::NotFound {
            cli: "mullvad".into(),
        };
        st.record(Err(&e));
        assert!(st.off);
        assert!(
            st.last_error
                .as_deref()
                .unwrap_or("")
                .contains("--mullvad-cli"),
            "{:?}",
            st.last_error
        );
    }

    fn cfg(cli: &str, timeout: Duration) -> MullvadConfig {
        MullvadConfig {
            cli: cli.into(),
            interval: Duration::from_secs(1),
            timeout,
        }
    }

    /// A shell script `mullvad` in a fresh directory.
    fn script(body: &str) -> (std::path::PathBuf, String) {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!(
            "wirescope-mullvad-unit-{}-{}",
            std::process::id(),
            body.len() ^ (body.as_bytes().iter().map(|&b| b as usize).sum::<usize>() << 8)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mullvad");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = path.display().to_string();
        (dir, p)
    }

    #[tokio::test]
    async fn command_outcomes() {
        let t = Duration::from_secs(5);
        let e = poll_once(&cfg("/nonexistent/mullvad", t))
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        let e = poll_once(&cfg("wirescope-no-such-mullvad", t))
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");

        let (dir, cli) = script(
            "echo 'Error: Management interface is not reachable' >&2\necho more >&2\nexit 3",
        );
        let e = poll_once(&cfg(&cli, t)).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("exit status 3: Error: Management interface is not reachable;"),
            "{msg}"
        );
        assert!(!msg.contains("more"), "{msg}");
        std::fs::remove_dir_all(dir).unwrap();

        let (dir, cli) = script("printf '{\"state\":\"connec'");
        let e = poll_once(&cfg(&cli, t)).await.unwrap_err();
        assert!(
            matches!(
                &e,
                MullvadError::Parse {
                    error: ParseError::Truncated { .. },
                    ..
                }
            ),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();

        let (dir, cli) =
            script(r#"echo '{"state":"disconnected","details":{"locked_down":false}}'"#);
        let s = poll_once(&cfg(&cli, t)).await.unwrap();
        assert_eq!(
            (s.state, s.locked_down),
            (TunnelState::Disconnected, Some(false))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_hang_is_killed_with_what_it_started() {
        let pidfile =
            std::env::temp_dir().join(format!("wirescope-mullvad-hang-{}", std::process::id()));
        let (dir, cli) = script(&format!(
            "sleep 30 &\necho $! > {}\nwait",
            pidfile.display()
        ));
        let started = std::time::Instant::now();
        let e = poll_once(&cfg(&cli, Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert!(matches!(e, MullvadError::Timeout { .. }), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let pid = pid.trim();
        // Gone, or a zombie waiting for whoever inherited it.
        let mut gone = false;
        for _ in 0..50 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => gone = true,
                Ok(stat) => {
                    gone = stat
                        .rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                }
            }
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            gone,
            "the script's `sleep 30` (pid {pid}) survived the timeout"
        );
        std::fs::remove_dir_all(dir).unwrap();
        let _ = std::fs::remove_file(pidfile);
    }
}
