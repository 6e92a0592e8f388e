//! An in-process WireGuard load generator: many simulated clients, each with its own static
//! key and its own UDP socket (a distinct source port), each doing real handshakes with one
//! relay through `defguard_boringtun`'s `noise::Tunn` (no TUN device), then sending inner
//! IPv4/UDP packets of one known size to an echo inside the relay's network and counting,
//! per public key, the inner packets it sent and the echoes that came back.
//!
//! Built for the churn bench ([`crate::bench::churn`]): thousands of distinct active peers
//! at a low packet rate, with exact per-peer counts to hold the agent's counters to. A
//! client can be switched to a fresh key (and tunnel address) while the others run on, as
//! when a relay's peer is replaced. Everything runs on one thread (a current-thread tokio
//! runtime) that entered the client's network namespace, so every socket lives there.
//!
//! Counting: an inner packet counts as sent when a data message carrying it is written to
//! the socket (boringtun queues packets while no session exists and sends them later, so
//! the datagram is what counts, not the call), and as received when a data message
//! decrypts to an echo of one (source the sink, destination this client, the same length).

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use base64::Engine as _;
use defguard_boringtun::noise::{Tunn, TunnResult};
use defguard_boringtun::x25519::{PublicKey, StaticSecret};
use nix::sched::{CloneFlags, setns};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::netns;

/// WireGuard message types (the first byte of every message).
const MSG_INITIATION: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;
/// A data message with an empty plaintext: 16-byte header and the 16-byte tag.
const KEEPALIVE_LEN: usize = 32;
/// The smallest inner packet: an IPv4 header and a UDP header.
pub const MIN_INNER_LEN: usize = 28;
/// boringtun wants at least this much room for any message it writes.
const MIN_BUF: usize = 148;
/// How often each client runs boringtun's timers (handshake retries, rekeying,
/// keepalives); its own device does it every 250 ms, but nothing here needs that precision.
const TIMER_TICK: Duration = Duration::from_millis(500);
/// The inner UDP source port of every client (each has its own address).
const INNER_SOURCE_PORT: u16 = 40_000;

/// A WireGuard static key pair.
pub struct Key {
    secret: StaticSecret,
    public: PublicKey,
}

impl Key {
    pub fn generate() -> Key {
        Key::from_secret(StaticSecret::random())
    }

    pub fn from_secret(secret: StaticSecret) -> Key {
        let public = PublicKey::from(&secret);
        Key { secret, public }
    }

    /// The public key in standard base64, as `wg` prints it and the agent labels peers.
    pub fn public_b64(&self) -> String {
        b64(self.public.as_bytes())
    }
}

/// Standard base64 with padding.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A public key from its standard base64.
pub fn parse_public(text: &str) -> Result<PublicKey> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .with_context(|| format!("public key {text:?} is not base64"))?;
    let bytes: [u8; 32] = raw
        .try_into()
        .map_err(|v: Vec<u8>| anyhow!("public key {text:?} has {} bytes, not 32", v.len()))?;
    Ok(PublicKey::from(bytes))
}

/// The `n`th address after `base` (wrapping is a caller's error: the churn bench stays in a
/// /16).
pub fn nth_ip(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(n))
}

/// `[Peer]` sections for `wg addconf`: each public key with its /32.
pub fn addconf(peers: &[(String, Ipv4Addr)]) -> String {
    peers
        .iter()
        .map(|(key, ip)| format!("[Peer]\nPublicKey = {key}\nAllowedIPs = {ip}/32\n"))
        .collect()
}

/// The arguments of one `wg set IFACE ...` that removes the peers `old` and adds `new`
/// (public key, /32): one UAPI transaction, as a relay replacing peers in bulk would do.
pub fn replace_args(iface: &str, old: &[String], new: &[(String, Ipv4Addr)]) -> Vec<String> {
    let mut args = vec!["wg".to_owned(), "set".to_owned(), iface.to_owned()];
    for key in old {
        args.extend(["peer".to_owned(), key.clone(), "remove".to_owned()]);
    }
    for (key, ip) in new {
        args.extend([
            "peer".to_owned(),
            key.clone(),
            "allowed-ips".to_owned(),
            format!("{ip}/32"),
        ]);
    }
    args
}

