//! The Mullvad daemon's view of the tunnel: `mullvad status --json`, polled every
//! `--mullvad-interval`, parsed tolerantly into [`MullvadStatus`] and kept in [`MullvadState`]
//! for the collector (`mullvad_*` metrics), the prober ([`MullvadState::probe_target`]) and
//! whoever names the entry and exit peers ([`MullvadState::relay_roles`]).
//!
//! The JSON shape (docs/CONTRACT.md, "Facts") is read from the client's source, not captured live,
//! so nothing here insists on more than `state`: unknown fields are ignored, every other field
//! is optional, a field of an unexpected type is left out and noted in
//! [`MullvadStatus::unreadable`], and a state this code does not know keeps its name
//! ([`TunnelState::Other`]). The CLI prints `Warning: ...` lines before the JSON when the
//! device is logged out or revoked: they give [`MullvadStatus::device`], and the JSON after
//! them is read as usual.
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

/// Mullvad's in-tunnel gateway (docs/CONTRACT.md): the default probe target while connected.
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
    /// The states docs/CONTRACT.md names, each with its own `mullvad_tunnel_state` series.
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

/// What the CLI says about this device's account: it checks only while connecting, connected
/// or in the error state, and then prints a warning line before the JSON when the device is
/// logged out or revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceState {
    /// No warning in a state where the CLI would have printed one.
    LoggedIn,
    /// `Warning: You are not logged in to an account.`
    LoggedOut,
    /// `Warning: This device has been revoked.`
    Revoked,
    /// The CLI does not say in this state (disconnected, disconnecting, unknown), or it
    /// printed a warning this agent does not know (kept in [`MullvadStatus::warnings`]).
    #[default]
    Unknown,
}

impl DeviceState {
    /// The states docs/CONTRACT.md names, each with its own `mullvad_device_state` series.
    pub const KNOWN: [DeviceState; 3] = [
        DeviceState::LoggedIn,
        DeviceState::LoggedOut,
        DeviceState::Revoked,
    ];

    /// The `state` label; None for [`DeviceState::Unknown`].
    pub fn name(&self) -> Option<&'static str> {
        match self {
            DeviceState::LoggedIn => Some("logged_in"),
            DeviceState::LoggedOut => Some("logged_out"),
            DeviceState::Revoked => Some("revoked"),
            DeviceState::Unknown => None,
        }
    }
}

/// The app's feature indicators (`FeatureIndicator` in mullvad-types, released desktop
/// versions): each has a `mullvad_feature_indicator` series while connected or connecting, 0
/// when off, so that a rule can watch for one turning on (`LanSharing`: local-network
/// traffic bypasses the tunnel on purpose). Others the app reports get a series at 1.
pub const FEATURE_INDICATORS: [&str; 15] = [
    "QuantumResistance",
    "Multihop",
    "SplitTunneling",
    "LockdownMode",
    "Udp2Tcp",
    "Shadowsocks",
    "Quic",
    "Lwo",
    "LanSharing",
    "DnsContentBlockers",
    "CustomDns",
    "ServerIpOverride",
    "CustomMtu",
    "Daita",
    "DaitaMultihop",
];

/// `details.endpoint` of a connected or connecting tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The relay WireGuard talks to last: the exit relay in multihop, the only one otherwise.
    pub address: Option<SocketAddr>,
    pub protocol: Option<String>,
    /// The entry relay in multihop.
    pub entry_address: Option<SocketAddr>,
    pub quantum_resistant: bool,
    /// The obfuscation in lower case (`udp2tcp`, `shadowsocks`, `quic`, `lwo`, or
    /// `multiplexer` when the app tries several); None when off.
    pub obfuscation: Option<String>,
    /// The obfuscators and the relay endpoints they carry WireGuard to: one, or the
    /// multiplexer's list.
    pub obfuscators: Vec<Obfuscator>,
    pub daita: bool,
    pub tunnel_interface: Option<String>,
}

/// One obfuscator of `details.endpoint.obfuscation`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Obfuscator {
    /// Its type in lower case (`udp2tcp`, `shadowsocks`, `quic`, `lwo`, ...).
    pub kind: String,
    /// Where it carries WireGuard to (the relay's obfuscation port).
    pub address: Option<SocketAddr>,
    /// `udp` or `tcp`.
    pub protocol: Option<String>,
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

/// A relay as exported: its hostname, country and city (empty when unknown).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayPlace {
    pub hostname: String,
    pub country: String,
    pub city: String,
}

impl Location {
    /// The exit relay: the daemon's country and city names, or else the codes its hostname
    /// starts with.
    pub fn exit(&self) -> RelayPlace {
        place(&self.hostname, &self.country, &self.city)
    }

    /// The entry relay (multihop). No released desktop version names its country or city
    /// (`entry_country`/`entry_city`): they come from the hostname (`de-fra-wg-001`: `de`,
    /// `fra`) unless the daemon gives them.
    pub fn entry(&self) -> RelayPlace {
        place(&self.entry_hostname, &self.entry_country, &self.entry_city)
    }
}

