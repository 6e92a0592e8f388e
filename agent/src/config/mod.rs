//! `run`'s configuration: the command line merged over the optional TOML file, checked, and
//! turned into a [`RunConfig`]. Every error here is a usage/configuration error (exit 2)
//! whose message names the bad value, where it came from, and what is accepted.
//!
//! # The TOML file (`--config FILE`)
//!
//! Keys are the long option names without `--`. Dots in them are TOML's dotted keys, so the
//! two spellings below are the same file:
//!
//! ```toml
//! web.listen-address = "[::]:9586"
//! web.telemetry-path = "/metrics"
//! web.config.file = "web.yml"
//! tunnel = ["wg0", "wg0-mullvad"]
//! underlay = ["eth0"]
//! wg-config = ["/etc/wireguard/wg0.conf"]
//! export-endpoints = false
//! log-level = "info"
//! leak-allow = ["192.168.0.0/16", "fd00::/8"]
//! obfuscation = ["wg0=shadowsocks,udp:198.51.100.1:8388"]
//! mullvad-cli = "/usr/bin/mullvad"
//! mullvad-interval = "10s"
//! probe = ["10.64.0.1@wg0-mullvad"]
//! probe-interval = "5s"
//! pmtu-interval = "5m"
//! peer-grace = "15m"
//! failover-command = "mullvad relay set location se && mullvad reconnect"
//! failover-max-rtt = "200ms"
//! failover-max-loss = 2.0
//! dry-run = false
//! ```
//!
//! ```toml
//! tunnel = ["wg0", "wg0-mullvad"]
//! [web]
//! listen-address = "[::]:9586"
//! config.file = "web.yml"
//! ```
//!
//! Unknown keys are an error (a typo must not silently fall back to a default). Relative
//! paths in the file are relative to the file's directory, so the file means the same thing
//! whatever directory the agent starts in. A flag on the command line overrides the file;
//! a repeatable flag given at least once replaces the file's whole list.

pub mod cli;
pub mod friendly;
pub mod obfuscation;
pub mod values;
pub mod web;
mod webfile;

pub use webfile::{Pem, RateLimit, TlsConfig, WebConfig};

use std::{
    collections::HashMap,
    fmt,
    io::Read as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use values::{
    check_hosts, check_ifaces, check_telemetry_path, on_off, parse_cidrs, parse_log_level,
    parse_percent, parse_probe,
};
pub use values::{is_ifname, parse_duration, parse_listen_address};

use cli::{DEFAULT_LISTEN_ADDRESS, DEFAULT_LOG_LEVEL, DEFAULT_TELEMETRY_PATH, RunArgs};

/// The exit status for bad usage or configuration (docs/CONTRACT.md).
pub const EXIT_USAGE: i32 = 2;

/// Config files are small; a bigger one is a mistake (a device, a log file).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Paths the HTTP server serves itself, which the metrics path must not shadow.
const RESERVED_PATHS: &[&str] = &["/", "/healthz", "/api/v1/status"];

/// Where a value came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Flag,
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that is not accepted: `key` is the option name without `--`.
    #[error("{}: {value:?} {problem}; {accepted}", Where(key, origin))]
    Invalid {
        key: &'static str,
        origin: Origin,
        value: String,
        problem: String,
        accepted: String,
    },
    #[error("cannot read {what} {}: {reason}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("config file {}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {}", Where("web.config.file", origin), message)]
    WebConfig { origin: Origin, message: String },
    #[error(transparent)]
    Friendly(#[from] friendly::FriendlyError),
    #[error("{0}")]
    Unsupported(String),
}

impl ConfigError {
    /// Always [`EXIT_USAGE`]; here so callers need not know which errors are which.
    pub fn exit_code(&self) -> i32 {
        EXIT_USAGE
    }
}

struct Where<'a>(&'static str, &'a Origin);

impl fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Origin::Flag => write!(f, "--{}", self.0),
            Origin::File(p) => write!(f, "{} in {}", self.0, p.display()),
        }
    }
}

