//! Booting a root file system ([`crate::sysroot`]) with systemd as PID 1 in a
//! systemd-nspawn container on this host's kernel, and running commands in it
//! (`nsenter` into the container's namespaces: `systemctl`, `journalctl`).
//!
//! The host needs no systemd of its own: nspawn runs with `--register=no --keep-unit` (no
//! machined to register with, no scope unit to create). nspawn puts itself and the container
//! in sub-cgroups of the cgroup it starts in; it starts in a fresh cgroup of its own per
//! hierarchy (`wirescope-nspawn-<machine>`), removed with the container, so nothing is left
//! in the host's cgroups. The root is mounted with `--volatile=overlay`: what the container
//! writes goes to a tmpfs and the cached root stays as built.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::cmd;

/// What to boot, and how.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    pub root: PathBuf,
    /// The machine name (also the container's hostname and its cgroups' suffix).
    pub machine: String,
    /// A named network namespace (`ip netns`, /run/netns/NAME) the container joins; None
    /// gives it a private one with only loopback.
    pub netns: Option<String>,
    /// Capabilities beyond nspawn's default set (`--capability`).
    pub capabilities: Vec<String>,
    /// System calls beyond nspawn's default filter (`--system-call-filter`).
    pub system_calls: Vec<String>,
    /// Host paths bound read-write at the same path in the container.
    pub bind: Vec<PathBuf>,
    /// (host path, container path) bound read-only.
    pub bind_ro: Vec<(PathBuf, PathBuf)>,
    /// nspawn's output and the container's console.
    pub log: PathBuf,
}

/// A booted container; powered off when dropped.
pub struct Container {
    child: Option<Child>,
    leader: u32,
    machine: String,
    cgroups: Vec<PathBuf>,
    log: PathBuf,
}

/// systemd-nspawn's arguments for `b` (without the program name).
pub fn nspawn_args(b: &Boot) -> Vec<String> {
    let mut a = vec![
        "--boot".to_string(),
        format!("--directory={}", b.root.display()),
        format!("--machine={}", b.machine),
        "--register=no".into(),
        "--keep-unit".into(),
        "--volatile=overlay".into(),
        "--settings=no".into(),
        "--console=pipe".into(),
    ];
    match &b.netns {
        Some(ns) => a.push(format!(
            "--network-namespace-path={}",
            crate::netns::path(ns).display()
        )),
        None => a.push("--private-network".into()),
    }
    if !b.capabilities.is_empty() {
        a.push(format!("--capability={}", b.capabilities.join(",")));
    }
    if !b.system_calls.is_empty() {
        a.push(format!("--system-call-filter={}", b.system_calls.join(" ")));
    }
    for p in &b.bind {
        a.push(format!("--bind={}", p.display()));
    }
    for (from, to) in &b.bind_ro {
        a.push(format!("--bind-ro={}:{}", from.display(), to.display()));
    }
    a
}

/// Whether this host can boot containers: root, systemd-nspawn installed.
pub fn prerequisites() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("booting a systemd container needs root");
    }
    if !crate::lab::on_path("systemd-nspawn") {
        bail!(
            "systemd-nspawn is not installed: `cargo xtask setup` (or `apt-get install \
             systemd-container`)"
        );
    }
    Ok(())
}

