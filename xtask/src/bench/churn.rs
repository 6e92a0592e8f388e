//! Churn: a wireguard-go relay with 10,000 peers of which 2,000 send traffic at once and
//! 500 are replaced every minute for 10 minutes (`--quick`: 1,000, 200, 50 every 10 s for a
//! minute), with the agent on the relay. What it holds the agent to:
//!
//! - exact counts: for a sample of active peers (some there from the start and never
//!   replaced, some replaced in by the first round), the agent's tunnel packets and bytes
//!   in both directions equal what the load generator sent and got back, exactly;
//! - memory: the agent's peak RSS, and its RSS over the last minute before the storm;
//! - series: /metrics' series count before churn, during it and after a quiet period past
//!   the agent's grace for gone peers (the same number of peers, so the same count once
//!   the replaced peers' series are pruned);
//! - scrape latency during the churn;
//! - a scrape storm (see [`super::storm`]): `/healthz` latency while it lasts.
//!
//! The load is [`crate::wgload`]: one in-process WireGuard client per active peer in the
//! lab's client namespace, each its own key, socket and /32 in [`CLIENT_NET`], sending one
//! inner IPv4/UDP packet of [`INNER_LEN`] bytes every [`SEND_EVERY`] to a UDP echo on the
//! relay's in-tunnel address. The idle peers are keys nobody holds, with /32s in
//! 172.16.0.0/12. A replaced peer is removed and its replacement (a fresh key and /32)
//! added in one `wg set`; its client pauses first (so no echo of the old key is still on
//! its way) and handshakes with the new key [`SETTLE`] later (so the agent, which syncs
//! peers every second, already has the new peer's allowed IPs when its first packet
//! arrives).

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::scale::{agent_pid, clock_ticks, cpu_ticks, rss_mb, timed_get, timed_get_as};
use super::storm::{self, StormPlan};
use super::{Ctx, Figure, Goal, median, quantile};
use crate::agent::Agent;
use crate::lab::{GATEWAY_V4, Lab, LabConfig, Topology, WgImpl};
use crate::scrape::Metrics;
use crate::udp::UdpEcho;
use crate::wgload::{self, ClientSpec, Key, Load, LoadConfig};
use crate::{cmd, netns};

const PREFIX: &str = "bc";
/// The active peers' /32s come from here (the relay routes the /16 into its tunnel).
pub const CLIENT_NET: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
const CLIENT_ROUTE: &str = "10.200.0.0/16";
const IDLE_NET: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
/// The echo on the relay that every inner packet goes to.
const SINK_PORT: u16 = 7777;
/// L3 length of every inner packet.
pub const INNER_LEN: usize = 100;
/// Each active peer sends one packet this often: 2,000 distinct peers, not throughput.
const SEND_EVERY: Duration = Duration::from_secs(2);
/// Handshake initiations a second, at the start and after switches.
const HANDSHAKES_PER_SEC: u32 = 100;
/// A replaced peer's client is paused this long before its peer is removed.
const DRAIN: Duration = Duration::from_millis(500);
/// A replacement's first handshake comes this long after it was added.
const SETTLE: Duration = Duration::from_secs(3);
/// Sampled active peers: never replaced, and replaced in by the first round.
const SAMPLE_STABLE: usize = 10;
const SAMPLE_REPLACED: usize = 10;
/// The agent's option for how long a gone peer's series stay, passed only when its
/// `run --help` lists it.
const GRACE_FLAG: &str = "--peer-grace";
/// What the quiet period waits past the grace: a sync and a scrape, and the agent's two
/// looks for silent unknown endpoints (every 5 s), whose series go at most grace + 10 s
/// after their last message.
const GRACE_MARGIN: Duration = Duration::from_secs(20);
/// The goals (issue 15).
const GOAL_RSS_MB: f64 = 64.0;
const GOAL_SCRAPE_MEDIAN_MS: f64 = 100.0;
const GOAL_SCRAPE_P99_MS: f64 = 250.0;
const GOAL_HEALTHZ_MS: f64 = 100.0;

