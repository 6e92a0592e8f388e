//! Running one VM: the shell script the guest runs (modules, mounts, facts about the kernel,
//! then each suite with `@@wirescope-vm` marker lines around it), booting it with vng under
//! software emulation, and following `guest.log` as it grows until the guest is done or the
//! time is up.

use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::install::{Kernel, Tools, path_with};
use super::report::{VmReport, parse_guest_log};
use super::suites::{Build, Suite};
use super::{VM_CPUS, VM_MEMORY};
use crate::agent::AGENT_BIN_ENV;
use crate::cmd;
use crate::lab::WG_IMPL_ENV;

/// Marker lines the guest script prints, `@@wirescope-vm KIND ARGS...`.
pub(super) const MARK: &str = "@@wirescope-vm";

pub(super) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs.
pub fn guest_script(out: &Path, suites: &[Suite], env: &[(&str, String)]) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "#!/bin/sh\n# Written by `cargo xtask vm-test`; runs inside the VM."
    );
    let _ = writeln!(s, "exec >>{} 2>&1", q(&out.join("guest.log")));
    let _ = writeln!(
        s,
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    // TMPDIR stays /tmp (an overlay on tmpfs): iperf3 cannot use an unlinked temporary
    // file on the 9p share. The agent's logs are copied out after each suite.
    let _ = writeln!(s, "export RUST_BACKTRACE=1");
    // The host's own agent logs show through the /tmp overlay: not this run's.
    let _ = writeln!(s, "rm -f /tmp/wirescope-*.log");
    for (k, v) in env {
        let _ = writeln!(s, "export {k}={}", shell_quote(v));
    }
    let _ = writeln!(
        s,
        r#"echo "{MARK} booted $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
fact() {{ echo "{MARK} fact $1 $2"; }}
yesno() {{ if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }}
modprobe tun 2>/dev/null
fact kernel_wireguard "$(yesno modprobe wireguard)"
fact netem "$(yesno modprobe sch_netem)"
[ -e /sys/kernel/tracing/kprobe_events ] || mount -t tracefs nodev /sys/kernel/tracing
fact kprobe_events "$(yesno test -e /sys/kernel/tracing/kprobe_events)"
fact btf "$(yesno test -e /sys/kernel/btf/vmlinux)"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
fact tun "$(yesno test -e /dev/net/tun)"
ulimit -l unlimited 2>/dev/null
stamp() {{
  while IFS= read -r l || [ -n "$l" ]; do
    printf '%s\n' "$l"
    case "$l" in
      "test "*" ... "*|ok|FAILED|ignored|"ignored, "*)
        read -r up _ </proc/uptime; echo "{MARK} t $up";;
    esac
  done
}}"#
    );
    for suite in suites {
        let label = &suite.label;
        let args: String = suite
            .args
            .iter()
            .map(|a| format!(" {}", shell_quote(a)))
            .collect();
        // Every line of the binary passes through `stamp`, which adds a `t` marker with the
        // uptime after each line that ends a test (libtest prints `test NAME ... ` as the
        // test starts and its result as it ends), for the per-test times of the summary.
        // Through a FIFO rather than a pipeline, so that a process a test left running with
        // the output inherited cannot hold the script: `stamp` gets 5 s to drain, then goes.
        let _ = writeln!(
            s,
            r#"echo "{MARK} suite-start {label} $(cut -d' ' -f1 /proc/uptime)"
rm -f /tmp/wirescope-vm-fifo && mkfifo /tmp/wirescope-vm-fifo
stamp </tmp/wirescope-vm-fifo &
spid=$!
(cd {cwd} && exec {exe} --test-threads=1{args}) >/tmp/wirescope-vm-fifo 2>&1
rc=$?
i=0
while kill -0 $spid 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
kill $spid 2>/dev/null
cp -f /tmp/wirescope-*.log {tmp}/ 2>/dev/null
echo "{MARK} suite-end {label} $rc $(cut -d' ' -f1 /proc/uptime)""#,
            cwd = q(&suite.cwd),
            exe = q(&suite.exe),
            tmp = q(&out.join("tmp")),
        );
    }
    let _ = writeln!(s, "echo \"{MARK} done\"\nexit 0");
    s
}

