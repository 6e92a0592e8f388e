//! Finding and removing everything a lab with a given prefix may have left, whether it was
//! torn down properly or crashed half-way: namespaces `PREFIX-*`, the processes inside them,
//! wireguard-go daemons for the lab's interface names (even ones whose namespace is gone),
//! stray links in the root namespace, control sockets, boringtun's logs, and the state file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::plan::{is_lab_iface, validate_prefix};
use crate::{cmd, netns, procs, wg};

/// Directory of the lab state files (`PREFIX.json`).
pub const STATE_DIR: &str = "/run/wirescope-lab";

pub fn state_path(prefix: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("{prefix}.json"))
}

#[derive(Debug, Default)]
struct Found {
    namespaces: Vec<String>,
    /// (pid, what it is)
    processes: Vec<(u32, String)>,
    root_links: Vec<String>,
    sockets: Vec<PathBuf>,
    /// boringtun's logs ([`super::impls::boringtun_log`]).
    logs: Vec<PathBuf>,
    state_file: Option<PathBuf>,
}

impl Found {
    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.namespaces
                .iter()
                .map(|n| format!("network namespace {n}")),
        );
        out.extend(
            self.processes
                .iter()
                .map(|(pid, what)| format!("process {pid} ({what})")),
        );
        out.extend(
            self.root_links
                .iter()
                .map(|l| format!("link {l} in the root namespace")),
        );
        out.extend(
            self.sockets
                .iter()
                .map(|s| format!("socket {}", s.display())),
        );
        out.extend(self.logs.iter().map(|s| format!("log {}", s.display())));
        out.extend(
            self.state_file
                .iter()
                .map(|s| format!("state file {}", s.display())),
        );
        out
    }
}

fn find(prefix: &str) -> Result<Found> {
    validate_prefix(prefix)?;
    let mut found = Found::default();
    let ns_prefix = format!("{prefix}-");
    found.namespaces = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&ns_prefix))
        .collect();

    let mut pids = Vec::new();
    for ns in &found.namespaces {
        for pid in procs::in_netns(ns)?.unwrap_or_default() {
            pids.push((pid, ns.clone()));
        }
    }
    for pid in procs::wireguard_go_pids(|iface| is_lab_iface(prefix, iface))? {
        pids.push((pid, String::new()));
    }
    // Keep the entry that names the namespace when a pid was found both ways.
    pids.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    pids.dedup_by_key(|(pid, _)| *pid);
    for (pid, ns) in pids {
        let Some(argv) = procs::argv(pid) else {
            continue;
        };
        let mut what = argv.join(" ");
        if !ns.is_empty() {
            what = format!("{what}, in {ns}");
        }
        found.processes.push((pid, what));
    }

    let links = cmd::ip(&["-o", "link", "show"])?;
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        // "5: wsc-e@if4: <BROADCAST,...> ..."
        if let Some(name) = line.split(": ").nth(1) {
            let name = name.split('@').next().unwrap_or(name);
            if is_lab_iface(prefix, name) {
                found.root_links.push(name.to_owned());
            }
        }
    }

    if let Ok(dir) = std::fs::read_dir(wg::SOCKET_DIR) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_suffix(".sock")
                && is_lab_iface(prefix, iface)
            {
                found.sockets.push(entry.path());
            }
        }
    }
    found.sockets.sort();
    if let Ok(dir) = std::fs::read_dir(STATE_DIR) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_suffix(".boringtun.log")
                && is_lab_iface(prefix, iface)
            {
                found.logs.push(entry.path());
            }
        }
    }
    found.logs.sort();

    let state = state_path(prefix);
    if state.exists() {
        found.state_file = Some(state);
    }
    Ok(found)
}

/// What a lab with this prefix left on the machine, one description per item; empty when
/// nothing.
pub fn leftovers(prefix: &str) -> Result<Vec<String>> {
    Ok(find(prefix)?.describe())
}

/// Removes everything a lab with this prefix made (see the module doc). Idempotent; returns
/// what it removed. Fails, naming them, if some things could not be removed.
pub fn down(prefix: &str) -> Result<Vec<String>> {
    let found = find(prefix)?;
    let removed = found.describe();
    if removed.is_empty() {
        return Ok(removed);
    }

    let pids: Vec<u32> = found.processes.iter().map(|(p, _)| *p).collect();
    let alive = procs::terminate(&pids, Duration::from_secs(2));
    let daemons: Vec<u32> = found
        .processes
        .iter()
        .filter(|(_, what)| {
            what.split_whitespace()
                .next()
                .is_some_and(procs::is_wg_daemon)
        })
        .map(|(p, _)| *p)
        .collect();
    procs::reap(&daemons);
    if !alive.is_empty() {
        bail!("processes {alive:?} survived SIGKILL; see `ps -o pid,stat,args -p PID`");
    }
    for ns in &found.namespaces {
        if netns::exists(ns) {
            cmd::ip(&["netns", "del", ns])
                .with_context(|| format!("removing network namespace {ns}"))?;
        }
    }
    for link in &found.root_links {
        // Gone already when its veth peer went with a namespace.
        let _ = cmd::ip(&["link", "del", link]);
    }
    for file in found.sockets.iter().chain(&found.logs) {
        remove_if_present(file)?;
    }
    if let Some(state) = &found.state_file {
        remove_if_present(state)?;
    }

    let left = leftovers(prefix)?;
    if !left.is_empty() {
        bail!(
            "after removing lab `{prefix}` these are still there: {}; \
             run `cargo xtask lab down --prefix {prefix}` again, or remove them by hand",
            left.join("; ")
        );
    }
    Ok(removed)
}

fn remove_if_present(path: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}