#[derive(Debug, Clone, Copy)]
struct Plan {
    peers: usize,
    active: usize,
    replaced: usize,
    every: Duration,
    rounds: usize,
    /// The agent's grace for gone peers, when it has the option.
    grace: Duration,
    scrape_every: Duration,
    /// From every client up to the series count before churn: long enough for every
    /// client to rekey once. A new peer's first handshake (and the keepalive after it)
    /// comes before the agent's next peer sync knows its endpoint, so it is counted under
    /// `endpoint:other`; the peer's own handshake series come with its first rekey (120 s
    /// on). Counted earlier, "before" lacks them and is no steady value to return to.
    warmup: Duration,
    storm: StormPlan,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                peers: 1_000,
                active: 200,
                replaced: 50,
                every: Duration::from_secs(10),
                rounds: 6,
                grace: Duration::from_secs(10),
                scrape_every: Duration::from_millis(500),
                // Too short a run to rekey: before and after both lack those series.
                warmup: Duration::ZERO,
                storm: StormPlan {
                    scrapes: 200,
                    stalled: 40,
                    min_duration: Duration::from_secs(3),
                },
            }
        } else {
            Plan {
                peers: 10_000,
                active: 2_000,
                replaced: 500,
                every: Duration::from_secs(60),
                rounds: 10,
                grace: Duration::from_secs(60),
                scrape_every: Duration::from_secs(1),
                warmup: Duration::from_secs(135),
                storm: StormPlan {
                    scrapes: 1_000,
                    stalled: 200,
                    min_duration: Duration::from_secs(10),
                },
            }
        }
    }

    fn section(&self) -> String {
        format!(
            "churn: {} active of {} peers, {} replaced every {} s",
            self.active,
            self.peers,
            self.replaced,
            self.every.as_secs()
        )
    }

    /// The sampled clients that are never replaced: spread over the slots.
    fn stable_sample(&self) -> Vec<usize> {
        (0..SAMPLE_STABLE)
            .map(|i| i * self.active / SAMPLE_STABLE)
            .collect()
    }
}

pub fn run(ctx: &Ctx) -> Result<Vec<Figure>> {
    let plan = Plan::new(ctx.quick);
    if plan.active + 1 > plan.peers || plan.replaced + SAMPLE_STABLE > plan.active {
        bail!("churn plan {plan:?} does not fit");
    }
    let mut cfg = LabConfig::new(Topology::Single, PREFIX);
    // As in the scale part: wireguard-go, whose UAPI the agent re-reads on every sync.
    cfg.wireguard = WgImpl::Userspace;
    let lab = Lab::up(cfg)?;
    let conf = ctx.work.join("churn-peers.conf");
    let result = measure(ctx, &lab, &plan, &conf);
    let _ = std::fs::remove_file(&conf);
    let teardown = lab.teardown();
    let figures = result?;
    teardown.context("tearing down the churn lab")?;
    Ok(figures)
}

/// The series of a text-format body: its sample lines.
pub fn count_series(body: &str) -> usize {
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// Series per metric family (the sample name with `_bucket`, `_sum`, `_count` and
/// `_total` kept: each is its own line in the body).
fn series_by_family(body: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name = l.split(['{', ' ']).next().unwrap_or(l);
        *out.entry(name.to_owned()).or_insert(0) += 1;
    }
    out
}

