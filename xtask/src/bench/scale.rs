//! Scale and rest: a wireguard-go interface carrying 1,000 and 10,000 peers, scraped by the
//! agent and by prometheus_wireguard_exporter on the same interface, alternately; the
//! agent's memory, its BPF maps' memory and how long it takes to sync the peers into the
//! maps; and what the agent costs when nothing happens.
//!
//! The setup is the single lab (prefix `bs`, wireguard-go forced, as on the hosts the issue
//! is about): the relay's interface `bsr0` gets random peers added to the lab's real client
//! peer, which handshakes and keeps pinging through the tunnel, so one peer's counters move
//! while the others sit still. The random peers have distinct /32s in 172.16.0.0/12 and
//! every 25th an endpoint on the relay's veth subnet (so the agent looks up routes for a
//! few hundred endpoints and hooks the underlay, as on a real relay).
//!
//! Peer sync: the agent logs `peers synced: N peers ... in X ms` when the number of peers
//! changes (so for the first round, which writes every peer into the maps) and exports the
//! last round's duration as `wirescope_peer_sync_duration_seconds` (steady state: nothing
//! to write, everything re-read). Rounds run every `wirescope_peer_sync_interval_seconds`
//! (2 s at 10,000 peers), and one that finds no key, endpoint or allowed IP changed writes
//! and compares no peer maps.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Ctx, Figure, Goal, median, quantile};
use crate::agent::Agent;
use crate::lab::{GATEWAY_V4, Lab, LabConfig, Topology, WgImpl};
use crate::{cmd, netns, procs, setup};

const PREFIX: &str = "bs";
/// The exporter listens beside the agent (127.0.0.1:9586) in the relay's namespace.
const EXPORTER_LISTEN: &str = "127.0.0.1:9587";
const PEER_COUNTS: [usize; 2] = [1_000, 10_000];
/// Every this many random peers has an endpoint.
const ENDPOINT_EVERY: usize = 25;

pub const SECTION_SCRAPE: &str = "scale: scrape latency (GET /metrics, body read)";
pub const SECTION_MEMORY: &str = "scale: memory";
pub const SECTION_SYNC: &str = "scale: peer sync";
pub const SECTION_REST: &str = "at rest";

/// The goals at 10,000 peers and at rest (issue 7).
const GOAL_PEERS: usize = 10_000;
const GOAL_SCRAPE_MS: f64 = 50.0;
const GOAL_SPEEDUP: f64 = 5.0;
const GOAL_RSS_MB: f64 = 40.0;
const GOAL_SYNC_S: f64 = 1.0;
/// 0.5 % of one core.
const GOAL_IDLE_CPU_S_PER_MIN: f64 = 0.3;

struct Plan {
    quick: bool,
    /// Scrapes of the agent at each count.
    scrapes: usize,
    /// The agent at rest in the idle lab.
    idle: Duration,
    /// The agent at rest with 10,000 peers.
    idle_at_scale: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                scrapes: 10,
                idle: Duration::from_secs(10),
                idle_at_scale: Duration::from_secs(5),
            }
        } else {
            Plan {
                quick,
                scrapes: 50,
                idle: Duration::from_secs(60),
                idle_at_scale: Duration::from_secs(60),
            }
        }
    }

    /// Scrapes of the exporter at `n` peers: as many as the agent's, except in quick mode
    /// at 10,000 peers, where one takes the exporter about 10 s.
    fn exporter_scrapes(&self, n: usize) -> usize {
        if self.quick && n >= 10_000 {
            2
        } else {
            self.scrapes
        }
    }
}

