//! `wirescope doctor`, end to end: the real binary, `--json`, each check made to fail, the
//! finding asserted with its fix, then the printed fix run (`sh -c FIX`, in the namespace the
//! doctor ran in) and the finding asserted gone.
//!
//! - key files: a 0644 file in a temporary `--wireguard-dir` (no root needed);
//! - Mullvad: a fake `--mullvad-cli` printing `status --json` (no root needed);
//! - permissions: doctor run as user nobody (setpriv); the fix installs a systemd unit, so
//!   only "gone as root" is checked;
//! - socket buffers: `net.core.rmem_max` lowered on the host (it is global: read-only inside
//!   a network namespace on this kernel), restored afterwards whatever happens;
//! - the lab (prefix "wsy", a single relay behind a hop whose onward link has a 1400-byte
//!   MTU): with the agent running, the tunnel MTU above the measured path MTU, and no
//!   response from the peer (its answers dropped in the hop, so handshake timeouts are
//!   counted); with a stand-in agent, UDP receive errors on the WireGuard port; then, host
//!   checks only, the persistent keepalive unset, an nftables rule dropping the WireGuard
//!   port, no kill switch (the fix's ruleset must keep the tunnel working and stop traffic
//!   outside it), and no response from the peer without an agent.
//!
//! Needs root for all but the first two; with CI=true a missing prerequisite fails. Run with
//! `--test-threads=1` (the lab tests share their prefix; `cargo xtask test` does): `cargo
//! test -p wirescope --test lab -- --test-threads=1 doctor::`.

use crate::common;

use std::{
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::{agent::Agent, lab::GATEWAY_V4};

use common::{Names, bin, lab_up, log_path, privileged, small_mtu_hop, wait_series};

const PREFIX: &str = "wsy";
const PATH_MTU: u32 = 1400;
const WG_MTU: u32 = 1420;
/// Nothing listens here: doctor checks the host only.
const NO_AGENT: &str = "127.0.0.1:9";

/// `wirescope doctor --json ARGS`, in `ns` when given. Returns the report and the exit code.
fn doctor(ns: Option<&str>, args: &[&str]) -> (Value, i32) {
    let b = bin().display().to_string();
    let mut cmd = match ns {
        Some(ns) => xtask::netns::command(ns, &b),
        None => Command::new(&b),
    };
    let out = cmd
        .args(["doctor", "--json"])
        .args(args)
        .output()
        .expect("running wirescope doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let code = out.status.code().expect("doctor exited");
    // The exit status is exactly "a problem was found".
    assert_eq!(v["ok"].as_bool(), Some(code == 0), "{v:#}");
    assert_eq!(code == 0, v["problems"] == 0, "{v:#}");
    (v, code)
}

/// The findings of `check` with `severity` whose message contains `needle`.
fn findings<'a>(v: &'a Value, check: &str, severity: &str, needle: &str) -> Vec<&'a Value> {
    v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| {
            f["check"] == check
                && f["severity"] == severity
                && f["message"].as_str().is_some_and(|m| m.contains(needle))
        })
        .collect()
}

/// The one problem of `check` mentioning `needle`; returns its fix.
fn problem(v: &Value, check: &str, needle: &str) -> String {
    let f = findings(v, check, "problem", needle);
    assert_eq!(
        f.len(),
        1,
        "want one {check} problem mentioning {needle:?}: {v:#}"
    );
    f[0]["fix"]
        .as_str()
        .expect("a problem has a fix")
        .to_string()
}

fn no_problem(v: &Value, check: &str, needle: &str) {
    let f = findings(v, check, "problem", needle);
    assert!(
        f.is_empty(),
        "{check} problem {needle:?} still there: {v:#}"
    );
}