impl Container {
    /// Boots `b` and waits (up to `timeout`) until systemd has finished starting up
    /// (`systemctl is-system-running`: `running`, or `degraded` when a unit failed).
    pub fn boot(b: &Boot, timeout: Duration) -> Result<Container> {
        prerequisites()?;
        for (from, _) in &b.bind_ro {
            if !from.exists() {
                bail!(
                    "{} does not exist (bound into the container)",
                    from.display()
                );
            }
        }
        let cgroups = own_cgroups(&b.machine)?;
        let log = cmd::new_file(&b.log)?;
        // The shell moves itself into the fresh cgroups, then becomes nspawn.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(
                "while [ \"$1\" != -- ]; do echo $$ > \"$1/cgroup.procs\" || exit 97; shift; \
                 done; shift; exec \"$@\"",
            )
            .arg("sh")
            .args(&cgroups)
            .arg("--")
            .arg("systemd-nspawn")
            .args(nspawn_args(b))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::describe(&command)))?;
        let mut c = Container {
            leader: 0,
            child: Some(child),
            machine: b.machine.clone(),
            cgroups,
            log: b.log.clone(),
        };
        let deadline = Instant::now() + timeout;
        c.leader = c.find_leader(deadline)?;
        c.wait_booted(deadline)?;
        Ok(c)
    }

    /// The container's PID 1 (as the host sees it).
    pub fn leader(&self) -> u32 {
        self.leader
    }

    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// nspawn's output so far (the container's console).
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `program` to run inside the container (every namespace of its PID 1).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={}", self.leader))
            .arg("--all")
            .arg(program);
        c
    }

    /// Runs `args` in the container to completion; fails with its stderr on a non-zero exit.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("Container::exec in {}: empty command", self.machine))?;
        cmd::run(self.command(program).args(rest))
    }

    /// `systemctl ARGS` in the container, checked.
    pub fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        let out = self.exec(&all)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The messages `unit` logged (`journalctl -u UNIT -o cat`), oldest first.
    pub fn journal(&self, unit: &str) -> Result<String> {
        let out = self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A property of a unit (`systemctl show -p NAME --value UNIT`).
    pub fn unit_property(&self, unit: &str, name: &str) -> Result<String> {
        self.systemctl(&["show", "-p", name, "--value", unit])
    }

    fn find_leader(&mut self, deadline: Instant) -> Result<u32> {
        let nspawn = self.child.as_ref().map(Child::id).unwrap_or_default();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "systemd-nspawn exited ({status}) before the container booted{}; its \
                     output:\n{}",
                    if status.code() == Some(97) {
                        " (it could not be moved into its cgroups)"
                    } else {
                        ""
                    },
                    self.console()
                );
            }
            if let Some(pid) = child_named(nspawn, "systemd") {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                bail!(
                    "systemd-nspawn started no systemd in time; its output:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_booted(&mut self, deadline: Instant) -> Result<()> {
        loop {
            // Fails (no bus yet) until PID 1 listens; prints `starting` until it is done.
            let out = self
                .command("systemctl")
                .arg("is-system-running")
                .stdin(Stdio::null())
                .output()
                .context("running nsenter")?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match state.as_str() {
                "running" => return Ok(()),
                "degraded" => {
                    let failed = self
                        .systemctl(&["list-units", "--failed", "--plain", "--no-legend"])
                        .unwrap_or_default();
                    eprintln!(
                        "container {}: booted degraded, failed units:\n{failed}",
                        self.machine
                    );
                    return Ok(());
                }
                _ => {}
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the container {} stopped while booting ({status}); its console:\n{}",
                    self.machine,
                    self.console()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the container {} did not finish booting in time (state {state:?}); its \
                     console:\n{}",
                    self.machine,
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `systemctl poweroff` in the container, waiting up to 30 s for nspawn to exit (then
    /// killing nspawn and the container's PID 1); removes the cgroups.
    pub fn poweroff(mut self) -> Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let asked = self
            .command("systemctl")
            .args(["poweroff", "--no-block"])
            .stdin(Stdio::null())
            .output()
            .map(|o| o.status);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut result = Ok(());
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    result = Err(anyhow!(
                        "the container {} did not power off within 30 s (systemctl poweroff: \
                         {asked:?}); killed",
                        self.machine
                    ));
                    let _ = child.kill();
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.leader as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = child.wait();
                    break;
                }
            }
        }
        // The container's processes are gone with its PID namespace; its cgroups empty.
        for cg in &self.cgroups {
            if let Err(e) = remove_cgroup_tree(cg) {
                eprintln!("removing the cgroup {}: {e}", cg.display());
            }
        }
        result
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            eprintln!("{e:#}");
        }
    }
}

/// A child of `parent` whose command name is `comm`.
fn child_named(parent: u32, comm: &str) -> Option<u32> {
    let parent = parent.to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((name, ppid)) = parse_stat(&stat)
            && ppid == parent
            && name == comm
        {
            return Some(pid);
        }
    }
    None
}

/// (command name, parent pid) from /proc/PID/stat (`pid (comm) state ppid ...`; the
/// name may hold spaces and parentheses, so it ends at the last `)`).
fn parse_stat(stat: &str) -> Option<(&str, &str)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    Some((name, rest.next()?))
}

