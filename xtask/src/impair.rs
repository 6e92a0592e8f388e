//! A deterministic impairing UDP relay for the lab: a userspace forwarder that one WireGuard
//! client's traffic to one relay goes through, and that can drop every k-th message, swap
//! every m-th pair, delay by a fixed time, or drop every handshake response, each per
//! direction, exactly and countably (no randomness, unlike netem).
//!
//! It listens on `listen` (the client's peer endpoint is pointed there), forwards every
//! datagram to `upstream` from a second socket connected to it, and sends what comes back
//! from `upstream` to the address the client last sent from (one client, one flow). Two
//! threads, one per direction, each with its own delay queue; both sockets are created in
//! the namespace given to [`Impairer::start`] (see [`netns::run_in`]) and live only as long
//! as the threads. Dropping the [`Impairer`] stops and joins them (within 20 ms).
//!
//! How each rule works, per direction ([`DirRules`]):
//! - Counting: the rules below count WireGuard data messages (type 4, keepalives included)
//!   by default, or every datagram with [`Count::All`]; other datagrams pass untouched.
//! - `drop_every: Some(k)`: the k-th, 2k-th, ... counted datagram is dropped.
//! - `reorder_every: Some(m)`: the counted datagrams that survived the drop rule form pairs
//!   (1st and 2nd, 3rd and 4th, ...); of every m-th pair the first is held back and sent
//!   right after the second. A held datagram whose partner does not come within
//!   [`HOLD_LIMIT`] is sent alone (counted in `unpaired`). N datagrams sent back to back
//!   thus make exactly floor(N / 2m) swapped pairs.
//! - `delay`: every datagram of the direction (after the rules above) leaves `delay` after it
//!   arrived, in arrival order (a timer queue of at most [`QUEUE_LIMIT`] datagrams; beyond,
//!   datagrams are dropped and counted in `overflow`). One-way: a round trip through the
//!   relay with the same delay both ways takes 2 x delay more.
//! - `drop_handshake_responses`: every WireGuard handshake response (type 2) is dropped,
//!   before the rules above look at it (so with [`Count::All`] it is not counted either).
//!
//! [`Impairer::set`] replaces the rules at run time and restarts the counting (the next
//! counted datagram is the 1st, also when its thread was already waiting for it);
//! [`Impairer::stats`] reads the counters, which are never reset: take differences.
//!
//! Datapath: each thread receives into one fixed 64 KiB buffer and copies the datagram into a
//! buffer from its own pool (reused, so in a steady state nothing is allocated); a datagram
//! that is not delayed or held is sent at once.
//!
//! In the lab, [`Lab::start_impairment`] (or `cargo xtask lab impair`) starts it at a
//! [`Place`]: in the hop, or between the multihop relays, and points the client at it; the
//! returned [`ImpairHandle`] undoes that and stops the relay when dropped.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::lab::{Lab, RELAY_PORT, Role};
use crate::netns;

/// The longest a datagram of a pair to swap waits for its partner.
pub const HOLD_LIMIT: Duration = Duration::from_millis(200);
/// The most datagrams a direction's delay queue holds.
pub const QUEUE_LIMIT: usize = 4096;
/// Largest datagram relayed (the largest UDP payload of IPv4).
const MAX_DATAGRAM: usize = 65_507;
/// How often the threads look at the stop flag when idle.
const TICK: Duration = Duration::from_millis(20);

/// Which datagrams `drop_every` and `reorder_every` count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Count {
    /// WireGuard transport data messages (type 4), keepalives included.
    #[default]
    Data,
    /// Every datagram.
    All,
}

/// What happens to the datagrams of one direction. The default changes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirRules {
    pub count: Count,
    /// Drop the k-th, 2k-th, ... counted datagram.
    pub drop_every: Option<u32>,
    /// Swap the two datagrams of every m-th pair of counted datagrams.
    pub reorder_every: Option<u32>,
    /// Fixed one-way delay of every datagram of this direction (`delay_ms` in JSON).
    #[serde(rename = "delay_ms", with = "millis")]
    pub delay: Duration,
    /// Drop every WireGuard handshake response (type 2).
    pub drop_handshake_responses: bool,
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `21st`.
fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

impl DirRules {
    pub fn is_noop(&self) -> bool {
        self.drop_every.is_none()
            && self.reorder_every.is_none()
            && self.delay.is_zero()
            && !self.drop_handshake_responses
    }