/// Runs a printed fix with `sh -c`, in `ns` when given.
fn apply(ns: Option<&str>, fix: &str) {
    let mut cmd = match ns {
        Some(ns) => xtask::netns::command(ns, "sh"),
        None => Command::new("sh"),
    };
    let out = cmd.args(["-c", fix]).output().expect("running the fix");
    assert!(
        out.status.success(),
        "the fix `{fix}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `wirescope doctor ARGS` (human output), in `ns` when given.
fn doctor_human(ns: Option<&str>, args: &[&str]) -> String {
    let b = bin().display().to_string();
    let mut cmd = match ns {
        Some(ns) => xtask::netns::command(ns, &b),
        None => Command::new(&b),
    };
    let out = cmd
        .arg("doctor")
        .args(args)
        .output()
        .expect("running wirescope doctor");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Serves `metrics` on `addr` in `ns` as /metrics, forever (a stand-in agent).
fn fake_agent(ns: &str, addr: &str, metrics: String) {
    let a = addr.to_string();
    let listener = xtask::netns::run_in(ns, move || std::net::TcpListener::bind(a))
        .expect("entering the namespace")
        .expect("binding the stand-in agent");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\r\n{metrics}"
            );
        }
    });
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wirescope-doctor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn key_file_readable_by_others() {
    let dir = temp_dir("keys");
    let conf = dir.join("wg0.conf");
    std::fs::write(&conf, "[Interface]\nPrivateKey = x\n").expect("write");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let good = dir.join("wg1.conf");
    std::fs::write(&good, "[Interface]\n").expect("write");
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let d = dir.display().to_string();
    let args = ["--wireguard-dir", &d, "--web.listen-address", NO_AGENT];

    let (v, code) = doctor(None, &args);
    assert_eq!(code, 1);
    let fix = problem(
        &v,
        "key_files",
        &format!("{} has mode 0644", conf.display()),
    );
    assert_eq!(fix, format!("chmod 600 {}", conf.display()));
    no_problem(&v, "key_files", "wg1.conf");

    apply(None, &fix);
    let (v, _) = doctor(None, &args);
    no_problem(&v, "key_files", "");
    assert_eq!(findings(&v, "key_files", "ok", "2 files").len(), 1, "{v:#}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_capabilities() {
    if !privileged("the capabilities test switches to user nobody") {
        return;
    }
    // A copy nobody may run, wherever the build directory is.
    let dir = temp_dir("caps");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let exe = dir.join("wirescope");
    std::fs::copy(bin(), &exe).expect("copying the binary");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["doctor", "--json", "--web.listen-address", NO_AGENT])
        .current_dir(&dir)
        .output()
        .expect("running setpriv (util-linux)");
    let v: Value = serde_json::from_slice(&out.stdout).expect("doctor --json as nobody");
    assert_eq!(out.status.code(), Some(1));
    let fix = problem(
        &v,
        "permissions",
        "missing CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_NET_RAW",
    );
    assert_eq!(
        fix,
        format!(
            "sudo install -m 755 {} /usr/local/bin/wirescope && sudo install -m 644 \
             deploy/wirescope.service /etc/systemd/system/ && sudo systemctl daemon-reload && \
             sudo systemctl enable --now wirescope",
            exe.display()
        )
    );
    // As root the finding is gone (the unit itself cannot be installed in a test).
    let (v, _) = doctor(None, &["--web.listen-address", NO_AGENT]);
    no_problem(&v, "permissions", "");
    let _ = std::fs::remove_dir_all(dir);
}

/// A fake `mullvad` printing `out` for `status --json`.
fn fake_mullvad(dir: &Path, out: &str) -> String {
    let p = dir.join("mullvad");
    std::fs::write(&p, format!("#!/bin/sh\ncat <<'EOF'\n{out}\nEOF\n")).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p.display().to_string()
}

