use clap::Parser as _;

use super::*;
use crate::config::cli::{Cli, Command};

const KEY: &str = "mDxDGAVBTKDEfGUqmcNYb09lq8QouG6gXvOqIDzLmTQ=";
pub(super) const HASH: &str = "$2y$10$X0h1gDsPszWURQaxFN.Dc.O1.7uE6iO6N5SeAHBAxjjtwiu9oWxRy";

/// A private temporary directory, removed on drop.
pub(super) struct Dir(pub(super) PathBuf);

impl Dir {
    pub(super) fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("wirescope-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    pub(super) fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn args(argv: &[&str]) -> RunArgs {
    let cli = Cli::try_parse_from(["wirescope", "run"].iter().chain(argv)).expect("usage");
    match cli.command {
        Command::Run(a) => a,
        _ => unreachable!(),
    }
}

fn config(argv: &[&str]) -> Result<RunConfig, ConfigError> {
    RunConfig::from_args(&args(argv))
}

#[test]
fn defaults() {
    let c = config(&[]).unwrap();
    assert_eq!(c.listen_address, "127.0.0.1:9586".parse().unwrap());
    assert_eq!(c.telemetry_path, "/metrics");
    assert_eq!(c.log_level, log::LevelFilter::Info);
    assert!(c.tunnels.is_empty() && c.underlays.is_empty() && c.wg_configs.is_empty());
    assert!(!c.export_endpoints);
    assert!(c.web_config.is_none());
}

#[test]
fn accepted_values() {
    let cases: &[(&[&str], &str)] = &[
        (&["--web.listen-address", "[::1]:9586"], "[::1]:9586"),
        (&["--web.listen-address", ":9586"], "[::]:9586"),
        (
            &["--web.listen-address", "localhost:9100"],
            "127.0.0.1:9100",
        ),
        (&["--web.listen-address", "0.0.0.0:0"], "0.0.0.0:0"),
        (&["--web.listen-address", "[fe80::1%2]:1"], "[fe80::1%2]:1"),
    ];
    for (argv, want) in cases {
        assert_eq!(
            config(argv).unwrap().listen_address.to_string(),
            *want,
            "{argv:?}"
        );
    }
    let c = config(&[
        "--web.telemetry-path",
        "/prom/metrics",
        "--log-level",
        "DEBUG",
        "--tunnel",
        "wg0",
        "--tunnel",
        "wg0-mullvad",
        "--tunnel",
        "wg0",
        "--underlay",
        "eth0",
        "--export-endpoints",
    ])
    .unwrap();
    assert_eq!(c.telemetry_path, "/prom/metrics");
    assert_eq!(c.log_level, log::LevelFilter::Debug);
    assert_eq!(
        c.tunnels,
        ["wg0", "wg0-mullvad"],
        "duplicates dropped, order kept"
    );
    assert_eq!(c.underlays, ["eth0"]);
    assert!(c.export_endpoints);
}

/// Every wrong value fails with a message that names the option, the value, and what is
/// accepted; and exits 2.
#[test]
fn wrong_values() {
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["--web.listen-address", "localhost"],
            "--web.listen-address: \"localhost\" has no :PORT",
            "accepted: IP:PORT",
        ),
        (
            &["--web.listen-address", "127.0.0.1:99999"],
            "\"127.0.0.1:99999\" has no valid port",
            "accepted: IP:PORT",
        ),
        (
            &["--web.listen-address", "127.0.0.1:"],
            "\"127.0.0.1:\" has no valid port",
            "[IPv6]:PORT",
        ),
        (
            &["--web.listen-address", "::1:9586"],
            "\"::1:9586\" is an IPv6 address without brackets",
            "[::1]:9586",
        ),
        (
            &["--web.listen-address", "example.com:80"],
            "\"example.com:80\" is not an IP address",
            ":PORT",
        ),
        (
            &["--web.listen-address", "999.1.1.1:80"],
            "\"999.1.1.1:80\" is not an IP address",
            "accepted",
        ),
        (
            &["--web.telemetry-path", "metrics"],
            "--web.telemetry-path: \"metrics\" does not start with '/'",
            "e.g. /metrics",
        ),
        (
            &["--web.telemetry-path", "/"],
            "\"/\" is already served by wirescope",
            "other than /, /healthz",
        ),
        (
            &["--web.telemetry-path", "/healthz"],
            "\"/healthz\" is already served",
            "accepted",
        ),
        (
            &["--web.telemetry-path", "/a b"],
            "\"/a b\" contains a character",
            "accepted",
        ),
        (
            &["--web.telemetry-path", "/m?x=1"],
            "\"/m?x=1\" contains a character",
            "accepted",
        ),
        (
            &["--log-level", "verbose"],
            "--log-level: \"verbose\" is not a log level",
            "accepted: error, warn, info, debug, trace",
        ),
        (
            &["--log-level", ""],
            "--log-level: \"\" is not a log level",
            "accepted: error",
        ),
        (
            &["--tunnel", "a/b"],
            "--tunnel: \"a/b\" is not an interface name",
            "e.g. wg0",
        ),
        (
            &["--underlay", "much-too-long-name"],
            "--underlay: \"much-too-long-name\" is not an interface name",
            "1 to 15 bytes",
        ),
        (
            &["--wg-config", "/nonexistent/wg0.conf"],
            "cannot read WireGuard config /nonexistent/wg0.conf",
            "No such file",
        ),
        (
            &["--config", "/nonexistent/wirescope.toml"],
            "cannot read config file /nonexistent/wirescope.toml",
            "No such file",
        ),
        (
            &["--web.config.file", "/nonexistent/web.yml"],
            "cannot read web config file /nonexistent/web.yml",
            "No such file",
        ),
    ];
    for (argv, what, accepted) in cases {
        let err = config(argv).expect_err(&format!("{argv:?} accepted"));
        let msg = err.to_string();
        assert!(msg.contains(what), "{argv:?}: {msg}");
        assert!(msg.contains(accepted), "{argv:?}: {msg}");
        assert_eq!(err.exit_code(), 2);
    }
}

