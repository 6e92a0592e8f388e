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

/// Runs `f` in namespace `ns`, or here when None.
fn in_ns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    match ns {
        Some(ns) => netns::run_in(ns, f),
        None => Ok(f()),
    }
}

/// Runs the storm against `addr` in namespace `ns` (None: this one).
pub fn run(ns: Option<&str>, addr: SocketAddr, plan: StormPlan) -> Result<StormResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let ns_owned = ns.map(str::to_owned);
    let prober = std::thread::Builder::new()
        .name("healthz-prober".into())
        .spawn(move || in_ns(ns_owned.as_deref(), move || probe_until(addr, &flag)))
        .context("starting the /healthz prober")?;
    let storm = in_ns(ns, move || -> Result<StormResult> {
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
    // Whatever the agent sent is read off; a connection it closed then reads as end of
    // file (or fails), an open one would block.
    let mut b = vec![0u8; 64 << 10];
    for s in &stalled {
        let open = loop {
            match s.try_read(&mut b) {
                Ok(0) => break false,
                Ok(_) => {}
                Err(e) => break e.kind() == std::io::ErrorKind::WouldBlock,
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    /// A server that answers any whole request `200 ok` and closes, and holds a half
    /// request open until its read times out.
    fn server() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut req = Vec::new();
                    let mut b = [0u8; 512];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut b) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nok\n");
                });
            }
        });
        addr
    }

    #[test]
    fn storm_counts_scrapes_probes_and_stalled_clients() {
        let plan = StormPlan {
            scrapes: 30,
            stalled: 6,
            min_duration: Duration::from_millis(300),
        };
        let r = run(None, server(), plan).unwrap();
        assert_eq!(
            (r.scrapes_ok, r.scrapes_failed),
            (30, 0),
            "{:?}",
            r.first_error
        );
        // The 3 half requests stay open; the 3 whole ones were answered and closed.
        assert_eq!(r.stalled_open, 3);
        assert!(r.healthz_ms.len() >= 2, "{r:?}");
        assert_eq!(r.healthz_failed, 0);
        assert!(
            r.healthz_ms
                .iter()
                .all(|&ms| ms < HEALTHZ_TIMEOUT.as_secs_f64() * 1e3)
        );
    }
}
