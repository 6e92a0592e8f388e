//! The Mullvad poller end to end, through the real command path: a shell script named
//! `mullvad` in a temporary directory prints a fixture from `tests/fixtures/mullvad/` (or
//! exits non-zero, or hangs), the real agent runs it with `--mullvad-cli PATH
//! --mullvad-interval 1s` in the multihop lab's client namespace, and the `mullvad_*` series
//! are checked exactly after each switch. The connected fixtures' relay addresses are
//! replaced by the lab's entry and exit relays, so `mullvad_peer_relay_info` must name the
//! lab's peers. Current releases' output is among them: a revoked device's warning line
//! before the JSON, and multihop without entry country or city names.
//!
//! Needs root and the lab tools (`cargo xtask setup`); without them the tests print why and
//! pass, except with CI=true, where they fail. Lab prefix `wsm`; run with
//! `cargo test -p wirescope --test lab -- --test-threads=1 mullvad::`.

use crate::common;

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    thread::sleep,
    time::{Duration, Instant},
};

use xtask::{
    agent::Agent,
    lab::{LabConfig, Topology},
    scrape::Metrics,
};

use common::{Names, bin, lab_up, log_path, stop};

const PREFIX: &str = "wsm";
/// The agent's default timeout for one call (config::MULLVAD_TIMEOUT).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const INTERVAL: &str = "1s";
const STATES: [&str; 5] = [
    "connected",
    "connecting",
    "disconnected",
    "disconnecting",
    "error",
];
/// The relays of connected_multihop.json and connected_multihop_current.json, replaced by
/// the lab's.
const FIXTURE_EXIT: &str = "185.213.154.69:51820";
const FIXTURE_ENTRY: &str = "185.65.135.117:3228";
/// The relay of revoked_connected.txt, replaced by the lab's exit relay.
const FIXTURE_SINGLE: &str = "185.213.154.68:51820";

pub(crate) fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mullvad")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fake `mullvad` executable. Each switch writes a new file and renames it over the old
/// one, so that a call never runs a half-written script (nor fails with ETXTBSY). Other
/// modules use it too (`obfuscation`).
pub(crate) struct FakeCli {
    dir: PathBuf,
    path: PathBuf,
}