#[test]
fn unreadable_files() {
    let dir = Dir::new("unreadable");
    let d = dir.0.display().to_string();
    // As root every file is readable; a directory is not.
    for argv in [
        ["--wg-config", d.as_str()],
        ["--config", d.as_str()],
        ["--web.config.file", d.as_str()],
    ] {
        let msg = config(&argv).unwrap_err().to_string();
        assert!(
            msg.contains(&d) && msg.contains("cannot read"),
            "{argv:?}: {msg}"
        );
    }
    let big = dir.file("big.toml", &"# padding\n".repeat(200_000));
    let msg = config(&["--config", &big]).unwrap_err().to_string();
    assert!(msg.contains("larger than"), "{msg}");
}

#[test]
fn toml_file_both_spellings_and_relative_paths() {
    let dir = Dir::new("toml");
    dir.file(
        "wg0.conf",
        &format!("[Peer]\nPublicKey = {KEY}\n# friendly_name = exit\n"),
    );
    let dotted = dir.file(
        "dotted.toml",
        "web.listen-address = \"[::]:9586\"\nweb.telemetry-path = \"/m\"\ntunnel = [\"wg0\"]\n\
         underlay = [\"eth0\", \"eth1\"]\nwg-config = [\"wg0.conf\"]\nexport-endpoints = true\nlog-level = \"warn\"\n",
    );
    let tables = dir.file(
        "tables.toml",
        "tunnel = [\"wg0\"]\nunderlay = [\"eth0\", \"eth1\"]\nwg-config = [\"wg0.conf\"]\nexport-endpoints = true\n\
         log-level = \"warn\"\n[web]\nlisten-address = \"[::]:9586\"\ntelemetry-path = \"/m\"\n",
    );
    for file in [&dotted, &tables] {
        let c = config(&["--config", file]).unwrap();
        assert_eq!(c.listen_address.to_string(), "[::]:9586");
        assert_eq!(c.telemetry_path, "/m");
        assert_eq!(c.tunnels, ["wg0"]);
        assert_eq!(c.underlays, ["eth0", "eth1"]);
        assert_eq!(
            c.wg_configs,
            [dir.0.join("wg0.conf")],
            "relative to the file's directory"
        );
        assert_eq!(c.friendly_names[KEY], "exit");
        assert!(c.export_endpoints);
        assert_eq!(c.log_level, log::LevelFilter::Warn);
    }
    // Flags win; a repeatable flag replaces the file's list.
    let c = config(&[
        "--config",
        &dotted,
        "--web.listen-address",
        "127.0.0.2:1",
        "--underlay",
        "veth0",
        "--log-level",
        "trace",
    ])
    .unwrap();
    assert_eq!(c.listen_address.to_string(), "127.0.0.2:1");
    assert_eq!(c.underlays, ["veth0"]);
    assert_eq!(c.tunnels, ["wg0"]);
    assert_eq!(c.log_level, log::LevelFilter::Trace);
}