/// The families whose series count changed, largest change first (at most 8): what the
/// series figure's difference is made of.
fn family_growth(before: &BTreeMap<String, usize>, after: &BTreeMap<String, usize>) -> String {
    let mut d: Vec<(i64, &str)> = before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|k| {
            let n = |m: &BTreeMap<String, usize>| m.get(k).copied().unwrap_or(0) as i64;
            (n(after) - n(before), k.as_str())
        })
        .filter(|(d, _)| *d != 0)
        .collect();
    d.sort_by_key(|(d, k)| (std::cmp::Reverse(d.abs()), *k));
    if d.is_empty() {
        return "none changed".into();
    }
    d.iter()
        .take(8)
        .map(|(d, k)| format!("{k} {d:+}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The body of a `timed_get` answer (after the headers).
fn body_of(raw: &[u8]) -> &[u8] {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw, |i| &raw[i + 4..])
}

/// One timed scrape from inside `ns`: (ms, body).
fn scrape(ns: &str) -> Result<(f64, String)> {
    let addr: SocketAddr = crate::agent::LISTEN.parse()?;
    netns::run_in(ns, move || -> Result<(f64, String)> {
        let mut buf = Vec::new();
        let took = timed_get(addr, &mut buf)?;
        let body = String::from_utf8_lossy(body_of(&buf)).into_owned();
        Ok((took.as_secs_f64() * 1e3, body))
    })?
}

/// What the background scraper saw: (when, ms, series).
type Scrapes = Arc<Mutex<Vec<(Instant, f64, usize)>>>;

/// Scrapes every `every` until `stop`, recording each; a failed scrape ends it with the
/// error.
fn scrape_loop(ns: String, every: Duration, out: Scrapes, stop: Arc<AtomicBool>) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let (ms, body) = scrape(&ns)?;
        out.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((t, ms, count_series(&body)));
        if let Some(rest) = every.checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}

/// Scrapes of each kind (plain, gzip) [`scrape_cpu`] times back to back.
const CPU_SCRAPES: u32 = 10;

/// What one scrape costs the agent itself, whatever else the machine runs: its CPU over
/// [`CPU_SCRAPES`] back-to-back scrapes, minus its CPU over as long a time without scrapes
/// (peer syncs, map sweeps), per scrape, in ms: (plain text, gzip).
fn scrape_cpu(ns: &str, pid: u32) -> Result<(f64, f64)> {
    let hz = clock_ticks()?;
    let addr: SocketAddr = crate::agent::LISTEN.parse()?;
    let mut per_kind = Vec::new();
    for gzip in [false, true] {
        let (c0, t0) = (cpu_ticks(pid)?, Instant::now());
        netns::run_in(ns, move || -> Result<()> {
            let mut buf = Vec::new();
            for _ in 0..CPU_SCRAPES {
                timed_get_as(addr, &mut buf, gzip)?;
            }
            Ok(())
        })??;
        let (c1, took) = (cpu_ticks(pid)?, t0.elapsed());
        std::thread::sleep(took);
        let c2 = cpu_ticks(pid)?;
        let busy = c1.saturating_sub(c0) as f64;
        let idle = c2.saturating_sub(c1) as f64;
        per_kind.push((busy - idle).max(0.0) / hz * 1e3 / f64::from(CPU_SCRAPES));
    }
    Ok((per_kind[0], per_kind[1]))
}

