//! Path MTU: a don't-fragment binary search of ICMP echo sizes to each target, and the tunnel
//! MTU that follows from it.
//!
//! Targets: the probe targets (static `--probe` and the dynamic ones, see [`crate::probes::icmp`]),
//! through their interface when given; and every tunnel's hop-1 peer endpoints, through the
//! underlay (the relay's address answers echo; WireGuard's UDP port cannot be probed).
//!
//! The search ([`Search`]): sizes are whole IP packets (header included, no options); every
//! echo leaves with don't-fragment at its size, whatever the kernel has cached for the path
//! (IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE: a PMTU learnt from an earlier ICMP too-big does
//! not cut the search short, and the search never fragments locally). It tries 1280 first
//! (the floor; the interface MTU when that is smaller), then the interface MTU (the ceiling:
//! the target's interface, or the interface the route to it leaves through), then bisects
//! between the largest size that passed and the smallest that failed. A size passes when one
//! of up to [`TRIES`] echoes of it gets its reply within the short [`try_timeout`]. The result
//! is the largest size that passed: `wirescope_path_mtu_bytes{target,interface}`. A target
//! where not even the floor passed has no series (until a later run reaches it).
//!
//! Recommended tunnel MTU, for each tunnel interface with a measured hop-1 peer endpoint
//! (see [`recommended_mtu`]):
//!
//! ```text
//! recommended = path_mtu(hop-1 endpoint) - sum over the WireGuard layers h = 1..=depth of
//!               (outer IP header of layer h: 20 for an IPv4 endpoint, 40 for IPv6)
//!               + 8 (UDP) + 32 (WireGuard data message: 16-byte header + 16-byte tag)
//! ```
//!
//! where `depth` is the deepest peer's hop on the interface (1 for a plain tunnel, 2 for
//! Mullvad multihop: the exit layer travels inside the entry layer). With several hop-1
//! peers, the smallest of their path MTUs counts; a layer whose endpoints are unknown counts
//! as IPv6 (the larger header). WireGuard pads the plaintext to a multiple of 16 but never
//! past the tunnel MTU, so a full-size inner packet makes exactly `MTU + overhead` bytes on
//! the wire and fits the measured path without fragmenting. Example: path MTU 1400 to an IPv4
//! relay, one layer: 1400 - (20 + 8 + 32) = 1340; two IPv4 layers: 1280.
//!
//! Where the endpoint search gets no reply (a firewall lets only the tunnel's own datagrams
//! reach the relay, as the Mullvad app's does), the tunnel's recommendation comes from an
//! in-tunnel search to a probe target bound to it ([`carrier`]: Mullvad's 10.64.0.1 while
//! connected; elsewhere `--probe ADDR@TUNNEL`), run after the others, one tunnel at a time.
//! `wirescope_recommended_mtu_info{interface,method}` says which search gave the value
//! ([`Method`]).
//!
//! When: at start, every `pmtu_interval`, for targets new to the set within [`CHECK_EVERY`]
//! (Mullvad connected, an endpoint changed), and soon after the `trigger` [`Notify`] fires (an
//! ICMP too-big seen by the datapath). Notifications that come during a run or within
//! [`GRACE`] after it are taken to be the echoes of the search itself (which provokes too-big
//! messages on purpose) and ignored, so the search does not retrigger itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use log::{debug, info, warn};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use crate::{
    config::ProbeConfig,
    probes::{
        carrier::{self, CarrierPlan, CarrierResult, CarrierSignals, Method},
        icmp::{ExtraTargets, IcmpSocket, target_set},
    },
    sources::netlink::{Link, Netlink},
    sync::inventory::{Inventory, Peer, Tunnel, Underlay},
    sync::peer_label::EndpointLabeler,
};

/// The smallest size searched: the IPv6 minimum MTU (and what WireGuard needs for IPv6).
pub const FLOOR: u32 = 1280;
/// Echoes per size before it counts as too big.
pub const TRIES: usize = 2;
/// Notifications within this long after a run are the run's own too-bigs.
pub const GRACE: Duration = Duration::from_secs(5);
/// How often the target set is looked at for new targets.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// UDP header plus WireGuard's data message overhead (16-byte header, 16-byte tag).
pub const WG_UDP_OVERHEAD: u32 = 8 + 32;

/// The per-size timeout: the probe timeout, at most 1 s.
pub fn try_timeout(cfg: &ProbeConfig) -> Duration {
    cfg.timeout.min(Duration::from_secs(1))
}