#[test]
fn toml_file_errors() {
    let dir = Dir::new("toml-errors");
    let cases: &[(&str, &[&str])] = &[
        (
            "listen-address = \":1\"\n",
            &["unknown field `listen-address`", "expected one of", "`web`"],
        ),
        (
            "[web]\nlisten_address = \":1\"\n",
            &["unknown field `listen_address`", "`listen-address`"],
        ),
        (
            "web.config.path = \"x\"\n",
            &["unknown field `path`", "`file`"],
        ),
        ("tunnel = \"wg0\"\n", &["tunnel", "expected a sequence"]),
        (
            "export-endpoints = \"yes\"\n",
            &["export-endpoints", "expected a boolean"],
        ),
        ("log-level = \n", &["line 1"]),
    ];
    for (i, (text, wants)) in cases.iter().enumerate() {
        let f = dir.file(&format!("c{i}.toml"), text);
        let err = config(&["--config", &f]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{text:?}: {msg}");
        assert!(
            msg.starts_with(&format!("config file {f}: ")),
            "{text:?}: {msg}"
        );
        for want in *wants {
            assert!(msg.contains(want), "{text:?}: missing {want:?} in {msg}");
        }
    }
    // A bad value in the file names the key and the file.
    let f = dir.file("bad-level.toml", "log-level = \"loud\"\n");
    let msg = config(&["--config", &f]).unwrap_err().to_string();
    assert_eq!(
        msg,
        format!(
            "log-level in {f}: \"loud\" is not a log level; accepted: error, warn, info, debug, trace"
        )
    );
    let f = dir.file("bad-addr.toml", "[web]\nlisten-address = \"nowhere\"\n");
    let msg = config(&["--config", &f]).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("web.listen-address in {f}: \"nowhere\"")),
        "{msg}"
    );
    // Relative paths in the file are resolved against its directory in messages too.
    let f = dir.file("missing-wg.toml", "wg-config = [\"nope.conf\"]\n");
    let msg = config(&["--config", &f]).unwrap_err().to_string();
    assert!(
        msg.contains(&dir.0.join("nope.conf").display().to_string()),
        "{msg}"
    );
}

/// A self-signed test certificate (CN=localhost, P-256, valid until 2125) and its key: a
/// fixture, used nowhere else.
pub(super) const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBrTCCAVSgAwIBAgIUXjfmB+LPHLoXS+OI3o0xRJY8ak0wCgYIKoZIzj0EAwIw\nFDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNjA0MjYwNVoYDzIxMjYxMTAy\nMDQyNjA1WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO\nPQMBBwNCAARcO8QMlhxdCgSPJ5xLEtJfmpiOmxHXoF82/0EmkieN9MziDzvoDH1m\nurUfpqDRQsyvvGrk3Ssqht9b6FV/Sr4Ho4GBMH8wHQYDVR0OBBYEFC34HjPPqeRw\nF9qoY1L0vHzN0CrTMB8GA1UdIwQYMBaAFC34HjPPqeRwF9qoY1L0vHzN0CrTMBoG\nA1UdEQQTMBGCCWxvY2FsaG9zdIcEfwAAATAMBgNVHRMBAf8EAjAAMBMGA1UdJQQM\nMAoGCCsGAQUFBwMBMAoGCCqGSM49BAMCA0cAMEQCIB0PxNBeCl6t86yedpj3LYjZ\nZFeC74qYjLplwMl+7EtYAiA7OiB9AuGwrUU7k5b9hvIn+v5RiHk9kE8wwGIDdW+2\nHw==\n-----END CERTIFICATE-----\n";
pub(super) const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgYM0OZPXSDd60ZvvO\nf4ZtQx9iENI+DT8itwaplmj3UvmhRANCAARcO8QMlhxdCgSPJ5xLEtJfmpiOmxHX\noF82/0EmkieN9MziDzvoDH1murUfpqDRQsyvvGrk3Ssqht9b6FV/Sr4H\n-----END PRIVATE KEY-----\n";

