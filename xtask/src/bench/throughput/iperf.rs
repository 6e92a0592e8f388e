//! One iperf3 run: a one-shot server in the relay namespace, the client in the client
//! namespace with the case's load, the sample read from iperf3's JSON (received Mbit/s for
//! TCP, received packets per second for UDP) with the CPU-seconds the flow's processes got.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Case, Env, Load, PORT, Proto, Sample, UDP_PAYLOAD};
use crate::procs::ChildGuard;
use crate::{netns, procs};

/// One iperf3 run of `seconds` against a fresh one-shot server; both processes are gone when
/// this returns, also on error.
pub(super) fn iperf(env: &Env, case: Case, load: Load, seconds: u32, tag: &str) -> Result<Sample> {
    iperf_way(env, case, load, seconds, tag, false)
}

/// [`iperf`], with the load flowing back to the client when `reverse` (iperf3 `-R`): the
/// client's ingress programs then see the load.
pub(super) fn iperf_way(
    env: &Env,
    case: Case,
    load: Load,
    seconds: u32,
    tag: &str,
    reverse: bool,
) -> Result<Sample> {
    let dst = env.dst(case);
    let port = PORT.to_string();
    let base = env.dir.join(format!("{}-{tag}", case.slug()));
    let server_log = base.with_extension("server.log");
    let out = crate::cmd::new_file(&server_log)?;
    let mut server_cmd = netns::command(&env.relay_ns, "iperf3");
    server_cmd.args(["-s", "-1", "-B", &dst, "-p", &port]);
    if case.pinned() {
        server_cmd.args(["-A", "0"]);
    }
    let mut server = ChildGuard(
        server_cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the iperf3 server (is iperf3 installed? `cargo xtask setup`)")?,
    );
    wait_listening(
        &env.relay_ns,
        &format!("{dst}:{port}"),
        &mut server.0,
        &server_log,
    )?;

    let json_path = base.with_extension("json");
    let secs = seconds.to_string();
    let mut client_cmd = netns::command(&env.client_ns, "iperf3");
    client_cmd.args([
        "-c",
        &dst,
        "-p",
        &port,
        "-t",
        &secs,
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    let (len, buf) = (UDP_PAYLOAD.to_string(), env.udp_buffer.to_string());
    let rate = load.rate_bps.unwrap_or(0).to_string();
    if case.proto == Proto::Udp {
        client_cmd.args(["-u", "-l", &len, "-b", &rate, "-w", &buf]);
    }
    if case.pinned() {
        client_cmd.args(["-A", "0"]);
    }
    if reverse {
        client_cmd.arg("-R");
    }
    let lab_cpu = LabCpu::snapshot(&[&env.client_ns, &env.relay_ns])?;
    let started = Instant::now();
    let mut client = ChildGuard(
        client_cmd
            .stdin(Stdio::null())
            .stdout(crate::cmd::new_file(&json_path)?)
            .stderr(crate::cmd::new_file(&base.with_extension("client.err"))?)
            .spawn()
            .context("starting the iperf3 client")?,
    );
    // iperf3 itself stops after -t; this bounds a hung one (connect, or a lost end message).
    let limit = Duration::from_secs(u64::from(seconds) + 15);
    let status = wait_exit(&mut client.0, limit)
        .with_context(|| format!("the iperf3 client ({})", env.client_ns))?;
    let lab_cpu_pct = 100.0 * lab_cpu.seconds_since() / started.elapsed().as_secs_f64();
    // The one-shot server exits after its client; give it a moment, then the guard kills it.
    let _ = wait_exit(&mut server.0, Duration::from_secs(3));
    let json = std::fs::read_to_string(&json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("iperf3 printed no JSON ({})", json_path.display()))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 to {dst} failed: {err}");
    }
    if !status.success() {
        bail!("iperf3 exited with {status}; see {}", json_path.display());
    }
    let mut sample =
        parse_sample(&v, case.proto).with_context(|| format!("reading {}", json_path.display()))?;
    sample.cpu_pct += lab_cpu_pct;
    Ok(sample)
}

/// CPU time of the processes in some namespaces (wireguard-go, the agent), iperf3 left out
/// (it reports its own): a snapshot, and the CPU-seconds the same processes used since.
struct LabCpu {
    ticks: Vec<(u32, u64)>,
}

impl LabCpu {
    fn snapshot(namespaces: &[&str]) -> Result<LabCpu> {
        let mut ticks = Vec::new();
        for ns in namespaces {
            for pid in procs::netns_pids(ns)? {
                let iperf = procs::argv(pid)
                    .is_some_and(|a| a.first().is_some_and(|p| p.ends_with("iperf3")));
                if let (false, Some(t)) = (iperf, cpu_ticks(pid)) {
                    ticks.push((pid, t));
                }
            }
        }
        Ok(LabCpu { ticks })
    }

    /// CPU-seconds used since the snapshot by the processes it saw (one that exited in
    /// between counts nothing).
    fn seconds_since(&self) -> f64 {
        let used: u64 = self
            .ticks
            .iter()
            .filter_map(|(pid, t0)| cpu_ticks(*pid).map(|t| t.saturating_sub(*t0)))
            .sum();
        used as f64 / USER_HZ
    }
}

/// Clock ticks per second in /proc/PID/stat: USER_HZ, which the kernel exports as 100 on
/// every architecture Linux runs this agent on (whatever its internal HZ).
const USER_HZ: f64 = 100.0;

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15); None when it
/// is gone.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name (which may contain spaces), from the
    // state (field 3) on.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The figures of one run out of iperf3's JSON (`end.sum_received`, `end.sum_sent`).
pub(super) fn parse_sample(v: &serde_json::Value, proto: Proto) -> Result<Sample> {
    let num = |x: &serde_json::Value, k: &str| {
        x[k].as_f64()
            .ok_or_else(|| anyhow!("iperf3 JSON has no number {k}"))
    };
    let rx = &v["end"]["sum_received"];
    let tx = &v["end"]["sum_sent"];
    let cpu = &v["end"]["cpu_utilization_percent"];
    let cpu_pct = match (cpu["host_total"].as_f64(), cpu["remote_total"].as_f64()) {
        (Some(h), Some(r)) => h + r,
        _ => f64::NAN,
    };
    match proto {
        Proto::Tcp => Ok(Sample {
            value: num(rx, "bits_per_second")? / 1e6,
            sent_pps: f64::NAN,
            loss_pct: f64::NAN,
            cpu_pct,
        }),
        Proto::Udp => {
            let secs = num(rx, "seconds")?;
            let sent_secs = num(tx, "seconds")?;
            if secs <= 0.0 || sent_secs <= 0.0 {
                bail!("iperf3 ran for no time");
            }
            let got = num(rx, "packets")? - num(rx, "lost_packets")?;
            let sent = num(tx, "packets")?;
            Ok(Sample {
                value: got / secs,
                sent_pps: sent / sent_secs,
                loss_pct: if sent > 0.0 {
                    100.0 * (1.0 - got / sent).max(0.0)
                } else {
                    0.0
                },
                cpu_pct,
            })
        }
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something listens on TCP `addr` in `ns`, failing early if `server` exits.
fn wait_listening(ns: &str, addr: &str, server: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.try_wait()? {
            bail!(
                "the iperf3 server exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        let out = netns::exec(ns, &["ss", "-Hltn"])?;
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some(addr))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the iperf3 server does not listen on {addr} in {ns} after 5 s");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}
