//! The command line (docs/CONTRACT.md): `wirescope run|status|doctor`.
//!
//! Values are taken as strings here and checked in [`crate::config`], so a bad value gets the
//! same message whether it came from a flag or from the `--config` file. clap's own usage
//! errors (unknown flag, missing value) exit with status 2 like ours.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub const DEFAULT_LISTEN_ADDRESS: &str = "127.0.0.1:9586";
pub const DEFAULT_TELEMETRY_PATH: &str = "/metrics";
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// What `--version` prints after the name: the release, the commit and the day it was built
/// from (agent/build.rs), so a report from a host names the exact source.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("WIRESCOPE_REVISION"),
    ", built ",
    env!("WIRESCOPE_BUILD_DATE"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "wirescope",
    version = VERSION,
    about = "eBPF agent that measures what a WireGuard tunnel costs and where it breaks",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of `run`'s options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the eBPF programs, read WireGuard state, serve metrics until
    /// SIGINT/SIGTERM, then detach.
    Run(RunArgs),
    /// Ask a running agent for its status and print it as a table.
    Status(StatusArgs),
    /// Check this host for problems and print how to fix each.
    Doctor(DoctorArgs),
}

/// Options of `run`. Every one except `--config` can also be set in the TOML file given with
/// `--config`; a flag given here wins over the file (for repeatable ones, the flags replace
/// the file's list).
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// TOML file with the options below; keys are the option names without `--`
    /// (`web.listen-address = "[::]:9586"`, `tunnel = ["wg0"]`, ...).
    #[arg(long = "config", value_name = "FILE", env = "WIRESCOPE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to serve metrics on: IP:PORT, [IPv6]:PORT, localhost:PORT, or :PORT for every
    /// address [default: 127.0.0.1:9586]
    #[arg(
        long = "web.listen-address",
        value_name = "ADDR",
        env = "WIRESCOPE_WEB_LISTEN_ADDRESS"
    )]
    pub listen_address: Option<String>,

    /// Path of the metrics endpoint [default: /metrics]
    #[arg(
        long = "web.telemetry-path",
        value_name = "PATH",
        env = "WIRESCOPE_WEB_TELEMETRY_PATH"
    )]
    pub telemetry_path: Option<String>,

    /// TLS, basic-auth, header and rate-limit settings, in the Prometheus exporter-toolkit
    /// web config format; re-read when it changes
    #[arg(
        long = "web.config.file",
        value_name = "FILE",
        env = "WIRESCOPE_WEB_CONFIG_FILE"
    )]
    pub web_config_file: Option<PathBuf>,

    /// A host name (or address) requests may name in their Host header when the agent
    /// listens on loopback (repeatable); localhost and loopback addresses always may.
    /// Others are refused, so a web page cannot reach the agent through DNS rebinding
    #[arg(
        long = "web.allowed-host",
        value_name = "NAME",
        env = "WIRESCOPE_WEB_ALLOWED_HOST",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// Tunnel interface to watch (repeatable) [default: every WireGuard interface in this
    /// network namespace]
    #[arg(
        long = "tunnel",
        value_name = "IFACE",
        env = "WIRESCOPE_TUNNEL",
        value_delimiter = ','
    )]
    pub tunnels: Vec<String>,

    /// Carrier interface to watch (repeatable) [default: the interfaces the routes to the
    /// peers' endpoints leave through]
    #[arg(
        long = "underlay",
        value_name = "IFACE",
        env = "WIRESCOPE_UNDERLAY",
        value_delimiter = ','
    )]
    pub underlays: Vec<String>,

    /// wg-quick style file whose `# friendly_name = NAME` comments in [Peer] blocks name
    /// peers (repeatable)
    #[arg(
        long = "wg-config",
        value_name = "FILE",
        env = "WIRESCOPE_WG_CONFIG",
        value_delimiter = ','
    )]
    pub wg_configs: Vec<PathBuf>,

    /// Add endpoint (peer IP address) labels; off by default because they are private data
    #[arg(long = "export-endpoints", env = "WIRESCOPE_EXPORT_ENDPOINTS")]
    pub export_endpoints: bool,

    /// Where the agent keeps state that must survive restarts (the endpoint-label salt)
    /// [default: /var/lib/wirescope]
    #[arg(long = "state-dir", value_name = "DIR", env = "WIRESCOPE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// error, warn, info, debug or trace [default: info]
    #[arg(
        long = "log.level",
        alias = "log-level",
        value_name = "LEVEL",
        env = "WIRESCOPE_LOG_LEVEL"
    )]
    pub log_level: Option<String>,

    /// How log lines look: `text` (a timestamp, the level and the message), `logfmt`
    /// (`ts=... level=info msg="..."`, as Prometheus exporters log) or `json` (one object a
    /// line) [default: text]
    #[arg(
        long = "log.format",
        value_name = "FORMAT",
        env = "WIRESCOPE_LOG_FORMAT"
    )]
    pub log_format: Option<String>,

    /// Destinations (CIDR) where traffic outside the tunnels is not a leak, e.g. the LAN
    /// when local network sharing is on (repeatable): 192.168.0.0/16, fd00::/8
    #[arg(
        long = "leak-allow",
        value_name = "CIDR",
        env = "WIRESCOPE_LEAK_ALLOW",
        value_delimiter = ','
    )]
    pub leak_allow: Vec<String>,

    /// A peer whose WireGuard a local proxy carries to its relay in another protocol
    /// (repeatable): the proxy's flow to the relay counts for that peer
    /// (wirescope_obfuscation_bytes_total) and never as a leak. PEER: a tunnel interface (its
    /// hop-1 peer) or a public key; KIND: udp2tcp, shadowsocks, quic, lwo or manual (the
    /// default); PROTO:ADDR:PORT: the relay's end, e.g. wg0=shadowsocks,udp:198.51.100.1:8388.
    /// Mullvad's own obfuscation is read from the daemon.
    #[arg(
        long = "obfuscation",
        value_name = "PEER=[KIND,]PROTO:ADDR:PORT",
        env = "WIRESCOPE_OBFUSCATION",
        value_delimiter = ';'
    )]
    pub obfuscation: Vec<String>,

    /// The Mullvad CLI, polled with `status --json`; when it is not found, Mullvad state is
    /// off (mullvad_up 0) [default: mullvad, looked up on PATH]
    #[arg(
        long = "mullvad-cli",
        value_name = "PATH",
        env = "WIRESCOPE_MULLVAD_CLI"
    )]
    pub mullvad_cli: Option<String>,

    /// How often to poll the Mullvad daemon, e.g. 10s [default: 10s]
    #[arg(
        long = "mullvad-interval",
        value_name = "DURATION",
        env = "WIRESCOPE_MULLVAD_INTERVAL"
    )]
    pub mullvad_interval: Option<String>,

    /// ICMP echo probe to TARGET, through IFACE when given (repeatable): 10.64.0.1@wg0-mullvad,
    /// fc00:bbbb:bbbb:bb01::1. When Mullvad is connected, 10.64.0.1 through its interface is
    /// probed as well.
    #[arg(
        long = "probe",
        value_name = "TARGET[@IFACE]",
        env = "WIRESCOPE_PROBE",
        value_delimiter = ','
    )]
    pub probes: Vec<String>,

    /// Time between two probes of a target [default: 5s]
    #[arg(
        long = "probe-interval",
        value_name = "DURATION",
        env = "WIRESCOPE_PROBE_INTERVAL"
    )]
    pub probe_interval: Option<String>,

    /// A probe without a reply within this time is lost [default: 2s]
    #[arg(
        long = "probe-timeout",
        value_name = "DURATION",
        env = "WIRESCOPE_PROBE_TIMEOUT"
    )]
    pub probe_timeout: Option<String>,

    /// `off` stops timing packets through WireGuard (wirescope_tunnel_transit_seconds): about
    /// 90 ns less per packet on a busy tunnel or relay [default: on]
    #[arg(
        long = "transit-time",
        value_name = "on|off",
        env = "WIRESCOPE_TRANSIT_TIME"
    )]
    pub transit_time: Option<String>,

    /// `off` exports the histograms wirescope_tunnel_transit_seconds and
    /// wirescope_handshake_rtt_seconds per interface (summed over its peers, no `peer` label)
    /// instead of per peer: about 50 series less per active peer, for relays and gateways
    /// that cannot take the cardinality; counters stay per peer [default: on]
    #[arg(
        long = "peer-histograms",
        value_name = "on|off",
        env = "WIRESCOPE_PEER_HISTOGRAMS"
    )]
    pub peer_histograms: Option<String>,

    /// A peer gone from its interface (or whose interface is gone) for longer than this is
    /// forgotten: its counters and series are removed and its map entries freed, so that
    /// churning peers do not fill the maps. One back within it keeps its counts; one back
    /// later starts from zero. An unknown endpoint silent this long leaves its own series
    /// too, its counts kept in endpoint:other [default: 15m]
    #[arg(
        long = "peer-grace",
        value_name = "DURATION",
        env = "WIRESCOPE_PEER_GRACE"
    )]
    pub peer_grace: Option<String>,

    /// Time between two path-MTU searches to each target (also run on an ICMP too-big), or
    /// `off` for none [default: 5m]
    #[arg(
        long = "pmtu-interval",
        value_name = "DURATION",
        env = "WIRESCOPE_PMTU_INTERVAL"
    )]
    pub pmtu_interval: Option<String>,

    /// Command run (with /bin/sh -c) when a path turns unhealthy; the event is in WIRESCOPE_*
    /// environment variables. Example: `mullvad relay set location se && mullvad reconnect`
    #[arg(
        long = "failover-command",
        value_name = "CMD",
        env = "WIRESCOPE_FAILOVER_COMMAND"
    )]
    pub failover_command: Option<String>,

    /// A path is unhealthy when its probe RTT stays above this over the window [default: 200ms]
    #[arg(
        long = "failover-max-rtt",
        value_name = "DURATION",
        env = "WIRESCOPE_FAILOVER_MAX_RTT"
    )]
    pub failover_max_rtt: Option<String>,

    /// ... or its probe loss over the window is above this percentage [default: 2]
    #[arg(
        long = "failover-max-loss",
        value_name = "PERCENT",
        env = "WIRESCOPE_FAILOVER_MAX_LOSS"
    )]
    pub failover_max_loss: Option<String>,

    /// ... or its peer's latest handshake is older than this [default: 180s]
    #[arg(
        long = "failover-max-handshake-age",
        value_name = "DURATION",
        env = "WIRESCOPE_FAILOVER_MAX_HANDSHAKE_AGE"
    )]
    pub failover_max_handshake_age: Option<String>,

    /// The window RTT and loss are judged over [default: 60s]
    #[arg(
        long = "failover-window",
        value_name = "DURATION",
        env = "WIRESCOPE_FAILOVER_WINDOW"
    )]
    pub failover_window: Option<String>,

    /// Least time between two failover actions [default: 300s]
    #[arg(
        long = "failover-cooldown",
        value_name = "DURATION",
        env = "WIRESCOPE_FAILOVER_COOLDOWN"
    )]
    pub failover_cooldown: Option<String>,

    /// A failover command still running after this is killed and counted as failed
    /// [default: 30s]
    #[arg(
        long = "failover-timeout",
        value_name = "DURATION",
        env = "WIRESCOPE_FAILOVER_TIMEOUT"
    )]
    pub failover_timeout: Option<String>,

    /// A peer (base64 public key or friendly name) judged on its handshake age even though
    /// no probe goes through it (repeatable). Without probes or this, a peer is not judged:
    /// idle peers of a gateway have old handshakes and are fine
    #[arg(
        long = "failover-peer",
        value_name = "PEER",
        env = "WIRESCOPE_FAILOVER_PEER",
        value_delimiter = ','
    )]
    pub failover_peers: Vec<String>,

    /// Turn the Mullvad collector off: no `mullvad status` polling and no mullvad_* metrics
    /// (for a gateway or a host without the app) [default: on]
    #[arg(
        long = "no-collector.mullvad",
        env = "WIRESCOPE_NO_COLLECTOR_MULLVAD",
        overrides_with = "collector_mullvad"
    )]
    pub no_collector_mullvad: bool,

    /// Turn the Mullvad collector on (the default; undoes an earlier --no-collector.mullvad)
    #[arg(
        long = "collector.mullvad",
        env = "WIRESCOPE_COLLECTOR_MULLVAD",
        overrides_with = "no_collector_mullvad"
    )]
    pub collector_mullvad: bool,

    /// Turn the probes collector off: no ICMP probes, not even Mullvad's automatic
    /// 10.64.0.1 (--probe is then refused), so failover judges handshakes only [default: on]
    #[arg(
        long = "no-collector.probes",
        env = "WIRESCOPE_NO_COLLECTOR_PROBES",
        overrides_with = "collector_probes"
    )]
    pub no_collector_probes: bool,

    /// Turn the probes collector on (the default)
    #[arg(
        long = "collector.probes",
        env = "WIRESCOPE_COLLECTOR_PROBES",
        overrides_with = "no_collector_probes"
    )]
    pub collector_probes: bool,

    /// Log the failover action instead of running it
    #[arg(long = "dry-run", env = "WIRESCOPE_DRY_RUN")]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub agent: AgentAddr,

    /// Print the raw JSON snapshot (/api/v1/status) instead of the tables
    #[arg(long)]
    pub json: bool,

    /// Redraw every second until Ctrl-C
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the findings as JSON (`ok`, `problems`, `agent`, `findings`: check, severity,
    /// message, fix)
    #[arg(long = "json")]
    pub json: bool,

    /// A running agent to consult for what only it measures (path MTU, UDP receive errors,
    /// handshake timeouts, leaks); doctor checks the host alone when none answers
    #[command(flatten)]
    pub agent: AgentAddr,

    /// Directory of WireGuard configuration and key files whose modes are checked
    #[arg(
        long = "wireguard-dir",
        value_name = "DIR",
        default_value = "/etc/wireguard",
        env = "WIRESCOPE_WIREGUARD_DIR"
    )]
    pub wireguard_dir: PathBuf,

    /// The Mullvad CLI (a path, or a name looked up on PATH)
    #[arg(
        long = "mullvad-cli",
        value_name = "PATH",
        default_value = "mullvad",
        env = "WIRESCOPE_MULLVAD_CLI"
    )]
    pub mullvad_cli: String,
}

