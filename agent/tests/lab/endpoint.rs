//! The endpoint locked down (issue 8): `--web.config.file` with TLS and basic auth tested
//! with a real HTTPS client (curl), nothing private in any output, and the capabilities
//! the agent keeps after attaching.
//!
//! Needs root, curl and openssl; the lab test also wireguard-go and the lab tools (`cargo
//! xtask setup`). With CI=true a missing prerequisite fails the test. The lab tests share
//! the prefix `wse`: run them with `--test-threads=1` (`cargo xtask test` does): `cargo
//! test -p wirescope --test lab -- --test-threads=1 endpoint::`.

use crate::common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use xtask::{
    agent::Agent,
    lab::{Lab, LabConfig, Role, Topology},
    netns,
};

use common::{bin, lab_up, late_interface_attached, log_path, privileged, stop};

const PREFIX: &str = "wse";
/// The namespace of the tests without a lab: the agent alone, no tunnel.
const BARE_NS: &str = "wse-bare";
const LISTEN: &str = "127.0.0.1:9586";

/// CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_PERFMON (38), CAP_BPF (39): what the agent keeps
/// on a kernel with CAP_BPF; CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_ADMIN (21) before.
fn kept_mask() -> u64 {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    if last >= 39 {
        (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39)
    } else {
        (1 << 12) | (1 << 13) | (1 << 21)
    }
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
        || Command::new(name)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}

/// Root, curl and openssl; otherwise a CI failure or a skip.
fn can_run(test: &str) -> bool {
    if !privileged(&format!("{test} runs the agent and needs root")) {
        return false;
    }
    for t in ["curl", "openssl"] {
        if !tool(t) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: {t} is not installed (CI=true: a failure, not a skip)");
            }
            eprintln!("skipping {test}: {t} is not installed");
            return false;
        }
    }
    true
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// A fresh directory for this test's files.
fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wirescope-endpoint-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("test directory");
    d
}

/// A CA and a server certificate it signed for 127.0.0.1/localhost, made with openssl in
/// `dir`: (ca.pem, cert.pem, key.pem).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(f).display().to_string();
    let ok = |o: Output, what: &str| {
        assert!(
            o.status.success(),
            "openssl {what}: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    };
    ok(
        run(Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("ca-key.pem"),
            "-out",
            &p("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=wirescope test CA",
        ])),
        "CA",
    );
    ok(
        run(Command::new("openssl").args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("key.pem"),
            "-out",
            &p("cert.csr"),
            "-subj",
            "/CN=localhost",
        ])),
        "CSR",
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext.cnf");
    ok(
        run(Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &p("cert.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca-key.pem"),
            "-CAcreateserial",
            "-out",
            &p("cert.pem"),
            "-days",
            "2",
            "-extfile",
            &p("ext.cnf"),
        ])),
        "signing",
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

const USER: &str = "prometheus";
const PASSWORD: &str = "correct horse battery staple";

/// The web config: TLS (min TLS12) with `cert`/`key`, and USER with a bcrypt hash of
/// PASSWORD.
fn web_config(dir: &Path, cert: &Path, key: &Path) -> PathBuf {
    let hash = bcrypt::hash(PASSWORD, 6).expect("bcrypt");
    let f = dir.join("web.yml");
    std::fs::write(
        &f,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  min_version: TLS12\nbasic_auth_users:\n  {USER}: '{hash}'\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("web.yml");
    f
}

/// A network namespace with only lo, up.
struct BareNs;

impl BareNs {
    fn new() -> BareNs {
        let _ = Command::new("ip")
            .args(["netns", "del", BARE_NS])
            .stderr(Stdio::null())
            .status();
        common::ip_cmd(&["netns", "add", BARE_NS]);
        let o = netns::exec(BARE_NS, &["ip", "link", "set", "lo", "up"]);
        assert!(o.is_ok(), "lo up in {BARE_NS}: {o:?}");
        BareNs
    }
}

impl Drop for BareNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", BARE_NS]).status();
    }
}