pub fn run(ctx: &Ctx) -> Result<Vec<Figure>> {
    let exporter = setup::wireguard_exporter().ok_or_else(|| {
        anyhow!(
            "{} {} is not installed: run `cargo xtask setup`",
            setup::EXPORTER_BIN,
            setup::EXPORTER_VERSION
        )
    })?;
    let plan = Plan::new(ctx.quick);
    let mut cfg = LabConfig::new(Topology::Single, PREFIX);
    // The issue is about wireguard-go's UAPI: its whole state is re-read on every sync and
    // every exporter scrape.
    cfg.wireguard = WgImpl::Userspace;
    let lab = Lab::up(cfg)?;
    let conf = ctx.work.join("scale-peers.conf");
    let result = measure(ctx, &lab, &plan, &exporter, &conf);
    let _ = std::fs::remove_file(&conf);
    let teardown = lab.teardown();
    let figures = result?;
    teardown.context("tearing down the bench lab")?;
    Ok(figures)
}

fn measure(ctx: &Ctx, lab: &Lab, plan: &Plan, exporter: &Path, conf: &Path) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    lab.handshake(Duration::from_secs(15))?;
    figures.push(idle_lab(ctx, lab, plan)?);

    let relay = lab.exit();
    let (ns, iface) = (relay.netns.clone(), relay.wg().iface.clone());
    // Some traffic the whole time: the client's real peer keeps its session and counters
    // moving (5 pings a second through the tunnel).
    let mut traffic = Guard::new(
        netns::command(&lab.client().netns, "ping")
            .args(["-q", "-i", "0.2", &GATEWAY_V4.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ping through the tunnel")?,
    );
    let mut peers = 1; // the lab's client
    for n in PEER_COUNTS {
        let t = Instant::now();
        add_peers(&ns, &iface, peers - 1, n - 1, conf)?;
        peers = n;
        let dumped = wg_peer_count(&ns, &iface)?;
        if dumped != n {
            bail!("{iface} has {dumped} peers after adding, expected {n}");
        }
        println!(
            "bench scale: {n} peers on {iface} ({:.1} s to add)",
            t.elapsed().as_secs_f64()
        );
        let last = n == *PEER_COUNTS.last().unwrap_or(&n);
        figures.extend(at_scale(
            ctx,
            plan,
            &ns,
            &iface,
            n,
            exporter,
            last.then_some(&mut traffic),
        )?);
    }
    Ok(figures)
}

/// The agent on the lab's client, tunnel up and nothing sent: CPU per minute.
fn idle_lab(ctx: &Ctx, lab: &Lab, plan: &Plan) -> Result<Figure> {
    let c = lab.client();
    let log = ctx.work.join("scale-idle-agent.log");
    let agent = Agent::start(&ctx.agent_bin, &c.netns, &["--tunnel", &c.wg().iface], &log)?;
    let pid = agent_pid(&c.netns, &ctx.agent_bin)?;
    // Start-up work (loading, the first rounds, trimming) is not rest.
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_per_minute(pid, plan.idle)?;
    agent.stop()?;
    Ok(Figure::new(
        SECTION_REST,
        "agent CPU, idle single lab (1 peer, tunnel up, no traffic)",
        cpu,
        "CPU s/min",
    )
    .goal(Goal::AtMost(GOAL_IDLE_CPU_S_PER_MIN))
    .note(format!(
        "utime+stime of the agent over {:.0} s (/proc/PID/stat); 0.3 CPU s/min = 0.5 % of one core",
        plan.idle.as_secs_f64()
    )))
}

/// Everything at `n` peers. `traffic`: stop it for an idle window at the end (the last
/// count only).
fn at_scale(
    ctx: &Ctx,
    plan: &Plan,
    ns: &str,
    iface: &str,
    n: usize,
    exporter: &Path,
    traffic: Option<&mut Guard>,
) -> Result<Vec<Figure>> {
    let goals = n == GOAL_PEERS;
    let with = |f: Figure, g: Goal| if goals { f.goal(g) } else { f };
    let mut figures = Vec::new();
    let log = ctx.work.join(format!("scale-agent-{n}.log"));
    let started = Instant::now();
    let agent = Agent::start(&ctx.agent_bin, ns, &["--tunnel", iface], &log)?;
    let healthy = started.elapsed();
    let pid = agent_pid(ns, &ctx.agent_bin)?;
    let first_sync = first_sync_ms(&agent.log_text(), n).with_context(|| {
        format!(
            "no `peers synced: {n} peers` line in the agent's log {}",
            log.display()
        )
    })?;

    let elog = ctx.work.join(format!("scale-exporter-{n}.log"));
    let theirs = Exporter::start(exporter, ns, iface, &elog)?;
    let ours_addr: SocketAddr = crate::agent::LISTEN.parse()?;
    let theirs_addr: SocketAddr = EXPORTER_LISTEN.parse()?;
    let counts = (plan.scrapes, plan.exporter_scrapes(n));
    let warm_up = !plan.quick;
    let s = netns::run_in(ns, move || {
        scrape_alternately(ours_addr, theirs_addr, counts, warm_up, n)
    })??;

    let (mut ours_ms, mut theirs_ms, mut resync) = (s.ours_ms, s.theirs_ms, s.sync_s);
    let (o50, o99) = (median(&mut ours_ms), quantile(&mut ours_ms, 0.99));
    let (t50, t99) = (median(&mut theirs_ms), quantile(&mut theirs_ms, 0.99));
    let how = format!(
        "{} / {} scrapes, alternating, text format, {} / {} bytes",
        counts.0, counts.1, s.ours_bytes, s.theirs_bytes
    );
    let sec = SECTION_SCRAPE;
    figures.push(with(
        Figure::new(sec, format!("wirescope median, {n} peers"), o50, "ms").note(how.clone()),
        Goal::AtMost(GOAL_SCRAPE_MS),
    ));
    figures.push(Figure::new(
        sec,
        format!("wirescope p99, {n} peers"),
        o99,
        "ms",
    ));
    figures.push(
        Figure::new(
            sec,
            format!("prometheus_wireguard_exporter median, {n} peers"),
            t50,
            "ms",
        )
        .note(how),
    );
    figures.push(Figure::new(
        sec,
        format!("prometheus_wireguard_exporter p99, {n} peers"),
        t99,
        "ms",
    ));
    figures.push(with(
        Figure::new(
            sec,
            format!("exporter median / wirescope median, {n} peers"),
            t50 / o50,
            "x",
        )
        .note("how many times faster the agent answers"),
        Goal::AtLeast(GOAL_SPEEDUP),
    ));

    let (rss, hwm) = rss_mb(pid)?;
    let (erss, _) = rss_mb(theirs.pid())?;
    let (maps_mb, maps) = bpf_map_memory(pid)?;
    let sec = SECTION_MEMORY;
    figures.push(with(
        Figure::new(
            sec,
            format!("wirescope resident memory, {n} peers"),
            rss,
            "MB",
        )
        .note(format!("VmRSS after the scrapes (peak VmHWM {hwm:.1} MB)")),
        Goal::AtMost(GOAL_RSS_MB),
    ));
    figures.push(
        Figure::new(
            sec,
            format!("prometheus_wireguard_exporter resident memory, {n} peers"),
            erss,
            "MB",
        )
        .note("VmRSS after the scrapes"),
    );
    figures.push(
        Figure::new(
            sec,
            format!("wirescope BPF map memory, {n} peers"),
            maps_mb,
            "MB",
        )
        .note(format!(
            "memlock of its {maps} maps (/proc/PID/fdinfo), kernel memory outside RSS"
        )),
    );

    let sec = SECTION_SYNC;
    figures.push(with(
        Figure::new(sec, format!("first sync, {n} peers"), first_sync / 1e3, "s").note(format!(
            "read all peers over UAPI and insert them into the maps (agent log); healthy {:.1} s after start",
            healthy.as_secs_f64()
        )),
        Goal::AtMost(GOAL_SYNC_S),
    ));
    figures.push(
        Figure::new(sec, format!("steady-state resync, {n} peers"), median(&mut resync), "s")
            .note("median of wirescope_peer_sync_duration_seconds over the scrapes (every sync period: re-read, no peer map rebuilt or written)"),
    );

    drop(theirs);
    if let Some(traffic) = traffic {
        traffic.stop();
        let cpu = cpu_per_minute(pid, plan.idle_at_scale)?;
        figures.push(
            Figure::new(
                SECTION_REST,
                format!("agent CPU, {n} idle peers"),
                cpu,
                "CPU s/min",
            )
            .note(format!(
                "no traffic, no scrapes, over {:.0} s: every sync period (2 s from 10,000 peers) the agent re-reads every peer, and leaves the unchanged peer maps alone",
                plan.idle_at_scale.as_secs_f64()
            )),
        );
    }
    agent.stop()?;
    Ok(figures)
}

/// Adds random peers `from..to` (0-based among the random ones) to `iface` with one
/// `wg addconf`.
fn add_peers(ns: &str, iface: &str, from: usize, to: usize, conf: &Path) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    let mut random = vec![0u8; 32 * (to - from)];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("reading /dev/urandom")?;
    let mut text = String::with_capacity(120 * (to - from));
    for (i, key) in (from..to).zip(random.chunks_exact(32)) {
        text += &peer_section(i, key);
    }
    std::fs::write(conf, text).with_context(|| format!("writing {}", conf.display()))?;
    let path = conf.display().to_string();
    netns::exec(ns, &["wg", "addconf", iface, &path])
        .with_context(|| format!("adding {} peers to {iface}", to - from))?;
    Ok(())
}

