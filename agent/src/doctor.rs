//! `wirescope doctor`: checks the host (and, when one answers, the running agent's metrics)
//! and prints, per finding, what is wrong and the exact command that fixes it.
//!
//! Every check reads the host directly, so the command works without an agent; an agent on
//! `--web.listen-address` adds what only it measures (path MTU, UDP receive errors, handshake
//! timeouts, leaks). Exit status 0 when no check found a problem, 1 otherwise.
//!
//! The checks, in order: agent, kernel, permissions, WireGuard (implementation, MTU,
//! keepalive, handshakes), socket buffers, clock, key files, firewall (kill switch, blocked
//! WireGuard ports), Mullvad. Parsers of what they read are pure functions, unit-tested below.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use serde_json::Value;

use crate::{
    client::{AgentClient, ClientError},
    config::MullvadConfig,
    config::cli::AgentAddr,
    config::cli::DoctorArgs,
    datapath::features::Features,
    sources::mullvad::{self, TunnelState},
    sources::netlink::{Link, Netlink},
    sources::wg,
    sync::inventory::WgDevice,
};

/// Socket buffer maximum below which UDP bursts are dropped on a busy tunnel (2.5 MiB, what
/// QUIC and WireGuard userspace implementations ask for).
pub const RMEM_BASELINE: u64 = 2_621_440;
/// Largest persistent-keepalive interval that keeps a NAT mapping alive everywhere.
pub const KEEPALIVE_MAX: u16 = 25;
/// WireGuard rejects a session older than this: a peer without a handshake for longer is
/// not talking to us.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);

/// Capability numbers (linux/capability.h).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;
/// What the agent needs, with names.
pub const NEEDED_CAPS: [(u32, &str); 4] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_NET_RAW, "CAP_NET_RAW"),
];

/// The table the kill-switch fix creates.
pub const KILLSWITCH_TABLE: &str = "wirescope_killswitch";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Checked and fine.
    Ok,
    /// Something to know, nothing to fix.
    Info,
    /// Wrong: `fix` says what to run.
    Problem,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// The check family: agent, kernel, permissions, wireguard, mtu, keepalive, handshake,
    /// socket_buffers, clock, key_files, kill_switch, firewall, mullvad.
    pub check: &'static str,
    pub severity: Severity,
    pub message: String,
    /// The exact command that fixes it (problems; sometimes an info's suggestion).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, Severity::Ok, message, None)
    }
    fn info(check: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, Severity::Info, message, None)
    }
    fn problem(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(check, Severity::Problem, message, Some(fix.into()))
    }
    fn new(
        check: &'static str,
        severity: Severity,
        message: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            check,
            severity,
            message: message.into(),
            fix,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// No problem found.
    pub ok: bool,
    pub problems: usize,
    /// The agent consulted, when one answered.
    pub agent: Option<String>,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new(agent: Option<String>, findings: Vec<Finding>) -> Self {
        let problems = findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .count();
        Self {
            ok: problems == 0,
            problems,
            agent,
            findings,
        }
    }

    /// The human rendering: one line per finding, its fix indented under it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.severity {
                Severity::Ok => "ok     ",
                Severity::Info => "info   ",
                Severity::Problem => "PROBLEM",
            };
            let _ = writeln!(out, "{tag} {:<14} {}", f.check, f.message);
            if let Some(fix) = &f.fix {
                let label = if f.severity == Severity::Problem {
                    "fix:"
                } else {
                    "try:"
                };
                let _ = writeln!(out, "{:22} {label} {fix}", "");
            }
        }
        let _ = writeln!(
            out,
            "{}",
            if self.ok {
                "no problems found".to_string()
            } else {
                format!(
                    "{} problem{} found",
                    self.problems,
                    if self.problems == 1 { "" } else { "s" }
                )
            }
        );
        out
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

/// `wirescope doctor`: runs every check, prints the report, returns the exit status.
pub fn run(args: &DoctorArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wirescope doctor: starting the async runtime failed: {e}");
            return ExitCode::from(1);
        }
    };
    let report = rt.block_on(diagnose(args));
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("wirescope doctor: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", report.render());
    }
    report.exit_code()
}

/// Everything the checks look at, gathered once.
struct Host {
    links: Vec<Link>,
    /// WireGuard interfaces read through a control interface.
    devices: Vec<(WgDevice, &'static str)>,
    /// The running agent's metrics, when one answered.
    metrics: Option<Metrics>,
}

/// Runs every check.
pub async fn diagnose(args: &DoctorArgs) -> Report {
    let mut f = Vec::new();

    let (metrics, agent_note) = match fetch_metrics(&args.agent) {
        Ok(text) => (Some(Metrics::parse(&text)), None),
        Err(e) => (None, Some(e)),
    };
    let agent = metrics.as_ref().map(|_| args.agent.listen_address.clone());
    match &agent_note {
        None => f.push(Finding::ok(
            "agent",
            format!(
                "agent answering on {}: its measurements are used below",
                args.agent.listen_address
            ),
        )),
        Some(e) => f.push(Finding::info(
            "agent",
            format!(
                "no agent answering on {} ({e}): host checks only (path MTU, UDP receive \
                 errors, handshake timeouts and leaks need `wirescope run`)",
                args.agent.listen_address
            ),
        )),
    }

    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s));
    check_kernel(&mut f, caps);
    check_permissions(&mut f, caps);

    let links = match Netlink::new() {
        Ok(nl) => match nl.links().await {
            Ok(l) => l,
            Err(e) => {
                f.push(Finding::info(
                    "wireguard",
                    format!("listing interfaces: {e}"),
                ));
                Vec::new()
            }
        },
        Err(e) => {
            f.push(Finding::info("wireguard", format!("rtnetlink: {e}")));
            Vec::new()
        }
    };
    let mut host = Host {
        links,
        devices: Vec::new(),
        metrics,
    };
    check_wireguard(&mut f, &mut host);
    check_mtu(&mut f, &host).await;
    check_keepalive(&mut f, &host).await;
    check_handshakes(&mut f, &host);
    check_socket_buffers(&mut f, &host);
    check_clock(&mut f);
    check_key_files(&mut f, &args.wireguard_dir);
    check_firewall(&mut f, &host).await;
    check_mullvad(&mut f, &args.mullvad_cli).await;
    Report::new(agent, f)
}

