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
                obfuscators: vec![],
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
            device: DeviceState::LoggedIn,
            warnings: vec![],
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
                obfuscators: vec![],
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
            device: DeviceState::LoggedIn,
            warnings: vec![],
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

/// The obfuscator of the single-hop fixtures, at the relay 185.213.154.68.
fn obf(kind: &str, port: u16, protocol: &str) -> Obfuscator {
    Obfuscator {
        kind: kind.into(),
        address: sa(&format!("185.213.154.68:{port}")),
        protocol: some(protocol),
    }
}

/// One fixture of [`current_obfuscation_shapes`] and what it must give.
struct ObfCase {
    file: &'static str,
    kind: &'static str,
    obfuscators: Vec<Obfuscator>,
    daita: bool,
    pq: bool,
    features: Vec<&'static str>,
}

/// Each obfuscation shape of 2025.13 and later (an externally tagged enum, types in mixed
/// case), as `mullvad status --json` prints it: the kind in lower case, its obfuscators, the
/// relay still the WireGuard endpoint, DAITA a boolean.
#[test]
fn current_obfuscation_shapes() {
    let case = |file, kind, obfuscators, daita, pq, features| ObfCase {
        file,
        kind,
        obfuscators,
        daita,
        pq,
        features,
    };
    let cases = [
        case(
            "connected_quic.json",
            "quic",
            vec![obf("quic", 443, "udp")],
            false,
            false,
            vec!["Quic", "LanSharing"],
        ),
        case(
            "connected_shadowsocks.json",
            "shadowsocks",
            vec![obf("shadowsocks", 51900, "udp")],
            true,
            false,
            vec!["Daita", "Shadowsocks"],
        ),
        case(
            "connected_udp2tcp.json",
            "udp2tcp",
            vec![obf("udp2tcp", 443, "tcp")],
            false,
            false,
            vec!["LockdownMode", "Udp2Tcp"],
        ),
        case(
            "connected_lwo.json",
            "lwo",
            vec![obf("lwo", 51820, "udp")],
            false,
            true,
            vec!["Lwo", "QuantumResistance"],
        ),
        case(
            "connected_multiplexer.json",
            "multiplexer",
            vec![
                obf("udp2tcp", 443, "tcp"),
                obf("shadowsocks", 51900, "udp"),
                obf("quic", 443, "udp"),
            ],
            false,
            false,
            vec!["Shadowsocks", "Quic", "Udp2Tcp"],
        ),
    ];
    for ObfCase {
        file,
        kind,
        obfuscators,
        daita,
        pq,
        features,
    } in cases
    {
        let s = parse(file);
        assert_eq!(s.state, TunnelState::Connected, "{file}");
        assert_eq!(
            s.endpoint,
            Some(Endpoint {
                address: sa("185.213.154.68:51820"),
                protocol: some("udp"),
                entry_address: None,
                quantum_resistant: pq,
                obfuscation: some(kind),
                obfuscators,
                daita,
                tunnel_interface: some("wg0-mullvad"),
            }),
            "{file}"
        );
        assert_eq!(s.feature_indicators, features, "{file}");
        assert_eq!(s.device, DeviceState::LoggedIn, "{file}");
        assert_eq!((s.daita(), s.quantum_resistant()), (daita, pq), "{file}");
        assert!(
            s.warnings.is_empty() && s.unreadable.is_empty(),
            "{file}: {s:?}"
        );
        let st = up(s);
        assert_eq!(
            st.relay_roles(),
            vec![(
                "185.213.154.68".parse().unwrap(),
                "exit",
                "se-got-wg-001".into(),
                "Sweden".into(),
                "Gothenburg".into()
            )],
            "{file}"
        );
    }
}