/// The validated configuration of `wirescope run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub listen_address: SocketAddr,
    pub telemetry_path: String,
    pub web_config: Option<WebConfig>,
    /// `--web.allowed-host`: names the Host header may carry on a loopback listener, lower
    /// case, without a trailing dot.
    pub allowed_hosts: Vec<String>,
    /// Empty: every WireGuard interface found.
    pub tunnels: Vec<String>,
    /// Empty: the interfaces the routes to the peers' endpoints leave through.
    pub underlays: Vec<String>,
    pub wg_configs: Vec<PathBuf>,
    /// Base64 public key -> friendly name, read from `wg_configs` at start.
    pub friendly_names: HashMap<String, String>,
    pub export_endpoints: bool,
    /// `--transit-time`: time packets through WireGuard (on by default).
    pub transit_time: bool,
    /// `--peer-histograms`: histograms per peer (on by default) or per interface.
    pub peer_histograms: bool,
    /// `--peer-grace`: how long a peer may be gone before it is forgotten.
    pub peer_grace: Duration,
    pub log_level: log::LevelFilter,
    pub log_format: LogFormat,
    pub state_dir: PathBuf,
    /// `--leak-allow`: destinations where traffic outside the tunnels is not a leak.
    pub leak_allow: Vec<IpNet>,
    /// `--obfuscation`: peers whose WireGuard a local proxy carries, and the flows.
    pub obfuscation: Vec<obfuscation::ObfuscationRule>,
    pub mullvad: MullvadConfig,
    pub probes: ProbeConfig,
    pub failover: FailoverConfig,
    /// `--[no-]collector.NAME`: which optional collectors run.
    pub collectors: Collectors,
}

/// The collectors that can be turned off, node_exporter style (`--no-collector.mullvad`,
/// `no-collector.mullvad = true` in the file); all on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Collectors {
    /// Polling the Mullvad daemon and the mullvad_* metrics.
    pub mullvad: bool,
    /// ICMP probes, given (`--probe`) and automatic (Mullvad's gateway).
    pub probes: bool,
}

impl Default for Collectors {
    fn default() -> Self {
        Collectors {
            mullvad: true,
            probes: true,
        }
    }
}

/// Polling the Mullvad daemon (`--mullvad-cli`, `--mullvad-interval`).
#[derive(Clone, Debug, PartialEq)]
pub struct MullvadConfig {
    /// A path, or a name looked up on PATH.
    pub cli: String,
    pub interval: Duration,
    /// A call that takes longer is killed and counts as failed (mullvad_up 0).
    pub timeout: Duration,
}

/// One `--probe TARGET[@IFACE]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    pub target: IpAddr,
    /// Bound with SO_BINDTODEVICE when given.
    pub iface: Option<String>,
}

/// Active probes and path-MTU searches.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    pub targets: Vec<ProbeTarget>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Zero: path-MTU searches are off (`--pmtu-interval off`).
    pub pmtu_interval: Duration,
}

/// Failover thresholds and action.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverConfig {
    pub command: Option<String>,
    pub max_rtt: Duration,
    pub max_loss_percent: f64,
    pub max_handshake_age: Duration,
    pub window: Duration,
    pub cooldown: Duration,
    pub timeout: Duration,
    pub dry_run: bool,
    /// `--failover-peer`: peers (public key or friendly name) judged without probes.
    pub peers: Vec<String>,
}

pub const DEFAULT_MULLVAD_CLI: &str = "mullvad";
pub const DEFAULT_MULLVAD_INTERVAL: Duration = Duration::from_secs(10);
pub const MULLVAD_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_PMTU_INTERVAL: Duration = Duration::from_secs(300);
/// Longer than WireGuard's longest silences (a rekey every 2 min, keepalives, a peer
/// re-added by a script), short enough that churning peers do not fill the maps.
pub const DEFAULT_PEER_GRACE: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_FAILOVER_MAX_RTT: Duration = Duration::from_millis(200);
pub const DEFAULT_FAILOVER_MAX_LOSS: f64 = 2.0;
pub const DEFAULT_FAILOVER_MAX_HANDSHAKE_AGE: Duration = Duration::from_secs(180);
pub const DEFAULT_FAILOVER_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_FAILOVER_COOLDOWN: Duration = Duration::from_secs(300);
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

impl RunConfig {
    /// Merges `args` over the `--config` file (if any) and checks everything, including that
    /// the files named can be read and, for `--web.config.file`, that its TLS certificate
    /// and key parse and belong together (so a bad one exits 2 at start, not at the first
    /// scrape).
    pub fn from_args(args: &RunArgs) -> Result<RunConfig, ConfigError> {
        Self::from_args_allowing_web_config(args)
    }