/// An IPv4/UDP packet from `src` to `dst` of exactly `len` bytes (L3, header included),
/// its payload `seq` (little endian) then zeros.
pub fn inner_packet(src: SocketAddrV4, dst: SocketAddrV4, len: usize, seq: u64) -> Result<Vec<u8>> {
    if !(MIN_INNER_LEN + 8..=1500).contains(&len) {
        bail!(
            "inner packet of {len} bytes: use {} to 1500",
            MIN_INNER_LEN + 8
        );
    }
    let mut payload = vec![0u8; len - MIN_INNER_LEN];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    let builder = etherparse::PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(len);
    builder
        .write(&mut out, &payload)
        .context("building an inner packet")?;
    Ok(out)
}

/// Whether `packet` is an echo for `me` from `sink` of `len` bytes: IPv4/UDP, source
/// `sink`, destination `me`, L3 length `len`.
pub fn is_echo(packet: &[u8], me: SocketAddrV4, sink: SocketAddrV4, len: usize) -> bool {
    let Ok(p) = etherparse::SlicedPacket::from_ip(packet) else {
        return false;
    };
    let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Udp(udp))) =
        (p.net, p.transport)
    else {
        return false;
    };
    let h = ip.header();
    packet.len() == len
        && usize::from(h.total_len()) == len
        && SocketAddrV4::new(h.source_addr(), udp.source_port()) == sink
        && SocketAddrV4::new(h.destination_addr(), udp.destination_port()) == me
}

/// What a datagram a client writes is, by its type byte and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Initiation,
    Response,
    Cookie,
    Keepalive,
    /// A data message carrying an inner packet.
    Data,
}

pub fn classify(datagram: &[u8]) -> Option<Message> {
    match (datagram.first()?, datagram.len()) {
        (&MSG_INITIATION, 148) => Some(Message::Initiation),
        (&MSG_RESPONSE, 92) => Some(Message::Response),
        (&MSG_COOKIE, 64) => Some(Message::Cookie),
        (&MSG_DATA, KEEPALIVE_LEN) => Some(Message::Keepalive),
        (&MSG_DATA, n) if n > KEEPALIVE_LEN => Some(Message::Data),
        _ => None,
    }
}

/// What one public key sent and got back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Inner packets written to the relay inside data messages.
    pub sent: u64,
    /// Echoes of them that came back.
    pub received: u64,
    /// Decrypted packets that were no echo of ours (never expected).
    pub unexpected: u64,
    /// Handshakes completed (the initial one and rekeys).
    pub handshakes: u64,
}

/// The tallies of every key a client has used, by public key (base64).
#[derive(Debug, Default, Clone)]
pub struct Tallies(Arc<Mutex<HashMap<String, Tally>>>);

impl Tallies {
    fn update(&self, key: &str, f: impl FnOnce(&mut Tally)) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(map.entry(key.to_owned()).or_default());
    }

    /// A key's tally so far (zeros for a key never used).
    pub fn get(&self, key: &str) -> Tally {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key).copied().unwrap_or_default()
    }

    /// The sum over every key.
    pub fn total(&self) -> Tally {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().fold(Tally::default(), |a, t| Tally {
            sent: a.sent + t.sent,
            received: a.received + t.received,
            unexpected: a.unexpected + t.unexpected,
            handshakes: a.handshakes + t.handshakes,
        })
    }
}

/// How the clients reach the relay and what they send.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The relay's WireGuard endpoint.
    pub relay: SocketAddr,
    /// The relay's public key.
    pub relay_public: String,
    /// The local address every client's socket binds (each gets its own port).
    pub bind: Ipv4Addr,
    /// The UDP echo inside the relay's network that inner packets go to.
    pub sink: SocketAddrV4,
    /// L3 length of every inner packet.
    pub inner_len: usize,
    /// Each client sends one inner packet this often (phases spread evenly).
    pub interval: Duration,
    /// At most this many handshake initiations a second for the first handshakes and after
    /// switches (not retries): a burst would put wireguard-go "under load", where it answers
    /// with cookies and rate-limits per source address.
    pub handshakes_per_sec: u32,
}

/// A client's starting identity: its key and tunnel address.
pub struct ClientSpec {
    pub key: Key,
    pub ip: Ipv4Addr,
}