impl Cli {
    /// Parses `std::env::args`; on a usage error clap prints it and exits with status 2
    /// (`--help` and `--version` exit 0).
    pub fn parse_args() -> Cli {
        Cli::parse()
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("wirescope").chain(args.iter().copied()))
    }

    /// Every option of `run`, and the agent address and tools of `status` and `doctor`, can
    /// also come from WIRESCOPE_ + its name in upper case with `.` and `-` as `_` (the
    /// output switches `--json` and `--watch` only from the command line).
    #[test]
    fn every_option_has_its_environment_variable() {
        let cmd = Cli::command();
        let mut checked = 0;
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "json" | "watch" | "help" | "version") {
                    continue;
                }
                let want = format!(
                    "WIRESCOPE_{}",
                    long.to_ascii_uppercase().replace(['.', '-'], "_")
                );
                assert_eq!(
                    arg.get_env().and_then(|e| e.to_str()),
                    Some(want.as_str()),
                    "{} --{long}",
                    sub.get_name()
                );
                checked += 1;
            }
        }
        // run's 36 options, status's and doctor's agent address (3 each), doctor's 2 tools.
        assert_eq!(checked, 36 + 3 + 3 + 2);
    }

    /// What the environment gives, in a child process of this test binary (the environment
    /// is the process's: setting it here would race the other tests): a value, a list split
    /// at commas (obfuscation rules at `;`: they hold commas), a switch, and the command
    /// line winning over the environment.
    #[test]
    fn options_from_the_environment() {
        const CHILD: &str = "WIRESCOPE_TEST_ENV_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let cli = Cli::try_parse_from(["wirescope", "run", "--probe-interval", "9s"])
                .expect("parses");
            let Command::Run(a) = cli.command else {
                panic!("not run")
            };
            println!(
                "listen={:?} tunnels={:?} obfs={:?} export={} interval={:?} level={:?}",
                a.listen_address,
                a.tunnels,
                a.obfuscation,
                a.export_endpoints,
                a.probe_interval,
                a.log_level
            );
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "config::cli::tests::options_from_the_environment",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("WIRESCOPE_WEB_LISTEN_ADDRESS", "[::]:9586")
            .env("WIRESCOPE_TUNNEL", "wg0,wg0-mullvad")
            .env(
                "WIRESCOPE_OBFUSCATION",
                "wg0=shadowsocks,udp:192.0.2.1:8388;wg1=tcp:192.0.2.2:443",
            )
            .env("WIRESCOPE_EXPORT_ENDPOINTS", "true")
            .env("WIRESCOPE_PROBE_INTERVAL", "1s")
            .env("WIRESCOPE_LOG_LEVEL", "debug")
            .output()
            .expect("runs the child");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(
                "listen=Some(\"[::]:9586\") tunnels=[\"wg0\", \"wg0-mullvad\"] \
                 obfs=[\"wg0=shadowsocks,udp:192.0.2.1:8388\", \"wg1=tcp:192.0.2.2:443\"] \
                 export=true interval=Some(\"9s\") level=Some(\"debug\")"
            ),
            "{text}"
        );
    }

    /// `--version` (on every subcommand) names the release, the commit this was built from
    /// and its day; both come from git here, so they must match what git says now.
    #[test]
    fn version_names_the_revision_and_the_build_date() {
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .expect("git runs");
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        let want = format!(
            "{} (revision {}, built {})\n",
            env!("CARGO_PKG_VERSION"),
            git(&["rev-parse", "--short=12", "HEAD"]),
            git(&["log", "-1", "--format=%cs", "HEAD"]),
        );
        assert_eq!(Cli::command().render_version(), format!("wirescope {want}"));
        for (args, name) in [
            (&["--version"][..], "wirescope"),
            (&["run", "--version"], "wirescope-run"),
            (&["status", "-V"], "wirescope-status"),
        ] {
            let e = parse(args).expect_err("prints the version");
            assert_eq!(e.kind(), ErrorKind::DisplayVersion, "{args:?}");
            assert_eq!(e.to_string(), format!("{name} {want}"), "{args:?}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_with_every_option() {
        let cli = parse(&[
            "run",
            "--config",
            "/etc/wirescope.toml",
            "--web.listen-address",
            "[::1]:9586",
            "--web.telemetry-path=/m",
            "--web.config.file",
            "web.yml",
            "--tunnel",
            "wg0",
            "--tunnel",
            "wg1",
            "--underlay",
            "eth0",
            "--wg-config",
            "a.conf",
            "--wg-config",
            "b.conf",
            "--export-endpoints",
            "--log-level",
            "debug",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.config, Some(PathBuf::from("/etc/wirescope.toml")));
        assert_eq!(a.listen_address.as_deref(), Some("[::1]:9586"));
        assert_eq!(a.telemetry_path.as_deref(), Some("/m"));
        assert_eq!(a.web_config_file, Some(PathBuf::from("web.yml")));
        assert_eq!(a.tunnels, ["wg0", "wg1"]);
        assert_eq!(a.underlays, ["eth0"]);
        assert_eq!(
            a.wg_configs,
            [PathBuf::from("a.conf"), PathBuf::from("b.conf")]
        );
        assert!(a.export_endpoints);
        assert_eq!(a.log_level.as_deref(), Some("debug"));
    }

    #[test]
    fn status_and_doctor() {
        let Command::Status(s) = parse(&["status"]).unwrap().command else {
            panic!()
        };
        assert_eq!(s.agent.listen_address, DEFAULT_LISTEN_ADDRESS);
        let Command::Status(s) = parse(&["status", "--web.listen-address", "10.0.0.1:1"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(s.agent.listen_address, "10.0.0.1:1");
        assert!(matches!(
            parse(&["doctor"]).unwrap().command,
            Command::Doctor(_)
        ));
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["run", "--bogus"][..],
            &["run", "--tunnel"],
            &["frobnicate"],
            &[],
            &["doctor", "--tunnel", "wg0"],
        ] {
            let err = parse(args).unwrap_err();
            assert_ne!(err.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }
}

/// The agent to talk to, as `status` and `doctor` take it on the command line.
#[derive(Debug, Clone, Args)]
pub struct AgentAddr {
    /// Address of the running agent: IP:PORT, [IPv6]:PORT, HOST:PORT or :PORT; prefix
    /// https:// when it serves TLS
    #[arg(long = "web.listen-address", value_name = "ADDR", default_value = DEFAULT_LISTEN_ADDRESS, env = "WIRESCOPE_WEB_LISTEN_ADDRESS")]
    pub listen_address: String,

    /// PEM certificates to trust for an agent serving TLS: its own cert_file when
    /// self-signed, or the CA that signed it (implies https)
    #[arg(
        long = "web.ca-file",
        value_name = "FILE",
        env = "WIRESCOPE_WEB_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,

    /// Basic-auth user, for an agent with basic_auth_users; the password is read from the
    /// environment variable WIRESCOPE_WEB_PASSWORD
    #[arg(long = "web.user", value_name = "USER", env = "WIRESCOPE_WEB_USER")]
    pub user: Option<String>,
}

impl AgentAddr {
    /// The agent at `listen_address`, plain HTTP, no user.
    pub fn plain(listen_address: &str) -> AgentAddr {
        AgentAddr {
            listen_address: listen_address.to_string(),
            ca_file: None,
            user: None,
        }
    }
}