#[test]
fn web_config_is_validated_and_accepted() {
    let dir = Dir::new("web");
    dir.file("cert.pem", TEST_CERT);
    dir.file("key.pem", TEST_KEY);
    dir.file("bad-cert.pem", "-----BEGIN CERTIFICATE-----\n");
    dir.file("other-key.pem", "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOdT1dBvdDb5pvz7WI+IFQ3APa6PTMcR33NFwPBBwQzu\n-----END PRIVATE KEY-----\n");
    let good = dir.file(
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  min_version: TLS12\n\
             http_server_config:\n  http2: true\nbasic_auth_users:\n  prometheus: {HASH}\n"
        ),
    );
    let parsed = RunConfig::from_args_allowing_web_config(&args(&["--web.config.file", &good]))
        .unwrap()
        .web_config
        .unwrap();
    let tls = parsed.tls.unwrap();
    assert_eq!(tls.cert, Pem::File(dir.0.join("cert.pem")));
    assert_eq!(tls.key, Pem::File(dir.0.join("key.pem")));
    assert_eq!(tls.client_auth_type, "NoClientCert");
    assert_eq!(parsed.basic_auth_users["prometheus"], HASH);

    // Accepted by from_args too (the HTTP server implements it).
    assert_eq!(
        config(&["--web.config.file", &good]).unwrap().web_config,
        RunConfig::from_args_allowing_web_config(&args(&["--web.config.file", &good]))
            .unwrap()
            .web_config
    );

    // From the TOML file too, relative to it.
    let toml = dir.file("c.toml", "web.config.file = \"web.yml\"\n");
    assert!(config(&["--config", &toml]).unwrap().web_config.is_some());

    let cases: &[(&str, &str)] = &[
        (
            "tls_server_config:\n  cert_file: cert.pem\n",
            "needs a certificate and its key",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: nokey.pem\n",
            "key_file",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_auth_type: Maybe\n",
            "client_auth_type \"Maybe\"",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  max_version: TLS14\n",
            "TLS version \"TLS14\"",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_auth_type: RequireAndVerifyClientCert\n",
            "needs client_ca_file",
        ),
        (
            "tls_server_config:\n  cert: x\n  key: y\n",
            "cert (inline): no PEM certificate",
        ),
        (
            "basic_auth_users:\n  alice: hunter2\n",
            "password of \"alice\" is not a bcrypt hash",
        ),
        (
            "tls_config:\n  cert_file: cert.pem\n",
            "unknown field `tls_config`",
        ),
        ("basic_auth_users: [1, 2]\n", "basic_auth_users"),
        (
            "tls_server_config:\n  cert_file: bad-cert.pem\n  key_file: key.pem\n",
            "cert_file",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: bad-cert.pem\n",
            "key_file",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: other-key.pem\n",
            "does the key belong to the certificate?",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  max_version: TLS11\n",
            "no TLS version",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_auth_type: RequireAnyClientCert\n",
            "not supported",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_allowed_sans: [a.example]\n",
            "client_allowed_sans is not supported",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let f = dir.file(&format!("w{i}.yml"), text);
        let err = RunConfig::from_args_allowing_web_config(&args(&["--web.config.file", &f]))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("--web.config.file: {f}: ")),
            "{text:?}: {msg}"
        );
        assert!(msg.contains(want), "{text:?}: {msg}");
        assert!(
            !msg.contains("hunter2"),
            "a password must not be echoed: {msg}"
        );
    }
    // An empty file is valid: it turns nothing on.
    let empty = dir.file("empty.yml", "");
    assert_eq!(
        RunConfig::from_args_allowing_web_config(&args(&["--web.config.file", &empty]))
            .unwrap()
            .web_config,
        Some(WebConfig {
            path: empty.clone().into(),
            ..WebConfig::default()
        })
    );
}