enum Cmd {
    /// Stop sending data at once (handshakes and keepalives go on).
    Pause,
    /// Drop the current session and key; after `after`, take `key` and `ip`, handshake
    /// and send again.
    Switch { spec: ClientSpec, after: Duration },
}

/// Shared between the clients and [`Load`].
struct Shared {
    cfg: LoadConfig,
    relay_public: PublicKey,
    tallies: Tallies,
    /// Clients whose current key has completed a handshake.
    established: AtomicUsize,
    /// No client sends data while set.
    quiet: AtomicBool,
    /// Hands out handshake slots at `handshakes_per_sec`.
    pacer: tokio::sync::Mutex<tokio::time::Interval>,
}

/// A running load: its clients on a thread of their own in the client namespace.
pub struct Load {
    cmds: Vec<mpsc::UnboundedSender<Cmd>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Load {
    /// Binds one socket per client in `ns` (None: this process's namespace) and starts
    /// them: each waits for its handshake slot, handshakes, then sends one inner packet per
    /// `interval`. Returns once every socket is bound.
    pub fn start(ns: Option<&str>, cfg: LoadConfig, clients: Vec<ClientSpec>) -> Result<Load> {
        if cfg.handshakes_per_sec == 0 || cfg.interval.is_zero() {
            bail!("the load needs a handshake rate and a send interval above 0");
        }
        // Validates the size once, so the clients can build packets without failing.
        inner_packet(
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            cfg.sink,
            cfg.inner_len,
            0,
        )?;
        raise_fd_limit(clients.len() + 256)?;
        let relay_public = parse_public(&cfg.relay_public)?;
        let ns_file = ns
            .map(|ns| {
                File::open(netns::path(ns))
                    .with_context(|| format!("opening network namespace {ns}"))
            })
            .transpose()?;
        // Built here, moved to the load's thread: the pacer's timer needs its context.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the load's runtime")?;
        let mut pacer = {
            let _in_rt = rt.enter();
            tokio::time::interval(Duration::from_secs(1) / cfg.handshakes_per_sec)
        };
        pacer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shared = Arc::new(Shared {
            cfg,
            relay_public,
            tallies: Tallies::default(),
            established: AtomicUsize::new(0),
            quiet: AtomicBool::new(false),
            pacer: tokio::sync::Mutex::new(pacer),
        });
        let (mut cmds, mut inboxes) = (Vec::new(), Vec::new());
        for _ in &clients {
            let (tx, rx) = mpsc::unbounded_channel();
            cmds.push(tx);
            inboxes.push(rx);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let sh = shared.clone();
        let name = ns.unwrap_or("here").to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("wgload-{name}"))
            .spawn(move || -> Result<()> {
                let started = (|| -> Result<_> {
                    if let Some(f) = &ns_file {
                        setns(f, CloneFlags::CLONE_NEWNET)
                            .with_context(|| format!("setns into {name}"))?;
                    }
                    let sockets = rt.block_on(async {
                        clients
                            .iter()
                            .map(|_| {
                                let s = std::net::UdpSocket::bind((sh.cfg.bind, 0))?;
                                s.connect(sh.cfg.relay)?;
                                s.set_nonblocking(true)?;
                                tokio::net::UdpSocket::from_std(s)
                            })
                            .collect::<std::io::Result<Vec<_>>>()
                    });
                    let sockets = sockets.with_context(|| {
                        format!("binding {} UDP sockets on {}", clients.len(), sh.cfg.bind)
                    })?;
                    Ok((rt, sockets))
                })();
                let (rt, sockets) = match started {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let n = clients.len();
                rt.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for (slot, ((spec, sock), inbox)) in
                        clients.into_iter().zip(sockets).zip(inboxes).enumerate()
                    {
                        // Phases spread evenly over the interval, so the relay sees a
                        // steady rate rather than bursts.
                        let phase = sh.cfg.interval.mul_f64(slot as f64 / n as f64);
                        tasks.spawn(run_client(slot, spec, sock, inbox, sh.clone(), phase));
                    }
                    while let Some(r) = tasks.join_next().await {
                        r.context("a load client panicked")??;
                    }
                    Ok(())
                })
            })
            .context("spawning the load thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("the load thread ended before binding its sockets"),
        }
        Ok(Load {
            cmds,
            shared,
            thread: Some(thread),
        })
    }