/// VmRSS every second until `stop`: (when, MB).
fn rss_loop(pid: u32, out: Arc<Mutex<Vec<(Instant, f64)>>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok((rss, _)) = rss_mb(pid) {
            out.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((Instant::now(), rss));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The largest value in `samples` taken within `[from, to]`; NaN when none.
fn max_between(samples: &[(Instant, f64)], from: Instant, to: Instant) -> f64 {
    samples
        .iter()
        .filter(|(t, _)| (from..=to).contains(t))
        .map(|(_, v)| *v)
        .fold(f64::NAN, f64::max)
}

fn measure(ctx: &Ctx, lab: &Lab, plan: &Plan, conf: &std::path::Path) -> Result<Vec<Figure>> {
    let relay = lab.exit();
    let (ns, iface) = (relay.netns.clone(), relay.wg().iface.clone());
    cmd::ip(&[
        "-n",
        &ns,
        "route",
        "add",
        CLIENT_ROUTE,
        "dev",
        &iface,
        "src",
        &GATEWAY_V4.to_string(),
    ])?;
    let sink = SocketAddrV4::new(GATEWAY_V4, SINK_PORT);
    let run_for = plan.warmup + plan.every * (plan.rounds as u32 + 10) + Duration::from_secs(600);
    let echo = UdpEcho::start(&ns, sink.into(), usize::MAX, run_for)?;

    let t = Instant::now();
    let mut active: Vec<ClientSpec> = (0..plan.active)
        .map(|i| ClientSpec {
            key: Key::generate(),
            ip: wgload::nth_ip(CLIENT_NET, i as u32),
        })
        .collect();
    let mut peers: Vec<(String, Ipv4Addr)> =
        active.iter().map(|c| (c.key.public_b64(), c.ip)).collect();
    let mut keys: Vec<String> = peers.iter().map(|(k, _)| k.clone()).collect();
    // The lab's own client is the last of `plan.peers`.
    peers.extend((0..plan.peers - plan.active - 1).map(|i| {
        (
            Key::generate().public_b64(),
            wgload::nth_ip(IDLE_NET, i as u32),
        )
    }));
    std::fs::write(conf, wgload::addconf(&peers))
        .with_context(|| format!("writing {}", conf.display()))?;
    netns::exec(&ns, &["wg", "addconf", &iface, &conf.display().to_string()])
        .with_context(|| format!("adding {} peers to {iface}", peers.len()))?;
    let dumped = wg_peer_count(&ns, &iface)?;
    if dumped != plan.peers {
        bail!("{iface} has {dumped} peers, expected {}", plan.peers);
    }
    println!(
        "bench churn: {} peers on {iface} ({:.1} s)",
        plan.peers,
        t.elapsed().as_secs_f64()
    );

    let help = cmd::stdout(&ctx.agent_bin.display().to_string(), ["run", "--help"])
        .context("reading the agent's `run --help`")?;
    let has_grace = help.contains(GRACE_FLAG);
    let grace = format!("{}s", plan.grace.as_secs());
    let mut args = vec!["--tunnel", iface.as_str()];
    if has_grace {
        args.extend([GRACE_FLAG, grace.as_str()]);
    }
    let log = ctx.work.join("churn-agent.log");
    let agent = Agent::start(&ctx.agent_bin, &ns, &args, &log)?;
    let pid = agent_pid(&ns, &ctx.agent_bin)?;
    let stop = Arc::new(AtomicBool::new(false));
    let rss: Arc<Mutex<Vec<(Instant, f64)>>> = Arc::default();
    let rss_thread = {
        let (out, stop) = (rss.clone(), stop.clone());
        std::thread::spawn(move || rss_loop(pid, out, stop))
    };

    let load_cfg = LoadConfig {
        relay: lab.exit_endpoint(),
        relay_public: relay.wg().public_key.clone(),
        bind: lab.client().address(),
        sink,
        inner_len: INNER_LEN,
        interval: SEND_EVERY,
        handshakes_per_sec: HANDSHAKES_PER_SEC,
    };
    // Every client's socket and the storm's connections, raised after the agent started.
    wgload::raise_fd_limit(plan.active + plan.storm.scrapes + plan.storm.stalled + 1024)?;
    let specs = std::mem::take(&mut active);
    let load = Load::start(Some(&lab.client().netns), load_cfg, specs)?;
    let result = churn(
        plan, &ns, &iface, &load, &mut keys, has_grace, &rss, pid, &ctx.work,
    );
    stop.store(true, Ordering::Relaxed);
    let _ = rss_thread.join();
    let stopped = load.stop();
    let echoed = echo.stop_counting();
    agent.stop()?;
    let mut figures = result?;
    // Echoes the relay could not send (or an echo that died) explain missing echoes: say so
    // beside the exact counts rather than lose the other figures.
    let said = match echoed {
        Err(e) => Some(format!("the relay's UDP echo stopped early: {e:#}")),
        Ok(d) => d.first_error.map(|e| {
            format!(
                "the relay's UDP echo could not send {} of {} echoes (first: {e})",
                d.send_errors,
                d.echoed as u64 + d.send_errors
            )
        }),
    };
    if let (Some(said), Some(f)) = (said, figures.first_mut()) {
        f.note = format!("{said}; {}", f.note);
    }
    stopped.context("the load generator")?;
    Ok(figures)
}

#[allow(clippy::too_many_arguments)]
fn churn(
    plan: &Plan,
    ns: &str,
    iface: &str,
    load: &Load,
    keys: &mut [String],
    has_grace: bool,
    rss: &Arc<Mutex<Vec<(Instant, f64)>>>,
    pid: u32,
    work: &std::path::Path,
) -> Result<Vec<Figure>> {
    let sec = plan.section();
    let deadline = Instant::now()
        + Duration::from_secs(1) * (plan.active as u32 / HANDSHAKES_PER_SEC)
        + Duration::from_secs(60);
    while load.established() < plan.active {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} load clients completed a handshake",
                load.established(),
                plan.active
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every active peer has sent and been echoed a few times, and rekeyed (see
    // `Plan::warmup`).
    if !plan.warmup.is_zero() {
        println!(
            "bench churn: {} clients up; {} s for every one to rekey once",
            plan.active,
            plan.warmup.as_secs()
        );
    }
    std::thread::sleep(plan.warmup.max(SEND_EVERY * 2 + Duration::from_secs(3)));
    let (_, body) = scrape(ns)?;
    let before = count_series(&body);
    let families_before = series_by_family(&body);
    // Kept for reading what the series figures are made of.
    let _ = std::fs::write(work.join("churn-before.prom"), &body);
    println!(
        "bench churn: {} clients up, {before} series; churning",
        plan.active
    );

    let scrapes: Scrapes = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (ns, out, stop) = (ns.to_owned(), scrapes.clone(), stop.clone());
        let every = plan.scrape_every;
        std::thread::spawn(move || scrape_loop(ns, every, out, stop))
    };
    let stable = plan.stable_sample();
    let mut queue: VecDeque<usize> = (0..plan.active).filter(|s| !stable.contains(s)).collect();
    let mut next_ip = plan.active as u32;
    let mut replaced_sample: Vec<String> = Vec::new();
    let mut sample_slots: Vec<usize> = Vec::new();
    let churn_start = Instant::now();
    let mut wg_set_ms = Vec::new();
    for round in 0..plan.rounds {
        let at = churn_start + plan.every * round as u32;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let slots: Vec<usize> = (0..plan.replaced)
            .filter_map(|_| queue.pop_front())
            .collect();
        for &s in &slots {
            load.pause(s)?;
        }
        std::thread::sleep(DRAIN);
        let new: Vec<ClientSpec> = slots
            .iter()
            .map(|_| {
                next_ip += 1;
                ClientSpec {
                    key: Key::generate(),
                    ip: wgload::nth_ip(CLIENT_NET, next_ip - 1),
                }
            })
            .collect();
        let old: Vec<String> = slots.iter().map(|&s| keys[s].clone()).collect();
        let added: Vec<(String, Ipv4Addr)> =
            new.iter().map(|c| (c.key.public_b64(), c.ip)).collect();
        let t = Instant::now();
        netns::exec(ns, &wgload::replace_args(iface, &old, &added))
            .with_context(|| format!("round {round}: replacing {} peers", slots.len()))?;
        wg_set_ms.push(t.elapsed().as_secs_f64() * 1e3);
        for ((&slot, spec), (key, _)) in slots.iter().zip(new).zip(&added) {
            keys[slot] = key.clone();
            load.switch(slot, spec, SETTLE)?;
            // The first round's first replacements are sampled: never replaced again.
            if round == 0 && sample_slots.len() < SAMPLE_REPLACED {
                sample_slots.push(slot);
                replaced_sample.push(key.clone());
            } else {
                queue.push_back(slot);
            }
        }
    }
    let churn_end = churn_start + plan.every * plan.rounds as u32;
    if let Some(wait) = churn_end.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    println!(
        "bench churn: {} rounds done; quiet for {} s",
        plan.rounds,
        (plan.grace + GRACE_MARGIN).as_secs()
    );
    std::thread::sleep(plan.grace + GRACE_MARGIN);
    stop.store(true, Ordering::Relaxed);
    scraper
        .join()
        .map_err(|_| anyhow!("the scraper panicked"))?
        .context("scraping during the churn")?;
    let (_, body) = scrape(ns)?;
    let after = count_series(&body);
    let growth = family_growth(&families_before, &series_by_family(&body));
    let _ = std::fs::write(work.join("churn-after.prom"), &body);
    let quiet_end = Instant::now();
    let scrape_cpu = scrape_cpu(ns, pid)?;

    println!("bench churn: scrape storm");
    let storm_result = storm::run(Some(ns), crate::agent::LISTEN.parse()?, plan.storm)?;

    // Nothing in flight: then the agent's counts must be the generator's, exactly.
    load.set_quiet(true);
    std::thread::sleep(Duration::from_secs(3));
    let (_, body) = scrape(ns)?;
    let metrics = Metrics::parse(&body)?;
    let sampled: Vec<String> = stable
        .iter()
        .map(|&s| keys[s].clone())
        .chain(replaced_sample)
        .collect();
    let mut exact = 0;
    let mut misses = Vec::new();
    for key in &sampled {
        let t = load.tallies().get(key);
        match check_peer(&metrics, iface, key, t) {
            Ok(()) => exact += 1,
            Err(e) => misses.push(format!("{e:#}")),
        }
    }
    let (_, hwm) = rss_mb(pid)?;
    let total = load.tallies().total();

    let scraped = scrapes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let during: Vec<&(Instant, f64, usize)> = scraped
        .iter()
        .filter(|(t, _, _)| (churn_start..churn_end).contains(t))
        .collect();
    let mut ms: Vec<f64> = during.iter().map(|(_, ms, _)| *ms).collect();
    let max_during = during.iter().map(|(_, _, n)| *n).max().unwrap_or(0);
    let rss = rss.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let minute = Duration::from_secs(60).min(plan.every * plan.rounds as u32);
    let first_minute = max_between(&rss, churn_start, churn_start + minute);
    let last_minute = max_between(
        &rss,
        quiet_end.checked_sub(minute).unwrap_or(churn_start),
        quiet_end,
    );
    let mut healthz = storm_result.healthz_ms.clone();

    let mut f = Vec::new();
    f.push(
        Figure::new(
            &sec,
            format!(
                "sampled active peers whose tunnel packets and bytes (rx, tx) are exact, of {}",
                sampled.len()
            ),
            exact as f64,
            "peers",
        )
        .goal(Goal::AtLeast(sampled.len() as f64))
        .note(if misses.is_empty() {
            format!(
                "{SAMPLE_STABLE} never replaced, {SAMPLE_REPLACED} replaced in by the first round; \
                 the load sent {} and got {} echoes back in all ({} unexpected)",
                total.sent, total.received, total.unexpected
            )
        } else {
            misses.join("; ")
        }),
    );
    f.push(
        Figure::new(&sec, "agent peak RSS", hwm, "MB")
            .goal(Goal::AtMost(GOAL_RSS_MB))
            .note("VmHWM at the end, the storm included"),
    );
    f.push(
        Figure::new(
            &sec,
            "agent RSS, last minute before the storm (max)",
            last_minute,
            "MB",
        )
        .goal(Goal::AtMost(GOAL_RSS_MB))
        .note(format!(
            "VmRSS every second; first minute of churn: {first_minute:.1} MB (max)"
        )),
    );
    let grace_note = if has_grace {
        format!("the agent ran with {GRACE_FLAG} {}s", plan.grace.as_secs())
    } else {
        format!(
            "the agent has no {GRACE_FLAG} yet: its default for gone peers; measured {} s after churn",
            (plan.grace + GRACE_MARGIN).as_secs()
        )
    };
    f.push(Figure::new(
        &sec,
        "series before churn",
        before as f64,
        "series",
    ));
    f.push(Figure::new(
        &sec,
        "series during churn (max)",
        max_during as f64,
        "series",
    ));
    f.push(
        Figure::new(
            &sec,
            "series after churn and the grace period",
            after as f64,
            "series",
        )
        .note(grace_note.clone()),
    );
    f.push(
        Figure::new(
            &sec,
            "series after churn and grace, minus before",
            after as f64 - before as f64,
            "series",
        )
        .goal(Goal::AtMost(0.0))
        .note(format!(
            "same peer count before and after: the replaced peers' series must go; {:.1} series \
             kept per replaced peer; {grace_note}; by family: {growth}",
            (after as f64 - before as f64) / (plan.replaced * plan.rounds) as f64
        )),
    );
    let how = format!(
        "{} scrapes every {} ms during the churn, text format; `wg set` of a round took {:.0} ms (median)",
        ms.len(),
        plan.scrape_every.as_millis(),
        median(&mut wg_set_ms)
    );
    f.push(
        Figure::new(&sec, "scrape median during churn", median(&mut ms), "ms")
            .goal(Goal::AtMost(GOAL_SCRAPE_MEDIAN_MS))
            .note(how),
    );
    f.push(
        Figure::new(
            &sec,
            "scrape p99 during churn",
            quantile(&mut ms, 0.99),
            "ms",
        )
        .goal(Goal::AtMost(GOAL_SCRAPE_P99_MS)),
    );
    f.push(
        Figure::new(
            &sec,
            "agent CPU per scrape after churn, text format",
            scrape_cpu.0,
            "ms",
        )
        .note(format!(
            "the agent's utime+stime over {CPU_SCRAPES} back-to-back scrapes minus as long \
             without scrapes, per scrape, at {after} series: its own part of the latency \
             above, which on this 2-CPU machine also waits for the relay and the load"
        )),
    );
    f.push(Figure::new(
        &sec,
        "agent CPU per scrape after churn, gzip (as Prometheus asks)",
        scrape_cpu.1,
        "ms",
    ));
    let storm_note = format!(
        "{} concurrent gzip scrapes ({} answered 200, {} failed{}) and {} stalled clients \
         ({} still open at the end), {:.1} s; {} probes, {} unanswered within {} s (counted as {} ms)",
        plan.storm.scrapes,
        storm_result.scrapes_ok,
        storm_result.scrapes_failed,
        storm_result
            .first_error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default(),
        plan.storm.stalled,
        storm_result.stalled_open,
        storm_result.took.as_secs_f64(),
        healthz.len(),
        storm_result.healthz_failed,
        storm::HEALTHZ_TIMEOUT.as_secs(),
        storm::HEALTHZ_TIMEOUT.as_millis()
    );
    f.push(
        Figure::new(
            &sec,
            "/healthz p50 during the scrape storm",
            median(&mut healthz),
            "ms",
        )
        .note(storm_note),
    );
    f.push(Figure::new(
        &sec,
        "/healthz p99 during the scrape storm",
        quantile(&mut healthz, 0.99),
        "ms",
    ));
    f.push(
        Figure::new(
            &sec,
            "/healthz max during the scrape storm",
            quantile(&mut healthz, 1.0),
            "ms",
        )
        .goal(Goal::AtMost(GOAL_HEALTHZ_MS)),
    );
    Ok(f)
}

/// Fails unless the agent's tunnel counters for `key` on `iface` are what the load counted:
/// rx (into the relay's tunnel interface from the peer) = sent, tx = echoes received, bytes
/// = packets x [`INNER_LEN`].
pub fn check_peer(m: &Metrics, iface: &str, key: &str, t: wgload::Tally) -> Result<()> {
    let short = key.get(..8).unwrap_or(key);
    if t.sent == 0 || t.received == 0 {
        bail!(
            "{short}: the load sent {} and got {} back: nothing to compare",
            t.sent,
            t.received
        );
    }
    let len = INNER_LEN as u64;
    let mut wrong = Vec::new();
    for (dir, packets) in [("rx", t.sent), ("tx", t.received)] {
        let labels = [("interface", iface), ("peer", key), ("direction", dir)];
        let p = m.get("wirescope_tunnel_packets_total", &labels)?;
        let b = m.get("wirescope_tunnel_bytes_total", &labels)?;
        if p != packets as f64 || b != (packets * len) as f64 {
            wrong.push(format!(
                "{dir} {p} packets / {b} bytes, the load {packets} / {}",
                packets * len
            ));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{short}: {}", wrong.join(", ")))
    }
}

fn wg_peer_count(ns: &str, iface: &str) -> Result<usize> {
    let out = netns::exec(ns, &["wg", "show", iface, "peers"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_growth_lists_the_changes_largest_first() {
        let before =
            series_by_family("# HELP a x\na_total{p=\"1\"} 1\nb 2\nc_bucket{le=\"1\"} 0\n");
        let after = series_by_family(
            "a_total{p=\"1\"} 1\na_total{p=\"2\"} 1\na_total{p=\"3\"} 1\nd 1\nc_bucket{le=\"1\"} 0\n",
        );
        assert_eq!(family_growth(&before, &after), "a_total +2, b -1, d +1");
        assert_eq!(family_growth(&after, &after), "none changed");
    }

    #[test]
    fn series_are_the_sample_lines() {
        let body =
            "# HELP a x\n# TYPE a counter\na_total{x=\"1\"} 3\na_total{x=\"2\"} 4\n\nb 1\n# EOF\n";
        assert_eq!(count_series(body), 3);
        assert_eq!(body_of(b"HTTP/1.0 200 OK\r\nA: b\r\n\r\nb 1\n"), b"b 1\n");
    }

    #[test]
    fn plans_fit_and_sample_distinct_slots() {
        for quick in [true, false] {
            let p = Plan::new(quick);
            let s = p.stable_sample();
            assert_eq!(s.len(), SAMPLE_STABLE);
            assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
            assert!(s.iter().all(|&x| x < p.active));
            assert!(p.replaced + SAMPLE_STABLE <= p.active);
            assert!(p.section().contains(" active "), "goal rows name 'active'");
        }
        assert_eq!(Plan::new(false).stable_sample()[1], 200);
    }

    #[test]
    fn peers_are_checked_exactly() {
        let key = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
        let text = format!(
            "wirescope_tunnel_packets_total{{interface=\"bcr0\",peer=\"{key}\",direction=\"rx\"}} 5\n\
             wirescope_tunnel_bytes_total{{interface=\"bcr0\",peer=\"{key}\",direction=\"rx\"}} 500\n\
             wirescope_tunnel_packets_total{{interface=\"bcr0\",peer=\"{key}\",direction=\"tx\"}} 4\n\
             wirescope_tunnel_bytes_total{{interface=\"bcr0\",peer=\"{key}\",direction=\"tx\"}} 400\n"
        );
        let m = Metrics::parse(&text).unwrap();
        let tally = |sent, received| wgload::Tally {
            sent,
            received,
            ..Default::default()
        };
        check_peer(&m, "bcr0", key, tally(5, 4)).unwrap();
        let e = check_peer(&m, "bcr0", key, tally(5, 5)).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "QUFBQUFB: tx 4 packets / 400 bytes, the load 5 / 500"
        );
        assert!(
            check_peer(&m, "bcr1", key, tally(5, 4)).is_err(),
            "another interface"
        );
        assert!(
            check_peer(&m, "bcr0", key, tally(0, 0)).is_err(),
            "nothing sent"
        );
    }

    #[test]
    fn maxima_between_instants() {
        let t0 = Instant::now();
        let s = |secs: u64, v: f64| (t0 + Duration::from_secs(secs), v);
        let samples = [s(0, 10.0), s(30, 30.0), s(61, 20.0), s(90, 25.0)];
        let minute = Duration::from_secs(60);
        assert_eq!(max_between(&samples, t0, t0 + minute), 30.0);
        assert_eq!(max_between(&samples, t0 + minute, t0 + minute * 2), 25.0);
        assert!(max_between(&samples, t0 + minute * 3, t0 + minute * 4).is_nan());
    }
}