    /// A short description for people, e.g. `drop every 10th data, delay 40ms`.
    pub fn describe(&self) -> String {
        let what = match self.count {
            Count::Data => "data",
            Count::All => "datagram",
        };
        let mut parts = Vec::new();
        if let Some(k) = self.drop_every {
            parts.push(format!("drop every {} {what}", ordinal(k)));
        }
        if let Some(m) = self.reorder_every {
            parts.push(format!("swap every {} pair of {what}s", ordinal(m)));
        }
        if !self.delay.is_zero() {
            parts.push(format!("delay {:?}", self.delay));
        }
        if self.drop_handshake_responses {
            parts.push("drop handshake responses".to_owned());
        }
        if parts.is_empty() {
            "pass".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

impl std::str::FromStr for DirRules {
    type Err = anyhow::Error;

    /// Comma-separated: `drop-every=K`, `reorder-every=M`, `delay=MS` (milliseconds),
    /// `drop-handshake-responses`, `count=data|all`; empty or `pass` for nothing. E.g.
    /// `drop-every=10,delay=40`.
    fn from_str(spec: &str) -> Result<Self> {
        let mut r = DirRules::default();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            let num = |v: Option<&str>| -> Result<u32> {
                let v = v.ok_or_else(|| anyhow!("`{key}` needs a value: `{key}=N`"))?;
                match v.parse::<u32>() {
                    Ok(n) if n > 0 || key == "delay" => Ok(n),
                    _ => Err(anyhow!("`{item}`: expected a positive whole number")),
                }
            };
            match key {
                "pass" if value.is_none() => {}
                "drop-every" => r.drop_every = Some(num(value)?),
                "reorder-every" => r.reorder_every = Some(num(value)?),
                "delay" => r.delay = Duration::from_millis(num(value)?.into()),
                "drop-handshake-responses" if value.is_none() => r.drop_handshake_responses = true,
                "count" => {
                    r.count = match value {
                        Some("data") => Count::Data,
                        Some("all") => Count::All,
                        _ => return Err(anyhow!("`{item}`: use count=data or count=all")),
                    }
                }
                _ => {
                    return Err(anyhow!(
                        "unknown impairment `{item}`: use drop-every=K, reorder-every=M, \
                         delay=MS, drop-handshake-responses, count=data|all"
                    ));
                }
            }
        }
        Ok(r)
    }
}

/// The rules of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impairment {
    /// Datagrams from the relay (upstream) to the client.
    pub to_client: DirRules,
    /// Datagrams from the client to the relay.
    pub to_relay: DirRules,
}

impl Impairment {
    /// Forwards everything unchanged.
    pub fn none() -> Self {
        Self::default()
    }

    /// The same fixed delay both ways: round trips take 2 x `delay` longer.
    pub fn delay(delay: Duration) -> Self {
        let d = DirRules {
            delay,
            ..Default::default()
        };
        Impairment {
            to_client: d,
            to_relay: d,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "to relay: {}; to client: {}",
            self.to_relay.describe(),
            self.to_client.describe()
        )
    }
}

/// What one direction did, since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStats {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent on.
    pub forwarded: u64,
    /// Received datagrams by WireGuard message type: index 1 initiation, 2 response, 3 cookie
    /// reply, 4 data; 0 anything else.
    pub messages: [u64; 5],
    /// Datagrams the drop and reorder rules counted.
    pub counted: u64,
    /// Dropped by `drop_every`.
    pub dropped: u64,
    /// Handshake responses dropped by `drop_handshake_responses`.
    pub dropped_handshake_responses: u64,
    /// Pairs sent in swapped order.
    pub reordered_pairs: u64,
    /// Datagrams that went through the delay queue.
    pub delayed: u64,
    /// Held datagrams sent alone when no partner came within [`HOLD_LIMIT`].
    pub unpaired: u64,
    /// Dropped because the delay queue was full.
    pub overflow: u64,
    /// Datagrams towards the client dropped before the client had sent anything.
    pub no_destination: u64,
    /// Sends that failed (e.g. ICMP port unreachable reported by the kernel).
    pub send_errors: u64,
}

/// Both directions' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImpairStats {
    pub to_client: DirStats,
    pub to_relay: DirStats,
}

/// The WireGuard message type of a datagram (1 to 4), or 0 when it is none: the first byte
/// is the type and the next three are zero.
pub fn message_type(d: &[u8]) -> u8 {
    match d {
        [t @ 1..=4, 0, 0, 0, ..] => *t,
        _ => 0,
    }
}

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