/// The agent, started by hand (xtask's Agent waits for plain-HTTP /healthz).
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn start(ns: &str, args: &[&str], log: &str) -> Running {
        let log = log_path(log);
        let f = std::fs::File::create(&log).expect("log file");
        let child = netns::command(ns, &bin().display().to_string())
            .args(["run", "--web.listen-address", LISTEN])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .spawn()
            .expect("starting the agent");
        Running { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log says it serves (the capability drop comes right after).
    fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("the agent exited with {st}; its log:\n{}", self.log());
            }
            if self.log().contains("capabilities:") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the agent did not start serving within 60 s; its log:\n{}",
            self.log()
        );
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert!(
                    st.success(),
                    "the agent exited with {st}; its log:\n{}",
                    self.log()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the agent did not stop within 10 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl in `ns`: (HTTP status, headers + body, curl's exit code). Status 0 when no HTTP
/// answer came.
fn curl(ns: &str, args: &[&str]) -> (u16, String, i32) {
    let mut cmd = netns::command(ns, "curl");
    cmd.args(["-sS", "-i", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args);
    let o = run(&mut cmd);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let (text, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
    (
        code.trim().parse().unwrap_or(0),
        format!("{text}{}", String::from_utf8_lossy(&o.stderr)),
        o.status.code().unwrap_or(-1),
    )
}

/// `Cap*` masks of every thread of `pid`: (tid, effective, permitted, bounding).
fn thread_caps(pid: u32) -> Vec<(String, u64, u64, u64)> {
    let mask = |s: &str, k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(u64::MAX)
    };
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the agent's threads")
        .flatten()
        .filter_map(|e| {
            let s = std::fs::read_to_string(e.path().join("status")).ok()?;
            Some((
                e.file_name().to_string_lossy().to_string(),
                mask(&s, "CapEff:"),
                mask(&s, "CapPrm:"),
                mask(&s, "CapBnd:"),
            ))
        })
        .collect()
}

/// Every thread of `pid` holds exactly the kept set (effective, permitted, bounding).
fn assert_caps_dropped(pid: u32) {
    let want = kept_mask();
    let threads = thread_caps(pid);
    assert!(!threads.is_empty());
    for (tid, eff, prm, bnd) in &threads {
        assert_eq!(
            (*eff, *prm, *bnd),
            (want, want, want),
            "thread {tid} of the agent {pid}: CapEff {eff:016x} CapPrm {prm:016x} CapBnd {bnd:016x}, want {want:016x}"
        );
    }
}

/// `--web.config.file` with TLS and basic auth, against curl: wrong or missing credentials
/// 401 with a Basic challenge on every path, plain HTTP refused, a TLS 1.1 client refused,
/// the right credentials 200 and the metrics; `wirescope status` and `doctor` read it with
/// --web.ca-file, --web.user and WIRESCOPE_WEB_PASSWORD, and each wrong setting is named. The agent runs in a namespace of its own, without tunnels; it holds only
/// the kept capabilities on every thread.
#[test]
fn tls_and_basic_auth() {
    if !can_run("tls_and_basic_auth") {
        return;
    }
    let dir = test_dir("tls");
    let (ca, cert, key) = make_certs(&dir);
    let web = web_config(&dir, &cert, &key);
    let _ns = BareNs::new();
    let mut agent = Running::start(
        BARE_NS,
        &["--web.config.file", &web.display().to_string()],
        "endpoint-tls",
    );
    agent.wait_serving();
    let log = agent.log();
    assert!(
        log.contains("serving metrics on https://127.0.0.1:9586/metrics"),
        "{log}"
    );

    let ca = ca.display().to_string();
    let url = |path: &str| format!("https://127.0.0.1:9586{path}");
    let good = format!("{USER}:{PASSWORD}");
    let bad = format!("{USER}:wrong");

    for path in ["/metrics", "/", "/healthz", "/api/v1/status"] {
        // No credentials, wrong password, unknown user: 401 and a challenge, no content.
        for creds in [None, Some(bad.as_str()), Some("mallory:x")] {
            let mut args = vec!["--cacert", &ca];
            if let Some(c) = creds {
                args.extend(["-u", c]);
            }
            let u = url(path);
            args.push(&u);
            let (code, text, _) = curl(BARE_NS, &args);
            assert_eq!(code, 401, "{path} with {creds:?}: {text}");
            assert!(
                text.to_ascii_lowercase()
                    .contains("www-authenticate: basic realm=\"wirescope\""),
                "{path}: {text}"
            );
            assert!(!text.contains("wirescope_build_info"), "{path}: {text}");
        }
        // The right ones: the content (/healthz is 503 here: no tunnel to attach to).
        let (code, text, _) = curl(BARE_NS, &["--cacert", &ca, "-u", &good, &url(path)]);
        let want = if path == "/healthz" { 503 } else { 200 };
        assert_eq!(code, want, "{path}: {text}");
    }
    let (_, metrics, _) = curl(BARE_NS, &["--cacert", &ca, "-u", &good, &url("/metrics")]);
    assert!(metrics.contains("wirescope_build_info{"), "{metrics}");

    // The certificate is checked by the client: without the CA, curl refuses it.
    let (code, text, rc) = curl(BARE_NS, &["-u", &good, &url("/metrics")]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        rc, 60,
        "curl: peer certificate cannot be authenticated: {text}"
    );

    // Plain HTTP to the TLS listener: 400, nothing else.
    let (code, text, _) = curl(BARE_NS, &["-u", &good, "http://127.0.0.1:9586/metrics"]);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("HTTP request to an HTTPS server"), "{text}");
    assert!(!text.contains("wirescope_build_info"), "{text}");

    // Below min_version (TLS12): no handshake.
    let (code, text, rc) = curl(
        BARE_NS,
        &[
            "--cacert",
            &ca,
            "--tlsv1.0",
            "--tls-max",
            "1.1",
            "-u",
            &good,
            &url("/metrics"),
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert_ne!(rc, 0, "{text}");
    // TLS 1.2 and 1.3 both work.
    for v in ["1.2", "1.3"] {
        let (code, text, _) = curl(
            BARE_NS,
            &[
                "--cacert",
                &ca,
                "--tls-max",
                v,
                "-u",
                &good,
                &url("/metrics"),
            ],
        );
        assert_eq!(code, 200, "TLS {v}: {text}");
    }

    // The status snapshot names the kept capabilities; every thread holds just them.
    let (_, status, _) = curl(
        BARE_NS,
        &["--cacert", &ca, "-u", &good, &url("/api/v1/status")],
    );
    let json = status.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(json).expect("status JSON");
    let kept: Vec<String> = v["capabilities"]["kept"]
        .as_array()
        .expect("capabilities.kept")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    let want = if kept_mask() & (1 << 39) != 0 {
        vec!["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_PERFMON", "CAP_BPF"]
    } else {
        vec!["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"]
    };
    assert_eq!(kept, want, "{status}");
    assert_caps_dropped(agent.pid());

    // `wirescope status` and `doctor` over TLS with basic auth: the CA and the user on the
    // command line, the password in the environment.
    let https = format!("https://{LISTEN}");
    let client = |args: &[&str], password: Option<&str>| {
        let mut cmd = netns::command(BARE_NS, &bin().display().to_string());
        cmd.args(args);
        match password {
            Some(p) => cmd.env("WIRESCOPE_WEB_PASSWORD", p),
            None => cmd.env_remove("WIRESCOPE_WEB_PASSWORD"),
        };
        let o = run(&mut cmd);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), said)
    };
    let tls_args = |cmd: &'static str| -> Vec<String> {
        vec![
            cmd.into(),
            "--web.listen-address".into(),
            https.clone(),
            "--web.ca-file".into(),
            ca.clone(),
            "--web.user".into(),
            USER.into(),
        ]
    };
    let status_args = tls_args("status");
    let status_args: Vec<&str> = status_args.iter().map(String::as_str).collect();
    let (code, said) = client(&status_args, Some(PASSWORD));
    assert_eq!(code, Some(0), "status over TLS: {said}");
    assert!(said.contains("wirescope status"), "{said}");
    let (code, said) = client(&[&status_args[..], &["--json"]].concat(), Some(PASSWORD));
    assert_eq!(code, Some(0), "status --json over TLS: {said}");
    let v: serde_json::Value = serde_json::from_str(&said).expect("status --json");
    assert!(v["tunnels"].is_array(), "{said}");
    // The wrong password: 401, and the message names what to check.
    let (code, said) = client(&status_args, Some("wrong"));
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("HTTP 401") && said.contains("WIRESCOPE_WEB_PASSWORD"),
        "{said}"
    );
    // A user without a password in the environment: a usage error naming the variable.
    let (code, said) = client(&status_args, None);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("WIRESCOPE_WEB_PASSWORD"), "{said}");
    // Without the CA the certificate is refused, and the message says to give it.
    let (code, said) = client(
        &["status", "--web.listen-address", &https, "--web.user", USER],
        Some(PASSWORD),
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("--web.ca-file"), "{said}");
    // Plain HTTP to the TLS listener: the message points to https://.
    let (code, said) = client(&["status", "--web.listen-address", LISTEN], None);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("HTTP 400") && said.contains("https://"),
        "{said}"
    );
    // doctor reads the agent's metrics the same way.
    let doctor_args = tls_args("doctor");
    let doctor_args: Vec<&str> = doctor_args.iter().map(String::as_str).collect();
    let (_, said) = client(&[&doctor_args[..], &["--json"]].concat(), Some(PASSWORD));
    let v: serde_json::Value = serde_json::from_str(&said).expect("doctor --json");
    assert_eq!(v["agent"], serde_json::json!(https), "{said}");

    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad web configs stop the agent at start with exit status 2 and a message naming the
