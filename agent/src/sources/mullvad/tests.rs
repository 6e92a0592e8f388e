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
