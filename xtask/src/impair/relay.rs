//! The relay itself: [`Impairer`] binds its two sockets in a namespace and runs one thread
//! per direction ([`Direction`]), which applies that direction's rules datagram by datagram
//! (drop, hold for a swap, delay queue) and counts what it did; [`wait_for`] waits on the
//! counters.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};

use super::{
    Count, DirRules, DirStats, HOLD_LIMIT, ImpairStats, Impairment, MAX_DATAGRAM, QUEUE_LIMIT,
    TICK, message_type,
};
use crate::netns;

struct Shared {
    rules: Mutex<(Impairment, u64)>,
    stats: Mutex<ImpairStats>,
    client: Mutex<Option<SocketAddr>>,
    stop: AtomicBool,
}

/// A running impairing relay. Dropping it stops it.
pub struct Impairer {
    listen: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Impairer {
    /// Binds `listen` and an upstream socket connected to `upstream` in network namespace
    /// `ns` (None: the caller's), and starts relaying with `rules`.
    pub fn start(
        ns: Option<&str>,
        listen: SocketAddr,
        upstream: SocketAddr,
        rules: Impairment,
    ) -> Result<Impairer> {
        let make = move || -> std::io::Result<(UdpSocket, UdpSocket)> {
            let front = UdpSocket::bind(listen)?;
            let any: SocketAddr = match upstream {
                SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
                SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
            };
            let back = UdpSocket::bind(any)?;
            back.connect(upstream)?;
            Ok((front, back))
        };
        let (front, back) = match ns {
            Some(ns) => netns::run_in(ns, make)?,
            None => make(),
        }
        .with_context(|| format!("impairing relay: binding {listen} / connecting {upstream}"))?;
        let listen = front.local_addr()?;
        let shared = Arc::new(Shared {
            rules: Mutex::new((rules, 0)),
            stats: Mutex::new(ImpairStats::default()),
            client: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let (front, back) = (Arc::new(front), Arc::new(back));
        let mut threads = Vec::new();
        for to_client in [false, true] {
            let (rx, tx) = if to_client {
                (back.clone(), front.clone())
            } else {
                (front.clone(), back.clone())
            };
            let sh = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!(
                    "impair-{}",
                    if to_client { "to-client" } else { "to-relay" }
                ))
                .spawn(move || Direction::new(to_client, sh).run(&rx, &tx));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.stop.store(true, Ordering::Relaxed);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e).context("spawning an impairing relay thread");
                }
            }
        }
        Ok(Impairer {
            listen,
            upstream,
            shared,
            threads,
        })
    }

    /// The address the client must send to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Replaces the rules; counting for `drop_every` and `reorder_every` restarts, and a
    /// datagram held for a swap is sent at once. Delayed datagrams already queued keep their
    /// time.
    pub fn set(&self, rules: Impairment) {
        let mut r = self.shared.rules.lock().expect("rules lock");
        r.0 = rules;
        r.1 += 1;
    }

    pub fn rules(&self) -> Impairment {
        self.shared.rules.lock().expect("rules lock").0
    }

    /// The counters so far (never reset).
    pub fn stats(&self) -> ImpairStats {
        *self.shared.stats.lock().expect("stats lock")
    }

    /// The client's address as last seen, None before it sent anything.
    pub fn client(&self) -> Option<SocketAddr> {
        *self.shared.client.lock().expect("client lock")
    }

    /// Stops the relay (queued and held datagrams are dropped) and returns its counters.
    pub fn stop(mut self) -> ImpairStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Impairer {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Packet {
    buf: Vec<u8>,
    len: usize,
    due: Instant,
}

/// One direction's state; only its thread touches it.
struct Direction {
    to_client: bool,
    shared: Arc<Shared>,
    rules: DirRules,
    generation: u64,
    counted: u64,
    survivors: u64,
    held: Option<(Packet, Instant)>,
    queue: VecDeque<Packet>,
    /// Buffers of sent datagrams, reused: in a steady state nothing is allocated.
    pool: Vec<Vec<u8>>,
    last_due: Option<Instant>,
}

impl Direction {
    fn new(to_client: bool, shared: Arc<Shared>) -> Self {
        Direction {
            to_client,
            shared,
            rules: DirRules::default(),
            generation: u64::MAX,
            counted: 0,
            survivors: 0,
            held: None,
            queue: VecDeque::new(),
            pool: Vec::new(),
            last_due: None,
        }
    }

    fn stat(&self, f: impl FnOnce(&mut DirStats)) {
        let mut s = self.shared.stats.lock().expect("stats lock");
        f(if self.to_client {
            &mut s.to_client
        } else {
            &mut s.to_relay
        });
    }

    fn packet(&mut self, data: &[u8]) -> Packet {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        Packet {
            len: data.len(),
            buf,
            due: Instant::now(),
        }
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < QUEUE_LIMIT {
            self.pool.push(buf);
        }
    }

    fn run(mut self, rx: &UdpSocket, tx: &UdpSocket) {
        let mut timeout = None;
        let mut rxbuf = vec![0u8; MAX_DATAGRAM];
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.refresh_rules(tx);
            let now = Instant::now();
            self.flush_due(tx, now);
            let mut wait = TICK;
            if let Some(p) = self.queue.front() {
                wait = wait.min(p.due.saturating_duration_since(now));
            }
            if let Some((_, since)) = &self.held {
                wait = wait.min((*since + HOLD_LIMIT).saturating_duration_since(now));
            }
            let wait = wait.max(Duration::from_micros(100));
            if timeout != Some(wait) {
                let _ = rx.set_read_timeout(Some(wait));
                timeout = Some(wait);
            }
            // Errors are timeouts, and ECONNREFUSED from an ICMP error on the connected socket.
            if let Ok((len, from)) = rx.recv_from(&mut rxbuf) {
                if !self.to_client {
                    *self.shared.client.lock().expect("client lock") = Some(from);
                }
                // Rules set while this thread waited apply to this datagram already.
                self.refresh_rules(tx);
                let p = self.packet(&rxbuf[..len]);
                self.handle(tx, p);
            }
        }
    }

    fn refresh_rules(&mut self, tx: &UdpSocket) {
        let (rules, generation) = *self.shared.rules.lock().expect("rules lock");
        if generation != self.generation {
            self.generation = generation;
            self.rules = if self.to_client {
                rules.to_client
            } else {
                rules.to_relay
            };
            self.counted = 0;
            self.survivors = 0;
            if let Some((p, _)) = self.held.take() {
                self.emit(tx, p);
            }
        }
    }

    fn handle(&mut self, tx: &UdpSocket, p: Packet) {
        let t = message_type(&p.buf[..p.len]);
        let rules = self.rules;
        let counts = match rules.count {
            Count::Data => t == 4,
            Count::All => true,
        };
        self.stat(|s| {
            s.received += 1;
            s.messages[t as usize] += 1;
            if counts {
                s.counted += 1;
            }
        });
        if rules.drop_handshake_responses && t == 2 {
            self.stat(|s| s.dropped_handshake_responses += 1);
            self.recycle(p.buf);
            return;
        }
        if !counts {
            self.emit(tx, p);
            return;
        }
        self.counted += 1;
        if rules
            .drop_every
            .is_some_and(|k| k > 0 && self.counted.is_multiple_of(k as u64))
        {
            self.stat(|s| s.dropped += 1);
            self.recycle(p.buf);
            return;
        }
        self.survivors += 1;
        let pair = self.survivors.div_ceil(2);
        let swap = rules
            .reorder_every
            .is_some_and(|m| m > 0 && pair.is_multiple_of(m as u64));
        if swap && self.survivors % 2 == 1 {
            if let Some((old, _)) = self.held.take() {
                self.stat(|s| s.unpaired += 1);
                self.emit(tx, old);
            }
            let now = Instant::now();
            self.held = Some((p, now));
            return;
        }
        self.emit(tx, p);
        if swap && let Some((held, _)) = self.held.take() {
            self.stat(|s| s.reordered_pairs += 1);
            self.emit(tx, held);
        }
    }

    /// Sends now, or queues for `delay`.
    fn emit(&mut self, tx: &UdpSocket, mut p: Packet) {
        let delay = self.rules.delay;
        if delay.is_zero() && self.queue.is_empty() {
            self.send(tx, p);
            return;
        }
        if self.queue.len() >= QUEUE_LIMIT {
            self.stat(|s| s.overflow += 1);
            self.recycle(p.buf);
            return;
        }
        // A held datagram arrived earlier: its time counts from its own arrival. Keep the
        // queue in order even when the delay was lowered meanwhile.
        let mut due = p.due + delay;
        if let Some(last) = self.last_due {
            due = due.max(last);
        }
        self.last_due = Some(due);
        p.due = due;
        if !delay.is_zero() {
            self.stat(|s| s.delayed += 1);
        }
        self.queue.push_back(p);
    }

    fn flush_due(&mut self, tx: &UdpSocket, now: Instant) {
        while self.queue.front().is_some_and(|p| p.due <= now) {
            let p = self.queue.pop_front().expect("front exists");
            self.send(tx, p);
        }
        if let Some((_, since)) = &self.held
            && now >= *since + HOLD_LIMIT
        {
            let (p, _) = self.held.take().expect("held");
            self.stat(|s| s.unpaired += 1);
            self.emit(tx, p);
        }
    }

    fn send(&mut self, tx: &UdpSocket, p: Packet) {
        let data = &p.buf[..p.len];
        let sent = if self.to_client {
            let client = *self.shared.client.lock().expect("client lock");
            client.map(|c| tx.send_to(data, c))
        } else {
            Some(tx.send(data))
        };
        match sent {
            Some(Ok(_)) => self.stat(|s| s.forwarded += 1),
            Some(Err(_)) => self.stat(|s| s.send_errors += 1),
            None => self.stat(|s| s.no_destination += 1),
        }
        self.recycle(p.buf);
    }
}

/// Lets a caller wait until a condition on the counters holds, e.g. that every datagram
/// sent has gone through.
pub fn wait_for(
    imp: &Impairer,
    timeout: Duration,
    cond: impl Fn(&ImpairStats) -> bool,
) -> Result<ImpairStats> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = imp.stats();
        if cond(&s) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "impairing relay: condition not met within {timeout:?}: {s:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