/// The binary search over IP packet sizes, driven from outside: ask [`Search::next`] for a
/// size, probe it, tell [`Search::record`] whether it passed, until `next` says None.
#[derive(Clone, Debug)]
pub struct Search {
    floor: u32,
    ceiling: u32,
    /// Largest size that passed.
    passed: Option<u32>,
    /// Smallest size that failed above `passed` (ceiling + 1 while none).
    failed: u32,
    floor_failed: bool,
}

impl Search {
    pub fn new(floor: u32, ceiling: u32) -> Search {
        let floor = floor.min(ceiling);
        Search {
            floor,
            ceiling,
            passed: None,
            failed: ceiling.saturating_add(1),
            floor_failed: false,
        }
    }

    /// The next size to try; None when the search is over.
    pub fn next(&self) -> Option<u32> {
        match self.passed {
            None if self.floor_failed => None,
            None => Some(self.floor),
            Some(p) if p >= self.ceiling => None,
            Some(_) if self.failed > self.ceiling => Some(self.ceiling),
            Some(p) if self.failed - p > 1 => Some(p + (self.failed - p) / 2),
            Some(_) => None,
        }
    }

    pub fn record(&mut self, size: u32, passed: bool) {
        if passed {
            if self.passed.is_none_or(|p| size > p) {
                self.passed = Some(size);
            }
        } else if self.passed.is_none() && size <= self.floor {
            self.floor_failed = true;
        } else if size < self.failed {
            self.failed = size;
        }
    }

    /// The largest size that passed: the path MTU once [`Search::next`] is None.
    pub fn result(&self) -> Option<u32> {
        self.passed
    }

    /// The smallest size that failed above the result; None while none did (the ceiling
    /// passed, or nothing was tried above the floor).
    pub fn smallest_failed(&self) -> Option<u32> {
        (self.passed.is_some() && self.failed <= self.ceiling).then_some(self.failed)
    }
}

/// Runs a whole search with a synchronous "does size S pass" (each size asked once).
pub fn search_with(floor: u32, ceiling: u32, mut passes: impl FnMut(u32) -> bool) -> Option<u32> {
    let mut s = Search::new(floor, ceiling);
    while let Some(size) = s.next() {
        let ok = passes(size);
        s.record(size, ok);
    }
    s.result()
}

/// The recommended tunnel MTU (see the module doc): `path_mtu` minus, per WireGuard layer,
/// its outer IP header (`layers_v6[h]`: layer h+1's endpoint is IPv6) plus UDP and WireGuard.
pub fn recommended_mtu(path_mtu: u32, layers_v6: &[bool]) -> u32 {
    let overhead: u32 = layers_v6
        .iter()
        .map(|v6| if *v6 { 40 } else { 20 } + WG_UDP_OVERHEAD)
        .sum();
    path_mtu.saturating_sub(overhead)
}

/// One destination of the search.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PmtuTarget {
    pub addr: IpAddr,
    pub iface: Option<String>,
    /// The `target` label: the address for a probe target; for a peer endpoint the
    /// endpoint label (the address only with `--export-endpoints`, else a salted hash).
    pub label: String,
}

impl PmtuTarget {
    /// (target, interface) labels.
    pub fn key(&self) -> (String, String) {
        (self.label.clone(), self.iface.clone().unwrap_or_default())
    }
}

/// What the searches found, read by the collector.
#[derive(Debug, Default)]
pub struct PmtuState {
    inner: Mutex<Measured>,
}

#[derive(Clone, Debug, Default)]
pub struct Measured {
    /// (target, interface) -> path MTU.
    pub path: BTreeMap<(String, String), u32>,
    /// tunnel interface -> recommended MTU.
    pub recommended: BTreeMap<String, u32>,
    /// tunnel interface -> how its recommended MTU was measured.
    pub method: BTreeMap<String, Method>,
    /// tunnel interface -> its in-tunnel search's result, for tunnels whose hop-1 endpoints
    /// could not be searched through the underlay.
    pub carrier: BTreeMap<String, CarrierResult>,
}

impl PmtuState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn snapshot(&self) -> Measured {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Measured)) {
        if let Ok(mut m) = self.inner.lock() {
            f(&mut m);
        }
    }
}