impl FakeCli {
    pub(crate) fn new(test: &str) -> FakeCli {
        let dir =
            std::env::temp_dir().join(format!("wirescope-mullvad-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("mullvad");
        FakeCli { dir, path }
    }

    fn script(&self, body: &str) {
        let tmp = self.dir.join(".mullvad.new");
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &self.path).expect("rename script");
    }

    /// Prints `json` for `status --json`, whatever the arguments (they are checked: anything
    /// else exits 64).
    pub(crate) fn prints(&self, json: &str) {
        self.script(&format!(
            "[ \"$1 $2\" = \"status --json\" ] || {{ echo \"unexpected arguments: $*\" >&2; exit 64; }}\n\
             cat <<'WIRESCOPE_EOF'\n{json}\nWIRESCOPE_EOF"
        ));
    }

    /// [`FakeCli::prints`], appending a line to `calls` at each call.
    fn prints_counting(&self, json: &str, calls: &Path) {
        self.script(&format!(
            "echo called >> '{}'\n\
             cat <<'WIRESCOPE_EOF'\n{json}\nWIRESCOPE_EOF",
            calls.display()
        ));
    }

    fn remove(&self) {
        std::fs::remove_file(&self.path).expect("remove script");
    }

    pub(crate) fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for FakeCli {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `mullvad_tunnel_state` as state -> value.
fn states(m: &Metrics) -> BTreeMap<String, f64> {
    m.select("mullvad_tunnel_state", &[])
        .map(|(l, v)| (l.get("state").cloned().unwrap_or_default(), v))
        .collect()
}

/// Every series of `name` as (labels, value).
fn series(m: &Metrics, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    m.select(name, &[]).map(|(l, v)| (l.clone(), v)).collect()
}

fn want_states(current: Option<&str>, extra: Option<&str>) -> BTreeMap<String, f64> {
    let mut m: BTreeMap<String, f64> = STATES
        .iter()
        .map(|s| (s.to_string(), if Some(*s) == current { 1.0 } else { 0.0 }))
        .collect();
    if let Some(e) = extra {
        m.insert(e.to_string(), 1.0);
    }
    m
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn mullvad_part(m: &Metrics) -> String {
    let mut out = String::new();
    for name in [
        "mullvad_up",
        "mullvad_tunnel_state",
        "mullvad_device_state",
        "mullvad_relay_info",
        "mullvad_feature_indicator",
        "mullvad_peer_relay_info",
    ] {
        for (l, v) in m.select(name, &[]) {
            out.push_str(&format!("{name}{l:?} {v}\n"));
        }
    }
    out
}

/// Scrapes until `ok` holds (every 200 ms, up to `timeout`); returns that scrape and how long
/// it took. Panics with the last scrape's Mullvad series and the agent's log otherwise.
fn wait_for(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Metrics) -> bool,
) -> (Metrics, Duration) {
    let start = Instant::now();
    let mut last = Metrics::default();
    while start.elapsed() < timeout {
        last = agent.scrape().expect("scrape");
        if ok(&last) {
            return (last, start.elapsed());
        }
        sleep(Duration::from_millis(200));
    }
    panic!(
        "{what}: not within {timeout:?}; last Mullvad series:\n{}\nagent log:\n{}",
        mullvad_part(&last),
        agent.log_text()
    );
}

fn up(m: &Metrics) -> f64 {
    m.get("mullvad_up", &[]).expect("one mullvad_up")
}

/// Waits until the agent's log contains `text`.
fn wait_log(agent: &Agent, text: &str, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if agent.log_text().contains(text) {
            return;
        }
        sleep(Duration::from_millis(100));
    }
    panic!(
        "the agent never logged {text:?}; its log:\n{}",
        agent.log_text()
    );
}

/// `mullvad_device_state` as state -> value.
fn device(m: &Metrics) -> BTreeMap<String, f64> {
    m.select("mullvad_device_state", &[])
        .map(|(l, v)| (l.get("state").cloned().unwrap_or_default(), v))
        .collect()
}

fn want_device(current: Option<&str>) -> BTreeMap<String, f64> {
    ["logged_in", "logged_out", "revoked"]
        .iter()
        .map(|s| (s.to_string(), if Some(*s) == current { 1.0 } else { 0.0 }))
        .collect()
}

/// The `mullvad_feature_indicator` series at 1, sorted.
fn features_on(m: &Metrics) -> Vec<String> {
    let mut on: Vec<String> = m
        .select("mullvad_feature_indicator", &[])
        .filter(|(_, v)| *v == 1.0)
        .map(|(l, _)| l.get("feature").cloned().unwrap_or_default())
        .collect();
    on.sort();
    on
}

/// mullvad_up 0, every known state 0, no relays: what a failed call leaves.
fn assert_down(m: &Metrics, what: &str) {
    assert_eq!(up(m), 0.0, "{what}: mullvad_up");
    assert_eq!(states(m), want_states(None, None), "{what}: states");
    assert_eq!(device(m), want_device(None), "{what}: device");
    assert_eq!(
        series(m, "mullvad_feature_indicator"),
        vec![],
        "{what}: feature_indicator"
    );
    assert_eq!(
        series(m, "mullvad_relay_info"),
        vec![],
        "{what}: relay_info"
    );
    assert_eq!(
        series(m, "mullvad_peer_relay_info"),
        vec![],
        "{what}: peer_relay_info"
    );
}

fn assert_healthy(agent: &Agent, what: &str) {
    let (code, body) = agent.get("/healthz").expect("healthz");
    assert_eq!(code, 200, "{what}: /healthz answered {body}");
}

/// Whether `pid` has exited (gone, or a zombie left for whoever inherited it).
fn exited(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn mullvad_states_through_the_real_command() {
    let Some(lab) = lab_up(
        "mullvad_states_through_the_real_command",
        LabConfig::new(Topology::Multihop, PREFIX),
    ) else {
        return;
    };
    let Names {
        tun,
        relay: exit_key,
        ..
    } = Names::of(&lab);
    let entry_key = lab.entry().expect("entry relay").wg().public_key.clone();
    let entry_ep = lab.entry_endpoint().to_string();
    let exit_ep = lab.exit_endpoint().to_string();

    // The connected multihop fixture, naming the lab's relays.
    let template = fixture("connected_multihop.json");
    assert!(template.contains(FIXTURE_EXIT) && template.contains(FIXTURE_ENTRY));
    let connected = template
        .replace(FIXTURE_EXIT, &exit_ep)
        .replace(FIXTURE_ENTRY, &entry_ep);

    let cli = FakeCli::new("states");
    cli.prints(&connected);
    let cli_arg = cli.arg();
    let agent = Agent::start(
        bin(),
        &lab.client().netns,
        &["--mullvad-cli", &cli_arg, "--mullvad-interval", INTERVAL],
        &log_path("mullvad-states"),
    )
    .expect("agent starts");
    let short = Duration::from_secs(10);

    // Connected, multihop: relays, and the lab's two peers named by role.
    let (m, _) = wait_for(&agent, "connected", short, |m| {
        up(m) == 1.0 && states(m).get("connected") == Some(&1.0)
    });
    assert_eq!(states(&m), want_states(Some("connected"), None));
    let relay = labels(&[
        ("hostname", "se-got-wg-101"),
        ("country", "Sweden"),
        ("city", "Gothenburg"),
        ("entry_hostname", "de-fra-wg-001"),
        ("entry_country", "Germany"),
        ("entry_city", "Frankfurt"),
        ("multihop", "true"),
        ("daita", "true"),
        ("quantum_resistant", "true"),
        ("obfuscation", "none"),
    ]);
    assert_eq!(series(&m, "mullvad_relay_info"), vec![(relay.clone(), 1.0)]);
    let mut peers = series(&m, "mullvad_peer_relay_info");
    peers.sort_by(|a, b| a.0.get("role").cmp(&b.0.get("role")));
    assert_eq!(
        peers,
        vec![
            (
                labels(&[
                    ("interface", &tun),
                    ("peer", &entry_key),
                    ("role", "entry"),
                    ("hostname", "de-fra-wg-001"),
                    ("country", "Germany"),
                    ("city", "Frankfurt"),
                ]),
                1.0
            ),
            (
                labels(&[
                    ("interface", &tun),
                    ("peer", &exit_key),
                    ("role", "exit"),
                    ("hostname", "se-got-wg-101"),
                    ("country", "Sweden"),
                    ("city", "Gothenburg"),
                ]),
                1.0
            ),
        ]
    );
    // The daemon's view does not change the datapath's: still hop 1 and hop 2.
    assert_eq!(
        m.get("wirescope_peer_info", &[("peer", &exit_key), ("hop", "2")])
            .unwrap(),
        1.0
    );

    assert_eq!(device(&m), want_device(Some("logged_in")));
    assert_eq!(features_on(&m), ["Daita", "Multihop", "QuantumResistance"]);

    // A current release with this device revoked: the warning line comes first and the
    // status after it is read (mullvad_up stays 1), the device state says revoked, and the
    // single relay it names is the lab's exit peer.
    let revoked = fixture("revoked_connected.txt");
    assert!(revoked.starts_with("Warning: This device has been revoked.\n"));
    assert!(revoked.contains(FIXTURE_SINGLE));
    cli.prints(
        revoked
            .trim_end()
            .replace(FIXTURE_SINGLE, &exit_ep)
            .as_str(),
    );
    let (m, _) = wait_for(&agent, "revoked", short, |m| {
        device(m).get("revoked") == Some(&1.0)
    });
    assert_eq!(up(&m), 1.0, "revoked: mullvad_up");
    assert_eq!(states(&m), want_states(Some("connected"), None));
    assert_eq!(device(&m), want_device(Some("revoked")));
    assert_eq!(features_on(&m), Vec::<String>::new());
    assert_eq!(
        series(&m, "mullvad_feature_indicator").len(),
        15,
        "every known indicator, at 0"
    );
    assert_eq!(
        series(&m, "mullvad_relay_info"),
        vec![(
            labels(&[
                ("hostname", "se-got-wg-001"),
                ("country", "Sweden"),
                ("city", "Gothenburg"),
                ("entry_hostname", ""),
                ("entry_country", ""),
                ("entry_city", ""),
                ("multihop", "false"),
                ("daita", "false"),
                ("quantum_resistant", "false"),
                ("obfuscation", "none"),
            ]),
            1.0
        )]
    );
    assert_eq!(
        series(&m, "mullvad_peer_relay_info"),
        vec![(
            labels(&[
                ("interface", &tun),
                ("peer", &exit_key),
                ("role", "exit"),
                ("hostname", "se-got-wg-001"),
                ("country", "Sweden"),
                ("city", "Gothenburg"),
            ]),
            1.0
        )]
    );
    wait_log(
        &agent,
        "Mullvad: the CLI says \"Warning: This device has been revoked.\": the tunnel cannot reconnect",
        short,
    );

    // Multihop as current releases print it: no entry country or city, so the entry
    // relay's come from its hostname (de-fra-wg-001: de, fra).
    let current = fixture("connected_multihop_current.json")
        .replace(FIXTURE_EXIT, &exit_ep)
        .replace(FIXTURE_ENTRY, &entry_ep);
    cli.prints(current.trim_end());
    let (m, _) = wait_for(&agent, "current multihop", short, |m| {
        device(m).get("logged_in") == Some(&1.0) && series(m, "mullvad_peer_relay_info").len() == 2
    });
    assert_eq!(states(&m), want_states(Some("connected"), None));
    let mut peers = series(&m, "mullvad_peer_relay_info");
    peers.sort_by(|a, b| a.0.get("role").cmp(&b.0.get("role")));
    assert_eq!(
        peers[0],
        (
            labels(&[
                ("interface", &tun),
                ("peer", &entry_key),
                ("role", "entry"),
                ("hostname", "de-fra-wg-001"),
                ("country", "de"),
                ("city", "fra"),
            ]),
            1.0
        )
    );
    let relay_now = series(&m, "mullvad_relay_info");
    assert_eq!(relay_now.len(), 1);
    assert_eq!(
        (
            relay_now[0].0.get("entry_country").map(String::as_str),
            relay_now[0].0.get("entry_city").map(String::as_str),
            relay_now[0].0.get("daita").map(String::as_str),
        ),
        (Some("de"), Some("fra"), Some("true"))
    );

    // A state from a future version: its own series at 1, every known one 0.
    cli.prints(&fixture("unknown_state.json"));
    let (m, _) = wait_for(&agent, "unknown state", short, |m| {
        states(m).get("hibernating") == Some(&1.0)
    });
    assert_eq!(up(&m), 1.0);
    assert_eq!(states(&m), want_states(None, Some("hibernating")));
    assert_eq!(series(&m, "mullvad_relay_info"), vec![]);
    assert_eq!(series(&m, "mullvad_peer_relay_info"), vec![]);

    // Disconnected with the kill switch on; then the error state.
    for (f, state) in [
        ("disconnected_locked.json", "disconnected"),
        ("error.json", "error"),
    ] {
        cli.prints(&fixture(f));
        let (m, _) = wait_for(&agent, state, short, |m| states(m).get(state) == Some(&1.0));
        assert_eq!(up(&m), 1.0, "{f}");
        assert_eq!(states(&m), want_states(Some(state), None), "{f}");
        assert_eq!(series(&m, "mullvad_relay_info"), vec![], "{f}");
        assert_eq!(series(&m, "mullvad_peer_relay_info"), vec![], "{f}");
    }

    // A non-zero exit: down, with stderr's first line in the log.
    cli.script(
        "echo 'Error: Management interface is not reachable: is the daemon running?' >&2\n\
         echo 'second line' >&2\nexit 3",
    );
    let (m, _) = wait_for(&agent, "non-zero exit", short, |m| up(m) == 0.0);
    assert_down(&m, "non-zero exit");
    wait_log(
        &agent,
        "failed with exit status 3: Error: Management interface is not reachable: is the daemon running?;",
        short,
    );
    assert_healthy(&agent, "non-zero exit");

    // Back up, then truncated output: down again, named as truncated.
    cli.prints(&connected);
    wait_for(&agent, "connected again", short, |m| up(m) == 1.0);
    cli.prints(&fixture("truncated.json"));
    let (m, _) = wait_for(&agent, "truncated", short, |m| up(m) == 0.0);
    assert_down(&m, "truncated");
    wait_log(&agent, "ends in the middle of the JSON (truncated", short);

    // Back up, then a hang: the call is killed after the timeout, with what it started, and
    // mullvad_up turns 0 within timeout + interval; the agent stays healthy meanwhile.
    cli.prints(&connected);
    let (m, _) = wait_for(&agent, "connected before the hang", short, |m| {
        up(m) == 1.0 && series(m, "mullvad_peer_relay_info").len() == 2
    });
    assert_eq!(series(&m, "mullvad_relay_info"), vec![(relay, 1.0)]);
    let pidfile = cli.dir.join("sleep.pid");
    cli.script(&format!(
        "sleep 30 &\necho $! > '{}'\nwait",
        pidfile.display()
    ));
    let budget = CALL_TIMEOUT + Duration::from_secs(1);
    let (m, took) = wait_for(&agent, "hang", budget + Duration::from_secs(3), |m| {
        assert_healthy(&agent, "during the hang");
        up(m) == 0.0
    });
    assert_down(&m, "hang");
    assert!(
        took >= CALL_TIMEOUT - Duration::from_secs(1),
        "mullvad_up went 0 after {took:?}, before the {CALL_TIMEOUT:?} timeout"
    );
    wait_log(&agent, "did not finish within 5s and was killed", short);
    let pid = std::fs::read_to_string(&pidfile).expect("the hung script wrote its pid");
    let pid = pid.trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !exited(&pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    assert!(
        exited(&pid),
        "the hung script's `sleep 30` (pid {pid}) was not killed"
    );
    assert_healthy(&agent, "after the hang");

    // The command goes away: Mullvad is off, logged once, nothing else breaks.
    cli.remove();
    wait_log(
        &agent,
        "was not found, so Mullvad counts as off",
        budget + short,
    );
    let m = agent.scrape().expect("scrape");
    assert_down(&m, "missing command");
    sleep(Duration::from_secs(3));
    let log = agent.log_text();
    assert_eq!(
        log.matches("was not found, so Mullvad counts as off")
            .count(),
        1,
        "logged once; the log:\n{log}"
    );
    assert_down(&agent.scrape().expect("scrape"), "missing command, later");
    assert_healthy(&agent, "missing command");
    assert!(
        agent
            .scrape()
            .expect("scrape")
            .get("wirescope_peer_info", &[("peer", &entry_key), ("hop", "1")])
            .unwrap()
            == 1.0,
        "the rest of the agent still works"
    );

    stop(agent);
    lab.teardown().unwrap();
}

#[test]
fn nonexistent_cli_leaves_the_agent_running() {
    let Some(lab) = lab_up(
        "nonexistent_cli_leaves_the_agent_running",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let agent = Agent::start(
        bin(),
        &lab.client().netns,
        &[
            "--mullvad-cli",
            "/nonexistent",
            "--mullvad-interval",
            INTERVAL,
        ],
        &log_path("mullvad-nonexistent"),
    )
    .expect("agent starts");
    wait_log(
        &agent,
        "`/nonexistent` was not found, so Mullvad counts as off",
        Duration::from_secs(10),
    );
    sleep(Duration::from_secs(2));
    let m = agent.scrape().expect("scrape");
    assert_down(&m, "/nonexistent");
    assert_healthy(&agent, "/nonexistent");
    let log = agent.log_text();
    assert_eq!(
        log.matches("was not found").count(),
        1,
        "logged once; the log:\n{log}"
    );
    stop(agent);
    lab.teardown().unwrap();
}

/// `--no-collector.mullvad`: a gateway without the app is never made to run `mullvad` and
/// exports no mullvad_* series; the same agent without the switch calls it within seconds.
#[test]
fn mullvad_collector_off_never_polls() {
    let Some(lab) = lab_up(
        "mullvad_collector_off_never_polls",
        LabConfig::new(Topology::Single, PREFIX),
    ) else {
        return;
    };
    let cli = FakeCli::new("collector-off");
    let calls =
        std::env::temp_dir().join(format!("wirescope-mullvad-calls-{}", std::process::id()));
    let count = || {
        std::fs::read_to_string(&calls)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let _ = std::fs::remove_file(&calls);
    cli.prints_counting(&fixture("connected_multihop.json"), &calls);
    let cli_arg = cli.arg();
    for (off, log) in [
        (true, "mullvad-collector-off"),
        (false, "mullvad-collector-on"),
    ] {
        let mut args = vec!["--mullvad-cli", &cli_arg, "--mullvad-interval", INTERVAL];
        if off {
            args.push("--no-collector.mullvad");
        }
        let agent =
            Agent::start(bin(), &lab.client().netns, &args, &log_path(log)).expect("agent starts");
        sleep(Duration::from_secs(3));
        let m = agent.scrape().expect("scrape");
        let mullvad_series = m.names().filter(|n| n.starts_with("mullvad_")).count();
        stop(agent);
        if off {
            assert_eq!(count(), 0, "the CLI was run with the collector off");
            assert_eq!(mullvad_series, 0, "mullvad_* series with the collector off");
        } else {
            assert!(count() >= 2, "{} calls in 3 s at a 1 s interval", count());
            assert!(mullvad_series > 0);
        }
    }
    let _ = std::fs::remove_file(&calls);
    lab.teardown().unwrap();
}