// ---------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------

/// GET /metrics from the agent (HTTP or HTTPS, see [`crate::client`]).
fn fetch_metrics(agent: &AgentAddr) -> Result<String, String> {
    let client = AgentClient::new(agent).map_err(|e| e.to_string())?;
    let (code, body) = client
        .get("/metrics", "text/plain;version=0.0.4", 64 << 20)
        .map_err(|e| match e {
            ClientError::Unreachable { cause, hint, .. } => format!("{cause}; {hint}"),
            e => e.to_string(),
        })?;
    if code != 200 {
        return Err(format!(
            "HTTP status {code} for /metrics: {}",
            client.status_hint(code)
        ));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// One sample: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Samples of a Prometheus/OpenMetrics text exposition.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Tolerant: lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Self { samples }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, l, v)| (l.as_slice(), *v))
    }

    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // + 0.0: an empty f64 sum is -0.0.
        self.select(name, labels).map(|(_, v)| v).sum::<f64>() + 0.0
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.select(name, labels).map(|(_, v)| v).next()
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    // A quoted value follows.
                    let (_, q) = chars.next()?;
                    if q != '"' {
                        return None;
                    }
                    let mut val = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => val.push('\n'),
                                other => val.push(other),
                            },
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), val));
                }
                c => key.push(c),
            }
        }
        rest = &r[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let v = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, v))
}

// ---------------------------------------------------------------------------------------
// Kernel and permissions
// ---------------------------------------------------------------------------------------

/// The `CapEff:` mask of a /proc/PID/status text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The needed capabilities missing from `mask`, by name.
pub fn missing_caps(mask: u64) -> Vec<&'static str> {
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| mask & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn check_kernel(f: &mut Vec<Finding>, caps: Option<u64>) {
    let feat = Features::detect();
    let privileged = caps.is_some_and(|c| missing_caps(c).is_empty());
    f.push(Finding::info(
        "kernel",
        format!(
            "kernel {}: TC hook {}, BTF {}, tracepoints {}, kprobes {}, fentry {}, BPF run stats {}",
            if feat.kernel.is_empty() {
                "?"
            } else {
                &feat.kernel
            },
            if feat.tcx { "TCX" } else { "clsact" },
            yes(feat.btf),
            if privileged {
                yes(feat.tracepoint)
            } else {
                "unknown (needs CAP_BPF)"
            },
            yes(feat.kprobe),
            if privileged {
                yes(feat.fentry)
            } else {
                "unknown (needs CAP_BPF)"
            },
            yes(feat.bpf_stats),
        ),
    ));
    if privileged {
        let tc = aya::sys::is_program_supported(aya::programs::ProgramType::SchedClassifier)
            .unwrap_or(false);
        if !tc {
            f.push(Finding::problem(
                "kernel",
                "the kernel refuses BPF TC (sched_cls) programs, which the agent needs",
                "boot a kernel built with CONFIG_BPF_SYSCALL=y and CONFIG_NET_CLS_BPF (any \
                 distribution kernel has both)",
            ));
        }
        if !feat.tracepoint {
            f.push(Finding::info(
                "kernel",
                "no BPF tracepoints: wirescope_drops_total and UDP receive errors stay empty",
            ));
        }
    }
    if !feat.btf {
        f.push(Finding::info(
            "kernel",
            "no /sys/kernel/btf/vmlinux: drop reasons cannot be named (CONFIG_DEBUG_INFO_BTF)",
        ));
    }
    if !feat.bpf_stats {
        f.push(Finding::new(
            "kernel",
            Severity::Info,
            "BPF run statistics are off: wirescope_bpf_run_seconds_total stays 0",
            Some("sysctl -w kernel.bpf_stats_enabled=1".into()),
        ));
    }
}

/// The commands that install the agent as the systemd unit of deploy/ (which runs
/// /usr/local/bin/wirescope with exactly the capabilities it needs).
fn service_install_command() -> String {
    const BIN: &str = "/usr/local/bin/wirescope";
    let unit = "sudo install -m 644 deploy/wirescope.service /etc/systemd/system/ && sudo \
                systemctl daemon-reload && sudo systemctl enable --now wirescope";
    match std::env::current_exe() {
        Ok(exe) if exe != Path::new(BIN) => format!(
            "sudo install -m 755 {} {BIN} && {unit}",
            shell_quote(&exe.display().to_string())
        ),
        _ => unit.to_string(),
    }
}

fn check_permissions(f: &mut Vec<Finding>, caps: Option<u64>) {
    let Some(mask) = caps else {
        f.push(Finding::info(
            "permissions",
            "could not read CapEff from /proc/self/status",
        ));
        return;
    };
    let missing = missing_caps(mask);
    if missing.is_empty() {
        f.push(Finding::ok(
            "permissions",
            "CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_NET_RAW are effective",
        ));
    } else {
        f.push(Finding::problem(
            "permissions",
            format!(
                "missing {}: the agent cannot load its programs as this user, and doctor \
                 sees less (run both as root: sudo wirescope doctor), or the agent as the \
                 systemd unit in deploy/, which grants exactly these",
                missing.join(", ")
            ),
            service_install_command(),
        ));
    }
}