/// Where in the lab the impairing relay sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    /// In the hop namespace (needs `LabConfig::hop`), between the client and the first relay
    /// (entry, or the single relay): the client's peer endpoint of that relay is pointed at
    /// the hop's client-side address, port 51820; the relay then sees the client at the hop's
    /// other address. All of the client's WireGuard to that relay goes through it: in
    /// multihop, the entry layer, which carries the exit layer.
    Hop,
    /// Multihop only, in the entry namespace in front of the exit relay, on the entry's
    /// exit-side address port 51821: the client's exit peer endpoint points there, and the
    /// client's entry peer gets that address in its allowed IPs (and a route into wg), so the
    /// exit layer reaches it through the entry tunnel; the relay forwards it to the exit from
    /// its own socket. Only the exit layer goes through it: a delay here lengthens the exit
    /// peer's round trips and not the entry peer's. No new namespace and no change to the lab's
    /// addresses; everything is undone when the handle drops.
    Relays,
}

/// The port the relay listens on with [`Place::Relays`] (the entry's WireGuard has 51820).
pub const RELAYS_PORT: u16 = 51821;

/// A running impairing relay in a lab, see [`Lab::start_impairment`]. Use it like the
/// [`Impairer`] it derefs to (`set`, `stats`). Dropping it puts the client's configuration
/// back and stops the relay (threads and sockets gone).
pub struct ImpairHandle {
    relay: Option<Impairer>,
    place: Place,
    /// Commands, each run in a namespace, that undo the client's changes (in order).
    undo: Vec<(String, Vec<String>)>,
}

impl std::ops::Deref for ImpairHandle {
    type Target = Impairer;
    fn deref(&self) -> &Impairer {
        self.relay.as_ref().expect("running")
    }
}

impl ImpairHandle {
    pub fn place(&self) -> Place {
        self.place
    }

    /// Restores the client's configuration, stops the relay and returns its counters.
    pub fn stop(mut self) -> Result<ImpairStats> {
        let undone = self.restore();
        let stats = self.relay.take().expect("running").stop();
        undone.map(|()| stats)
    }

