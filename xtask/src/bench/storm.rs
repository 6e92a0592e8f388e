//! A scrape storm for the churn bench: many concurrent `GET /metrics` (gzip, as Prometheus
//! asks) beside stalled clients (half send a whole request for the uncompressed body and
//! never read it, half send half a request and nothing more), while a prober of its own
//! thread asks `/healthz` every few milliseconds and times each answer.
//!
//! The storm's clients share one current-thread runtime; the prober has a thread of its
//! own so that its timings are the agent's answer, not the wait for a busy client runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::netns;

/// How long the prober waits for one `/healthz` answer before counting it unanswered.
pub const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(2);
/// The prober's pause between two questions.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// How long one storm scrape may take before it counts as failed.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct StormPlan {
    pub scrapes: usize,
    /// Half never read the answer to a whole request, half send half a request.
    pub stalled: usize,
    /// The prober runs at least this long, however fast the scrapes end.
    pub min_duration: Duration,
}

#[derive(Debug, Default)]
pub struct StormResult {
    /// Every `/healthz` answer's time, connect to last byte, in ms; an unanswered or failed
    /// probe counts as [`HEALTHZ_TIMEOUT`].
    pub healthz_ms: Vec<f64>,
    /// Probes without a 200 within [`HEALTHZ_TIMEOUT`].
    pub healthz_failed: usize,
    pub scrapes_ok: usize,
    pub scrapes_failed: usize,
    /// The first scrape failure, to show in the report.
    pub first_error: Option<String>,
    /// From the first stalled client to the last scrape answered.
    pub took: Duration,
    /// Stalled clients whose connection was open when the storm ended.
    pub stalled_open: usize,
}

/// Runs the storm against `addr` in namespace `ns`.
pub fn run(ns: &str, addr: SocketAddr, plan: StormPlan) -> Result<StormResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let ns_owned = ns.to_owned();
    let prober = std::thread::Builder::new()
        .name("healthz-prober".into())
        .spawn(move || netns::run_in(&ns_owned, move || probe_until(addr, &flag)))
        .context("starting the /healthz prober")?;
    let storm = netns::run_in(ns, move || -> Result<StormResult> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the storm's runtime")?;
        rt.block_on(storm(addr, plan))
    });
    stop.store(true, Ordering::Relaxed);
    let probes = prober
        .join()
        .map_err(|_| anyhow!("the /healthz prober panicked"))??;
    let mut result = storm??;
    result.healthz_failed = probes.iter().filter(|p| p.is_none()).count();
    result.healthz_ms = probes
        .into_iter()
        .map(|p| p.unwrap_or(HEALTHZ_TIMEOUT.as_secs_f64() * 1e3))
        .collect();
    Ok(result)
}

/// `/healthz` every [`PROBE_EVERY`] until `stop`: each answer's ms, None when not a 200
/// within [`HEALTHZ_TIMEOUT`].
fn probe_until(addr: SocketAddr, stop: &AtomicBool) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let ok = crate::scrape::get(addr, "/healthz", HEALTHZ_TIMEOUT)
            .is_ok_and(|(code, _)| code == 200);
        let took = t.elapsed();
        out.push((ok && took <= HEALTHZ_TIMEOUT).then_some(took.as_secs_f64() * 1e3));
        std::thread::sleep(PROBE_EVERY);
    }
    out
}

async fn storm(addr: SocketAddr, plan: StormPlan) -> Result<StormResult> {
    let started = Instant::now();
    let mut stalled = Vec::with_capacity(plan.stalled);
    for i in 0..plan.stalled {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("stalled client {i}: connecting to {addr}"))?;
        let request = if i % 2 == 0 {
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n")
        } else {
            "GET /metrics HTTP/1.1\r\nHo".to_owned()
        };
        s.write_all(request.as_bytes())
            .await
            .with_context(|| format!("stalled client {i}: writing"))?;
        stalled.push(s);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.scrapes {
        tasks.spawn(tokio::time::timeout(SCRAPE_TIMEOUT, scrape(addr)));
    }
    let mut result = StormResult::default();
    while let Some(r) = tasks.join_next().await {
        let r = r
            .map_err(|e| anyhow!("{e}"))
            .and_then(|r| r.map_err(|_| anyhow!("no answer within {SCRAPE_TIMEOUT:?}")))
            .and_then(|r| r);
        match r {
            Ok(()) => result.scrapes_ok += 1,
            Err(e) => {
                result.scrapes_failed += 1;
                result.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    result.took = started.elapsed();
    if let Some(rest) = plan.min_duration.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    // A connection the agent closed reads as end of file or fails at once; an open one
    // has nothing to read yet, or the answer it never read.
    for s in &stalled {
        let mut b = [0u8; 1];
        let open = match s.try_read(&mut b) {
            Ok(n) => n > 0,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        };
        result.stalled_open += usize::from(open);
    }
    drop(stalled);
    Ok(result)
}

/// One gzip-accepting `GET /metrics` over HTTP/1.0, read to the end; fails unless 200.
async fn scrape(addr: SocketAddr) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept-Encoding: gzip\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    let head = body
        .get(..12)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    if !head.starts_with("HTTP/1.") || !head.ends_with(" 200") {
        anyhow::bail!("GET /metrics answered {head:?}");
    }
    Ok(())
}
