//! Active probes: ICMP echo (IPv4 and IPv6) to each target every interval, through the
//! target's interface when one is given (SO_BINDTODEVICE), like `ping -i 5 -I wg0 10.64.0.1`.
//! A probe without a reply within the timeout is lost.
//!
//! The target set is the static `--probe` targets plus whatever the `extra` closure given to
//! [`spawn`] returns (the Mullvad poller: 10.64.0.1 through wg0-mullvad while connected),
//! looked at on every interval. A target that leaves the set stops being probed; its
//! outstanding probes still end (reply or timeout) first, so `sent == replies + lost` holds
//! for it from then on. Its series stay (counters never vanish).
//!
//! Counting, per (target, interface): `sent` when a probe is handed to the kernel (or could
//! not be: a send that fails, or a socket that cannot be opened, e.g. the interface does not
//! exist, counts as sent and at once lost, so a dead path shows as 100 % loss, not as
//! silence); `lost` when its timeout passes without a reply; otherwise its round trip goes
//! into the histogram. Between probes, `sent - lost - rtt_count` is the number in flight.
//!
//! The ICMP sockets are this module's own, small (see [`IcmpSocket`]): raw sockets
//! (CAP_NET_RAW, which the privileged agent has), falling back to unprivileged ping sockets
//! (SOCK_DGRAM, when `net.ipv4.ping_group_range` allows). Each socket is connected to its
//! target and tags its echoes with a random identifier and a random 8-byte token at the start
//! of the payload, so replies to other sockets (a raw socket sees every ICMP packet of the
//! namespace: ping, the path-MTU search) are never counted. The path-MTU search
//! ([`crate::probes::pmtu`]) uses the same sockets with don't-fragment probing on.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::{self, Read as _},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::config::{ProbeConfig, ProbeTarget};

/// Upper bounds (seconds) of the RTT histogram's buckets: 100 µs to 10 s, 1-2.5-5 steps.
pub const RTT_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The ICMP payload of a probe: the token plus padding, 56 bytes like ping's default (an
/// 84-byte IPv4 packet).
pub const PROBE_PAYLOAD: usize = 56;
const TOKEN_LEN: usize = 8;
/// Receive errors in a row after which a socket is reopened.
pub const MAX_RECV_ERRORS: u32 = 16;
const ICMP_HEADER: usize = 8;

/// Outcomes kept per target for [`ProbeStats::window`]: at most this many, none older than
/// [`KEEP_FOR`].
const KEEP_OUTCOMES: usize = 100_000;
const KEEP_FOR: Duration = Duration::from_secs(3600);

/// A probe target as a map key: (address, interface; empty when none).
pub type TargetKey = (IpAddr, String);

pub fn key_of(t: &ProbeTarget) -> TargetKey {
    (t.target, t.iface.clone().unwrap_or_default())
}

/// The counters and recent outcomes of one target.
#[derive(Clone, Debug, Default)]
pub struct TargetStats {
    pub sent: u64,
    pub lost: u64,
    /// Replies: the histogram's count.
    pub replies: u64,
    pub rtt_sum: f64,
    /// Per bucket of [`RTT_BUCKETS`], non-cumulative; the last one is +Inf.
    pub buckets: [u64; RTT_BUCKETS.len() + 1],
    /// (when sent, round trip or None for lost), oldest first.
    recent: VecDeque<(Instant, Option<Duration>)>,
}

impl TargetStats {
    fn sent(&mut self) {
        self.sent += 1;
    }

    /// `known_at`: when the outcome became known (a reply's arrival, a loss's timeout), so
    /// `recent` stays in time order and a loss falls in the window that ends after it.
    fn resolve(&mut self, known_at: Instant, rtt: Option<Duration>) {
        match rtt {
            Some(d) => {
                let s = d.as_secs_f64();
                self.replies += 1;
                self.rtt_sum += s;
                let i = RTT_BUCKETS
                    .iter()
                    .position(|le| s <= *le)
                    .unwrap_or(RTT_BUCKETS.len());
                self.buckets[i] += 1;
            }
            None => self.lost += 1,
        }
        self.recent.push_back((known_at, rtt));
        while self.recent.len() > KEEP_OUTCOMES {
            self.recent.pop_front();
        }
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > KEEP_FOR)
        {
            self.recent.pop_front();
        }
    }

    /// (bucket upper bound, count in that bucket) as prometheus-client's encoder wants them.
    pub fn encoder_buckets(&self) -> Vec<(f64, u64)> {
        RTT_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().copied())
            .collect()
    }
}

