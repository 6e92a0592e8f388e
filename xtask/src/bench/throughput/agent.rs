//! The "with" side of a measured pair: the agent started in the client namespace for a
//! with-run ([`Running`]) and checked attached to both interfaces (`wirescope_attach_info`,
//! and in TCX mode its own TCX links from /proc/PID/fdinfo), then stopped and checked gone
//! (none of its link ids left in `bpftool link show`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::Env;
use crate::agent::Agent;
use crate::procs;

/// The agent running in the client namespace, attached to both interfaces.
pub(super) struct Running {
    agent: Agent,
    pid: u32,
    /// Its TCX link ids (none in clsact mode).
    links: Vec<u32>,
}

impl Running {
    pub(super) fn start(env: &Env) -> Result<Running> {
        let log = env.dir.join("agent.log");
        let state = env.dir.join("agent-state");
        let state = state.to_string_lossy();
        let args = [
            "--tunnel",
            &env.wg,
            "--underlay",
            &env.veth,
            "--state-dir",
            &state,
        ];
        let agent = Agent::start(&env.ctx.agent_bin, &env.client_ns, &args, &log)?;
        let pid = agent_pid(env)?;
        let mut running = Running {
            agent,
            pid,
            links: Vec::new(),
        };
        running.check_attached(env)?;
        Ok(running)
    }

    /// Waits (up to 10 s) until /metrics shows rx and tx attached on both interfaces in the
    /// expected mode and the relay as a peer (so that the programs have their maps filled);
    /// in TCX mode also reads the agent's own links: one ingress and one egress per ifindex.
    fn check_attached(&mut self, env: &Env) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut missing;
        loop {
            let m = self.agent.scrape()?;
            missing = Vec::new();
            for iface in [&env.wg, &env.veth] {
                for dir in ["rx", "tx"] {
                    let v = m.get(
                        "wirescope_attach_info",
                        &[
                            ("interface", iface),
                            ("direction", dir),
                            ("mode", env.attach_mode),
                        ],
                    )?;
                    if v != 1.0 {
                        missing.push(format!("{iface} {dir}"));
                    }
                }
            }
            if m.sum("wirescope_peer_info", &[("interface", &env.wg)]) < 1.0 {
                missing.push(format!("the relay peer on {}", env.wg));
            }
            if missing.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent has not attached ({} missing in /metrics after 10 s); its log:\n{}",
                    missing.join(", "),
                    self.agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if env.attach_mode != "tcx" {
            return Ok(());
        }
        let links = tcx_links(self.pid)?;
        for iface in [&env.wg, &env.veth] {
            let index = ifindex(&env.client_ns, iface)?;
            for dir in ["ingress", "egress"] {
                if !links
                    .iter()
                    .any(|l| l.ifindex == index && l.attach_type.contains(dir))
                {
                    bail!(
                        "the agent (pid {}) holds no TCX {dir} link on {iface} (ifindex {index}); \
                         its links: {links:?}",
                        self.pid
                    );
                }
            }
        }
        self.links = links.iter().map(|l| l.id).collect();
        Ok(())
    }

    /// SIGINT; fails unless the agent exits 0 and, in TCX mode, its links are gone.
    pub(super) fn stop(self) -> Result<()> {
        let status = self.agent.stop()?;
        if !status.success() {
            bail!("the agent exited with {status} instead of 0 (clean detach)");
        }
        if self.links.is_empty() {
            return Ok(());
        }
        let out = crate::cmd::stdout("bpftool", ["-j", "link", "show"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("parsing `bpftool -j link show`")?;
        let left: Vec<u32> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["id"].as_u64())
            .filter_map(|id| u32::try_from(id).ok())
            .filter(|id| self.links.contains(id))
            .collect();
        if !left.is_empty() {
            bail!("the stopped agent's TCX links {left:?} are still there");
        }
        Ok(())
    }
}

/// The agent's pid: `ip netns exec` execs it, but Agent keeps its Child private, so it is
/// found among the namespace's processes by its argv.
fn agent_pid(env: &Env) -> Result<u32> {
    let bin = env.ctx.agent_bin.to_string_lossy();
    procs::netns_pids(&env.client_ns)?
        .into_iter()
        .find(|&pid| procs::argv(pid).is_some_and(|a| a.first().is_some_and(|p| *p == bin)))
        .ok_or_else(|| anyhow!("no {bin} process in {}", env.client_ns))
}

#[derive(Debug)]
struct TcxLink {
    id: u32,
    ifindex: u32,
    /// e.g. "46 (ingress)"
    attach_type: String,
}

/// The TCX links a process holds, from /proc/PID/fdinfo (link_type, link_id, ifindex,
/// attach_type: what the kernel prints for a TCX link fd since 6.6).
fn tcx_links(pid: u32) -> Result<Vec<TcxLink>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut links = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let Ok(entry) = entry else { continue };
        // A descriptor may close between the listing and the read: skip it.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_string())
        };
        if field("link_type").as_deref() != Some("tcx") {
            continue;
        }
        let num = |k: &str| field(k).and_then(|v| v.parse::<u32>().ok());
        if let (Some(id), Some(ifindex), Some(attach_type)) =
            (num("link_id"), num("ifindex"), field("attach_type"))
        {
            links.push(TcxLink {
                id,
                ifindex,
                attach_type,
            });
        }
    }
    Ok(links)
}

/// An interface's index in a namespace (`ip -o link show dev IFACE`: "3: btc0: ...").
fn ifindex(ns: &str, iface: &str) -> Result<u32> {
    let out = crate::cmd::stdout("ip", ["-n", ns, "-o", "link", "show", "dev", iface])?;
    out.split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| anyhow!("no ifindex in `ip -n {ns} -o link show dev {iface}`: {out:?}"))
}

pub(super) fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() != "0")
}