/// A hop-1 peer's endpoint as a target: bound to the peer's underlay (`via`) when that is a
/// watched underlay, so that policy routing that sends unmarked traffic into the tunnel
/// (Mullvad's) does not carry the echoes through the tunnel; else through the route.
fn endpoint_target(
    p: &Peer,
    underlays: &[Underlay],
    labeler: &EndpointLabeler,
) -> Option<PmtuTarget> {
    if p.hop != 1 {
        return None;
    }
    let e = p.wg.endpoint?;
    // A local obfuscation proxy on loopback: echoes to it measure loopback, not the path
    // to the relay (which the proxy reaches in another protocol).
    if crate::config::obfuscation::is_local_proxy(e.ip()) {
        return None;
    }
    let iface = underlays
        .iter()
        .any(|u| !p.via.is_empty() && u.name == p.via)
        .then(|| p.via.clone());
    Some(PmtuTarget {
        addr: e.ip(),
        iface,
        label: labeler.label(e),
    })
}

/// Hop-1 peer endpoints of every tunnel, as targets through the underlay.
fn endpoint_targets(inv: &Inventory, labeler: &EndpointLabeler) -> Vec<PmtuTarget> {
    let mut out = Vec::new();
    for t in &inv.tunnels {
        for p in &t.peers {
            if let Some(pt) = endpoint_target(p, &inv.underlays, labeler)
                && !out.contains(&pt)
            {
                out.push(pt);
            }
        }
    }
    out
}

/// Per tunnel, its recommended MTU from the measured path MTUs of its hop-1 endpoints.
pub fn recommendations(
    tunnels: &[Tunnel],
    underlays: &[Underlay],
    labeler: &EndpointLabeler,
    path: &BTreeMap<(String, String), u32>,
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for t in tunnels {
        let measured = t
            .peers
            .iter()
            .filter_map(|p| endpoint_target(p, underlays, labeler))
            .filter_map(|pt| path.get(&pt.key()).copied())
            .min();
        let Some(mtu) = measured else { continue };
        out.insert(t.name.clone(), recommended_mtu(mtu, &layers_of(t)));
    }
    out
}

/// The WireGuard layers of a tunnel, hop 1 first, down to its deepest peer's hop: true when
/// that layer's endpoints are IPv6 (or unknown: the larger header counts).
pub fn layers_of(t: &Tunnel) -> Vec<bool> {
    let depth = t.peers.iter().map(|p| p.hop).max().unwrap_or(1).max(1);
    (1..=depth)
        .map(|h| {
            let fams: Vec<bool> = t
                .peers
                .iter()
                .filter(|p| p.hop == h)
                .filter_map(|p| p.wg.endpoint)
                .map(|e| e.is_ipv6())
                .collect();
            fams.is_empty() || fams.iter().any(|v6| *v6)
        })
        .collect()
}

/// The in-tunnel searches a round needs: every tunnel with a hop-1 peer whose recommendation
/// the underlay search could not give (not in `recommended`) and a target bound to it among
/// `targets` (the first, in the set's order). The watched interfaces are the watched
/// underlays its hop-1 peers are reached over (all of them when none is known).
pub fn carrier_plans(
    tunnels: &[Tunnel],
    underlays: &[Underlay],
    targets: &[PmtuTarget],
    recommended: &BTreeMap<String, u32>,
) -> Vec<CarrierPlan> {
    let mut out = Vec::new();
    for t in tunnels {
        if recommended.contains_key(&t.name) || !t.peers.iter().any(|p| p.hop == 1) {
            continue;
        }
        let Some(target) = targets
            .iter()
            .find(|x| x.iface.as_deref() == Some(t.name.as_str()))
        else {
            continue;
        };
        let vias: Vec<u32> = underlays
            .iter()
            .filter(|u| t.peers.iter().any(|p| p.hop == 1 && p.via == u.name))
            .map(|u| u.ifindex)
            .collect();
        let watch = if vias.is_empty() {
            underlays.iter().map(|u| u.ifindex).collect()
        } else {
            vias
        };
        out.push(CarrierPlan {
            tunnel: t.name.clone(),
            target: target.clone(),
            watch,
            mtu: t.mtu,
            layers_v6: layers_of(t),
        });
    }
    out
}