/// Multihop as released versions print it: no `entry_city`/`entry_country`, so the entry
/// relay's country and city are the codes its hostname starts with.
#[test]
fn current_multihop_entry_codes_from_the_hostname() {
    let s = parse("connected_multihop_current.json");
    let ep = s.endpoint.clone().unwrap();
    assert_eq!(
        (ep.address, ep.entry_address),
        (sa("185.213.154.69:51820"), sa("185.65.135.117:3228"))
    );
    assert!(ep.daita && ep.quantum_resistant && ep.obfuscation.is_none());
    let loc = s.location.clone().unwrap();
    assert_eq!(
        (
            loc.entry_hostname.clone(),
            loc.entry_country.clone(),
            loc.entry_city.clone()
        ),
        (some("de-fra-wg-001"), None, None)
    );
    assert_eq!(
        loc.entry(),
        RelayPlace {
            hostname: "de-fra-wg-001".into(),
            country: "de".into(),
            city: "fra".into(),
        }
    );
    // The exit relay's names are given: they win over the hostname's codes.
    assert_eq!(
        loc.exit(),
        RelayPlace {
            hostname: "se-got-wg-101".into(),
            country: "Sweden".into(),
            city: "Gothenburg".into(),
        }
    );
    assert!(s.multihop() && s.daita() && s.quantum_resistant());
    assert!(s.unreadable.is_empty(), "{:?}", s.unreadable);
    assert_eq!(
        up(s).relay_roles(),
        vec![
            (
                "185.65.135.117".parse().unwrap(),
                "entry",
                "de-fra-wg-001".into(),
                "de".into(),
                "fra".into()
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
}

#[test]
fn hostname_codes_of_relay_names() {
    let codes = |h: &str| hostname_codes(h).map(|(a, b)| format!("{a}/{b}"));
    assert_eq!(codes("se-got-wg-101"), some("se/got"));
    assert_eq!(codes("US-NYC-WG-301"), some("us/nyc"));
    assert_eq!(codes("gb-lon-br-001"), some("gb/lon"));
    assert_eq!(codes("se-got"), None);
    assert_eq!(codes("wg0"), None);
    assert_eq!(codes(""), None);
    assert_eq!(codes("s3-got-wg-1"), None);
    assert_eq!(codes("sweden-got-wg-1"), None);
    assert_eq!(codes("se--wg-1"), None);
    // No hostname, no codes: empty labels.
    assert_eq!(Location::default().entry(), RelayPlace::default());
}

/// A revoked device: the CLI's warning line comes first, the JSON after it is the status.
#[test]
fn revoked_device_warning_before_the_json() {
    let s = parse("revoked_connected.txt");
    assert_eq!(s.state, TunnelState::Connected);
    assert_eq!(s.device, DeviceState::Revoked);
    assert_eq!(s.warnings, ["Warning: This device has been revoked."]);
    assert_eq!(
        s.endpoint.as_ref().and_then(|e| e.address),
        sa("185.213.154.68:51820")
    );
    assert_eq!(
        s.endpoint.as_ref().and_then(|e| e.obfuscation.clone()),
        None
    );
    assert!(!s.daita());
    assert!(s.unreadable.is_empty(), "{:?}", s.unreadable);
    let st = up(s);
    assert!(st.up);
    assert_eq!(st.probe_target().and_then(|t| t.iface), some("wg0-mullvad"));
}

/// Logged out: the daemon cannot make a tunnel without a key and stays in the error state.
#[test]
fn logged_out_warning_before_the_error_state() {
    let s = parse("logged_out_error.txt");
    assert_eq!(s.state, TunnelState::Error);
    assert_eq!(s.device, DeviceState::LoggedOut);
    assert_eq!(s.error_cause, some("tunnel_parameter_error"));
    assert_eq!(s.blocking, Some(true));
    assert_eq!(
        s.warnings,
        ["Warning: You are not logged in to an account."]
    );
    assert!(s.unreadable.is_empty(), "{:?}", s.unreadable);
}

/// The CLI checks the device only while connecting, connected or in error: no warning then
/// means logged in, and in the other states nothing is known.
#[test]
fn device_state_where_the_cli_says_nothing() {
    let device = |t: &str| parse_status(t).unwrap().device;
    assert_eq!(device(&fixture("connecting.json")), DeviceState::LoggedIn);
    assert_eq!(device(&fixture("error.json")), DeviceState::LoggedIn);
    assert_eq!(
        device(&fixture("disconnected_locked.json")),
        DeviceState::Unknown
    );
    assert_eq!(
        device(r#"{"state":"disconnecting","details":"nothing"}"#),
        DeviceState::Unknown
    );
    // A warning this agent does not know: kept, the device state unknown, nothing unreadable.
    let s = parse_status(
        "Warning: Your account expires in 2 days.\n{\"state\":\"connected\",\"details\":{}}\n",
    )
    .unwrap();
    assert_eq!(s.device, DeviceState::Unknown);
    assert_eq!(s.warnings, ["Warning: Your account expires in 2 days."]);
    assert!(s.unreadable.is_empty(), "{:?}", s.unreadable);
    // Other text before the JSON is noted; the status is still read.
    let s = parse_status("\nhello\n  {\"state\":\"connected\"}").unwrap();
    assert_eq!(s.state, TunnelState::Connected);
    assert_eq!(s.unreadable, ["text before the JSON: hello"]);
    assert_eq!(s.device, DeviceState::Unknown);
}

#[test]
fn a_warning_with_nothing_after_it() {
    let err = parse_status("Warning: This device has been revoked.\n").unwrap_err();
    assert_eq!(
        err,
        ParseError::NoJsonAfter("Warning: This device has been revoked.".into())
    );
    assert!(
        err.hint().contains("mullvad status --json"),
        "{}",
        err.hint()
    );
    // Cut inside the JSON after a warning: truncated, at the output's own line number.
    let err =
        parse_status("Warning: This device has been revoked.\n{\"state\":\"conn").unwrap_err();
    assert!(
        matches!(err, ParseError::Truncated { line: 2, .. }),
        "{err:?}"
    );
}

/// Obfuscation the agent cannot read is `unknown`, with a note, never a failure.
#[test]
fn odd_obfuscation_is_unknown_and_noted() {
    let obfuscation = |o: &str| {
        let s = parse_status(&format!(
            r#"{{"state":"connected","details":{{"endpoint":{{"address":"192.0.2.1:51820","obfuscation":{o}}}}}}}"#
        ))
        .unwrap();
        let ep = s.endpoint.unwrap();
        (ep.obfuscation, ep.obfuscators.len(), s.unreadable)
    };
    let (kind, n, notes) = obfuscation(r#"{"Wormhole":{"depth":3}}"#);
    assert_eq!((kind, n), (some("unknown"), 0));
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("details.endpoint.obfuscation: an unknown shape"),
        "{notes:?}"
    );
    let (kind, n, notes) = obfuscation(r#"{"Single":{"endpoint":{}}}"#);
    assert_eq!((kind, n), (some("unknown"), 0));
    assert_eq!(
        notes,
        ["details.endpoint.obfuscation.Single: no string `obfuscation_type`"]
    );
    // A future type keeps its name, in lower case.
    let (kind, n, notes) = obfuscation(
        r#"{"Single":{"endpoint":{"address":"192.0.2.1:8443","protocol":"udp"},"obfuscation_type":"Hyperspace"}}"#,
    );
    assert_eq!((kind, n, notes), (some("hyperspace"), 1, vec![]));
    // An empty multiplexer is still one.
    let (kind, n, notes) = obfuscation(r#"{"Multiplexer":{"direct":null,"obfuscators":[]}}"#);
    assert_eq!((kind, n, notes), (some("multiplexer"), 0, vec![]));
    let (kind, _, notes) = obfuscation("7");
    assert_eq!(kind, some("unknown"));
    assert_eq!(notes, ["details.endpoint.obfuscation: 7"]);
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

    let (dir, cli) =
        script("echo 'Error: Management interface is not reachable' >&2\necho more >&2\nexit 3");
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

    let (dir, cli) = script(r#"echo '{"state":"disconnected","details":{"locked_down":false}}'"#);
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

/// What leak detection asks: the daemon's tunnel interface and whether it is connected; the
/// interface it named last when it names none now; nothing while it does not answer.
#[test]
fn tunnel_connected_for_leak_detection() {
    let mut st = MullvadState::default();
    assert_eq!(st.tunnel_connected(), None);
    st.record(Ok(parse("connecting.json")));
    assert_eq!(st.tunnel_connected(), Some(("wg0-mullvad".into(), false)));
    st.record(Ok(parse("connected_future_fields.json")));
    assert_eq!(st.tunnel_connected(), Some(("wg1-mullvad".into(), true)));
    st.record(Ok(parse("disconnected_locked.json")));
    assert_eq!(st.tunnel_connected(), Some(("wg1-mullvad".into(), false)));
    st.record(Ok(parse("logged_out_error.txt")));
    assert_eq!(st.tunnel_connected(), Some(("wg1-mullvad".into(), false)));
    st.record(Err(&MullvadError::Timeout {
        cli: "mullvad".into(),
        timeout: Duration::from_secs(5),
    }));
    assert_eq!(st.tunnel_connected(), None);
    st.record(Ok(parse("revoked_connected.txt")));
    assert_eq!(st.tunnel_connected(), Some(("wg0-mullvad".into(), true)));
}
