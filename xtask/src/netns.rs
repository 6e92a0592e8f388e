//! Named network namespaces (the ones `ip netns` manages under /run/netns): running programs
//! and Rust code inside them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};

use crate::cmd;

/// Where `ip netns add` mounts named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

pub fn exists(ns: &str) -> bool {
    path(ns).exists()
}

/// Names of all named network namespaces.
pub fn list() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// A `Command` that runs `program` inside `ns` (`ip netns exec NS program`). Add arguments and
/// choose stdio yourself.
pub fn command(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

/// Runs `args[0] args[1..]` inside `ns` to completion. Fails with the command's stderr when it
/// exits non-zero.
pub fn exec<S: AsRef<str>>(ns: &str, args: &[S]) -> Result<Output> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| anyhow!("netns::exec in {ns}: empty command"))?;
    let mut cmd = command(ns, program.as_ref());
    cmd.args(rest.iter().map(AsRef::as_ref));
    cmd::run(&mut cmd)
}

/// Starts `args[0] args[1..]` inside `ns` and returns at once. stdin is closed; stdout and
/// stderr are inherited (so a chatty program can never block on a full pipe). Use
/// [`command`] for other stdio.
pub fn spawn<S: AsRef<str>>(ns: &str, args: &[S]) -> Result<Child> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| anyhow!("netns::spawn in {ns}: empty command"))?;
    let mut cmd = command(ns, program.as_ref());
    cmd.args(rest.iter().map(AsRef::as_ref))
        .stdin(Stdio::null());
    cmd.spawn()
        .with_context(|| format!("starting `{}`", cmd::describe(&cmd)))
}

/// Runs `f` on a new thread that has first entered the network namespace `ns` (setns with
/// CLONE_NEWNET on /run/netns/NS), and returns what `f` returned. Sockets created by `f` stay
/// in `ns` for their whole life, whichever thread uses them later. Fails when the namespace
/// cannot be entered or `f` panics.
pub fn run_in<F, T>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let ns_path = path(ns);
    let file = File::open(&ns_path).with_context(|| {
        format!(
            "opening network namespace {} (is the lab up? `cargo xtask lab up`)",
            ns_path.display()
        )
    })?;
    let name = ns.to_owned();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into network namespace {name} (needs root)"))?;
            Ok(f())
        })
        .context("spawning a thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("the closure run in network namespace {ns} panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_wraps_ip_netns_exec() {
        let mut cmd = command("x-cli", "ping");
        cmd.args(["-c", "1"]);
        assert_eq!(cmd::describe(&cmd), "ip netns exec x-cli ping -c 1");
    }

    #[test]
    fn run_in_missing_namespace_names_it() {
        let err = run_in("wirescope-no-such-ns", || ()).unwrap_err();
        assert!(format!("{err:#}").contains("/run/netns/wirescope-no-such-ns"));
    }
}