/// The MTU of the interface packets to `t` leave through, among `links` (one dump for a
/// whole run, not one per target).
pub(crate) async fn ceiling(
    netlink: &Netlink,
    links: &[Link],
    t: &PmtuTarget,
) -> Result<u32, String> {
    match &t.iface {
        Some(name) => links
            .iter()
            .find(|l| &l.name == name)
            .map(|l| l.mtu)
            .ok_or_else(|| format!("no interface {name}")),
        None => {
            let oif = netlink
                .route_oif(t.addr)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no route to {}", t.addr))?;
            links
                .iter()
                .find(|l| l.index == oif)
                .map(|l| l.mtu)
                .ok_or_else(|| format!("route to {} leaves through unknown ifindex {oif}", t.addr))
        }
    }
}

/// Does an echo of `size` bytes get through? Up to [`TRIES`] echoes, each waited for
/// `timeout`.
async fn passes(sock: &IcmpSocket, seq: &mut u16, size: u32, timeout: Duration) -> bool {
    for _ in 0..TRIES {
        *seq = seq.wrapping_add(1);
        let want = *seq;
        if let Err(e) = sock.send_sized(want, size as usize) {
            debug!("path MTU probe of {size} bytes: send: {e}");
            continue;
        }
        if await_reply(sock, want, Instant::now() + timeout, size).await {
            return true;
        }
    }
    false
}

/// Waits until `deadline` for the reply to echo `want` (of `size` bytes, for the log).
pub(crate) async fn await_reply(
    sock: &IcmpSocket,
    want: u16,
    deadline: Instant,
    size: u32,
) -> bool {
    let mut errors = 0;
    loop {
        match tokio::time::timeout_at(deadline, sock.recv()).await {
            Err(_) => return false,
            Ok(Ok(Some(s))) if s == want => return true,
            Ok(Ok(_)) => {}
            // An ICMP error reported on the socket (too big): wait for the timeout,
            // unless the socket keeps failing.
            Ok(Err(e)) => {
                errors += 1;
                if errors >= crate::probes::icmp::MAX_RECV_ERRORS {
                    debug!("path MTU probe of {size} bytes: receive: {e}");
                    return false;
                }
            }
        }
    }
}

/// Searches one target; None when it could not be searched or not even the floor passed.
async fn measure(
    netlink: &Netlink,
    links: &[Link],
    t: &PmtuTarget,
    timeout: Duration,
) -> Option<u32> {
    let ceil = match ceiling(netlink, links, t).await {
        Ok(c) => c,
        Err(e) => {
            warn!("path MTU to {}: {e}", t.label);
            return None;
        }
    };
    let sock = match IcmpSocket::open(t.addr, t.iface.as_deref(), true) {
        Ok(s) => s,
        Err(e) => {
            warn!("path MTU to {}: {e}", t.label);
            return None;
        }
    };
    let mut search = Search::new(FLOOR, ceil);
    let mut seq = 0u16;
    while let Some(size) = search.next() {
        let ok = passes(&sock, &mut seq, size, timeout).await;
        search.record(size, ok);
    }
    match search.result() {
        Some(m) => info!(
            "path MTU to {}{}: {m} (interface MTU {ceil})",
            t.label,
            t.iface
                .as_deref()
                .map(|i| format!(" via {i}"))
                .unwrap_or_default()
        ),
        None => warn!(
            "path MTU to {}: no echo of {} bytes came back",
            t.label,
            FLOOR.min(ceil)
        ),
    }
    search.result()
}

/// Everything the search task needs.
pub struct PmtuTask {
    pub cfg: ProbeConfig,
    pub extra: ExtraTargets,
    pub inventory: Arc<RwLock<Inventory>>,
    pub labeler: EndpointLabeler,
    pub state: Arc<PmtuState>,
    /// Fired on an ICMP too-big (from the datapath): a run soon.
    pub trigger: Arc<Notify>,
    /// The datapath's fragment and too-big counts, for the in-tunnel searches
    /// ([`carrier`]); None: no in-tunnel searches.
    pub carrier: Option<Arc<dyn CarrierSignals>>,
}

impl PmtuTask {
    fn targets(&self) -> (Vec<PmtuTarget>, Vec<Tunnel>, Vec<Underlay>) {
        let mut out: Vec<PmtuTarget> = target_set(&self.cfg, self.extra.as_ref())
            .into_iter()
            .map(|p| PmtuTarget {
                addr: p.target,
                iface: p.iface.filter(|i| !i.is_empty()),
                label: p.target.to_string(),
            })
            .collect();
        let tunnels = match self.inventory.read() {
            Ok(inv) => {
                for t in endpoint_targets(&inv, &self.labeler) {
                    if !out.contains(&t) {
                        out.push(t);
                    }
                }
                (inv.tunnels.clone(), inv.underlays.clone())
            }
            Err(_) => (Vec::new(), Vec::new()),
        };
        (out, tunnels.0, tunnels.1)
    }