/// Boots `kernel`, runs the suites in it and returns what happened. Errs only when the VM
/// could not be started at all.
pub fn run_vm(
    tools: &Tools,
    kernel: &Kernel,
    build: &Build,
    timeout: Duration,
) -> Result<VmReport> {
    let root = crate::build::repo_root();
    let suites = &build.suites;
    let out = super::target_dir().join("vm").join(kernel.series);
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("tmp"))
        .with_context(|| format!("creating {}", out.display()))?;
    // CI=true inside whatever the host has: a suite that skips in the VM proves nothing.
    let mut env = vec![
        ("CI", "true".to_owned()),
        (AGENT_BIN_ENV, build.agent.display().to_string()),
    ];
    if let Ok(v) = std::env::var(WG_IMPL_ENV) {
        env.push((WG_IMPL_ENV, v));
    }
    let script = out.join("run.sh");
    std::fs::write(&script, guest_script(&out, suites, &env))
        .with_context(|| format!("writing {}", script.display()))?;
    let guest_log = out.join("guest.log");
    std::fs::write(&guest_log, "").with_context(|| format!("creating {}", guest_log.display()))?;
    let console = std::fs::File::create(out.join("console.log"))
        .with_context(|| format!("creating {}/console.log", out.display()))?;

    let mut c = Command::new(tools.vng());
    c.arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--disable-kvm", "--cpus", &VM_CPUS.to_string()])
        .args(["--memory", VM_MEMORY])
        .arg("--rwdir")
        .arg(&out)
        .arg("--exec")
        .arg(format!("sh {}", shell_quote(&script.display().to_string())))
        .current_dir(&root)
        .env("PATH", path_with(&tools.bin))
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .process_group(0);
    println!(
        "==> vm {} ({}): booting with {} CPUs, {VM_MEMORY}, software emulation",
        kernel.series, kernel.release, VM_CPUS
    );
    let start = Instant::now();
    let mut child = c
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::describe(&c)))?;
    let mut tail = Tail::new(&guest_log);
    let mut boot = None;
    let mut error = None;
    loop {
        let exited = child.try_wait().context("waiting for vng")?;
        for line in tail.read_lines() {
            if boot.is_none() && line.starts_with(&format!("{MARK} booted")) {
                boot = Some(start.elapsed());
                println!(
                    "vm {}: booted in {:.1} s",
                    kernel.series,
                    start.elapsed().as_secs_f64()
                );
            }
            if !line.starts_with(MARK) {
                println!("{line}");
            }
        }
        if let Some(status) = exited {
            for line in tail.finish() {
                if !line.starts_with(MARK) {
                    println!("{line}");
                }
            }
            if !status.success() {
                error = Some(format!("vng exited with {status}"));
            }
            break;
        }
        if start.elapsed() > timeout {
            // vng runs QEMU in its own process group (process_group(0) above).
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            error = Some(format!("timed out after {} s", timeout.as_secs()));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let total = start.elapsed();
    let text = std::fs::read_to_string(&guest_log).unwrap_or_default();
    let guest = parse_guest_log(&text);
    // Per-test wall times, one `suite<TAB>test<TAB>seconds` line each, for comparing runs.
    let times: String = guest
        .suites
        .iter()
        .flat_map(|s| {
            s.tests
                .iter()
                .map(move |(t, secs)| format!("{}\t{t}\t{secs:.2}\n", s.label))
        })
        .collect();
    let _ = std::fs::write(out.join("times.tsv"), times);
    if error.is_none() && !guest.done {
        error = Some(if boot.is_none() {
            format!(
                "the guest never started the script; console:\n{}",
                console_tail(&out)
            )
        } else {
            format!("the guest stopped early; console:\n{}", console_tail(&out))
        });
    }
    Ok(VmReport {
        series: kernel.series,
        release: guest
            .release
            .clone()
            .unwrap_or_else(|| kernel.release.clone()),
        boot,
        total,
        guest,
        error,
        out_dir: out,
        expected_suites: suites.iter().map(|s| s.label.clone()).collect(),
    })
}

fn console_tail(out: &Path) -> String {
    let text = std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Reads the lines appended to a file since the last call.
pub(super) struct Tail {
    path: PathBuf,
    pos: u64,
    partial: String,
}

impl Tail {
    pub(super) fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            pos: 0,
            partial: String::new(),
        }
    }

    fn read_new(&mut self) -> String {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return String::new();
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return String::new();
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return String::new();
        }
        self.pos += buf.len() as u64;
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Complete new lines.
    pub(super) fn read_lines(&mut self) -> Vec<String> {
        let new = self.read_new();
        self.partial.push_str(&new);
        let Some(end) = self.partial.rfind('\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        done.lines().map(str::to_owned).collect()
    }

    /// Everything left, the last line even without its newline.
    pub(super) fn finish(&mut self) -> Vec<String> {
        let mut lines = self.read_lines();
        if !self.partial.is_empty() {
            lines.push(std::mem::take(&mut self.partial));
        }
        lines
    }
}