    /// Clients whose current key has a session.
    pub fn established(&self) -> usize {
        self.shared.established.load(Ordering::Relaxed)
    }

    pub fn tallies(&self) -> &Tallies {
        &self.shared.tallies
    }

    /// Stops (true) or resumes (false) every client's data.
    pub fn set_quiet(&self, quiet: bool) {
        self.shared.quiet.store(quiet, Ordering::Relaxed);
    }

    /// Stops client `slot`'s data at once.
    pub fn pause(&self, slot: usize) -> Result<()> {
        self.send(slot, Cmd::Pause)
    }

    /// Client `slot` drops its key and, after `after`, handshakes with `spec`'s and sends.
    pub fn switch(&self, slot: usize, spec: ClientSpec, after: Duration) -> Result<()> {
        self.send(slot, Cmd::Switch { spec, after })
    }

    fn send(&self, slot: usize, cmd: Cmd) -> Result<()> {
        self.cmds
            .get(slot)
            .ok_or_else(|| anyhow!("no load client {slot}"))?
            .send(cmd)
            .map_err(|_| anyhow!("load client {slot} has stopped"))
    }

    /// Stops every client and reports the first failure of any.
    pub fn stop(mut self) -> Result<()> {
        self.cmds.clear();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("the load thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.cmds.clear();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lets this process hold `want` file descriptors (the soft limit is often 1024). Start the
/// agent before, so that it keeps the limit it would have under systemd.
pub fn raise_fd_limit(want: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit NOFILE")?;
    let want = want as u64;
    if soft >= want {
        return Ok(());
    }
    if hard < want {
        bail!("the load needs {want} file descriptors, the hard limit is {hard}");
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard).context("setrlimit NOFILE")
}

/// One client's session with the relay under its current key.
struct Session {
    tunn: Tunn,
    key: String,
    me: SocketAddrV4,
    established: bool,
}

impl Session {
    fn new(slot: usize, spec: ClientSpec, sh: &Shared) -> Session {
        // The index only has to be unique among this client's sessions; boringtun shifts
        // it left by 8 bits and counts sessions in the low byte.
        let index = (slot as u32) & 0x00ff_ffff;
        let key = spec.key.public_b64();
        Session {
            tunn: Tunn::new(spec.key.secret, sh.relay_public, None, None, index, None),
            key,
            me: SocketAddrV4::new(spec.ip, INNER_SOURCE_PORT),
            established: false,
        }
    }
}

async fn run_client(
    slot: usize,
    spec: ClientSpec,
    sock: tokio::net::UdpSocket,
    mut inbox: mpsc::UnboundedReceiver<Cmd>,
    sh: Arc<Shared>,
    phase: Duration,
) -> Result<()> {
    let cfg = &sh.cfg;
    let mut buf = vec![0u8; (cfg.inner_len + 64).max(MIN_BUF)];
    let mut rx = vec![0u8; 2048];
    let mut session = Some(Session::new(slot, spec, &sh));
    let mut pending: Option<(ClientSpec, Instant)> = None;
    let mut sending = true;
    let mut seq = 0u64;
    let mut timers = tokio::time::interval(TIMER_TICK);
    timers.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_send = Instant::now() + phase;
    handshake(&sock, session.as_mut(), &sh, &mut buf).await?;
    loop {
        let switch_at = pending.as_ref().map(|(_, at)| *at);
        tokio::select! {
            cmd = inbox.recv() => match cmd {
                None => return Ok(()),
                Some(Cmd::Pause) => sending = false,
                Some(Cmd::Switch { spec, after }) => {
                    if session.take().is_some_and(|s| s.established) {
                        sh.established.fetch_sub(1, Ordering::Relaxed);
                    }
                    pending = Some((spec, Instant::now() + after));
                }
            },
            _ = tokio::time::sleep_until(switch_at.unwrap_or_else(Instant::now)), if switch_at.is_some() => {
                if let Some((spec, _)) = pending.take() {
                    session = Some(Session::new(slot, spec, &sh));
                    sending = true;
                    handshake(&sock, session.as_mut(), &sh, &mut buf).await?;
                }
            }
            r = sock.recv(&mut rx) => {
                let n = match r {
                    Ok(n) => n,
                    // ICMP port unreachable from an earlier send, reported on a connected
                    // socket: nothing to count.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e).context("receiving from the relay"),
                };
                // Datagrams for a key already dropped have no session to go to.
                if let Some(s) = session.as_mut() {
                    receive(&sock, s, &rx[..n], &sh, &mut buf).await?;
                }
            }
            _ = timers.tick() => {
                if let Some(s) = session.as_mut() {
                    let r = s.tunn.update_timers(&mut buf);
                    write_out(&sock, s, r, &sh).await?;
                }
            }
            _ = tokio::time::sleep_until(next_send) => {
                next_send += cfg.interval;
                if let Some(s) = session.as_mut()
                    && sending
                    && s.established
                    && !sh.quiet.load(Ordering::Relaxed)
                {
                    let packet = inner_packet(s.me, cfg.sink, cfg.inner_len, seq)?;
                    seq += 1;
                    let r = s.tunn.encapsulate(&packet, &mut buf);
                    write_out(&sock, s, r, &sh).await?;
                }
            }
        }
    }
}

/// Waits for a handshake slot and sends the session's first initiation (boringtun's timers
/// retry it).
async fn handshake(
    sock: &tokio::net::UdpSocket,
    session: Option<&mut Session>,
    sh: &Shared,
    buf: &mut [u8],
) -> Result<()> {
    let Some(s) = session else { return Ok(()) };
    sh.pacer.lock().await.tick().await;
    let r = s.tunn.format_handshake_initiation(buf, false);
    write_out(sock, s, r, sh).await
}

/// Feeds a datagram from the relay to the session, then drains what it queued.
async fn receive(
    sock: &tokio::net::UdpSocket,
    s: &mut Session,
    datagram: &[u8],
    sh: &Shared,
    buf: &mut [u8],
) -> Result<()> {
    let r = s.tunn.decapsulate(None, datagram, buf);
    let wrote = matches!(r, TunnResult::WriteToNetwork(_));
    // A response that boringtun accepted is answered with a keepalive.
    if wrote && classify(datagram) == Some(Message::Response) {
        if !s.established {
            s.established = true;
            sh.established.fetch_add(1, Ordering::Relaxed);
        }
        sh.tallies.update(&s.key, |t| t.handshakes += 1);
    }
    write_out(sock, s, r, sh).await?;
    // "repeat the call with empty datagram, until TunnResult::Done" (boringtun's contract
    // after a WriteToNetwork): that sends what was queued during the handshake.
    if wrote {
        loop {
            let r = s.tunn.decapsulate(None, &[], buf);
            if !matches!(r, TunnResult::WriteToNetwork(_)) {
                break;
            }
            write_out(sock, s, r, sh).await?;
        }
    }
    Ok(())
}

/// Sends what boringtun asked to send and counts what it carried; counts a decrypted echo.
async fn write_out(
    sock: &tokio::net::UdpSocket,
    s: &Session,
    r: TunnResult<'_>,
    sh: &Shared,
) -> Result<()> {
    match r {
        TunnResult::WriteToNetwork(d) => {
            if let Err(e) = sock.send(d).await {
                // The relay's port unreachable for a moment is a lost datagram, as on a
                // network; the counts only include datagrams handed to the kernel.
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    return Ok(());
                }
                return Err(e).context("sending to the relay");
            }
            if classify(d) == Some(Message::Data) {
                sh.tallies.update(&s.key, |t| t.sent += 1);
            }
        }
        TunnResult::WriteToTunnelV4(p, _) => {
            let echo = is_echo(p, s.me, sh.cfg.sink, sh.cfg.inner_len);
            sh.tallies.update(&s.key, |t| {
                if echo {
                    t.received += 1
                } else {
                    t.unexpected += 1
                }
            });
        }
        TunnResult::WriteToTunnelV6(..) => sh.tallies.update(&s.key, |t| t.unexpected += 1),
        // Errors are the relay's messages for a session already gone (after a switch) or
        // a handshake retried by the timers: the protocol recovers, the counts stay exact.
        TunnResult::Done | TunnResult::Err(_) => {}
    }
    Ok(())
}

#[cfg(test)]
#[path = "wgload_tests.rs"]
mod tests;