    /// Searches the current targets (with `skip`, only those not in it), then, one at a
    /// time, the in-tunnel searches of the tunnels the underlay searches left without a
    /// recommendation ([`carrier_plans`]; with `skip`, only those not in it), and updates
    /// the state at once: their results replace the old ones, targets and plans no longer in
    /// the set go, the recommendations are recomputed. Returns the keys of the current set
    /// (targets, and plans as `("carrier " + target label, tunnel)`) and whether anything
    /// was searched.
    async fn run(
        &self,
        netlink: &Netlink,
        skip: Option<&BTreeSet<(String, String)>>,
    ) -> (BTreeSet<(String, String)>, bool) {
        let (targets, tunnels, underlays) = self.targets();
        let timeout = try_timeout(&self.cfg);
        let is_new = |k: &(String, String)| skip.is_none_or(|seen| !seen.contains(k));
        let chosen: Vec<&PmtuTarget> = targets.iter().filter(|t| is_new(&t.key())).collect();
        // Without the interfaces nothing can be searched: the results stand, and the
        // targets of this run count as not seen, so the next check (CHECK_EVERY) tries them.
        let links = if chosen.is_empty() {
            Vec::new()
        } else {
            match netlink.links().await {
                Ok(l) => l,
                Err(e) => {
                    warn!("path MTU: {e}; the searches are retried within {CHECK_EVERY:?}");
                    return (skip.cloned().unwrap_or_default(), false);
                }
            }
        };
        let mut searched = !chosen.is_empty();
        let gate = tokio::sync::Semaphore::new(MAX_SEARCHES);
        let results = futures_util::future::join_all(chosen.iter().map(|t| {
            gated(&gate, async {
                (t.key(), measure(netlink, &links, t, timeout).await)
            })
        }))
        .await;
        let mut current: BTreeSet<(String, String)> = targets.iter().map(PmtuTarget::key).collect();
        let mut m = self.state.snapshot();
        m.path.retain(|k, _| current.contains(k));
        for (k, r) in results {
            match r {
                Some(v) => {
                    m.path.insert(k, v);
                }
                None => {
                    m.path.remove(&k);
                }
            }
        }
        m.recommended = recommendations(&tunnels, &underlays, &self.labeler, &m.path);
        m.method = m
            .recommended
            .keys()
            .map(|t| (t.clone(), Method::UnderlayEcho))
            .collect();

        let plans = carrier_plans(&tunnels, &underlays, &targets, &m.recommended);
        m.carrier
            .retain(|tunnel, _| plans.iter().any(|p| &p.tunnel == tunnel));
        for plan in &plans {
            let key = (
                format!("carrier {}", plan.target.label),
                plan.tunnel.clone(),
            );
            let new = is_new(&key);
            current.insert(key);
            let Some(signals) = self.carrier.as_deref() else {
                continue;
            };
            if !new {
                continue;
            }
            searched = true;
            match carrier::measure(netlink, plan, signals, timeout).await {
                Some(r) => {
                    m.carrier.insert(plan.tunnel.clone(), r);
                }
                None => {
                    m.carrier.remove(&plan.tunnel);
                }
            }
        }
        for (tunnel, r) in &m.carrier {
            m.recommended.insert(tunnel.clone(), r.recommended);
            m.method.insert(tunnel.clone(), r.method);
        }
        self.state.update(|s| *s = m);
        (current, searched)
    }
}

/// At most this many searches at once, each with its raw socket: a relay or gateway with
/// thousands of endpoints would otherwise open a socket per endpoint at the same moment
/// and run out of file descriptors.
pub const MAX_SEARCHES: usize = 32;

/// Runs `f` once `gate` has a permit for it: `MAX_SEARCHES` permits bound the searches
/// under way (a closed gate cannot happen: nothing closes it; `f` then just runs).
async fn gated<F: std::future::Future>(gate: &tokio::sync::Semaphore, f: F) -> F::Output {
    let _permit = gate.acquire().await.ok();
    f.await
}

