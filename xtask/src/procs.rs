//! Finding and stopping processes: userspace WireGuard daemons (wireguard-go, boringtun) by the
//! interface named in their argv,
//! and everything running inside a network namespace.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns;

/// Program names of the userspace WireGuard daemons the lab runs: any wireguard-go build
/// (Debian's or a newer one from another path) and boringtun's CLI.
pub const WG_DAEMONS: &[&str] = &["wireguard-go", "boringtun-cli", "boringtun"];

/// Whether `prog` (a path or a name) is one of [`WG_DAEMONS`].
pub fn is_wg_daemon(prog: &str) -> bool {
    prog.rsplit('/')
        .next()
        .is_some_and(|name| WG_DAEMONS.contains(&name))
}

/// The interface a process's argv names when the process is a userspace WireGuard daemon
/// (`wireguard-go [-f] IFACE`, `boringtun-cli [-f] IFACE`; the lab passes boringtun's other
/// options through its environment), else None.
pub fn wireguard_go_iface(argv: &[String]) -> Option<&str> {
    let prog = argv.first()?;
    if !is_wg_daemon(prog) {
        return None;
    }
    argv[1..]
        .iter()
        .find(|a| !a.starts_with('-'))
        .map(String::as_str)
}

/// `argv` of a process, or None when it is gone or a kernel thread.
pub fn argv(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

fn all_pids() -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry.context("listing /proc")?;
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// PIDs of running userspace WireGuard daemons ([`WG_DAEMONS`]) whose interface argument
/// satisfies `want`.
pub fn wireguard_go_pids(want: impl Fn(&str) -> bool) -> Result<Vec<u32>> {
    let mut found = Vec::new();
    for pid in all_pids()? {
        if let Some(args) = argv(pid)
            && let Some(iface) = wireguard_go_iface(&args)
            && want(iface)
            && is_alive(pid)
        {
            found.push(pid);
        }
    }
    Ok(found)
}

/// PIDs of the processes whose network namespace is `ns` (`ip netns pids NS`), never this
/// process itself.
pub fn netns_pids(ns: &str) -> Result<Vec<u32>> {
    let out = crate::cmd::ip(&["netns", "pids", ns])?;
    let me = std::process::id();
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .filter(|pid| *pid != me)
        .collect())
}

/// True while `pid` exists and is not a zombie (never for pid 0).
pub fn is_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends SIGTERM to every pid, waits up to `grace` for them to exit, then SIGKILLs what is
/// left and waits once more. Returns the pids that are still alive after all that. Pid 0 (a
/// kernel WireGuard interface's "daemon", which would mean our own process group) and this
/// process are never signalled.
pub fn terminate(pids: &[u32], grace: Duration) -> Vec<u32> {
    let me = std::process::id();
    let pids: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| *p != me && *p != 0)
        .collect();
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        for &pid in &pids {
            if is_alive(pid) {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
        }
        let deadline = Instant::now() + grace;
        while pids.iter().any(|p| is_alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pids.into_iter().filter(|p| is_alive(*p)).collect()
}

/// Collects the exit status of those of `pids` that are children of this process (zombies
/// otherwise). Lab daemons become our children when [`become_subreaper`] was called.
pub fn reap(pids: &[u32]) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    for &pid in pids {
        let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
    }
}

/// Makes orphaned descendants (the wireguard-go daemons, which detach from `ip netns exec`)
/// children of this process rather than of init, so that [`reap`] can collect them: init
/// does not reap them on every machine (a sandbox's PID 1 may not).
pub fn become_subreaper() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// Every process inside `ns`, or None when the namespace does not exist.
pub fn in_netns(ns: &str) -> Result<Option<Vec<u32>>> {
    if !netns::exists(ns) {
        return Ok(None);
    }
    netns_pids(ns).map(Some)
}

/// A child process killed (unless it has exited already) and reaped when dropped, so an
/// error path leaves no process behind.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn recognises_wireguard_go() {
        assert_eq!(
            wireguard_go_iface(&v(&["wireguard-go", "wsc0"])),
            Some("wsc0")
        );
        assert_eq!(
            wireguard_go_iface(&v(&["/usr/bin/wireguard-go", "-f", "wsx0"])),
            Some("wsx0")
        );
        assert_eq!(wireguard_go_iface(&v(&["wg", "show", "wsc0"])), None);
        assert_eq!(
            wireguard_go_iface(&v(&["/root/.cargo/bin/boringtun-cli", "wsb0"])),
            Some("wsb0")
        );
        assert_eq!(
            wireguard_go_iface(&v(&[
                "/opt/wirescope/wireguard-go-current/wireguard-go",
                "wsn0"
            ])),
            Some("wsn0")
        );
        assert_eq!(wireguard_go_iface(&v(&["wireguard-go"])), None);
    }

    #[test]
    fn self_is_alive_and_never_terminated() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert_eq!(
            terminate(&[me], Duration::from_millis(1)),
            Vec::<u32>::new()
        );
        assert!(is_alive(me));
    }

    #[test]
    fn terminates_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let left = terminate(&[child.id()], Duration::from_secs(2));
        assert!(left.is_empty());
        child.wait().unwrap();
    }
}