/// The `[Peer]` section of random peer `i`: `key` as its public key, 172.16.0.0/12 + i as
/// its /32, and for every [`ENDPOINT_EVERY`]th an endpoint on the relay's veth subnet.
fn peer_section(i: usize, key: &[u8]) -> String {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i as u32);
    let mut s = format!(
        "[Peer]\nPublicKey = {}\nAllowedIPs = {ip}/32\n",
        base64(key)
    );
    if i.is_multiple_of(ENDPOINT_EVERY) {
        let k = i / ENDPOINT_EVERY;
        s += &format!("Endpoint = 198.51.100.{}:{}\n", 10 + k % 240, 20_000 + k);
    }
    s
}

/// Standard base64 with padding, as `wg` writes keys.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (j, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if j <= c.len() {
                out.push(A[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn wg_peer_count(ns: &str, iface: &str) -> Result<usize> {
    let out = netns::exec(ns, &["wg", "show", iface, "peers"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count())
}

/// The agent's pid: `ip netns exec` execs it, so it is the process in `ns` running `bin`.
pub(super) fn agent_pid(ns: &str, bin: &Path) -> Result<u32> {
    let want = bin.display().to_string();
    procs::netns_pids(ns)?
        .into_iter()
        .find(|&pid| procs::argv(pid).is_some_and(|a| a.first() == Some(&want)))
        .ok_or_else(|| anyhow!("no process running {want} in {ns}"))
}

/// The ms of the first `peers synced: N peers ... in X ms` line of the agent's log.
fn first_sync_ms(log: &str, n: usize) -> Option<f64> {
    let tag = format!("peers synced: {n} peers");
    let line = log.lines().find(|l| l.contains(&tag))?;
    let rest = line.split(" in ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// utime + stime of `pid` in clock ticks (/proc/PID/stat, fields 14 and 15), dead threads
/// included.
pub(super) fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The fields after the parenthesised name, which may contain spaces: state is the 3rd
    // field, so utime (14th) is the 12th after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: {stat:?}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{path}: field {i} in {stat:?}"))
    };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub(super) fn clock_ticks() -> Result<f64> {
    cmd::stdout("getconf", ["CLK_TCK"])?
        .parse()
        .context("getconf CLK_TCK")
}

/// CPU seconds per minute `pid` uses over `window`.
fn cpu_per_minute(pid: u32, window: Duration) -> Result<f64> {
    let hz = clock_ticks()?;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), cpu_ticks(pid)?);
    let secs = (c1 - c0) as f64 / hz;
    Ok(secs * 60.0 / (t1 - t0).as_secs_f64())
}

/// (VmRSS, VmHWM) of `pid` in MB.
pub(super) fn rss_mb(pid: u32) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb = |key: &str| -> Result<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no {key} in {path}"))
    };
    Ok((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
}

/// The memory the kernel charges for the BPF maps `pid` holds (the `memlock` of each map's
/// fdinfo, each map once): (MB, number of maps).
fn bpf_map_memory(pid: u32) -> Result<(f64, usize)> {
    let dir = format!("/proc/{pid}/fd");
    let mut seen = std::collections::HashMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry.with_context(|| format!("listing {dir}"))?;
        let is_map =
            std::fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info_path = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        // A fd closed meanwhile is simply not counted.
        let Ok(info) = std::fs::read_to_string(&info_path) else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    Ok((seen.values().sum::<u64>() as f64 / 1e6, seen.len()))
}

/// What the alternating scrapes measured.
struct Scrapes {
    ours_ms: Vec<f64>,
    theirs_ms: Vec<f64>,
    /// `wirescope_peer_sync_duration_seconds` as each of our scrapes read it.
    sync_s: Vec<f64>,
    ours_bytes: usize,
    theirs_bytes: usize,
}

/// `counts.0` scrapes of the agent and `counts.1` of the exporter, alternating which goes
/// first while both have some left; with `warm_up`, after one unmeasured scrape of each.
/// The first scrape of each checks that it lists all `n` peers. Run inside the namespace.
fn scrape_alternately(
    ours: SocketAddr,
    theirs: SocketAddr,
    counts: (usize, usize),
    warm_up: bool,
    n: usize,
) -> Result<Scrapes> {
    let mut s = Scrapes {
        ours_ms: Vec::new(),
        theirs_ms: Vec::new(),
        sync_s: Vec::new(),
        ours_bytes: 0,
        theirs_bytes: 0,
    };
    let mut buf = Vec::with_capacity(8 << 20);
    let check = |buf: &[u8], is_ours: bool| -> Result<()> {
        let series = String::from_utf8_lossy(buf)
            .matches("\nwireguard_sent_bytes_total{")
            .count();
        if series != n {
            let who = if is_ours {
                "wirescope"
            } else {
                "prometheus_wireguard_exporter"
            };
            bail!("{who} lists {series} peers in wireguard_sent_bytes_total, expected {n}");
        }
        Ok(())
    };
    if warm_up {
        for is_ours in [true, false] {
            timed_get(if is_ours { ours } else { theirs }, &mut buf)?;
            check(&buf, is_ours)?;
        }
    }
    for i in 0..counts.0.max(counts.1) {
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_ours in order {
            if i >= if is_ours { counts.0 } else { counts.1 } {
                continue;
            }
            let addr = if is_ours { ours } else { theirs };
            let took = timed_get(addr, &mut buf)?;
            if i == 0 && !warm_up {
                check(&buf, is_ours)?;
            }
            let ms = took.as_secs_f64() * 1e3;
            if is_ours {
                s.ours_ms.push(ms);
                s.ours_bytes = buf.len();
                if let Some(v) = gauge(&buf, "wirescope_peer_sync_duration_seconds") {
                    s.sync_s.push(v);
                }
            } else {
                s.theirs_ms.push(ms);
                s.theirs_bytes = buf.len();
            }
        }
    }
    Ok(s)
}

/// `GET /metrics` over HTTP/1.0 (the server closes after the body): the time from connect
/// to the last byte; the whole response is left in `buf`. Fails unless the status is 200.
pub(super) fn timed_get(addr: SocketAddr, buf: &mut Vec<u8>) -> Result<Duration> {
    timed_get_as(addr, buf, false)
}

/// [`timed_get`], asking for a gzip body (as Prometheus does) when `gzip`.
pub(super) fn timed_get_as(addr: SocketAddr, buf: &mut Vec<u8>, gzip: bool) -> Result<Duration> {
    buf.clear();
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let encoding = if gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n{encoding}\r\n")?;
    s.read_to_end(buf)
        .with_context(|| format!("reading /metrics from {addr}"))?;
    let took = t.elapsed();
    let head = buf
        .get(..12)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    if !head.starts_with("HTTP/1.") || !head.ends_with(" 200") {
        bail!("GET /metrics on {addr} answered {head:?}");
    }
    Ok(took)
}

/// The value of the unlabelled sample `name` in a text-format body.
fn gauge(body: &[u8], name: &str) -> Option<f64> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?;
    line[name.len()..].trim().parse().ok()
}

/// A child process killed (and reaped) when dropped.
struct Guard(Option<Child>);

impl Guard {
    fn new(c: Child) -> Guard {
        Guard(Some(c))
    }
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// prometheus_wireguard_exporter on [`EXPORTER_LISTEN`] in `ns`, once it listens, reading
/// only `iface` (the
/// control sockets of every namespace's wireguard-go share one directory, so `wg show all`
/// would list other labs' interfaces too).
struct Exporter(Guard);

impl Exporter {
    fn start(bin: &Path, ns: &str, iface: &str, log: &PathBuf) -> Result<Exporter> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let listen: SocketAddr = EXPORTER_LISTEN.parse()?;
        let child = netns::command(ns, &bin.display().to_string())
            .args([
                "-l",
                &listen.ip().to_string(),
                "-p",
                &listen.port().to_string(),
                "-i",
                iface,
            ])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {} in {ns}", bin.display()))?;
        let mut e = Exporter(Guard::new(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Listening is enough: at 10,000 peers one scrape takes it about 10 s, and the
            // first measured scrape checks what it answers.
            let ok = netns::run_in(ns, move || {
                TcpStream::connect_timeout(&listen, Duration::from_secs(1))
            })?;
            match ok {
                Ok(_) => return Ok(e),
                _ if Instant::now() > deadline => {
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    e.0.stop();
                    bail!(
                        "{} did not answer on {listen} within 20 s ({ok:?}); its log:\n{text}",
                        bin.display()
                    );
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    fn pid(&self) -> u32 {
        self.0.pid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_wg() {
        assert_eq!(
            base64(&[0u8; 32]),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        );
        assert_eq!(base64(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw==");
        assert_eq!(base64(b"any carnal pleasu"), "YW55IGNhcm5hbCBwbGVhc3U=");
        assert_eq!(base64(b"any carnal pleasur"), "YW55IGNhcm5hbCBwbGVhc3Vy");
    }

    #[test]
    fn peers_are_distinct_and_some_have_endpoints() {
        let a = peer_section(0, &[1; 32]);
        assert!(a.contains("AllowedIPs = 172.16.0.0/32\n"), "{a}");
        assert!(a.contains("Endpoint = 198.51.100.10:20000\n"), "{a}");
        let b = peer_section(9_999, &[2; 32]);
        assert!(b.contains("AllowedIPs = 172.16.39.15/32\n"), "{b}");
        assert!(!b.contains("Endpoint"), "{b}");
    }

    #[test]
    fn reads_the_agent_log_and_gauges() {
        let log = "[2026 INFO] peers synced: 1 peers on 1 tunnel(s) in 2.0 ms (x)\n\
                   [2026 INFO] peers synced: 1000 peers on 1 tunnel(s) in 41.5 ms (control interfaces 9.1 ms, BPF maps 30.2 ms)\n";
        assert_eq!(first_sync_ms(log, 1000), Some(41.5));
        assert_eq!(first_sync_ms(log, 10), None);
        let body = b"# HELP x\nwirescope_peer_sync_duration_seconds_x 9\nwirescope_peer_sync_duration_seconds 0.012\n";
        assert_eq!(
            gauge(body, "wirescope_peer_sync_duration_seconds"),
            Some(0.012)
        );
    }
}