    /// The same as [`RunConfig::from_args`] (TLS and basic auth used to be refused here;
    /// kept for callers of that time).
    pub fn from_args_allowing_web_config(args: &RunArgs) -> Result<RunConfig, ConfigError> {
        let (file, file_origin) = match &args.config {
            Some(path) => (load_toml(path)?, Origin::File(path.clone())),
            None => (FileConfig::default(), Origin::Flag),
        };
        let base = match &args.config {
            Some(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            None => PathBuf::new(),
        };
        let web = file.web.unwrap_or_default();

        // Each value with where it came from: the flag if given, else the file, else default.
        let pick = |flag: &Option<String>, file: Option<String>| -> (Option<String>, Origin) {
            match (flag, file) {
                (Some(v), _) => (Some(v.clone()), Origin::Flag),
                (None, Some(v)) => (Some(v), file_origin.clone()),
                (None, None) => (None, Origin::Flag),
            }
        };
        let pick_list = |flag: &Vec<String>, file: Option<Vec<String>>| -> (Vec<String>, Origin) {
            match file {
                Some(v) if flag.is_empty() => (v, file_origin.clone()),
                _ => (flag.clone(), Origin::Flag),
            }
        };
        // File paths are relative to the file; flag paths to the working directory.
        let pick_paths =
            |flag: &Vec<PathBuf>, file: Option<Vec<PathBuf>>| -> Vec<(PathBuf, Origin)> {
                match file {
                    Some(v) if flag.is_empty() => v
                        .into_iter()
                        .map(|p| (base.join(p), file_origin.clone()))
                        .collect(),
                    _ => flag.iter().map(|p| (p.clone(), Origin::Flag)).collect(),
                }
            };

        let (addr, origin) = pick(&args.listen_address, web.listen_address);
        let listen_address =
            parse_listen_address(addr.as_deref().unwrap_or(DEFAULT_LISTEN_ADDRESS), origin)?;

        let (path, origin) = pick(&args.telemetry_path, web.telemetry_path);
        let telemetry_path =
            check_telemetry_path(path.as_deref().unwrap_or(DEFAULT_TELEMETRY_PATH), origin)?;

        let (hosts, origin) = pick_list(&args.allowed_hosts, web.allowed_host);
        let allowed_hosts = check_hosts(hosts, &origin)?;

        let file_log = file.log.unwrap_or_default();
        let (level, origin) = pick(&args.log_level, file_log.level.or(file.log_level));
        let log_level = parse_log_level(level.as_deref().unwrap_or(DEFAULT_LOG_LEVEL), origin)?;
        let (format, origin) = pick(&args.log_format, file_log.format);
        let log_format = match format {
            None => LogFormat::Text,
            Some(f) => LogFormat::parse(&f).ok_or_else(|| ConfigError::Invalid {
                key: "log.format",
                origin,
                value: f.clone(),
                problem: "is not a log format".into(),
                accepted: "accepted: text, logfmt, json".into(),
            })?,
        };

        let (tunnels, origin) = pick_list(&args.tunnels, file.tunnel);
        let tunnels = check_ifaces("tunnel", tunnels, &origin)?;
        let (underlays, origin) = pick_list(&args.underlays, file.underlay);
        let underlays = check_ifaces("underlay", underlays, &origin)?;

        let wg_configs: Vec<PathBuf> = pick_paths(&args.wg_configs, file.wg_config)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        // Read now, so a wrong path stops the agent at start with exit 2, not later.
        let friendly_names = friendly::load(&wg_configs)?;

        let web_file = match (&args.web_config_file, web.config.and_then(|c| c.file)) {
            (Some(p), _) => Some((p.clone(), Origin::Flag)),
            (None, Some(p)) => Some((base.join(p), file_origin.clone())),
            (None, None) => None,
        };
        let web_config = web_file
            .map(|(p, origin)| WebConfig::load(&p, origin))
            .transpose()?;

        let (nets, origin) = pick_list(&args.leak_allow, file.leak_allow);
        let leak_allow = parse_cidrs("leak-allow", nets, &origin)?;
        let (rules, origin) = pick_list(&args.obfuscation, file.obfuscation);
        let obfuscation = obfuscation::parse_obfuscations(&rules, &origin)?;

        let duration = |key: &'static str,
                        flag: &Option<String>,
                        file: Option<String>,
                        default: Duration|
         -> Result<Duration, ConfigError> {
            match pick(flag, file) {
                (Some(v), origin) => parse_duration(key, &v, origin),
                (None, _) => Ok(default),
            }
        };
        let mullvad = MullvadConfig {
            cli: match pick(&args.mullvad_cli, file.mullvad_cli) {
                (Some(v), origin) if v.trim().is_empty() => {
                    return Err(ConfigError::Invalid {
                        key: "mullvad-cli",
                        origin,
                        value: v,
                        problem: "is empty".into(),
                        accepted: "accepted: a path or a command name on PATH, e.g. mullvad".into(),
                    });
                }
                (Some(v), _) => v,
                (None, _) => DEFAULT_MULLVAD_CLI.into(),
            },
            interval: duration(
                "mullvad-interval",
                &args.mullvad_interval,
                file.mullvad_interval,
                DEFAULT_MULLVAD_INTERVAL,
            )?,
            timeout: MULLVAD_TIMEOUT,
        };
        let (file_on, file_off) = (
            file.collector.unwrap_or_default(),
            file.no_collector.unwrap_or_default(),
        );
        // The command line's last word wins; then the file, whose keys are the flags
        // (`collector.NAME = true` / `no-collector.NAME = true`); on by default.
        let switch = |name: &'static str,
                      on: bool,
                      off: bool,
                      file_on: Option<bool>,
                      file_off: Option<bool>|
         -> Result<bool, ConfigError> {
            if on || off {
                return Ok(on);
            }
            match (file_on.unwrap_or(false), file_off.unwrap_or(false)) {
                (true, true) => Err(ConfigError::Invalid {
                    key: name,
                    origin: file_origin.clone(),
                    value: "true".into(),
                    problem: "is set both ways (collector.NAME and no-collector.NAME)".into(),
                    accepted: "accepted: one of the two".into(),
                }),
                (_, off) => Ok(!off),
            }
        };
        let collectors = Collectors {
            mullvad: switch(
                "collector.mullvad",
                args.collector_mullvad,
                args.no_collector_mullvad,
                file_on.mullvad,
                file_off.mullvad,
            )?,
            probes: switch(
                "collector.probes",
                args.collector_probes,
                args.no_collector_probes,
                file_on.probes,
                file_off.probes,
            )?,
        };
        let (targets, origin) = pick_list(&args.probes, file.probe);
        if !collectors.probes && !targets.is_empty() {
            return Err(ConfigError::Invalid {
                key: "probe",
                origin,
                value: targets.join(","),
                problem: "is given with the probes collector off".into(),
                accepted:
                    "accepted: drop --no-collector.probes (or `[collector] probes = false`), \
                           or the probe targets"
                        .into(),
            });
        }
        let probes = ProbeConfig {
            targets: targets
                .iter()
                .map(|t| parse_probe(t, &origin))
                .collect::<Result<_, _>>()?,
            interval: duration(
                "probe-interval",
                &args.probe_interval,
                file.probe_interval,
                DEFAULT_PROBE_INTERVAL,
            )?,
            timeout: duration(
                "probe-timeout",
                &args.probe_timeout,
                file.probe_timeout,
                DEFAULT_PROBE_TIMEOUT,
            )?,
            // `off`: no active path-MTU searches (no ICMP to the relays outside the tunnel).
            pmtu_interval: match pick(&args.pmtu_interval, file.pmtu_interval.clone()) {
                (Some(v), _) if v.trim() == "off" => Duration::ZERO,
                _ => duration(
                    "pmtu-interval",
                    &args.pmtu_interval,
                    file.pmtu_interval,
                    DEFAULT_PMTU_INTERVAL,
                )?,
            },
        };
        let peer_grace = duration(
            "peer-grace",
            &args.peer_grace,
            file.peer_grace,
            DEFAULT_PEER_GRACE,
        )?;
        let failover = FailoverConfig {
            command: pick(&args.failover_command, file.failover_command).0,
            max_rtt: duration(
                "failover-max-rtt",
                &args.failover_max_rtt,
                file.failover_max_rtt,
                DEFAULT_FAILOVER_MAX_RTT,
            )?,
            max_loss_percent: match (&args.failover_max_loss, file.failover_max_loss) {
                (Some(v), _) => parse_percent("failover-max-loss", v, Origin::Flag)?,
                (None, Some(v)) => {
                    parse_percent("failover-max-loss", &v.to_string(), file_origin.clone())?
                }
                (None, None) => DEFAULT_FAILOVER_MAX_LOSS,
            },
            max_handshake_age: duration(
                "failover-max-handshake-age",
                &args.failover_max_handshake_age,
                file.failover_max_handshake_age,
                DEFAULT_FAILOVER_MAX_HANDSHAKE_AGE,
            )?,
            window: duration(
                "failover-window",
                &args.failover_window,
                file.failover_window,
                DEFAULT_FAILOVER_WINDOW,
            )?,
            cooldown: duration(
                "failover-cooldown",
                &args.failover_cooldown,
                file.failover_cooldown,
                DEFAULT_FAILOVER_COOLDOWN,
            )?,
            timeout: duration(
                "failover-timeout",
                &args.failover_timeout,
                file.failover_timeout,
                DEFAULT_FAILOVER_TIMEOUT,
            )?,
            dry_run: args.dry_run || file.dry_run.unwrap_or(false),
            peers: pick_list(&args.failover_peers, file.failover_peer).0,
        };

        Ok(RunConfig {
            listen_address,
            telemetry_path,
            allowed_hosts,
            web_config,
            tunnels,
            underlays,
            wg_configs,
            friendly_names,
            export_endpoints: args.export_endpoints || file.export_endpoints.unwrap_or(false),
            transit_time: on_off("transit-time", pick(&args.transit_time, file.transit_time))?,
            peer_histograms: on_off(
                "peer-histograms",
                pick(&args.peer_histograms, file.peer_histograms),
            )?,
            peer_grace,
            log_level,
            log_format,
            collectors,
            leak_allow,
            obfuscation,
            mullvad,
            probes,
            failover,
            state_dir: match (&args.state_dir, file.state_dir) {
                (Some(p), _) => p.clone(),
                (None, Some(p)) => base.join(p),
                (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
            },
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    web: Option<FileWeb>,
    tunnel: Option<Vec<String>>,
    underlay: Option<Vec<String>>,
    wg_config: Option<Vec<PathBuf>>,
    export_endpoints: Option<bool>,
    transit_time: Option<String>,
    peer_histograms: Option<String>,
    peer_grace: Option<String>,
    /// The old spelling of `log.level`.
    log_level: Option<String>,
    /// `log.level`, `log.format` (a table, as TOML reads the dotted keys).
    log: Option<FileLog>,
    /// `collector.NAME = true`: as `--collector.NAME`.
    collector: Option<FileCollectors>,
    /// `no-collector.NAME = true`: as `--no-collector.NAME`.
    no_collector: Option<FileCollectors>,
    state_dir: Option<PathBuf>,
    leak_allow: Option<Vec<String>>,
    obfuscation: Option<Vec<String>>,
    mullvad_cli: Option<String>,
    mullvad_interval: Option<String>,
    probe: Option<Vec<String>>,
    probe_interval: Option<String>,
    probe_timeout: Option<String>,
    pmtu_interval: Option<String>,
    failover_command: Option<String>,
    failover_max_rtt: Option<String>,
    failover_max_loss: Option<f64>,
    failover_max_handshake_age: Option<String>,
    failover_window: Option<String>,
    failover_cooldown: Option<String>,
    failover_timeout: Option<String>,
    failover_peer: Option<Vec<String>>,
    dry_run: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCollectors {
    mullvad: Option<bool>,
    probes: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileWeb {
    listen_address: Option<String>,
    telemetry_path: Option<String>,
    allowed_host: Option<Vec<String>>,
    config: Option<FileWebConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebConfig {
    file: Option<PathBuf>,
}

pub(crate) fn read_small(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    let unreadable = |reason: String| ConfigError::Unreadable {
        what,
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(unreadable(format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| unreadable("not UTF-8 text".into()))
}

fn load_toml(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = read_small("config file", path)?;
    // toml's message names the line, the column and, for an unknown key, the keys accepted.
    toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// `--log.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// env_logger's: `[TIME LEVEL] message`.
    #[default]
    Text,
    /// `ts=TIME level=LEVEL msg="message"`, the exporters' logfmt.
    Logfmt,
    /// `{"ts":"TIME","level":"LEVEL","msg":"message"}`.
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "logfmt" => Some(LogFormat::Logfmt),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// One log line (without the newline) of `level` and `msg` at `ts` (RFC 3339), or None
    /// for [`LogFormat::Text`], which env_logger writes itself.
    pub fn line(self, ts: &str, level: log::Level, msg: &str) -> Option<String> {
        let level = level.as_str().to_ascii_lowercase();
        match self {
            LogFormat::Text => None,
            LogFormat::Logfmt => Some(format!("ts={ts} level={level} msg={}", logfmt_value(msg))),
            LogFormat::Json => {
                Some(serde_json::json!({ "ts": ts, "level": level, "msg": msg }).to_string())
            }
        }
    }
}

/// A logfmt value: bare when it has no space, quote, `=` or control character, else quoted
/// with `"`, `\\` and control characters escaped.
fn logfmt_value(v: &str) -> String {
    let bare = !v.is_empty()
        && !v
            .chars()
            .any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    if bare {
        return v.to_owned();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where the agent keeps what must survive it (the endpoint salt), unless `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/wirescope";

#[cfg(test)]
mod tests;
#[cfg(test)]
mod webfile_tests;