/// The cgroup hierarchies nspawn works in, from /proc/self/mountinfo and /proc/self/cgroup:
/// (mount point, this process's cgroup in it) for the unified hierarchy (cgroup2) and, on a
/// hybrid or legacy host, systemd's named v1 hierarchy (`name=systemd`).
fn cgroup_hierarchies(mountinfo: &str, own: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount) = left.split_whitespace().nth(4) else {
            continue;
        };
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or_default();
        let superopts = r.nth(1).unwrap_or_default();
        let key = match fstype {
            "cgroup2" => "",
            "cgroup" if superopts.split(',').any(|o| o == "name=systemd") => "name=systemd",
            _ => continue,
        };
        let path = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, p) = (f.next()?, f.next()?, f.next()?);
            (ctrl == key).then(|| p.to_string())
        });
        if let Some(p) = path {
            out.push((PathBuf::from(mount), p));
        }
    }
    out
}

/// Creates `wirescope-nspawn-<machine>` under this process's cgroup in every hierarchy of
/// [`cgroup_hierarchies`] (emptied first when a crashed run left it).
fn own_cgroups(machine: &str) -> Result<Vec<PathBuf>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let hierarchies = cgroup_hierarchies(&mountinfo, &own);
    if hierarchies.is_empty() {
        bail!(
            "no cgroup2 or name=systemd cgroup hierarchy is mounted: systemd-nspawn needs one \
             (mount cgroup2 at /sys/fs/cgroup)"
        );
    }
    let mut dirs = Vec::new();
    for (mount, path) in hierarchies {
        let dir = mount
            .join(path.trim_start_matches('/'))
            .join(format!("wirescope-nspawn-{machine}"));
        remove_cgroup_tree(&dir)?;
        std::fs::create_dir(&dir)
            .with_context(|| format!("creating the cgroup {}", dir.display()))?;
        dirs.push(dir);
    }
    Ok(dirs)
}

/// Removes an empty cgroup and its descendants, deepest first (absent: nothing to do).
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.with_context(|| format!("listing {}", dir.display()))?,
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing the cgroup {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_join_the_lab_namespace_and_bind_what_is_asked() {
        let b = Boot {
            root: "/t/root".into(),
            machine: "wsu".into(),
            netns: Some("wsu-cli".into()),
            capabilities: vec!["CAP_BPF".into(), "CAP_NET_ADMIN".into()],
            system_calls: vec!["bpf".into(), "perf_event_open".into()],
            bind: vec!["/sys/fs/bpf".into()],
            bind_ro: vec![("/t/wirescope".into(), "/usr/local/bin/wirescope".into())],
            log: "/t/log".into(),
        };
        let a = nspawn_args(&b);
        for want in [
            "--boot",
            "--directory=/t/root",
            "--machine=wsu",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--network-namespace-path=/run/netns/wsu-cli",
            "--capability=CAP_BPF,CAP_NET_ADMIN",
            "--system-call-filter=bpf perf_event_open",
            "--bind=/sys/fs/bpf",
            "--bind-ro=/t/wirescope:/usr/local/bin/wirescope",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--private-network"));
        let private = nspawn_args(&Boot { netns: None, ..b });
        assert!(private.iter().any(|x| x == "--private-network"));
        assert!(
            !private
                .iter()
                .any(|x| x.starts_with("--network-namespace-path"))
        );
    }

    #[test]
    fn stat_names_and_parents() {
        assert_eq!(
            parse_stat("42 (systemd) S 7 42 42 0 -1"),
            Some(("systemd", "7"))
        );
        assert_eq!(
            parse_stat("43 (a (b) c) R 9 1 1"),
            Some(("a (b) c", "9")),
            "a name with spaces and parentheses"
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn hierarchies_of_a_hybrid_and_a_unified_host() {
        let hybrid_mounts = "\
35 25 0:30 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 25 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
42 25 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
43 25 0:40 / /sys/fs/bpf rw,relatime shared:14 - bpf bpf rw,mode=700
";
        let own = "9:name=systemd:/\n1:cpu:/\n0::/ci/job\n";
        assert_eq!(
            cgroup_hierarchies(hybrid_mounts, own),
            vec![
                (PathBuf::from("/sys/fs/cgroup/systemd"), "/".to_string()),
                (
                    PathBuf::from("/sys/fs/cgroup/unified"),
                    "/ci/job".to_string()
                ),
            ]
        );
        let unified = "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_hierarchies(unified, "0::/user.slice/session-1.scope\n"),
            vec![(
                PathBuf::from("/sys/fs/cgroup"),
                "/user.slice/session-1.scope".to_string()
            )]
        );
        assert_eq!(cgroup_hierarchies("", "0::/\n"), vec![]);
    }
}