// ---------------------------------------------------------------------------------------
// WireGuard: implementation, MTU, keepalive, handshakes
// ---------------------------------------------------------------------------------------

fn check_wireguard(f: &mut Vec<Finding>, host: &mut Host) {
    let module = Path::new("/sys/module/wireguard").exists();
    let mut names: BTreeSet<String> = host
        .links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("wireguard"))
        .map(|l| l.name.clone())
        .collect();
    let uapi = wg::list_uapi_sockets();
    for n in &uapi {
        if host.links.iter().any(|l| &l.name == n) {
            names.insert(n.clone());
        }
    }
    f.push(Finding::info(
        "wireguard",
        format!(
            "kernel WireGuard module {}",
            if module {
                "loaded"
            } else {
                "not loaded (userspace implementations only)"
            }
        ),
    ));
    if names.is_empty() {
        f.push(Finding::info(
            "wireguard",
            "no WireGuard interface in this network namespace",
        ));
    }
    for name in names {
        match wg::read_device(&name) {
            Ok((dev, backend)) => {
                let how = match backend {
                    crate::sync::inventory::Backend::Netlink => "kernel WireGuard",
                    _ => "userspace WireGuard (UAPI socket)",
                };
                f.push(Finding::info(
                    "wireguard",
                    format!(
                        "{name}: {how}, listen port {}, {} peer{}",
                        dev.listen_port,
                        dev.peers.len(),
                        if dev.peers.len() == 1 { "" } else { "s" }
                    ),
                ));
                host.devices.push((dev, how));
            }
            Err(e) => f.push(Finding::info(
                "wireguard",
                format!("{name}: peers not readable: {e}"),
            )),
        }
    }
    // Mullvad's in-app WireGuard: a tun device with no control socket.
    for l in &host.links {
        if l.kind.as_deref() == Some("tun")
            && l.name.starts_with("wg")
            && !host.devices.iter().any(|(d, _)| d.name == l.name)
        {
            f.push(Finding::info(
                "wireguard",
                format!(
                    "{}: a tun device without a WireGuard control socket (an in-app userspace \
                     WireGuard such as Mullvad's): only the datapath is measured",
                    l.name
                ),
            ));
        }
    }
}

/// WireGuard's overhead over an outer IPv4 (20 + 8 + 32) or IPv6 (40 + 8 + 32) header.
pub fn wg_overhead(endpoint: &IpAddr) -> u32 {
    if endpoint.is_ipv4() { 60 } else { 80 }
}

async fn check_mtu(f: &mut Vec<Finding>, host: &Host) {
    let nl = Netlink::new().ok();
    for (dev, _) in &host.devices {
        let Some(link) = host.links.iter().find(|l| l.name == dev.name) else {
            continue;
        };
        let measured = host.metrics.as_ref().and_then(|m| {
            m.get(
                "wirescope_recommended_mtu_bytes",
                &[("interface", dev.name.as_str())],
            )
        });
        if let Some(rec) = measured.filter(|r| *r > 0.0) {
            let rec = rec as u32;
            if link.mtu > rec {
                f.push(Finding::problem(
                    "mtu",
                    format!(
                        "{}: MTU {} exceeds the {rec} the measured path MTU allows (the agent's \
                         wirescope_recommended_mtu_bytes): full-size packets fragment or vanish",
                        dev.name, link.mtu
                    ),
                    format!("ip link set dev {} mtu {rec}", dev.name),
                ));
            } else {
                f.push(Finding::ok(
                    "mtu",
                    format!(
                        "{}: MTU {} fits the measured path (recommended {rec})",
                        dev.name, link.mtu
                    ),
                ));
            }
            continue;
        }
        // No measurement: the first hop's MTU bounds the path.
        let mut limit: Option<(u32, String)> = None;
        if let Some(nl) = &nl {
            for p in &dev.peers {
                let Some(ep) = p.endpoint else { continue };
                let Ok(Some(oif)) = nl.route_oif(ep.ip()).await else {
                    continue;
                };
                let Some(under) = host.links.iter().find(|l| l.index == oif) else {
                    continue;
                };
                if under.name == dev.name {
                    continue;
                }
                let allowed = under.mtu.saturating_sub(wg_overhead(&ep.ip()));
                if limit.as_ref().is_none_or(|(l, _)| allowed < *l) {
                    limit = Some((allowed, under.name.clone()));
                }
            }
        }
        match limit {
            Some((allowed, under)) if link.mtu > allowed => f.push(Finding::problem(
                "mtu",
                format!(
                    "{}: MTU {} exceeds the {allowed} that {under}'s MTU leaves after \
                     WireGuard's overhead",
                    dev.name, link.mtu
                ),
                format!("ip link set dev {} mtu {allowed}", dev.name),
            )),
            Some((allowed, under)) => f.push(Finding::ok(
                "mtu",
                format!(
                    "{}: MTU {} fits {under} (at most {allowed}); the path beyond is measured \
                     only by a running agent",
                    dev.name, link.mtu
                ),
            )),
            None => {}
        }
    }
}

/// Whether an address looks like one behind NAT: not globally routable (private, CGNAT,
/// link-local, unique-local, documentation and benchmarking ranges).
pub fn behind_nat(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_link_local()
                || a.is_loopback()
                || a.is_documentation()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || a.is_loopback()
                || (s[0] == 0x2001 && s[1] == 0xdb8)
        }
    }
}