/// `--leak-allow`: CIDRs or single addresses, host bits cleared, duplicates dropped; from
/// the file too (`leak-allow = [...]`); a bad one names the option, the value and what is
/// accepted, and exits 2.
#[test]
fn leak_allow_cidrs() {
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &[]),
        (&["--leak-allow", "198.51.100.0/24"], &["198.51.100.0/24"]),
        (&["--leak-allow", "192.168.1.7/16"], &["192.168.0.0/16"]),
        (&["--leak-allow", "10.0.0.1"], &["10.0.0.1/32"]),
        (&["--leak-allow", "fd00::/8"], &["fd00::/8"]),
        (&["--leak-allow", "2001:db8::1"], &["2001:db8::1/128"]),
        (
            &[
                "--leak-allow",
                "10.0.0.0/8",
                "--leak-allow",
                "fe80::/10",
                "--leak-allow",
                "10.1.2.3/8",
            ],
            &["10.0.0.0/8", "fe80::/10"],
        ),
        (&["--leak-allow", "0.0.0.0/0"], &["0.0.0.0/0"]),
    ];
    for (argv, want) in cases {
        let got: Vec<String> = config(argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
            .leak_allow
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, *want, "{argv:?}");
    }
    let bad: &[&str] = &[
        "",
        "lan",
        "10.0.0.0/33",
        "10.0.0/8",
        "fd00::/129",
        "192.168.0.0/",
        "10.0.0.0 /8",
        "10.0.0.0/8/8",
    ];
    for v in bad {
        let err = config(&["--leak-allow", v]).expect_err(&format!("{v:?} accepted"));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("--leak-allow: {v:?} is not a CIDR")),
            "{v:?}: {msg}"
        );
        assert!(
            msg.contains("accepted:") && msg.contains("192.168.0.0/16"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 2);
    }
    let dir = Dir::new("leak-allow");
    let f = dir.file(
        "c.toml",
        "leak-allow = [\"192.168.0.0/16\", \"fd00::/8\"]\n",
    );
    let c = config(&["--config", &f]).unwrap();
    let got: Vec<String> = c.leak_allow.iter().map(|n| n.to_string()).collect();
    assert_eq!(got, ["192.168.0.0/16", "fd00::/8"]);
    // The flag replaces the file's list.
    let c = config(&["--config", &f, "--leak-allow", "10.0.0.0/8"]).unwrap();
    assert_eq!(c.leak_allow.len(), 1);
    let f = dir.file("bad.toml", "leak-allow = [\"nope\"]\n");
    let msg = config(&["--config", &f]).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("leak-allow in {f}: \"nope\" is not a CIDR")),
        "{msg}"
    );
}