/// Starts the path-MTU task (see the module doc) until `stop` turns true.
pub fn spawn(task: PmtuTask, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let netlink = match Netlink::new() {
            Ok(n) => n,
            Err(e) => {
                warn!("path MTU is not measured: {e}");
                return;
            }
        };
        if task.cfg.pmtu_interval.is_zero() {
            info!("path MTU searches are off (--pmtu-interval off)");
            return;
        }
        let interval = task.cfg.pmtu_interval.max(Duration::from_secs(1));
        // Every target of the set at the last run, searched then (whatever the outcome).
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        let mut next_run = Instant::now();
        let mut next_check = Instant::now() + CHECK_EVERY;
        let mut last_end: Option<Instant> = None;
        loop {
            enum Why {
                Due,
                Check,
                TooBig,
            }
            let why = tokio::select! {
                _ = tokio::time::sleep_until(next_run) => Why::Due,
                _ = tokio::time::sleep_until(next_check) => Why::Check,
                _ = task.trigger.notified() => Why::TooBig,
                _ = stop.changed() => return,
            };
            if *stop.borrow() {
                return;
            }
            let full = match why {
                Why::Due => true,
                Why::TooBig => {
                    if last_end.is_some_and(|t| t.elapsed() < GRACE) {
                        debug!("ICMP too-big right after a path MTU search: its own, ignored");
                        continue;
                    }
                    info!("ICMP too-big seen: measuring the path MTU again");
                    true
                }
                Why::Check => {
                    next_check = Instant::now() + CHECK_EVERY;
                    false
                }
            };
            let skip = if full { None } else { Some(&seen) };
            let (current, searched) = tokio::select! {
                r = task.run(&netlink, skip) => r,
                _ = stop.changed() => return,
            };
            seen = current;
            if searched {
                last_end = Some(Instant::now());
            }
            if full {
                next_run = Instant::now() + interval;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::*;
    use crate::sync::inventory::{Backend, WgPeer};

    /// Sizes asked, in order, with the answer of a path that passes up to `mtu`.
    fn run(floor: u32, ceiling: u32, mtu: Option<u32>) -> (Option<u32>, Vec<u32>) {
        let mut asked = Vec::new();
        let r = search_with(floor, ceiling, |s| {
            asked.push(s);
            mtu.is_some_and(|m| s <= m)
        });
        (r, asked)
    }

    #[test]
    fn finds_the_exact_largest_size() {
        let (r, asked) = run(FLOOR, 1500, Some(1392));
        assert_eq!(r, Some(1392));
        assert!(asked.contains(&1392) && asked.contains(&1393), "{asked:?}");
        // Floor, ceiling, then a bisection of 220 sizes: 8 more.
        assert_eq!(&asked[..2], &[1280, 1500]);
        assert!(asked.len() <= 2 + 8, "{asked:?}");
        for mtu in 1280..=1500 {
            assert_eq!(run(FLOOR, 1500, Some(mtu)).0, Some(mtu), "mtu {mtu}");
        }
        // Through a tunnel: the ceiling is the tunnel MTU.
        assert_eq!(run(FLOOR, 1420, Some(1400)).0, Some(1400));
    }

    #[test]
    fn floor_and_ceiling() {
        // Only the floor passes.
        assert_eq!(run(FLOOR, 1500, Some(1280)).0, Some(1280));
        // Everything passes: the ceiling (interface MTU), in two echoes.
        assert_eq!(run(FLOOR, 1500, Some(9000)), (Some(1500), vec![1280, 1500]));
        assert_eq!(run(FLOOR, 9000, Some(9000)).0, Some(9000));
        // Nothing passes: no result after the floor alone.
        assert_eq!(run(FLOOR, 1500, None), (None, vec![1280]));
        assert_eq!(run(FLOOR, 1500, Some(1279)), (None, vec![1280]));
        // An interface MTU below the floor is its own floor and ceiling.
        assert_eq!(run(FLOOR, 1000, Some(1500)), (Some(1000), vec![1000]));
        assert_eq!(run(FLOOR, 1280, Some(1500)), (Some(1280), vec![1280]));
        assert_eq!(run(FLOOR, 1281, Some(1280)), (Some(1280), vec![1280, 1281]));
    }

    #[test]
    fn a_flaky_size_is_decided_by_record() {
        let mut s = Search::new(FLOOR, 1500);
        assert_eq!(s.next(), Some(1280));
        s.record(1280, true);
        assert_eq!(s.next(), Some(1500));
        s.record(1500, false);
        assert_eq!(s.next(), Some(1390));
        s.record(1390, true);
        assert_eq!(s.next(), Some(1445));
    }

    #[test]
    fn recommended_mtu_per_layer() {
        assert_eq!(recommended_mtu(1400, &[false]), 1340);
        assert_eq!(recommended_mtu(1500, &[false]), 1440);
        assert_eq!(recommended_mtu(1500, &[true]), 1420);
        assert_eq!(recommended_mtu(1500, &[false, false]), 1380);
        assert_eq!(recommended_mtu(1400, &[false, false]), 1280);
        assert_eq!(recommended_mtu(1500, &[true, false]), 1360);
        assert_eq!(recommended_mtu(50, &[false]), 0);
    }

    fn peer(hop: u32, endpoint: Option<&str>) -> Peer {
        let wg = WgPeer {
            endpoint: endpoint.map(|e| e.parse::<SocketAddr>().unwrap()),
            last_handshake: Some(SystemTime::now()),
            ..WgPeer::new([hop as u8; 32])
        };
        Peer {
            hop,
            ..Peer::new(hop, String::new(), wg)
        }
    }

    fn tunnel(name: &str, peers: Vec<Peer>) -> Tunnel {
        Tunnel {
            name: name.into(),
            ifindex: 3,
            mtu: 1420,
            backend: Backend::Netlink,
            listen_port: 51820,
            peers,
        }
    }

    #[test]
    fn recommendations_from_hop_1_endpoints() {
        let l = EndpointLabeler::with_salt([7; 32], true);
        let single = tunnel("wg0", vec![peer(1, Some("192.0.2.1:51820"))]);
        let multi = tunnel(
            "wg1",
            vec![
                peer(1, Some("192.0.2.2:51820")),
                peer(2, Some("10.0.0.9:51820")),
            ],
        );
        let unmeasured = tunnel("wg2", vec![peer(1, Some("192.0.2.3:51820"))]);
        let no_endpoint = tunnel("wg3", vec![peer(1, None)]);
        let tunnels = [single, multi, unmeasured, no_endpoint];
        let mut path = BTreeMap::new();
        path.insert(
            ("endpoint:192.0.2.1:51820".to_string(), String::new()),
            1400,
        );
        path.insert(
            ("endpoint:192.0.2.2:51820".to_string(), String::new()),
            1500,
        );
        let r = recommendations(&tunnels, &[], &l, &path);
        assert_eq!(r.get("wg0"), Some(&1340));
        assert_eq!(r.get("wg1"), Some(&1380));
        assert_eq!(r.len(), 2, "{r:?}");
        // Nothing measured (no target reachable): no series.
        assert!(recommendations(&tunnels, &[], &l, &BTreeMap::new()).is_empty());
        // A peer reached over a watched underlay is measured bound to it, and labelled so.
        let mut via = tunnels[0].clone();
        via.peers[0].via = "eth0".into();
        let eth0 = [Underlay {
            name: "eth0".into(),
            ifindex: 2,
        }];
        let inv_via = Inventory {
            tunnels: vec![via.clone()],
            underlays: eth0.to_vec(),
            ..Default::default()
        };
        let t = endpoint_targets(&inv_via, &l);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[0].key(),
            ("endpoint:192.0.2.1:51820".to_string(), "eth0".to_string())
        );
        assert!(recommendations(&[via.clone()], &eth0, &l, &path).is_empty());
        let mut path_via = BTreeMap::new();
        path_via.insert(t[0].key(), 1400);
        assert_eq!(
            recommendations(&[via.clone()], &eth0, &l, &path_via).get("wg0"),
            Some(&1340)
        );
        // Not a watched underlay (e.g. a tunnel's name): through the route, unbound.
        assert_eq!(
            endpoint_targets(
                &Inventory {
                    tunnels: vec![via],
                    ..Default::default()
                },
                &l
            )[0]
            .iface,
            None
        );
        let inv = Inventory {
            tunnels: tunnels.to_vec(),
            ..Default::default()
        };
        let t = endpoint_targets(&inv, &l);
        let labels: Vec<&str> = t.iter().map(|t| t.label.as_str()).collect();
        // Hop-1 endpoints only; the exit relay is reached through the entry's tunnel.
        assert_eq!(
            labels,
            [
                "endpoint:192.0.2.1:51820",
                "endpoint:192.0.2.2:51820",
                "endpoint:192.0.2.3:51820"
            ]
        );
        // An endpoint on loopback (a local obfuscation proxy) is no path to measure.
        let proxied = Inventory {
            tunnels: vec![tunnel("wg4", vec![peer(1, Some("127.0.0.1:51900"))])],
            ..Default::default()
        };
        assert!(endpoint_targets(&proxied, &l).is_empty());
        // Without --export-endpoints the label hides the address.
        let hidden = EndpointLabeler::with_salt([7; 32], false);
        assert!(
            endpoint_targets(&inv, &hidden)
                .iter()
                .all(|t| !t.label.contains("192.0.2"))
        );
    }

    fn target(addr: &str, iface: Option<&str>) -> PmtuTarget {
        PmtuTarget {
            addr: addr.parse().unwrap(),
            iface: iface.map(str::to_string),
            label: addr.to_string(),
        }
    }

    #[test]
    fn in_tunnel_searches_only_where_the_underlay_gave_nothing() {
        let mut a = tunnel("wg0", vec![peer(1, Some("192.0.2.1:51820"))]);
        a.peers[0].via = "eth1".into();
        let mut b = tunnel(
            "wg1",
            vec![
                peer(1, Some("[2001:db8::1]:51820")),
                peer(2, Some("10.0.0.9:51820")),
            ],
        );
        b.ifindex = 4;
        b.mtu = 1380;
        let no_target = tunnel("wg2", vec![peer(1, Some("192.0.2.3:51820"))]);
        let no_peer = tunnel("wg3", vec![]);
        let underlays = [
            Underlay {
                name: "eth0".into(),
                ifindex: 2,
            },
            Underlay {
                name: "eth1".into(),
                ifindex: 7,
            },
        ];
        let targets = [
            target("192.0.2.1", Some("eth1")),
            target("10.64.0.1", Some("wg0")),
            target("10.64.0.2", Some("wg0")),
            target("10.64.0.1", Some("wg1")),
            target("10.64.0.1", Some("wg3")),
            target("10.9.9.9", None),
        ];
        let tunnels = [a, b, no_target, no_peer];
        let plans = carrier_plans(&tunnels, &underlays, &targets, &BTreeMap::new());
        assert_eq!(
            plans,
            vec![
                CarrierPlan {
                    tunnel: "wg0".into(),
                    target: targets[1].clone(),
                    // Its hop-1 peer's underlay only.
                    watch: vec![7],
                    mtu: 1420,
                    layers_v6: vec![false],
                },
                CarrierPlan {
                    tunnel: "wg1".into(),
                    target: targets[3].clone(),
                    // No hop-1 underlay known: every watched one.
                    watch: vec![2, 7],
                    mtu: 1380,
                    layers_v6: vec![true, false],
                },
            ]
        );
        // A tunnel the underlay search measured needs none.
        let measured = BTreeMap::from([("wg0".to_string(), 1340)]);
        let plans = carrier_plans(&tunnels, &underlays, &targets, &measured);
        assert_eq!(
            plans.iter().map(|p| p.tunnel.as_str()).collect::<Vec<_>>(),
            ["wg1"]
        );
    }

    #[test]
    fn smallest_failed_is_the_bracket_top() {
        let mut s = Search::new(FLOOR, 1420);
        assert_eq!(s.smallest_failed(), None);
        while let Some(size) = s.next() {
            s.record(size, size <= 1328);
        }
        assert_eq!((s.result(), s.smallest_failed()), (Some(1328), Some(1329)));
        let mut all = Search::new(FLOOR, 1420);
        while let Some(size) = all.next() {
            all.record(size, true);
        }
        assert_eq!((all.result(), all.smallest_failed()), (Some(1420), None));
        let mut none = Search::new(FLOOR, 1420);
        none.record(FLOOR, false);
        assert_eq!((none.result(), none.smallest_failed()), (None, None));
    }

    /// 1,000 targets are searched at most MAX_SEARCHES at a time, and every one is.
    #[tokio::test]
    async fn searches_are_bounded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let items: Vec<u32> = (0..1000).collect();
        let (running, peak) = (&running, &peak);
        let gate = tokio::sync::Semaphore::new(MAX_SEARCHES);
        let mut done = futures_util::future::join_all(items.iter().map(|i| {
            gated(&gate, async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                *i
            })
        }))
        .await;
        done.sort_unstable();
        assert_eq!(done, items);
        assert_eq!(peak.load(Ordering::SeqCst), MAX_SEARCHES);
    }
}