    fn restore(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        for (ns, argv) in self.undo.drain(..) {
            if let Err(e) = netns::exec(&ns, &argv) {
                failed.push(format!("{e:#}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("undoing the impairment: {}", failed.join("; ")))
        }
    }
}

impl Drop for ImpairHandle {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("{e:#}");
        }
    }
}

fn argv(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

impl Lab {
    /// Starts the impairing relay in the hop ([`Place::Hop`]): the lab needs `hop`.
    pub fn start_impairment(&self, rules: Impairment) -> Result<ImpairHandle> {
        self.start_impairment_at(Place::Hop, rules)
    }

    /// Starts the impairing relay at `place` with `rules` (see [`Place`]) and points the
    /// client at it. The client's sessions stay; only its endpoints change.
    pub fn start_impairment_at(&self, place: Place, rules: Impairment) -> Result<ImpairHandle> {
        let c = self.client();
        let cw = c.wg();
        let iface = cw.iface.as_str();
        let (ns, listen, upstream, steps): (String, SocketAddr, SocketAddr, Vec<(String, String)>) =
            match place {
                Place::Hop => {
                    let hop = self.hop().ok_or_else(|| {
                        anyhow!(
                            "lab `{}` has no hop: the impairing relay needs `--hop` \
                             (LabConfig::hop)",
                            self.prefix
                        )
                    })?;
                    let relay = self.first_relay();
                    let key = &relay.wg().public_key;
                    let listen = SocketAddr::new(hop.address().into(), RELAY_PORT);
                    let upstream = self.entry_endpoint();
                    let steps = vec![(
                        format!("wg set {iface} peer {key} endpoint {listen}"),
                        format!("wg set {iface} peer {key} endpoint {upstream}"),
                    )];
                    (hop.netns.clone(), listen, upstream, steps)
                }
                Place::Relays => {
                    let entry = self.entry().ok_or_else(|| {
                        anyhow!(
                            "lab `{}` is not multihop: no relays to impair between",
                            self.prefix
                        )
                    })?;
                    let exit = self.exit();
                    let at = entry.veths[1].address;
                    let listen = SocketAddr::new(at.into(), RELAYS_PORT);
                    let upstream = self.exit_endpoint();
                    let entry_peer = cw.peer(Role::Entry).expect("client has the entry peer");
                    let old = entry_peer.allowed_ips.join(",");
                    let (ek, xk) = (&entry.wg().public_key, &exit.wg().public_key);
                    let steps = vec![
                        (
                            format!("wg set {iface} peer {ek} allowed-ips {old},{at}/32"),
                            format!("wg set {iface} peer {ek} allowed-ips {old}"),
                        ),
                        (
                            format!("ip route add {at}/32 dev {iface}"),
                            format!("ip route del {at}/32 dev {iface}"),
                        ),
                        (
                            format!("wg set {iface} peer {xk} endpoint {listen}"),
                            format!("wg set {iface} peer {xk} endpoint {upstream}"),
                        ),
                    ];
                    (entry.netns.clone(), listen, upstream, steps)
                }
            };
        let relay = Impairer::start(Some(&ns), listen, upstream, rules)
            .with_context(|| format!("lab `{}`: impairing relay in {ns}", self.prefix))?;
        let mut handle = ImpairHandle {
            relay: Some(relay),
            place,
            undo: Vec::new(),
        };
        for (doit, undo) in steps {
            netns::exec(&c.netns, &argv(&doit))
                .with_context(|| format!("pointing the client at the impairing relay: {doit}"))?;
            handle.undo.insert(0, (c.netns.clone(), argv(&undo)));
        }
        Ok(handle)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udp::UdpEcho;

    const LO: &str = "127.0.0.1:0";

    /// A WireGuard-looking datagram of type `t` carrying the number `i`.
    fn msg(t: u8, i: u32) -> Vec<u8> {
        let mut d = vec![t, 0, 0, 0];
        d.extend_from_slice(&i.to_be_bytes());
        d.resize(32, 0);
        d
    }

    fn number(d: &[u8]) -> u32 {
        u32::from_be_bytes(d[4..8].try_into().unwrap())
    }

    fn recv_numbers(sock: &UdpSocket, n: usize, timeout: Duration) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            if let Ok(len) = sock.recv(&mut buf) {
                got.push(number(&buf[..len]));
            }
        }
        got
    }

    #[test]
    fn message_types() {
        assert_eq!(message_type(&[4, 0, 0, 0, 1]), 4);
        assert_eq!(message_type(&[1, 0, 0, 0]), 1);
        assert_eq!(message_type(&[4, 0, 1, 0]), 0);
        assert_eq!(message_type(&[5, 0, 0, 0]), 0);
        assert_eq!(message_type(&[4, 0]), 0);
    }

    #[test]
    fn parses_rules() {
        let r: DirRules = "drop-every=10, delay=40,count=all".parse().unwrap();
        assert_eq!(
            r,
            DirRules {
                count: Count::All,
                drop_every: Some(10),
                delay: Duration::from_millis(40),
                ..Default::default()
            }
        );
        let r: DirRules = "reorder-every=5,drop-handshake-responses".parse().unwrap();
        assert_eq!(r.reorder_every, Some(5));
        assert!(r.drop_handshake_responses);
        assert_eq!("".parse::<DirRules>().unwrap(), DirRules::default());
        assert_eq!("pass".parse::<DirRules>().unwrap(), DirRules::default());
        for bad in [
            "drop-every=0",
            "drop-every",
            "delay=x",
            "jitter=3",
            "count=some",
        ] {
            assert!(bad.parse::<DirRules>().is_err(), "{bad}");
        }
    }

    #[test]
    fn describes_rules() {
        let r = DirRules {
            drop_every: Some(10),
            delay: Duration::from_millis(40),
            ..Default::default()
        };
        assert_eq!(r.describe(), "drop every 10th data, delay 40ms");
        assert_eq!(DirRules::default().describe(), "pass");
        let r: DirRules = "reorder-every=2,drop-every=21,count=all".parse().unwrap();
        assert_eq!(
            r.describe(),
            "drop every 21st datagram, swap every 2nd pair of datagrams"
        );
        let i = Impairment::delay(Duration::from_millis(40));
        let json = serde_json::to_string(&i.to_client).unwrap();
        assert!(json.contains("\"delay_ms\":40"), "{json}");
        assert_eq!(
            serde_json::from_str::<DirRules>(&json).unwrap(),
            i.to_client
        );
        assert!(DirRules::default().is_noop());
    }

    #[test]
    fn drops_every_kth_data_message_towards_the_client() {
        let up = UdpSocket::bind(LO).unwrap();
        let echo = UdpEcho::with_socket(up, 110, Duration::from_secs(10)).unwrap();
        let rules = Impairment {
            to_client: DirRules {
                drop_every: Some(10),
                ..Default::default()
            },
            ..Default::default()
        };
        let imp = Impairer::start(None, LO.parse().unwrap(), echo.local_addr(), rules).unwrap();
        let client = UdpSocket::bind(LO).unwrap();
        // Handshake-like datagrams are not counted and pass.
        for i in 0..5 {
            client
                .send_to(&msg(1, 1000 + i), imp.listen_addr())
                .unwrap();
        }
        for i in 0..100 {
            client.send_to(&msg(4, i), imp.listen_addr()).unwrap();
        }
        let got = recv_numbers(&client, 105, Duration::from_secs(3));
        assert_eq!(got.len(), 95, "{got:?}");
        let data: Vec<u32> = got.iter().copied().filter(|n| *n < 1000).collect();
        let want: Vec<u32> = (0..100).filter(|i| (i + 1) % 10 != 0).collect();
        assert_eq!(data, want);
        let s = imp.stop();
        assert_eq!(s.to_client.dropped, 10);
        assert_eq!(s.to_client.counted, 100);
        assert_eq!(s.to_client.messages[4], 100);
        assert_eq!(s.to_client.messages[1], 5);
        assert_eq!(s.to_client.forwarded, 95);
        assert_eq!(s.to_relay.forwarded, 105);
        assert_eq!(s.to_relay.dropped, 0);
        assert_eq!(echo.stop().unwrap(), 105);
    }

    #[test]
    fn swaps_every_mth_pair_and_counts_all() {
        let sink = UdpSocket::bind(LO).unwrap();
        let rules = Impairment {
            to_relay: DirRules {
                count: Count::All,
                reorder_every: Some(5),
                ..Default::default()
            },
            ..Default::default()
        };
        let imp =
            Impairer::start(None, LO.parse().unwrap(), sink.local_addr().unwrap(), rules).unwrap();
        let client = UdpSocket::bind(LO).unwrap();
        for i in 0..100 {
            // Types vary: Count::All counts every datagram.
            client
                .send_to(&msg(if i % 3 == 0 { 1 } else { 4 }, i), imp.listen_addr())
                .unwrap();
        }
        let got = recv_numbers(&sink, 100, Duration::from_secs(3));
        let mut want: Vec<u32> = (0..100).collect();
        // Pairs are (0,1), (2,3), ...: pairs 5, 10, ... (1-based) are swapped.
        for p in (5..=50).step_by(5) {
            want.swap(2 * p - 2, 2 * p - 1);
        }
        assert_eq!(got, want);
        let s = imp.stats();
        assert_eq!(s.to_relay.reordered_pairs, 10);
        assert_eq!(s.to_relay.unpaired, 0);
        // A held datagram without a partner goes out alone after HOLD_LIMIT.
        imp.set(Impairment {
            to_relay: DirRules {
                reorder_every: Some(1),
                ..Default::default()
            },
            ..Default::default()
        });
        std::thread::sleep(Duration::from_millis(50));
        client.send_to(&msg(4, 7), imp.listen_addr()).unwrap();
        let t = Instant::now();
        assert_eq!(recv_numbers(&sink, 1, Duration::from_secs(2)), [7]);
        assert!(t.elapsed() >= HOLD_LIMIT - Duration::from_millis(5));
        assert_eq!(imp.stop().to_relay.unpaired, 1);
    }

    #[test]
    fn delays_both_ways_in_order() {
        let up = UdpSocket::bind(LO).unwrap();
        let echo = UdpEcho::with_socket(up, 20, Duration::from_secs(10)).unwrap();
        let d = Duration::from_millis(30);
        let imp = Impairer::start(
            None,
            LO.parse().unwrap(),
            echo.local_addr(),
            Impairment::delay(d),
        )
        .unwrap();
        let client = UdpSocket::bind(LO).unwrap();
        let t = Instant::now();
        for i in 0..20 {
            client.send_to(&msg(4, i), imp.listen_addr()).unwrap();
        }
        let got = recv_numbers(&client, 20, Duration::from_secs(3));
        assert!(t.elapsed() >= 2 * d, "{:?}", t.elapsed());
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        let s = imp.stop();
        assert_eq!((s.to_relay.delayed, s.to_client.delayed), (20, 20));
    }

    #[test]
    fn drops_handshake_responses() {
        let up = UdpSocket::bind(LO).unwrap();
        let rules = Impairment {
            to_client: DirRules {
                drop_handshake_responses: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let imp =
            Impairer::start(None, LO.parse().unwrap(), up.local_addr().unwrap(), rules).unwrap();
        let client = UdpSocket::bind(LO).unwrap();
        client.send_to(&msg(1, 0), imp.listen_addr()).unwrap();
        let mut buf = [0u8; 64];
        up.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (_, from) = up.recv_from(&mut buf).unwrap();
        for (t, i) in [(2, 1), (4, 2), (2, 3), (3, 4)] {
            up.send_to(&msg(t, i), from).unwrap();
        }
        assert_eq!(recv_numbers(&client, 4, Duration::from_millis(500)), [2, 4]);
        let s = imp.stop();
        assert_eq!(s.to_client.dropped_handshake_responses, 2);
        assert_eq!(s.to_client.messages, [0, 0, 2, 1, 1]);
    }
}