#[test]
fn mullvad_probe_and_failover_options() {
    let c = config(&[]).unwrap();
    assert_eq!(c.mullvad.cli, "mullvad");
    assert_eq!(c.mullvad.interval, DEFAULT_MULLVAD_INTERVAL);
    assert!(c.probes.targets.is_empty());
    assert_eq!(c.probes.interval, Duration::from_secs(5));
    assert_eq!(c.failover.max_rtt, Duration::from_millis(200));
    assert_eq!(c.failover.max_loss_percent, 2.0);
    assert!(c.failover.command.is_none() && !c.failover.dry_run);

    let c = config(&[
        "--mullvad-cli",
        "/opt/mullvad",
        "--mullvad-interval",
        "2s",
        "--probe",
        "10.64.0.1@wg0-mullvad",
        "--probe",
        "fc00:bbbb:bbbb:bb01::1",
        "--probe-interval",
        "500ms",
        "--pmtu-interval",
        "1m",
        "--failover-command",
        "mullvad reconnect",
        "--failover-max-loss",
        "5%",
        "--failover-window",
        "30s",
        "--dry-run",
    ])
    .unwrap();
    assert_eq!(c.mullvad.cli, "/opt/mullvad");
    assert_eq!(c.mullvad.interval, Duration::from_secs(2));
    assert_eq!(
        c.probes.targets,
        [
            ProbeTarget {
                target: "10.64.0.1".parse().unwrap(),
                iface: Some("wg0-mullvad".into())
            },
            ProbeTarget {
                target: "fc00:bbbb:bbbb:bb01::1".parse().unwrap(),
                iface: None
            }
        ]
    );
    assert_eq!(c.probes.interval, Duration::from_millis(500));
    assert_eq!(c.probes.pmtu_interval, Duration::from_secs(60));
    assert!(
        config(&["--pmtu-interval", "off"])
            .unwrap()
            .probes
            .pmtu_interval
            .is_zero()
    );
    assert_eq!(c.failover.command.as_deref(), Some("mullvad reconnect"));
    assert_eq!(c.failover.max_loss_percent, 5.0);
    assert_eq!(c.failover.window, Duration::from_secs(30));
    assert!(c.failover.dry_run);

    for (argv, names) in [
        (
            &["--probe", "example.com"][..],
            "--probe: \"example.com\" is not an IP address",
        ),
        (&["--probe", "10.0.0.1@"], "no valid interface name"),
        (
            &["--probe-interval", "5"],
            "--probe-interval: \"5\" is not a duration",
        ),
        (&["--mullvad-interval", "0s"], "is zero"),
        (&["--failover-max-loss", "150"], "is not a percentage"),
        (&["--mullvad-cli", " "], "--mullvad-cli: \" \" is empty"),
    ] {
        let e = config(argv).unwrap_err().to_string();
        assert!(e.contains(names), "{argv:?}: {e}");
        assert!(e.contains("accepted"), "{argv:?}: {e}");
    }

    let d = Dir::new("failover-toml");
    let f = d.file(
        "w.toml",
        "probe = [\"10.64.0.1@wg0\"]\nfailover-max-loss = 0.5\nfailover-max-rtt = \"150ms\"\ndry-run = true\n",
    );
    let c = config(&["--config", &f]).unwrap();
    assert_eq!(c.probes.targets.len(), 1);
    assert_eq!(c.failover.max_loss_percent, 0.5);
    assert_eq!(c.failover.max_rtt, Duration::from_millis(150));
    assert!(c.failover.dry_run);
}

#[test]
fn transit_time_on_off() {
    assert!(config(&[]).unwrap().transit_time);
    assert!(config(&["--transit-time", "on"]).unwrap().transit_time);
    assert!(!config(&["--transit-time", "off"]).unwrap().transit_time);
    let e = config(&["--transit-time", "no"]).unwrap_err().to_string();
    assert!(
        e.contains("--transit-time: \"no\" is neither on nor off")
            && e.contains("accepted: on (the default) or off"),
        "{e}"
    );
    let d = Dir::new("transit-toml");
    let f = d.file("c.toml", "transit-time = \"off\"\n");
    let c = config(&["--config", &f]).unwrap();
    assert!(!c.transit_time);
    // The command line wins over the file.
    let c = config(&["--config", &f, "--transit-time", "on"]).unwrap();
    assert!(c.transit_time);
}

#[test]
fn peer_histograms_on_off() {
    assert!(config(&[]).unwrap().peer_histograms);
    assert!(
        !config(&["--peer-histograms", "off"])
            .unwrap()
            .peer_histograms
    );
    let e = config(&["--peer-histograms", "aggregate"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--peer-histograms: \"aggregate\" is neither on nor off")
            && e.contains("accepted: on (the default) or off"),
        "{e}"
    );
    let d = Dir::new("peer-hist-toml");
    let f = d.file("c.toml", "peer-histograms = \"off\"\n");
    assert!(!config(&["--config", &f]).unwrap().peer_histograms);
    assert!(
        config(&["--config", &f, "--peer-histograms", "on"])
            .unwrap()
            .peer_histograms
    );
}