/// What the probes measured, shared with the collector and the failover logic.
#[derive(Debug, Default)]
pub struct ProbeStats {
    targets: Mutex<BTreeMap<TargetKey, TargetStats>>,
}

impl ProbeStats {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, key: &TargetKey, f: impl FnOnce(&mut TargetStats) -> R) -> Option<R> {
        let mut m = self.targets.lock().ok()?;
        Some(f(m.entry(key.clone()).or_default()))
    }

    /// Every target ever probed with its counters.
    pub fn snapshot(&self) -> BTreeMap<TargetKey, TargetStats> {
        self.targets.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Probes to `target` sent in the last `window` whose outcome is known: (sent, lost,
    /// round trips of the others). Probes still in flight are not counted, so
    /// `sent == lost + rtts.len()`. (0, 0, []) for a target never probed.
    pub fn window(&self, target: &ProbeTarget, window: Duration) -> (u64, u64, Vec<Duration>) {
        let key = key_of(target);
        let Ok(m) = self.targets.lock() else {
            return (0, 0, Vec::new());
        };
        let Some(s) = m.get(&key) else {
            return (0, 0, Vec::new());
        };
        let now = Instant::now();
        let (mut sent, mut lost, mut rtts) = (0, 0, Vec::new());
        for (at, rtt) in s.recent.iter().rev() {
            if now.saturating_duration_since(*at) > window {
                break;
            }
            sent += 1;
            match rtt {
                Some(d) => rtts.push(*d),
                None => lost += 1,
            }
        }
        rtts.reverse();
        (sent, lost, rtts)
    }
}

/// The targets to probe now: the static ones, then the extra ones not already among them.
pub fn target_set(
    cfg: &ProbeConfig,
    extra: &(dyn Fn() -> Vec<ProbeTarget> + Send + Sync),
) -> Vec<ProbeTarget> {
    let mut out: Vec<ProbeTarget> = Vec::new();
    for t in cfg.targets.iter().cloned().chain(extra()) {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// The dynamic targets, e.g. from the Mullvad poller.
pub type ExtraTargets = Arc<dyn Fn() -> Vec<ProbeTarget> + Send + Sync>;

/// Starts probing: one task per target, re-evaluating the target set every interval, until
/// `stop` turns true. Await the handle to know every target's task has ended.
pub fn spawn(
    cfg: ProbeConfig,
    extra: ExtraTargets,
    stats: Arc<ProbeStats>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut running: HashMap<TargetKey, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        let mut tick = tokio::time::interval(cfg.interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let want = target_set(&cfg, extra.as_ref());
            let keys: Vec<TargetKey> = want.iter().map(key_of).collect();
            running.retain(|k, (tx, _)| {
                if keys.contains(k) {
                    true
                } else {
                    info!("probes to {}{}: stopped", k.0, at_iface(&k.1));
                    let _ = tx.send(true);
                    false
                }
            });
            for t in want {
                let k = key_of(&t);
                if running.contains_key(&k) {
                    continue;
                }
                info!(
                    "probing {}{} every {:?} (timeout {:?})",
                    t.target,
                    at_iface(&k.1),
                    cfg.interval,
                    cfg.timeout
                );
                let (tx, rx) = watch::channel(false);
                let h = tokio::spawn(probe_target(
                    t,
                    cfg.interval,
                    cfg.timeout,
                    stats.clone(),
                    rx,
                ));
                running.insert(k, (tx, h));
            }
        }
        for (_, (tx, h)) in running.drain() {
            let _ = tx.send(true);
            // At a stop, probes in flight need not run to their timeout.
            h.abort();
            let _ = h.await;
        }
    })
}

fn at_iface(iface: &str) -> String {
    if iface.is_empty() {
        String::new()
    } else {
        format!(" via {iface}")
    }
}

/// Probes one target until `stop`; then lets the probes in flight end.
async fn probe_target(
    target: ProbeTarget,
    interval: Duration,
    timeout: Duration,
    stats: Arc<ProbeStats>,
    mut stop: watch::Receiver<bool>,
) {
    let key = key_of(&target);
    // Make the series exist from the start, at 0.
    stats.with(&key, |_| ());
    let mut sock: Option<IcmpSocket> = None;
    let mut open_error_logged = false;
    let mut seq: u16 = 0;
    // seq -> when sent
    let mut pending: BTreeMap<u16, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    // Receive errors in a row: ICMP errors come one per packet; a socket that keeps failing
    // is reopened at the next probe (its probes in flight end by their timeout).
    let mut recv_errors = 0u32;
    loop {
        if stopping && pending.is_empty() {
            return;
        }
        let next_deadline = pending.values().min().map(|t| *t + timeout);
        let expire = async {
            match next_deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let recv = async {
            match &sock {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick(), if !stopping => {
                if sock.is_none() {
                    match IcmpSocket::open(target.target, target.iface.as_deref(), false) {
                        Ok(s) => {
                            if open_error_logged {
                                info!("probes to {}{}: socket open again", target.target, at_iface(&key.1));
                            }
                            open_error_logged = false;
                            sock = Some(s);
                        }
                        Err(e) => {
                            if !open_error_logged {
                                warn!("probes to {}{}: {e} (counted as lost until it works)", target.target, at_iface(&key.1));
                                open_error_logged = true;
                            }
                        }
                    }
                }
                seq = seq.wrapping_add(1);
                let now = Instant::now();
                stats.with(&key, TargetStats::sent);
                let sent = match &sock {
                    Some(s) => s.send(seq, PROBE_PAYLOAD).map_err(|e| {
                        debug!("probe to {}{}: send: {e}", target.target, at_iface(&key.1));
                    }).is_ok(),
                    None => false,
                };
                if sent {
                    // A sequence number still pending after 65536 probes (a timeout far
                    // longer than the interval) ends as lost first.
                    if pending.insert(seq, now).is_some() {
                        stats.with(&key, |s| s.resolve(Instant::now(), None));
                    }
                } else {
                    stats.with(&key, |s| s.resolve(now, None));
                    if sock.is_some() {
                        // Reopen next time: the interface may have been recreated.
                        sock = None;
                    }
                }
            }
            r = recv => {
                match r {
                    Ok(Some(got)) => {
                        recv_errors = 0;
                        if let Some(at) = pending.remove(&got) {
                            let rtt = at.elapsed();
                            stats.with(&key, |s| s.resolve(Instant::now(), Some(rtt)));
                        }
                    }
                    Ok(None) => recv_errors = 0,
                    Err(e) => {
                        // ICMP errors reported on the connected socket (unreachable, ...):
                        // the probe ends by its timeout.
                        debug!("probes to {}{}: receive: {e}", target.target, at_iface(&key.1));
                        recv_errors += 1;
                        if recv_errors >= MAX_RECV_ERRORS {
                            warn!("probes to {}{}: receive keeps failing ({e}): reopening the socket", target.target, at_iface(&key.1));
                            sock = None;
                            recv_errors = 0;
                        }
                    }
                }
            }
            _ = expire => {
                let now = Instant::now();
                let expired: Vec<u16> = pending
                    .iter()
                    .filter(|(_, t)| now >= **t + timeout)
                    .map(|(s, _)| *s)
                    .collect();
                for s in expired {
                    if pending.remove(&s).is_some() {
                        stats.with(&key, |st| st.resolve(Instant::now(), None));
                    }
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
            }
        }
    }
}

/// One connected ICMP echo socket to one target (see the module doc).
#[derive(Debug)]
pub struct IcmpSocket {
    fd: AsyncFd<Socket>,
    v6: bool,
    /// Raw socket: replies carry the IPv4 header, and the identifier is ours to check.
    raw: bool,
    ident: u16,
    token: [u8; TOKEN_LEN],
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::fill(&mut b).is_err() {
        // No randomness: fall back to the time and the pid (only used to tell our echoes
        // from others).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8;
        }
    }
    b
}

fn setsockopt_int(
    s: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid fd, a pointer to a c_int that outlives the call and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Hands the socket to the runtime's reactor.
fn register(sock: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: the AsyncFd owns the socket, so its fd stays open and the same until dropped.
    Ok(unsafe { AsyncFd::register(sock) }?)
}

fn bind_device(s: &Socket, iface: &str) -> io::Result<()> {
    // SAFETY: a valid fd, a pointer to the name's bytes and their length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            iface.as_ptr().cast(),
            iface.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl IcmpSocket {
    /// A socket connected to `target`, bound to `iface` when given. `df_probe`: every echo
    /// leaves with don't-fragment set, at its size, whatever path MTU the kernel has cached
    /// (IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE), for the path-MTU search.
    pub fn open(target: IpAddr, iface: Option<&str>, df_probe: bool) -> io::Result<IcmpSocket> {
        let v6 = target.is_ipv6();
        let (domain, proto) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let (sock, raw) = match Socket::new(domain, Type::RAW, Some(proto)) {
            Ok(s) => (s, true),
            Err(raw_err) => match Socket::new(domain, Type::DGRAM, Some(proto)) {
                Ok(s) => (s, false),
                Err(_) => {
                    return Err(io::Error::new(
                        raw_err.kind(),
                        format!(
                            "opening an ICMP socket: {raw_err} (raw sockets need CAP_NET_RAW; \
                             ping sockets need net.ipv4.ping_group_range to include the group)"
                        ),
                    ));
                }
            },
        };
        if let Some(i) = iface.filter(|i| !i.is_empty()) {
            bind_device(&sock, i).map_err(|e| {
                io::Error::new(e.kind(), format!("binding the ICMP socket to {i}: {e}"))
            })?;
        }
        if df_probe {
            if v6 {
                setsockopt_int(
                    &sock,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MTU_DISCOVER,
                    libc::IPV6_PMTUDISC_PROBE,
                )?;
                setsockopt_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)?;
            } else {
                setsockopt_int(
                    &sock,
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    libc::IP_PMTUDISC_PROBE,
                )?;
            }
        }
        sock.set_nonblocking(true)?;
        sock.connect(&SockAddr::from(SocketAddr::new(target, 0)))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("connecting the ICMP socket to {target}: {e}"),
                )
            })?;
        let ident = u16::from_be_bytes(random_bytes::<2>());
        Ok(IcmpSocket {
            fd: register(sock)?,
            v6,
            raw,
            ident,
            token: random_bytes::<TOKEN_LEN>(),
        })
    }

    /// The IP header size of this socket's family.
    pub fn ip_header(&self) -> usize {
        if self.v6 { 40 } else { 20 }
    }

    /// Sends echo request `seq` with `payload` bytes of ICMP payload (at least the token's 8).
    pub fn send(&self, seq: u16, payload: usize) -> io::Result<()> {
        let pkt = echo_request(self.v6, self.ident, seq, &self.token, payload);
        let n = self.fd.get_ref().send(&pkt)?;
        if n != pkt.len() {
            return Err(io::Error::other(format!("sent {n} of {} bytes", pkt.len())));
        }
        Ok(())
    }

    /// Sends an echo request making an IP packet of exactly `ip_len` bytes (no IP options).
    pub fn send_sized(&self, seq: u16, ip_len: usize) -> io::Result<()> {
        let payload = ip_len
            .checked_sub(self.ip_header() + ICMP_HEADER)
            .filter(|p| *p >= TOKEN_LEN)
            .ok_or_else(|| io::Error::other(format!("IP packet size {ip_len} is too small")))?;
        self.send(seq, payload)
    }

    /// Waits for the next ICMP packet: Some(seq) for an echo reply to this socket, None for
    /// anything else.
    pub async fn recv(&self) -> io::Result<Option<u16>> {
        let mut buf = [0u8; 2048];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|s| s.get_ref().read(&mut buf)) {
                Ok(r) => {
                    let n = r?;
                    return Ok(self.parse_reply(&buf[..n]));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn parse_reply(&self, pkt: &[u8]) -> Option<u16> {
        let icmp = if self.raw && !self.v6 {
            let ihl = usize::from(pkt.first()? & 0x0f) * 4;
            pkt.get(ihl..)?
        } else {
            pkt
        };
        let reply_type = if self.v6 { 129 } else { 0 };
        if icmp.len() < ICMP_HEADER + TOKEN_LEN || icmp[0] != reply_type || icmp[1] != 0 {
            return None;
        }
        // Ping sockets choose the identifier themselves and deliver only their own replies.
        if self.raw && u16::from_be_bytes([icmp[4], icmp[5]]) != self.ident {
            return None;
        }
        if icmp[ICMP_HEADER..ICMP_HEADER + TOKEN_LEN] != self.token {
            return None;
        }
        Some(u16::from_be_bytes([icmp[6], icmp[7]]))
    }
}

/// An ICMP (type 8) or ICMPv6 (type 128) echo request: identifier, sequence, the token, then
/// zero padding up to `payload` bytes. The IPv4 checksum is filled in; the kernel fills the
/// ICMPv6 one (it covers a pseudo-header only the kernel knows for sure).
pub fn echo_request(v6: bool, ident: u16, seq: u16, token: &[u8], payload: usize) -> Vec<u8> {
    let payload = payload.max(token.len());
    let mut p = vec![0u8; ICMP_HEADER + payload];
    p[0] = if v6 { 128 } else { 8 };
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[ICMP_HEADER..ICMP_HEADER + token.len()].copy_from_slice(token);
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = match c {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_layout_and_checksum() {
        let p = echo_request(false, 0x1234, 7, &[1, 2, 3, 4, 5, 6, 7, 8], PROBE_PAYLOAD);
        assert_eq!(p.len(), 64);
        assert_eq!(&p[..2], &[8, 0]);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
        // A packet with its checksum in place sums to 0.
        assert_eq!(checksum(&p), 0);
        let p6 = echo_request(true, 1, 2, &[0; 8], 0);
        assert_eq!(p6.len(), 16);
        assert_eq!(p6[0], 128);
        assert_eq!(&p6[2..4], &[0, 0]);
    }

    #[test]
    fn replies_are_matched_by_ident_and_token() {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let s = IcmpSocket {
            fd: register(sock).unwrap(),
            v6: false,
            raw: true,
            ident: 0xabcd,
            token: [9; 8],
        };
        let mut reply = echo_request(false, 0xabcd, 42, &[9; 8], 56);
        reply[0] = 0;
        let mut ip = vec![0x45u8];
        ip.resize(20, 0);
        ip.extend_from_slice(&reply);
        assert_eq!(s.parse_reply(&ip), Some(42));
        // Another identifier, another token, a request, a truncated packet: not ours.
        let mut other = ip.clone();
        other[24] = 0;
        assert_eq!(s.parse_reply(&other), None);
        let mut other = ip.clone();
        other[28] = 0;
        assert_eq!(s.parse_reply(&other), None);
        let mut other = ip.clone();
        other[20] = 8;
        assert_eq!(s.parse_reply(&other), None);
        assert_eq!(s.parse_reply(&ip[..30]), None);
        assert_eq!(s.parse_reply(&[]), None);
    }

    #[test]
    fn window_and_histogram() {
        let stats = ProbeStats::new();
        let t = ProbeTarget {
            target: "10.64.0.1".parse().unwrap(),
            iface: Some("wg0".into()),
        };
        let k = key_of(&t);
        let now = Instant::now();
        for (i, rtt) in [Some(0.0002), None, Some(0.03), Some(20.0)]
            .iter()
            .enumerate()
        {
            stats.with(&k, TargetStats::sent);
            stats.with(&k, |s| {
                s.resolve(
                    now - Duration::from_secs(10 - i as u64),
                    rtt.map(Duration::from_secs_f64),
                )
            });
        }
        let snap = stats.snapshot();
        let s = &snap[&k];
        assert_eq!((s.sent, s.lost, s.replies), (4, 1, 3));
        let b = s.encoder_buckets();
        assert_eq!(b.len(), RTT_BUCKETS.len() + 1);
        assert_eq!(b[1], (0.00025, 1));
        assert_eq!(b[7], (0.025, 0));
        assert_eq!(b[8], (0.05, 1));
        assert_eq!(b[16], (f64::INFINITY, 1));
        let (sent, lost, rtts) = stats.window(&t, Duration::from_secs(60));
        assert_eq!((sent, lost, rtts.len()), (4, 1, 3));
        // Only the last two (sent 8 and 7 s ago) are within 8.5 s.
        let (sent, lost, rtts) = stats.window(&t, Duration::from_millis(8500));
        assert_eq!((sent, lost), (2, 0));
        assert_eq!(
            rtts,
            vec![Duration::from_millis(30), Duration::from_secs(20)]
        );
        let other = ProbeTarget {
            target: t.target,
            iface: None,
        };
        assert_eq!(
            stats.window(&other, Duration::from_secs(60)),
            (0, 0, Vec::new())
        );
    }

    #[test]
    fn target_set_is_static_then_extra_without_duplicates() {
        let a = ProbeTarget {
            target: "10.64.0.1".parse().unwrap(),
            iface: Some("wg0-mullvad".into()),
        };
        let b = ProbeTarget {
            target: "fd00::1".parse().unwrap(),
            iface: None,
        };
        let cfg = ProbeConfig {
            targets: vec![a.clone()],
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            pmtu_interval: Duration::from_secs(300),
        };
        let (a2, b2) = (a.clone(), b.clone());
        let extra = move || vec![a2.clone(), b2.clone()];
        assert_eq!(target_set(&cfg, &extra), vec![a, b]);
    }
}