fn place(hostname: &Option<String>, country: &Option<String>, city: &Option<String>) -> RelayPlace {
    let codes = hostname.as_deref().and_then(hostname_codes);
    let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    RelayPlace {
        hostname: hostname.clone().unwrap_or_default(),
        country: given(country)
            .or_else(|| codes.as_ref().map(|c| c.0.clone()))
            .unwrap_or_default(),
        city: given(city)
            .or_else(|| codes.as_ref().map(|c| c.1.clone()))
            .unwrap_or_default(),
    }
}

/// The country and city codes a Mullvad relay hostname starts with: `se-got-wg-101` gives
/// (`se`, `got`). None for a name not of that shape (at least three dash-separated parts,
/// the first two letters only).
pub fn hostname_codes(hostname: &str) -> Option<(String, String)> {
    let mut parts = hostname.split('-');
    let (country, city) = (parts.next()?, parts.next()?);
    parts.next()?;
    let letters = |s: &str, max: usize| {
        (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphabetic())
    };
    (letters(country, 3) && letters(city, 8))
        .then(|| (country.to_ascii_lowercase(), city.to_ascii_lowercase()))
}

/// One parsed `mullvad status --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MullvadStatus {
    pub state: TunnelState,
    /// Connected and connecting.
    pub endpoint: Option<Endpoint>,
    /// Any state that has one.
    pub location: Option<Location>,
    /// e.g. `Multihop`, `Daita`, `QuantumResistance` (see [`FEATURE_INDICATORS`]).
    pub feature_indicators: Vec<String>,
    /// What the warning lines before the JSON say about this device's account.
    pub device: DeviceState,
    /// The lines the CLI printed before the JSON (`Warning: ...`), trimmed.
    pub warnings: Vec<String>,
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
    #[error("the output has no JSON after its text {0:?}")]
    NoJsonAfter(String),
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
            ParseError::NoJsonAfter(_) => {
                "the CLI printed a message but no status: run `mullvad status --json` by hand, \
                 and restart the daemon (`systemctl restart mullvad-daemon`) if it fails there too"
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
    /// The tunnel interface the daemon last named (it names none while disconnected or in
    /// error, when its interface is still the same one).
    pub last_tunnel_interface: Option<String>,
}

/// One relay the daemon says the tunnel uses, for naming a WireGuard peer by its endpoint.
pub type RelayRole = (IpAddr, &'static str, String, String, String);

impl MullvadState {
    /// Records one poll's outcome.
    pub fn record(&mut self, result: Result<MullvadStatus, &MullvadError>) {
        self.polled_at = Some(SystemTime::now());
        match result {
            Ok(status) => {
                if let Some(i) = status
                    .endpoint
                    .as_ref()
                    .and_then(|e| e.tunnel_interface.clone())
                    .filter(|i| !i.is_empty())
                {
                    self.last_tunnel_interface = Some(i);
                }
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

    /// For leak detection: the daemon's tunnel interface (the one it names now, or named
    /// last, or `wg0-mullvad`) and whether it says connected; None while the daemon does
    /// not answer or Mullvad is off, when it says nothing.
    pub fn tunnel_connected(&self) -> Option<(String, bool)> {
        let s = self.current()?;
        let iface = s
            .endpoint
            .as_ref()
            .and_then(|e| e.tunnel_interface.clone())
            .filter(|i| !i.is_empty())
            .or_else(|| self.last_tunnel_interface.clone())
            .unwrap_or_else(|| DEFAULT_TUNNEL_INTERFACE.to_owned());
        Some((iface, s.state == TunnelState::Connected))
    }

    /// The relays in use, connected or connecting, each as (address, role, hostname, country,
    /// city): `entry` from `entry_endpoint` and [`Location::entry`] (multihop only), `exit`
    /// from `endpoint` and [`Location::exit`]. Unknown names are empty.
    /// A WireGuard peer whose endpoint IP is one of these addresses is that relay.
    pub fn relay_roles(&self) -> Vec<RelayRole> {
        let Some(s) = self.current().filter(|s| s.has_relays()) else {
            return Vec::new();
        };
        let Some(ep) = &s.endpoint else {
            return Vec::new();
        };
        let loc = s.location.clone().unwrap_or_default();
        let mut out = Vec::new();
        let mut push = |a: SocketAddr, role, p: RelayPlace| {
            out.push((a.ip().to_canonical(), role, p.hostname, p.country, p.city));
        };
        if let Some(a) = ep.entry_address {
            push(a, "entry", loc.entry());
        }
        if let Some(a) = ep.address {
            push(a, "exit", loc.exit());
        }
        out
    }
}

// The JSON as serde reads it. Every field is optional and unknown ones are ignored; the parts
// are read one by one from `Value`s so that one odd part leaves the others readable.

mod parse;
mod poll;
#[cfg(test)]
mod tests;

pub use parse::parse_status;
pub use poll::{poll_once, spawn};