/// `--peer-grace`: 15 minutes unless given, from the flag, the environment or the file (the
/// flag winning), a duration that is not zero.
#[test]
fn peer_grace() {
    assert_eq!(config(&[]).unwrap().peer_grace, Duration::from_secs(900));
    assert_eq!(
        config(&["--peer-grace", "3s"]).unwrap().peer_grace,
        Duration::from_secs(3)
    );
    let e = config(&["--peer-grace", "0s"]).unwrap_err().to_string();
    assert!(e.contains("--peer-grace: \"0s\" is zero"), "{e}");
    let e = config(&["--peer-grace", "soon"]).unwrap_err().to_string();
    assert!(
        e.contains("--peer-grace: \"soon\" is not a duration"),
        "{e}"
    );
    let d = Dir::new("peer-grace-toml");
    let f = d.file("c.toml", "peer-grace = \"1h\"\n");
    assert_eq!(
        config(&["--config", &f]).unwrap().peer_grace,
        Duration::from_secs(3600)
    );
    assert_eq!(
        config(&["--config", &f, "--peer-grace", "2m"])
            .unwrap()
            .peer_grace,
        Duration::from_secs(120)
    );
}

/// `--web.allowed-host` (repeatable; `[web] allowed-host = [...]` in the file): names and
/// addresses kept lower case without a trailing dot or brackets; anything else is refused
/// with the option, the value and what is accepted, exit 2.
#[test]
fn web_allowed_hosts() {
    let c = config(&[
        "--web.allowed-host",
        "Metrics.Example.NET.",
        "--web.allowed-host",
        "192.0.2.7",
        "--web.allowed-host",
        "[2001:db8::7]",
        "--web.allowed-host",
        "metrics.example.net",
    ])
    .unwrap();
    assert_eq!(
        c.allowed_hosts,
        ["metrics.example.net", "192.0.2.7", "2001:db8::7"]
    );
    assert!(config(&[]).unwrap().allowed_hosts.is_empty());
    for v in ["", "host:9586", "a b", "http://x", "x..y", "[192.0.2.7"] {
        let err = config(&["--web.allowed-host", v]).expect_err(&format!("{v:?} accepted"));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "--web.allowed-host: {v:?} is not a host name or IP address"
            )),
            "{v:?}: {msg}"
        );
        assert!(msg.contains("accepted:"), "{msg}");
        assert_eq!(err.exit_code(), 2);
    }
    let dir = Dir::new("allowed-host");
    let f = dir.file("c.toml", "[web]\nallowed-host = [\"grafana.lan\"]\n");
    assert_eq!(
        config(&["--config", &f]).unwrap().allowed_hosts,
        ["grafana.lan"]
    );
}

/// `--obfuscation`: repeatable, from the file too (`obfuscation = [...]`), the flag list
/// replacing the file's; a bad value exits 2 naming the option, the value and the form.
#[test]
fn obfuscation_rules_from_flags_and_file() {
    use crate::config::obfuscation::ObfuscatedPeer;
    let c = config(&[
        "--obfuscation",
        "wg0=shadowsocks,udp:198.51.100.1:8388",
        "--obfuscation",
        &format!("{KEY}=tcp:192.0.2.1:443"),
    ])
    .unwrap();
    let peers: Vec<&ObfuscatedPeer> = c.obfuscation.iter().map(|r| &r.peer).collect();
    assert_eq!(
        peers,
        [
            &ObfuscatedPeer::Interface("wg0".into()),
            &ObfuscatedPeer::Key(KEY.into())
        ]
    );
    assert!(config(&[]).unwrap().obfuscation.is_empty());
    let dir = Dir::new("obfuscation");
    let f = dir.file(
        "c.toml",
        "obfuscation = [\"wg0-mullvad=udp2tcp,tcp:192.0.2.1:443\"]\n",
    );
    assert_eq!(config(&["--config", &f]).unwrap().obfuscation.len(), 1);
    let c = config(&["--config", &f, "--obfuscation", "wg1=udp:192.0.2.9:1"]).unwrap();
    assert_eq!(
        c.obfuscation[0].peer,
        ObfuscatedPeer::Interface("wg1".into())
    );
    let f = dir.file("bad.toml", "obfuscation = [\"wg0=udp:127.0.0.1:51900\"]\n");
    let err = config(&["--config", &f]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "obfuscation in {f}: \"wg0=udp:127.0.0.1:51900\" gives 127.0.0.1, the local side"
        )),
        "{msg}"
    );
    assert!(
        msg.contains("accepted: PEER=[KIND,]PROTO:ADDR:PORT"),
        "{msg}"
    );
    assert_eq!(err.exit_code(), 2);
}