#[test]
fn mullvad_state_relays_and_features() {
    let dir = temp_dir("mullvad");
    let connected = r#"{"state":"connected","details":{"endpoint":{"address":"185.213.154.68:51820","protocol":"udp","quantum_resistant":true,"obfuscation":null,"entry_endpoint":{"address":"185.65.135.1:51820","protocol":"udp"},"tunnel_interface":"wg0-mullvad","daita":{"enabled":true}},"location":{"ipv4":"185.213.154.70","hostname":"se-got-wg-101","city":"Gothenburg","country":"Sweden","entry_hostname":"de-fra-wg-001","entry_city":"Frankfurt","entry_country":"Germany","mullvad_exit_ip":true},"feature_indicators":["Multihop","Daita","QuantumResistance"]}}"#;
    let cli = fake_mullvad(&dir, connected);
    let args = ["--mullvad-cli", &cli, "--web.listen-address", NO_AGENT];
    let (v, _) = doctor(None, &args);
    let f = findings(&v, "mullvad", "info", "state connected");
    assert_eq!(f.len(), 1, "{v:#}");
    let m = f[0]["message"].as_str().unwrap_or_default();
    for want in [
        "exit se-got-wg-101 (Gothenburg)",
        "entry de-fra-wg-001 (Frankfurt)",
        "multihop on",
        "DAITA on",
    ] {
        assert!(m.contains(want), "{want:?} not in {m:?}");
    }

    let cli = fake_mullvad(
        &dir,
        r#"{"state":"error","details":{"cause":"the firewall could not be set up"}}"#,
    );
    let (v, code) = doctor(
        None,
        &["--mullvad-cli", &cli, "--web.listen-address", NO_AGENT],
    );
    assert_eq!(code, 1);
    assert_eq!(problem(&v, "mullvad", "state error"), "mullvad reconnect");

    let (v, _) = doctor(
        None,
        &[
            "--mullvad-cli",
            "/nonexistent/mullvad",
            "--web.listen-address",
            NO_AGENT,
        ],
    );
    assert_eq!(
        findings(&v, "mullvad", "info", "not installed").len(),
        1,
        "{v:#}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Puts `net.core.rmem_max` back when dropped.
struct RestoreRmem(String);

impl Drop for RestoreRmem {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/net/core/rmem_max", &self.0);
    }
}

#[test]
fn rmem_max_below_baseline() {
    if !privileged("the socket buffer test changes net.core.rmem_max") {
        return;
    }
    let path = "/proc/sys/net/core/rmem_max";
    let orig = std::fs::read_to_string(path).expect("rmem_max");
    let _restore = RestoreRmem(orig.trim().to_string());
    std::fs::write(path, "212992").expect("lowering rmem_max");
    let args = ["--web.listen-address", NO_AGENT];

    let (v, code) = doctor(None, &args);
    assert_eq!(code, 1);
    let fix = problem(&v, "socket_buffers", "net.core.rmem_max = 212992");
    assert_eq!(fix, "sysctl -w net.core.rmem_max=2621440");

    apply(None, &fix);
    let (v, _) = doctor(None, &args);
    no_problem(&v, "socket_buffers", "rmem_max");
    assert_eq!(
        findings(&v, "socket_buffers", "ok", "net.core.rmem_max = 2621440").len(),
        1,
        "{v:#}"
    );
}

#[test]
fn lab_mtu_keepalive_kill_switch_blocked_port() {
    let cfg = small_mtu_hop(PREFIX, PATH_MTU, WG_MTU);
    let Some(lab) = lab_up("lab_mtu_keepalive_kill_switch_blocked_port", cfg) else {
        return;
    };
    let Names {
        cns: client_ns,
        tun: wg,
        ..
    } = Names::of(&lab);
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let ns = Some(client_ns.as_str());
    let relay = lab.entry_endpoint();
    let key = lab.client().wg().peers[0].public_key.clone();
    let empty = temp_dir("lab-keys");
    let empty = empty.display().to_string();

    // MTU above the measured path MTU, with the agent measuring it.
    let probe = format!("{GATEWAY_V4}@{wg}");
    let agent = Agent::start(
        bin(),
        &client_ns,
        &[
            "--probe",
            &probe,
            "--probe-interval",
            "200ms",
            "--pmtu-interval",
            "1h",
        ],
        &log_path("doctor"),
    )
    .expect("agent starts");
    let rec = PATH_MTU - 60;
    let _ = wait_series(
        &agent,
        "wirescope_recommended_mtu_bytes",
        &[("interface", wg.as_str())],
        Duration::from_secs(60),
    );
    let with_agent = [
        "--web.listen-address",
        xtask::agent::LISTEN,
        "--wireguard-dir",
        &empty,
    ];
    let (v, code) = doctor(ns, &with_agent);
    assert_eq!(code, 1);
    assert_eq!(v["agent"], xtask::agent::LISTEN, "{v:#}");
    let fix = problem(&v, "mtu", &format!("{wg}: MTU {WG_MTU} exceeds the {rec}"));
    let human = doctor_human(ns, &with_agent);
    println!("wirescope doctor in the lab, agent running:\n{human}");
    assert!(human.contains(&format!("fix: {fix}")), "{human}");
    assert_eq!(fix, format!("ip link set dev {wg} mtu {rec}"));
    apply(ns, &fix);
    let (v, _) = doctor(ns, &with_agent);
    no_problem(&v, "mtu", "");
    assert_eq!(
        findings(&v, "mtu", "ok", &format!("{wg}: MTU {rec} fits")).len(),
        1,
        "{v:#}"
    );

    // No response from the peer: the relay's answers dropped on the path (the hop's
    // forward chain, which doctor cannot see), and the session forgotten (the peer removed
    // and added back), so the next packet needs a handshake that gets no answer.
    let hop_ns = lab.hop().expect("the lab has a hop").netns.clone();
    let block = format!(
        "nft 'add table inet wsyblock; add chain inet wsyblock pathblock {{ type filter hook forward priority 0; policy accept; }}; add rule inet wsyblock pathblock udp sport {} drop'",
        relay.port()
    );
    apply(Some(&hop_ns), &block);
    let allowed = lab.client().wg().peers[0].allowed_ips.join(",");
    apply(
        ns,
        &format!(
            "wg set {wg} peer {key} remove && wg set {wg} peer {key} endpoint {relay} allowed-ips {allowed}"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let gw = GATEWAY_V4.to_string();
        let _ = xtask::netns::exec(&client_ns, &["ping", "-c1", "-W1", "-q", &gw]);
        let m = agent.scrape().expect("scrape");
        if m.sum(
            "wirescope_handshake_timeouts_total",
            &[("peer", key.as_str())],
        ) > 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no handshake timeout counted: {}",
            agent.log_text()
        );
    }
    let (v, code) = doctor(ns, &with_agent);
    assert_eq!(code, 1);
    let fix = problem(&v, "handshake", "no response from peer");
    assert!(fix.contains(&format!("ping -c 3 {}", relay.ip())), "{fix}");
    let p = findings(&v, "handshake", "problem", "initiations unanswered");
    assert_eq!(p.len(), 1, "{v:#}");
    let msg = p[0]["message"].as_str().unwrap_or_default();
    let n: f64 = msg
        .split(" initiations unanswered")
        .next()
        .and_then(|b| b.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {msg:?}"));
    assert!(n >= 1.0, "{msg}");
    let human = doctor_human(ns, &with_agent);
    println!("wirescope doctor, the relay's answers dropped on the path, agent running:\n{human}");
    assert!(human.contains(&format!("fix: {fix}")), "{human}");
    // The path unblocked: the next handshake completes and the finding goes.
    apply(Some(&hop_ns), "nft delete table inet wsyblock");
    lab.handshake(Duration::from_secs(30))
        .expect("handshake once unblocked");
    let (v, _) = doctor(ns, &with_agent);
    no_problem(&v, "handshake", "");
    agent.stop().expect("agent stops");

    // UDP receive errors counted on the WireGuard port call for a larger rmem_max. A
    // stand-in agent serves them (real receive-buffer overflows are not reproducible on
    // demand). rmem_max is global (read-only in a namespace), so the fix runs on the host.
    let port = lab.client().wg().listen_port;
    let fake = "127.0.0.1:9587";
    fake_agent(
        &client_ns,
        fake,
        format!("wirescope_udp_receive_errors_total{{port=\"{port}\"}} 12\n"),
    );
    let rmem = "/proc/sys/net/core/rmem_max";
    let orig = std::fs::read_to_string(rmem).expect("rmem_max");
    let _restore = RestoreRmem(orig.trim().to_string());
    std::fs::write(rmem, "4194304").expect("setting rmem_max");
    let fake_args = ["--web.listen-address", fake, "--wireguard-dir", &empty];
    let (v, _) = doctor(ns, &fake_args);
    let fix = problem(
        &v,
        "socket_buffers",
        &format!(
            "counted 12 UDP datagrams dropped on full receive buffers of WireGuard ports {port}"
        ),
    );
    assert_eq!(fix, "sysctl -w net.core.rmem_max=8388608");
    apply(None, &fix);
    let (v, _) = doctor(ns, &fake_args);
    no_problem(&v, "socket_buffers", "");
    assert_eq!(
        findings(
            &v,
            "socket_buffers",
            "info",
            "although net.core.rmem_max = 8388608"
        )
        .len(),
        1,
        "{v:#}"
    );
    drop(_restore);

    // Host checks only from here.
    let host_only = ["--web.listen-address", NO_AGENT, "--wireguard-dir", &empty];

    // Persistent keepalive unset on a peer with an endpoint, from a non-public address.
    let (v, _) = doctor(ns, &host_only);
    let fix = problem(&v, "keepalive", &format!("{wg} peer {key} ({relay})"));
    assert_eq!(
        fix,
        format!("wg set {wg} peer {key} persistent-keepalive 25")
    );
    apply(ns, &fix);
    let (v, _) = doctor(ns, &host_only);
    no_problem(&v, "keepalive", "");
    assert_eq!(
        findings(&v, "keepalive", "ok", "persistent keepalive 25 s").len(),
        1
    );

    // An nftables rule dropping the WireGuard port.
    apply(
        ns,
        &format!(
            "nft 'add table inet wsyblock; add chain inet wsyblock out {{ type filter hook output priority 0; policy accept; }}; add rule inet wsyblock out udp dport {} drop'",
            relay.port()
        ),
    );
    let (v, _) = doctor(ns, &host_only);
    let fix = problem(&v, "firewall", &format!("drops UDP port {}", relay.port()));
    assert!(
        fix.starts_with("nft delete rule inet wsyblock out handle "),
        "{fix}"
    );
    apply(ns, &fix);
    let (v, _) = doctor(ns, &host_only);
    no_problem(&v, "firewall", "");
    apply(ns, "nft delete table inet wsyblock");

    // No kill switch: the fix installs one, and the tunnel still works behind it.
    let (v, _) = doctor(ns, &host_only);
    let fix = problem(&v, "kill_switch", &format!("outside {wg}"));
    assert!(fix.contains("policy drop"), "{fix}");
    apply(ns, &fix);
    let (v, _) = doctor(ns, &host_only);
    no_problem(&v, "kill_switch", "");
    assert_eq!(
        findings(&v, "kill_switch", "ok", "wirescope_killswitch/output").len(),
        1,
        "{v:#}"
    );
    lab.handshake(Duration::from_secs(20))
        .expect("the tunnel works behind the kill switch");
    // Outside the tunnel: the hop's address on the underlay is now unreachable.
    let hop = lab.client().underlay().peer_address.to_string();
    let out = xtask::netns::command(&client_ns, "ping")
        .args(["-c", "1", "-W", "1", &hop])
        .output()
        .expect("ping");
    assert!(
        !out.status.success(),
        "ping to {hop} outside the tunnel got through"
    );

    // No response from the peer without an agent: initiations sent (the peer's tx bytes)
    // and no handshake.
    apply(Some(&hop_ns), &block);
    apply(
        ns,
        &format!(
            "wg set {wg} peer {key} remove && wg set {wg} peer {key} endpoint {relay} allowed-ips {allowed}"
        ),
    );
    let gw = GATEWAY_V4.to_string();
    let _ = xtask::netns::exec(&client_ns, &["ping", "-c1", "-W1", "-q", &gw]);
    let (v, _) = doctor(ns, &host_only);
    problem(
        &v,
        "handshake",
        "no response from peer: last handshake never;",
    );
    apply(Some(&hop_ns), "nft delete table inet wsyblock");
    lab.handshake(Duration::from_secs(30))
        .expect("handshake once unblocked");
    let (v, _) = doctor(ns, &host_only);
    no_problem(&v, "handshake", "");

    lab.teardown().expect("lab down");
}
