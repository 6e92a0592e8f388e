//! `wirescope doctor`: checks the host (and, when one answers, the running agent's metrics)
//! and prints, per finding, what is wrong and the exact command that fixes it.
//!
//! Every check reads the host directly, so the command works without an agent; an agent on
//! `--web.listen-address` adds what only it measures (path MTU, UDP receive errors, handshake
//! timeouts, leaks). Exit status 0 when no check found a problem, 1 otherwise.
//!
//! The checks, in order: agent, kernel, permissions, WireGuard (implementation, MTU,
//! keepalive, handshakes), socket buffers, clock, key files, firewall (kill switch, blocked
//! WireGuard ports), Mullvad. Parsers of what they read are pure functions, unit-tested beside
//! them.
//!
//! One file per family: findings.rs (what a check reports), agent.rs (the agent's
//! metrics), kernel.rs, wireguard.rs, system.rs (socket buffers, clock), keys.rs,
//! firewall.rs, mullvad_daemon.rs.

mod agent;
mod findings;
mod firewall;
mod kernel;
mod keys;
mod mullvad_daemon;
mod system;
mod wireguard;

use std::process::ExitCode;

use self::{
    agent::fetch_metrics,
    firewall::check_firewall,
    kernel::{check_kernel, check_permissions},
    keys::check_key_files,
    mullvad_daemon::check_mullvad,
    system::{check_clock, check_socket_buffers},
    wireguard::{check_handshakes, check_keepalive, check_mtu, check_wireguard},
};
pub use self::{
    agent::{Metrics, Sample},
    findings::{Finding, Report, Severity},
    firewall::{
        BlockingRule, KILLSWITCH_TABLE, NftFacts, iptables_kill_switch, killswitch_command,
        parse_nft,
    },
    kernel::{
        CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON, NEEDED_CAPS, missing_caps, parse_cap_eff,
    },
    keys::{mode_too_open, shell_quote},
    system::{RMEM_BASELINE, RMEM_UNDER_ERRORS, STA_UNSYNC, TIME_ERROR, clock_synced, rmem_target},
    wireguard::{KEEPALIVE_MAX, REJECT_AFTER, behind_nat, keepalive_problem, wg_overhead},
};
use crate::{
    config::cli::DoctorArgs,
    sources::netlink::{Link, Netlink},
    sync::inventory::WgDevice,
};

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