/// `--log.format` (`log-format` in the file): text (the default), logfmt or json; anything
/// else exits 2 naming what is accepted. The lines: logfmt quotes and escapes what needs it,
/// json is one object.
#[test]
fn log_formats() {
    use crate::config::LogFormat;
    assert_eq!(config(&[]).unwrap().log_format, LogFormat::Text);
    assert_eq!(
        config(&["--log.format", "logfmt"]).unwrap().log_format,
        LogFormat::Logfmt
    );
    assert_eq!(
        config(&["--log.format", "JSON", "--log.level", "debug"])
            .unwrap()
            .log_format,
        LogFormat::Json
    );
    let err = config(&["--log.format", "xml"]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--log.format: \"xml\" is not a log format"),
        "{err}"
    );
    assert!(err.to_string().contains("text, logfmt, json"), "{err}");
    assert_eq!(err.exit_code(), 2);
    let dir = Dir::new("log-format");
    let f = dir.file(
        "c.toml",
        "log.format = \"json\"\nlog.level = \"debug\"\nlog-level = \"warn\"\n",
    );
    let c = config(&["--config", &f]).unwrap();
    assert_eq!(
        c.log_level,
        log::LevelFilter::Debug,
        "log.level before log-level"
    );
    assert_eq!(
        config(&["--config", &f]).unwrap().log_format,
        LogFormat::Json
    );

    let ts = "2026-12-07T00:10:00.123Z";
    assert_eq!(
        LogFormat::Logfmt.line(ts, log::Level::Warn, "attached wg0 (tcx)"),
        Some(format!("ts={ts} level=warn msg=\"attached wg0 (tcx)\""))
    );
    assert_eq!(
        LogFormat::Logfmt.line(ts, log::Level::Info, "ready"),
        Some(format!("ts={ts} level=info msg=ready"))
    );
    assert_eq!(
        LogFormat::Logfmt.line(ts, log::Level::Error, "a \"b\"\nc\\d"),
        Some(format!(r#"ts={ts} level=error msg="a \"b\"\nc\\d""#))
    );
    assert_eq!(
        LogFormat::Json.line(ts, log::Level::Debug, "x=\"1\""),
        Some(format!(
            r#"{{"level":"debug","msg":"x=\"1\"","ts":"{ts}"}}"#
        ))
    );
    assert_eq!(LogFormat::Text.line(ts, log::Level::Info, "m"), None);
}

/// `--no-collector.mullvad` / `--no-collector.probes` (and `--collector.*`, the last word
/// winning; `[collector]` in the file): all on by default; a probe target with the probes
/// collector off is refused, exit 2.
#[test]
fn collector_switches() {
    use crate::config::Collectors;
    let on = Collectors {
        mullvad: true,
        probes: true,
    };
    assert_eq!(config(&[]).unwrap().collectors, on);
    let c = config(&["--no-collector.mullvad", "--no-collector.probes"]).unwrap();
    assert_eq!(
        c.collectors,
        Collectors {
            mullvad: false,
            probes: false
        }
    );
    let c = config(&["--no-collector.mullvad", "--collector.mullvad"]).unwrap();
    assert!(c.collectors.mullvad);
    let c = config(&["--collector.mullvad", "--no-collector.mullvad"]).unwrap();
    assert!(!c.collectors.mullvad);
    let dir = Dir::new("collectors");
    let f = dir.file(
        "c.toml",
        "no-collector.mullvad = true\ncollector.probes = true\n",
    );
    let c = config(&["--config", &f]).unwrap();
    assert_eq!(
        c.collectors,
        Collectors {
            mullvad: false,
            probes: true
        }
    );
    // The command line wins over the file.
    assert!(
        config(&["--config", &f, "--collector.mullvad"])
            .unwrap()
            .collectors
            .mullvad
    );
    let err = config(&["--no-collector.probes", "--probe", "10.64.0.1"]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--probe: \"10.64.0.1\" is given with the probes collector off"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
    let f = dir.file("bad.toml", "[collector]\nmulvad = false\n");
    assert!(
        config(&["--config", &f]).is_err(),
        "unknown collector names are refused"
    );
}