/// The source address the kernel would use towards `dst` (no packet sent).
fn local_addr_towards(dst: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(dst).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// The keepalive verdict for one peer: `Some(reason)` when it needs one.
pub fn keepalive_problem(keepalive: Option<u16>, local_behind_nat: bool) -> Option<String> {
    match keepalive.filter(|k| *k > 0) {
        None if local_behind_nat => Some(
            "persistent keepalive is off and this host's address towards it is not public (NAT): \
             the mapping expires and the peer can no longer reach us"
                .into(),
        ),
        Some(k) if k > KEEPALIVE_MAX && local_behind_nat => Some(format!(
            "persistent keepalive {k} s is above {KEEPALIVE_MAX} s behind NAT: mappings can \
             expire between keepalives"
        )),
        _ => None,
    }
}

async fn check_keepalive(f: &mut Vec<Finding>, host: &Host) {
    let nl = Netlink::new().ok();
    // WireGuard interfaces: an endpoint routed through one is a multihop exit.
    let tunnels: Vec<u32> = host
        .links
        .iter()
        .filter(|l| host.devices.iter().any(|(d, _)| d.name == l.name))
        .map(|l| l.index)
        .collect();
    for (dev, _) in &host.devices {
        for p in &dev.peers {
            let Some(ep) = p.endpoint else { continue };
            let key = wg::key_to_base64(&p.public_key);
            let oif = match &nl {
                Some(nl) => nl.route_oif(ep.ip()).await.ok().flatten(),
                None => None,
            };
            if let Some(via) = oif.and_then(|i| host.links.iter().find(|l| l.index == i))
                && tunnels.contains(&via.index)
            {
                f.push(Finding::ok(
                    "keepalive",
                    format!(
                        "{} peer {key}: reached through {} (multihop exit): the carrying \
                         peer's keepalives hold the NAT mapping",
                        dev.name, via.name
                    ),
                ));
                continue;
            }
            let nat = local_addr_towards(ep).is_some_and(behind_nat);
            match keepalive_problem(p.persistent_keepalive, nat) {
                Some(why) => f.push(Finding::problem(
                    "keepalive",
                    format!("{} peer {key} ({ep}): {why}", dev.name),
                    format!(
                        "wg set {} peer {key} persistent-keepalive {KEEPALIVE_MAX}",
                        dev.name
                    ),
                )),
                None => f.push(Finding::ok(
                    "keepalive",
                    format!(
                        "{} peer {key}: persistent keepalive {}",
                        dev.name,
                        p.persistent_keepalive
                            .filter(|k| *k > 0)
                            .map_or("off (public address)".to_string(), |k| format!("{k} s"))
                    ),
                )),
            }
        }
    }
}

fn check_handshakes(f: &mut Vec<Finding>, host: &Host) {
    let now = SystemTime::now();
    for (dev, _) in &host.devices {
        for p in &dev.peers {
            let Some(ep) = p.endpoint else { continue };
            let key = wg::key_to_base64(&p.public_key);
            let age = p.last_handshake.and_then(|t| now.duration_since(t).ok());
            let timeouts = host.metrics.as_ref().map(|m| {
                m.sum(
                    // Counted on whichever interface carries the handshakes (the underlay).
                    "wirescope_handshake_timeouts_total",
                    &[("peer", key.as_str())],
                )
            });
            let stale = age.is_none_or(|a| a > REJECT_AFTER);
            let tried = p.tx_bytes > 0 || timeouts.is_some_and(|t| t > 0.0);
            if stale && tried {
                let age_s = age.map_or("never".to_string(), |a| format!("{} s ago", a.as_secs()));
                let t = match timeouts {
                    Some(t) if t > 0.0 => {
                        format!(", {t} initiations unanswered (wirescope_handshake_timeouts_total)")
                    }
                    Some(_) => ", no initiation timed out yet".to_string(),
                    None => String::new(),
                };
                f.push(Finding::problem(
                    "handshake",
                    format!(
                        "{} peer {key} ({ep}): no response from peer: last handshake {age_s}{t}; \
                         the peer is down, its port blocked, or it does not know our key",
                        dev.name
                    ),
                    format!(
                        "check the path and the peer: ping -c 3 {}; nft list ruleset | grep -n {}; \
                         then on the peer: wg show (our public key must be listed)",
                        ep.ip(),
                        ep.port()
                    ),
                ));
            } else if let Some(a) = age {
                f.push(Finding::ok(
                    "handshake",
                    format!(
                        "{} peer {key}: last handshake {} s ago",
                        dev.name,
                        a.as_secs()
                    ),
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Socket buffers and clock
// ---------------------------------------------------------------------------------------

fn read_sysctl(name: &str) -> Option<u64> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `rmem_max` wanted once UDP receive errors were counted on a WireGuard port: 8 MiB, above
/// the 7 MiB wireguard-go asks for.
pub const RMEM_UNDER_ERRORS: u64 = 8_388_608;

/// What `rmem_max` should be at least: the baseline, or [`RMEM_UNDER_ERRORS`] when UDP
/// receive errors were counted on a WireGuard port.
pub fn rmem_target(receive_errors: f64) -> u64 {
    if receive_errors > 0.0 {
        RMEM_UNDER_ERRORS
    } else {
        RMEM_BASELINE
    }
}

fn check_socket_buffers(f: &mut Vec<Finding>, host: &Host) {
    let ports: BTreeSet<u16> = host
        .devices
        .iter()
        .map(|(d, _)| d.listen_port)
        .filter(|p| *p != 0)
        .collect();
    let errors = host.metrics.as_ref().map(|m| {
        ports
            .iter()
            .map(|p| {
                m.sum(
                    "wirescope_udp_receive_errors_total",
                    &[("port", &p.to_string())],
                )
            })
            .sum::<f64>()
    });
    let plist = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    for (name, is_rmem) in [("net.core.rmem_max", true), ("net.core.wmem_max", false)] {
        let Some(cur) = read_sysctl(name) else {
            f.push(Finding::info(
                "socket_buffers",
                format!("{name} not readable"),
            ));
            continue;
        };
        let errs = if is_rmem { errors.unwrap_or(0.0) } else { 0.0 };
        if errs > 0.0 && cur < rmem_target(errs) {
            let want = rmem_target(errs);
            f.push(Finding::problem(
                "socket_buffers",
                format!(
                    "{name} = {cur}: the agent counted {errs} UDP datagrams dropped on full \
                     receive buffers of WireGuard ports {plist}; allow {want}"
                ),
                format!("sysctl -w {name}={want}"),
            ));
        } else if errs > 0.0 {
            f.push(Finding::info(
                "socket_buffers",
                format!(
                    "the agent counted {errs} UDP datagrams dropped on full receive buffers of \
                     WireGuard ports {plist} although {name} = {cur}: if they keep rising, \
                     the receiver is short of CPU or its socket asks for a small buffer"
                ),
            ));
        } else if cur < RMEM_BASELINE {
            let msg = format!(
                "{name} = {cur} is below {RMEM_BASELINE} (2.5 MiB): bursts overflow the \
                 WireGuard socket's buffer and are dropped"
            );
            // With an agent that saw no errors it is only advice.
            if errors.is_some() && is_rmem {
                f.push(Finding::new(
                    "socket_buffers",
                    Severity::Info,
                    format!("{msg} (none counted so far)"),
                    Some(format!("sysctl -w {name}={RMEM_BASELINE}")),
                ));
            } else {
                f.push(Finding::problem(
                    "socket_buffers",
                    msg,
                    format!("sysctl -w {name}={RMEM_BASELINE}"),
                ));
            }
        } else {
            f.push(Finding::ok("socket_buffers", format!("{name} = {cur}")));
        }
    }
}

/// adjtimex's `STA_UNSYNC` status bit and its `TIME_ERROR` return.
pub const STA_UNSYNC: i32 = 0x0040;
pub const TIME_ERROR: i32 = 5;

/// Whether adjtimex's answer (return value, `status`) says the clock is synchronised.
pub fn clock_synced(ret: i32, status: i32) -> bool {
    ret != TIME_ERROR && ret >= 0 && status & STA_UNSYNC == 0
}

fn check_clock(f: &mut Vec<Finding>) {
    // SAFETY: a zeroed timex with modes 0 only reads the kernel's clock state.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let ret = unsafe { libc::adjtimex(&mut tx) };
    if ret < 0 {
        f.push(Finding::info(
            "clock",
            format!("adjtimex failed: {}", std::io::Error::last_os_error()),
        ));
    } else if clock_synced(ret, tx.status) {
        f.push(Finding::ok(
            "clock",
            format!("synchronised (estimated error {} us)", tx.esterror),
        ));
    } else {
        f.push(Finding::problem(
            "clock",
            "the clock is not synchronised (adjtimex: STA_UNSYNC): a clock far off breaks \
             handshakes, whose TAI64N timestamps peers reject when they go backwards",
            "timedatectl set-ntp true",
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Key files
// ---------------------------------------------------------------------------------------

/// Whether a mode lets group or others read or write the file.
pub fn mode_too_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

fn check_key_files(f: &mut Vec<Finding>, dir: &Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            f.push(Finding::info(
                "key_files",
                format!("{}: {e} (nothing to check)", dir.display()),
            ));
            return;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf" || x == "key"))
        .collect();
    files.sort();
    let mut bad = 0;
    for p in &files {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode_too_open(mode) {
            bad += 1;
            f.push(Finding::problem(
                "key_files",
                format!(
                    "{} has mode {mode:04o}: group or others can read its private key",
                    p.display()
                ),
                format!("chmod 600 {}", shell_quote(&p.display().to_string())),
            ));
        }
    }
    if bad == 0 {
        f.push(Finding::ok(
            "key_files",
            format!(
                "{}: {} file{} readable by the owner only",
                dir.display(),
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
        ));
    }
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

// ---------------------------------------------------------------------------------------
// Firewall: kill switch and blocked WireGuard ports
// ---------------------------------------------------------------------------------------

/// A rule that drops WireGuard's UDP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockingRule {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub port: u16,
}

/// What `nft -j list ruleset` says about the firewall.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftFacts {
    /// "TABLE/CHAIN" of an output chain that drops traffic outside the tunnel (policy drop,
    /// or a drop/reject rule on `oifname !=`).
    pub kill_switch: Vec<String>,
    /// Drop/reject rules matching a UDP port in `ports`.
    pub blocking: Vec<BlockingRule>,
}

fn is_drop(v: &Value) -> bool {
    v.get("drop").is_some() || v.get("reject").is_some()
}

fn numbers(v: &Value) -> Vec<u64> {
    match v {
        Value::Number(n) => n.as_u64().into_iter().collect(),
        Value::Object(o) => o
            .get("set")
            .map(numbers)
            .or_else(|| {
                o.get("range").and_then(|r| {
                    let a = r.get(0)?.as_u64()?;
                    let b = r.get(1)?.as_u64()?;
                    Some((a..=b.min(a + 65535)).collect())
                })
            })
            .unwrap_or_default(),
        Value::Array(a) => a.iter().flat_map(numbers).collect(),
        _ => Vec::new(),
    }
}

/// Reads `nft -j list ruleset`; `ports` are the WireGuard ports (listen ports and peers'
/// endpoint ports).
pub fn parse_nft(json: &str, ports: &BTreeSet<u16>) -> Result<NftFacts, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("nft JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft JSON without an nftables array")?;
    let mut facts = NftFacts::default();
    // (family, table, chain) of base chains hooked at output.
    let mut output_chains = Vec::new();
    for it in items {
        let Some(c) = it.get("chain") else { continue };
        let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        if s("hook") == "output" {
            output_chains.push((s("family"), s("table"), s("name")));
            if s("policy") == "drop" {
                facts
                    .kill_switch
                    .push(format!("{}/{}", s("table"), s("name")));
            }
        }
    }
    for it in items {
        let Some(r) = it.get("rule") else { continue };
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let exprs = r
            .get("expr")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !exprs.iter().any(is_drop) {
            continue;
        }
        let key = (s("family"), s("table"), s("chain"));
        let matches: Vec<&Value> = exprs.iter().filter_map(|e| e.get("match")).collect();
        if output_chains.contains(&key)
            && matches.iter().any(|m| {
                m.get("op").and_then(Value::as_str) == Some("!=")
                    && m.pointer("/left/meta/key").and_then(Value::as_str) == Some("oifname")
            })
        {
            facts.kill_switch.push(format!("{}/{}", key.1, key.2));
        }
        for m in &matches {
            let Some(payload) = m.pointer("/left/payload") else {
                continue;
            };
            let proto = payload.get("protocol").and_then(Value::as_str);
            let field = payload.get("field").and_then(Value::as_str);
            let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
            if proto != Some("udp")
                || !matches!(field, Some("dport" | "sport"))
                || op != "==" && op != "in"
            {
                continue;
            }
            let hit = m
                .get("right")
                .map(numbers)
                .unwrap_or_default()
                .into_iter()
                .find_map(|p| u16::try_from(p).ok().filter(|p| ports.contains(p)));
            if let (Some(port), Some(handle)) = (hit, r.get("handle").and_then(Value::as_u64)) {
                facts.blocking.push(BlockingRule {
                    family: key.0.clone(),
                    table: key.1.clone(),
                    chain: key.2.clone(),
                    handle,
                    port,
                });
            }
        }
    }
    facts.kill_switch.dedup();
    Ok(facts)
}

/// Whether `iptables -S OUTPUT` (or ip6tables) shows a kill switch: policy DROP, or a DROP
/// or REJECT rule for traffic not leaving through an interface (`! -o IFACE`).
pub fn iptables_kill_switch(rules: &str) -> bool {
    rules.lines().any(|l| {
        let l = l.trim();
        l == "-P OUTPUT DROP"
            || (l.starts_with("-A OUTPUT")
                && l.contains("! -o ")
                && (l.ends_with("-j DROP") || l.contains("-j REJECT")))
    })
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nft command that installs a kill switch: output dropped except on loopback, the
/// tunnels and to the peers' endpoints.
pub fn killswitch_command(tunnels: &[String], endpoints: &[SocketAddr]) -> String {
    let t = KILLSWITCH_TABLE;
    let mut s = format!(
        "nft 'add table inet {t}; add chain inet {t} output {{ type filter hook output priority 0; policy drop; }}; add rule inet {t} output oifname \"lo\" accept"
    );
    for tun in tunnels {
        let _ = write!(s, "; add rule inet {t} output oifname \"{tun}\" accept");
    }
    for ep in endpoints {
        let fam = if ep.is_ipv4() { "ip" } else { "ip6" };
        let _ = write!(
            s,
            "; add rule inet {t} output {fam} daddr {} udp dport {} accept",
            ep.ip(),
            ep.port()
        );
    }
    s.push('\'');
    s
}

async fn check_firewall(f: &mut Vec<Finding>, host: &Host) {
    let tunnels: Vec<String> = host.devices.iter().map(|(d, _)| d.name.clone()).collect();
    let mut all: Vec<SocketAddr> = host
        .devices
        .iter()
        .flat_map(|(d, _)| d.peers.iter().filter_map(|p| p.endpoint))
        .collect();
    all.sort();
    all.dedup();
    let mut ports: BTreeSet<u16> = all.iter().map(SocketAddr::port).collect();
    // Endpoints reached through a tunnel (multihop exit) need no exception in a kill switch.
    let tunnel_idx: Vec<u32> = host
        .links
        .iter()
        .filter(|l| tunnels.contains(&l.name))
        .map(|l| l.index)
        .collect();
    let nl = Netlink::new().ok();
    let mut endpoints = Vec::new();
    for ep in all {
        let oif = match &nl {
            Some(nl) => nl.route_oif(ep.ip()).await.ok().flatten(),
            None => None,
        };
        if !oif.is_some_and(|i| tunnel_idx.contains(&i)) {
            endpoints.push(ep);
        }
    }
    ports.extend(
        host.devices
            .iter()
            .map(|(d, _)| d.listen_port)
            .filter(|p| *p != 0),
    );

    let nft = output_of("nft", &["-j", "list", "ruleset"]);
    let facts = match nft.as_deref().map(|j| parse_nft(j, &ports)) {
        Some(Ok(facts)) => Some(facts),
        Some(Err(e)) => {
            f.push(Finding::info(
                "firewall",
                format!("nft ruleset unreadable: {e}"),
            ));
            None
        }
        None => None,
    };
    let ipt = ["iptables", "ip6tables"]
        .iter()
        .filter_map(|p| output_of(p, &["-S", "OUTPUT"]))
        .any(|s| iptables_kill_switch(&s));
    if nft.is_none() && !ipt {
        f.push(Finding::info(
            "firewall",
            "neither `nft list ruleset` nor `iptables -S` could be read (not root, or not \
             installed)",
        ));
    }

    for b in facts.iter().flat_map(|x| x.blocking.iter()) {
        f.push(Finding::problem(
            "firewall",
            format!(
                "nftables rule {} {}/{} handle {} drops UDP port {}, which WireGuard uses: \
                 handshakes get no response",
                b.family, b.table, b.chain, b.handle, b.port
            ),
            format!(
                "nft delete rule {} {} {} handle {}",
                b.family, b.table, b.chain, b.handle
            ),
        ));
    }

    let leaks = host
        .metrics
        .as_ref()
        .map(|m| m.sum("wirescope_leaked_packets_total", &[]));
    let switch: Vec<String> = facts.map(|x| x.kill_switch).unwrap_or_default();
    let has_switch = !switch.is_empty() || ipt;
    if tunnels.is_empty() {
        return;
    }
    let fix = killswitch_command(&tunnels, &endpoints);
    if has_switch {
        let whr = if switch.is_empty() {
            "iptables OUTPUT".to_string()
        } else {
            format!("nftables {}", switch.join(", "))
        };
        f.push(Finding::ok(
            "kill_switch",
            format!("traffic outside the tunnel is dropped ({whr})"),
        ));
        if let Some(n) = leaks.filter(|n| *n > 0.0) {
            f.push(Finding::info(
                "kill_switch",
                format!(
                    "the agent counted {n} packets leaving outside the tunnel \
                     (wirescope_leaked_packets_total, counted before the firewall or before it \
                     was set up)"
                ),
            ));
        }
    } else {
        let leak = match leaks {
            Some(n) if n > 0.0 => format!("; the agent counted {n} leaked packets"),
            Some(_) => "; the agent counted no leak so far".to_string(),
            None => String::new(),
        };
        f.push(Finding::problem(
            "kill_switch",
            format!(
                "no kill switch: no firewall rule drops traffic leaving outside {}{leak}",
                tunnels.join(", ")
            ),
            fix,
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Mullvad
// ---------------------------------------------------------------------------------------

/// Whether an executable file `name` is in a PATH directory (unreadable ones skipped).
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

async fn check_mullvad(f: &mut Vec<Finding>, cli: &str) {
    let cfg = MullvadConfig {
        cli: cli.to_string(),
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(5),
    };
    if !cli.contains('/') && !on_path(cli) {
        f.push(Finding::info("mullvad", "Mullvad is not installed"));
        return;
    }
    match mullvad::poll_once(&cfg).await {
        Err(e) if e.is_not_found() => {
            f.push(Finding::info("mullvad", "Mullvad is not installed"));
        }
        Err(e) => f.push(Finding::problem(
            "mullvad",
            format!("the Mullvad daemon does not answer: {e}"),
            "systemctl restart mullvad-daemon",
        )),
        Ok(st) => {
            let mut msg = format!("state {}", st.state.name());
            if let Some(loc) = &st.location {
                if let Some(h) = &loc.hostname {
                    let _ = write!(msg, ", exit {h}");
                    if let Some(c) = &loc.city {
                        let _ = write!(msg, " ({c})");
                    }
                }
                if let Some(h) = &loc.entry_hostname {
                    let _ = write!(msg, ", entry {h}");
                    if let Some(c) = &loc.entry_city {
                        let _ = write!(msg, " ({c})");
                    }
                }
            }
            let _ = write!(
                msg,
                ", multihop {}, DAITA {}, quantum-resistant {}",
                if st.multihop() { "on" } else { "off" },
                if st.daita() { "on" } else { "off" },
                if st.quantum_resistant() { "on" } else { "off" },
            );
            if let Some(true) = st.locked_down {
                msg.push_str(", lockdown mode (blocks traffic while disconnected)");
            }
            match st.state {
                TunnelState::Error => f.push(Finding::problem(
                    "mullvad",
                    format!(
                        "{msg}: {}",
                        st.error_cause
                            .as_deref()
                            .unwrap_or("the tunnel is in the error state")
                    ),
                    "mullvad reconnect",
                )),
                TunnelState::Disconnected => f.push(Finding::new(
                    "mullvad",
                    Severity::Info,
                    msg,
                    Some("mullvad connect".into()),
                )),
                _ => f.push(Finding::info("mullvad", msg)),
            }
            if !st.unreadable.is_empty() {
                f.push(Finding::info(
                    "mullvad",
                    format!("fields not understood: {}", st.unreadable.join(", ")),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n";
        let m = parse_cap_eff(s).unwrap();
        assert!(missing_caps(m).is_empty());
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff(""), None);
        // NET_ADMIN and NET_RAW only (what a container often gets).
        let m = parse_cap_eff("CapEff:\t0000000000003000\n").unwrap();
        assert_eq!(missing_caps(m), vec!["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(0).len(), 4);
    }

    #[test]
    fn adjtimex_bits() {
        assert!(clock_synced(0, 0x2001));
        assert!(!clock_synced(0, STA_UNSYNC));
        assert!(!clock_synced(TIME_ERROR, 0));
        assert!(!clock_synced(-1, 0));
        assert!(clock_synced(1, 0x0001));
    }

    #[test]
    fn modes() {
        assert!(!mode_too_open(0o600));
        assert!(!mode_too_open(0o400));
        assert!(mode_too_open(0o644));
        assert!(mode_too_open(0o640));
        assert!(mode_too_open(0o602));
        assert_eq!(
            shell_quote("/etc/wireguard/wg0.conf"),
            "/etc/wireguard/wg0.conf"
        );
        assert_eq!(shell_quote("/tmp/a b'c"), "'/tmp/a b'\\''c'");
    }

    #[test]
    fn nat_heuristic() {
        for a in [
            "10.1.2.3",
            "192.168.1.2",
            "172.16.0.1",
            "100.64.0.1",
            "198.51.100.2",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(behind_nat(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "185.65.135.1", "100.128.0.1", "2a03:1b20::1"] {
            assert!(!behind_nat(a.parse().unwrap()), "{a}");
        }
        assert!(keepalive_problem(None, true).is_some());
        assert!(keepalive_problem(Some(0), true).is_some());
        assert!(keepalive_problem(Some(60), true).is_some());
        assert!(keepalive_problem(Some(25), true).is_none());
        assert!(keepalive_problem(None, false).is_none());
    }

    #[test]
    fn rmem() {
        assert_eq!(rmem_target(0.0), RMEM_BASELINE);
        assert_eq!(rmem_target(3.0), 8_388_608);
    }

    #[test]
    fn metrics_text() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE wirescope_recommended_mtu_bytes gauge\n\
             wirescope_recommended_mtu_bytes{interface=\"wg0\"} 1340\n\
             wirescope_udp_receive_errors_total{port=\"51820\"} 7\n\
             wirescope_udp_receive_errors_total{port=\"53\"} 2\n\
             weird{a=\"x\\\"y,z\",b=\"\"} 1.5 1700000000\n\
             plain 3\n# EOF\n",
        );
        assert_eq!(
            m.get("wirescope_recommended_mtu_bytes", &[("interface", "wg0")]),
            Some(1340.0)
        );
        assert_eq!(m.sum("wirescope_udp_receive_errors_total", &[]), 9.0);
        assert_eq!(
            m.sum("wirescope_udp_receive_errors_total", &[("port", "53")]),
            2.0
        );
        assert_eq!(m.get("weird", &[("a", "x\"y,z"), ("b", "")]), Some(1.5));
        assert_eq!(m.get("plain", &[]), Some(3.0));
        assert_eq!(m.get("absent", &[]), None);
    }

    const NFT: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "f", "handle": 1}},
 {"chain": {"family": "inet", "table": "f", "name": "out", "handle": 1, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "f", "name": "in", "handle": 2, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "f", "chain": "out", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 51820}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "f", "chain": "in", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": {"set": [53, 51821]}}}, {"reject": null}]}},
 {"rule": {"family": "inet", "table": "f", "chain": "out", "handle": 6, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 9999}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "f", "chain": "out", "handle": 7, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 51820}}, {"accept": null}]}}
]}"#;

    #[test]
    fn nft_blocking_rules() {
        let ports: BTreeSet<u16> = [51820, 51821].into();
        let f = parse_nft(NFT, &ports).unwrap();
        assert!(f.kill_switch.is_empty());
        assert_eq!(
            f.blocking
                .iter()
                .map(|b| (b.chain.as_str(), b.handle, b.port))
                .collect::<Vec<_>>(),
            vec![("out", 4, 51820), ("in", 5, 51821)]
        );
        assert!(parse_nft("{}", &ports).is_err());
        assert!(parse_nft("not json", &ports).is_err());
    }

    #[test]
    fn nft_kill_switch() {
        let policy = r#"{"nftables": [{"chain": {"family": "inet", "table": "mullvad", "name": "output", "hook": "output", "policy": "drop"}}]}"#;
        assert_eq!(
            parse_nft(policy, &BTreeSet::new()).unwrap().kill_switch,
            vec!["mullvad/output"]
        );
        let rule = r#"{"nftables": [{"chain": {"family": "inet", "table": "t", "name": "o", "hook": "output", "policy": "accept"}},
          {"rule": {"family": "inet", "table": "t", "chain": "o", "handle": 3, "expr": [{"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "wg0"}}, {"reject": {"type": "icmpx"}}]}}]}"#;
        assert_eq!(
            parse_nft(rule, &BTreeSet::new()).unwrap().kill_switch,
            vec!["t/o"]
        );
        // The same rule in an input chain is no kill switch.
        let input = rule.replace("\"output\"", "\"input\"");
        assert!(
            parse_nft(&input, &BTreeSet::new())
                .unwrap()
                .kill_switch
                .is_empty()
        );
    }

    #[test]
    fn iptables() {
        assert!(iptables_kill_switch("-P INPUT ACCEPT\n-P OUTPUT DROP\n"));
        assert!(iptables_kill_switch(
            "-P OUTPUT ACCEPT\n-A OUTPUT ! -o wg0 -m mark ! --mark 0xca6c -j REJECT --reject-with icmp-port-unreachable\n"
        ));
        assert!(!iptables_kill_switch(
            "-P OUTPUT ACCEPT\n-A OUTPUT -o wg0 -j DROP\n"
        ));
        assert!(!iptables_kill_switch(""));
    }

    #[test]
    fn killswitch_fix() {
        let c = killswitch_command(&["wg0".into()], &["192.0.2.1:51820".parse().unwrap()]);
        assert!(
            c.starts_with("nft 'add table inet wirescope_killswitch;"),
            "{c}"
        );
        assert!(c.contains("policy drop;"));
        assert!(c.contains("oifname \"wg0\" accept"));
        assert!(
            c.ends_with("ip daddr 192.0.2.1 udp dport 51820 accept'"),
            "{c}"
        );
    }

    #[test]
    fn report_exit_and_render() {
        let r = Report::new(None, vec![Finding::ok("clock", "fine")]);
        assert!(r.ok);
        assert!(r.render().ends_with("no problems found\n"));
        let r = Report::new(
            None,
            vec![Finding::problem(
                "key_files",
                "x has mode 0644",
                "chmod 600 x",
            )],
        );
        assert!(!r.ok);
        assert_eq!(r.problems, 1);
        let text = r.render();
        assert!(text.contains("PROBLEM key_files"), "{text}");
        assert!(text.contains("fix: chmod 600 x"), "{text}");
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["findings"][0]["fix"], "chmod 600 x");
        assert_eq!(j["findings"][0]["severity"], "problem");
    }
}
