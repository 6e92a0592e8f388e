//! One metrics body for many concurrent scrapes.
//!
//! Rendering /metrics reads every BPF map under the datapath lock and, at 10,000 peers,
//! builds megabytes of text: a thousand scrapers arriving at once must not make a thousand
//! bodies (CPU, and memory while slow clients read them). A scrape may use a body whose
//! rendering *started after the scrape arrived*, never an older one, so no scrape sees
//! counts from before it asked (the exact-count tests rely on that): scrapes that arrive
//! while a body is rendered wait for the next rendering and all share it, so any burst
//! costs at most two renderings. Bodies are shared buffers (`Bytes`, or a
//! [`super::packed::Packed`] behind an `Arc`): every waiter holds the same one.

use std::{future::Future, time::Instant};

use tokio::sync::Mutex;

/// A rendered body and when its rendering started.
struct Rendered<T> {
    started: Instant,
    body: T,
}

/// One shared body per kind of answer (format x encoding): [`Coalescer::get`]. `T` is a
/// handle to a shared buffer, so cloning it is cheap.
pub struct Coalescer<T> {
    slot: Mutex<Option<Rendered<T>>>,
}

impl<T> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer {
            slot: Mutex::new(None),
        }
    }
}

impl<T: Clone> Coalescer<T> {
    /// The body for a scrape that arrived at `arrived`: one whose rendering started at or
    /// after then, rendered by `render` when there is none. Only one rendering runs at a
    /// time; a failed one is not kept (the next scrape tries again).
    pub async fn get<F, Fut, E>(&self, arrived: Instant, render: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(r) = slot.as_ref()
            && r.started >= arrived
        {
            return Ok(r.body.clone());
        }
        let started = Instant::now();
        let body = render().await?;
        *slot = Some(Rendered {
            started,
            body: body.clone(),
        });
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    /// 100 scrapes at once while a rendering is under way: exactly one more rendering, and
    /// all 100 get its body; a scrape after that gets a fresh one; a failure is not kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scrapes_share_one_rendering() {
        let c = Arc::new(Coalescer::default());
        let renders = Arc::new(AtomicUsize::new(0));
        let render = |renders: Arc<AtomicUsize>| {
            move || async move {
                let n = renders.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, String>(Bytes::from(format!("body {n}")))
            }
        };
        // A first scrape starts rendering #1 ...
        let first = {
            let (c, r) = (c.clone(), renders.clone());
            tokio::spawn(async move { c.get(Instant::now(), render(r)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // ... and 100 arrive while it runs: #1 started before them, so they share #2.
        let mut waiting = Vec::new();
        for _ in 0..100 {
            let (c, r) = (c.clone(), renders.clone());
            let arrived = Instant::now();
            waiting.push(tokio::spawn(async move { c.get(arrived, render(r)).await }));
        }
        assert_eq!(first.await.unwrap().unwrap(), "body 1");
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap(), "body 2");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 2);
        // Later: a new rendering, never the old body.
        let later = c.get(Instant::now(), render(renders.clone())).await;
        assert_eq!(later.unwrap(), "body 3");
        // A failure is returned, not kept.
        let failed = c
            .get(Instant::now(), || async {
                Err::<Bytes, _>("map read failed")
            })
            .await;
        assert_eq!(failed, Err("map read failed"));
        let after = c.get(Instant::now(), render(renders.clone())).await;
        assert_eq!(after.unwrap(), "body 4");
    }
}