/// file: a key that does not belong to the certificate, a password that is no bcrypt hash.
#[test]
fn bad_web_config_exits_2() {
    if !can_run("bad_web_config_exits_2") {
        return;
    }
    let dir = test_dir("bad");
    let (ca, cert, _) = make_certs(&dir);
    let ca_key = dir.join("ca-key.pem");
    let cases = [
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                cert.display(),
                ca_key.display()
            ),
            "does the key belong to the certificate?",
        ),
        (
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                cert.display(),
                ca.display()
            ),
            "key_file",
        ),
        (
            "basic_auth_users:\n  alice: hunter2\n".to_string(),
            "not a bcrypt hash",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad{i}.yml"));
        std::fs::write(&f, text).unwrap();
        let o = run(Command::new(bin()).args([
            "run",
            "--web.listen-address",
            "127.0.0.1:0",
            "--web.config.file",
            &f.display().to_string(),
        ]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains(&f.display().to_string()) && err.contains(want),
            "{text}: {err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The keys of every WireGuard interface in the lab (`wg showconf`): private and preshared,
/// as base64.
fn lab_secrets(lab: &Lab) -> Vec<String> {
    let mut keys = Vec::new();
    for h in &lab.hosts {
        let Some(wg) = &h.wg else { continue };
        let out = lab
            .exec(&h.netns, &["wg", "showconf", &wg.iface])
            .expect("wg showconf");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.split_once('=') {
                let k = k.trim();
                if k == "PrivateKey" || k == "PresharedKey" {
                    keys.push(v.trim().to_string());
                }
            }
        }
    }
    keys
}

/// Every spelling of a key that could show up in text: base64 (standard, URL-safe,
/// unpadded) and hex (both cases).
fn spellings(key: &str) -> Vec<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap_or_else(|e| panic!("key {key:?} from wg showconf: {e}"));
    let std = base64::engine::general_purpose::STANDARD.encode(&raw);
    vec![
        std.clone(),
        std.trim_end_matches('=').to_string(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw),
        hex::encode(&raw),
        hex::encode_upper(&raw),
    ]
}

/// Every endpoint's answer, concatenated (status codes too).
fn everything(agent: &Agent) -> String {
    let mut all = String::new();
    for path in ["/metrics", "/", "/healthz", "/api/v1/status"] {
        let (code, body) = agent.get(path).unwrap_or_else(|e| panic!("{path}: {e:#}"));
        all.push_str(&format!("== {path} {code}\n{body}\n"));
    }
    all
}

/// Sets a fresh preshared key between the client's `peer_role` peer and that relay's peer
/// for the client, on both sides.
fn set_psk(lab: &Lab, relay: Role) {
    let key = {
        let o = Command::new("wg")
            .arg("genpsk")
            .output()
            .expect("wg genpsk");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let f = std::env::temp_dir().join(format!("wirescope-endpoint-psk-{relay:?}"));
    std::fs::write(&f, format!("{key}\n")).expect("psk file");
    let c = lab.client();
    let r = lab.host(relay).expect("relay host");
    let fs = f.display().to_string();
    for (host, other, what) in [(c, r, "psk on the client"), (r, c, "psk on the relay")] {
        let (iface, key) = (&host.wg().iface, &other.wg().public_key);
        lab.exec(
            &host.netns,
            &["wg", "set", iface, "peer", key, "preshared-key", &fs],
        )
        .expect(what);
    }
    let _ = std::fs::remove_file(&f);
}

/// Multihop lab with preshared keys on both layers, traffic through both hops: no private
/// or preshared key, in any spelling, appears at any endpoint; without --export-endpoints
/// no relay endpoint (IP:PORT, nor the entry relay's address) either; with it, they do.
/// Also: the agent holds only the kept capabilities and still attaches to a WireGuard
/// interface created after the drop.
#[test]
fn nothing_private_is_exported() {
    let Some(lab) = lab_up(
        "nothing_private_is_exported",
        LabConfig::new(Topology::Multihop, PREFIX),
    ) else {
        return;
    };
    set_psk(&lab, Role::Entry);
    set_psk(&lab, Role::Exit);
    let secrets = lab_secrets(&lab);
    // Client, entry and exit private keys, and a preshared key on each side of two pairs.
    assert!(secrets.len() >= 3 + 4, "keys read: {}", secrets.len());
    let entry = lab.entry_endpoint();
    let exit = lab.exit_endpoint();

    let cns = lab.client().netns.clone();
    let agent = Agent::start(bin(), &cns, &[], &log_path("endpoint-private")).expect("agent");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    common::ping(&lab, 20, &[], false);
    std::thread::sleep(Duration::from_millis(1500));
    let all = everything(&agent);
    assert!(
        all.contains("wirescope_wire_packets_total{"),
        "traffic was counted: {all}"
    );
    for key in &secrets {
        for s in spellings(key) {
            assert!(!all.contains(&s), "a key ({s}) is exported:\n{all}");
        }
    }
    for ep in [entry, exit] {
        assert!(
            !all.contains(&ep.to_string()),
            "endpoint {ep} exported:\n{all}"
        );
    }
    // The entry relay's address is nowhere (the exit's is the entry peer's allowed IP, a
    // label prometheus_wireguard_exporter has too).
    assert!(
        !all.contains(&format!("{}\"", entry.ip())) && !all.contains(&format!("{}:", entry.ip())),
        "entry relay address exported:\n{all}"
    );

    // The capabilities: exactly the kept set, on every thread.
    let pid = agent_pid(&cns);
    assert_caps_dropped(pid);
    assert!(
        agent.log_text().contains("capabilities: kept"),
        "{}",
        agent.log_text()
    );

    // An interface created after the drop is attached within 4 s.
    let (late, attached) = late_interface_attached(&agent, &cns, PREFIX);
    assert!(
        attached,
        "{late} attached within 4 s after the capability drop; log:\n{}",
        agent.log_text()
    );
    stop(agent);

    // --export-endpoints: the relays' endpoints are there, keys still not.
    let agent = Agent::start(
        bin(),
        &cns,
        &["--export-endpoints"],
        &log_path("endpoint-export"),
    )
    .expect("agent with --export-endpoints");
    common::ping(&lab, 5, &[], false);
    std::thread::sleep(Duration::from_millis(1500));
    let all = everything(&agent);
    assert!(
        all.contains(&entry.to_string()),
        "entry endpoint {entry} missing:\n{all}"
    );
    assert!(
        all.contains(&exit.to_string()),
        "exit endpoint {exit} missing:\n{all}"
    );
    for key in &secrets {
        for s in spellings(key) {
            assert!(!all.contains(&s), "a key ({s}) is exported:\n{all}");
        }
    }
    stop(agent);
    lab.teardown().expect("lab down");
}

/// The pid of the wirescope process in `ns` (the one the test started there).
fn agent_pid(ns: &str) -> u32 {
    let target = std::fs::metadata(netns::path(ns)).ok().map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.ino()
    });
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "wirescope")
                && std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .ok()
                    .map(|m| {
                        use std::os::unix::fs::MetadataExt as _;
                        m.ino()
                    })
                    == target
        })
        .unwrap_or_else(|| panic!("no wirescope process in {ns}"))
}
