//! The sync loop: find the tunnels and underlays in this namespace, read their peers, hook
//! the programs to new interfaces, unhook vanished ones, and bring the peer maps up to date.
//! It runs every second below 10,000 peers and less often above ([`rounds::sync_period`]),
//! so a change shows in the maps within two periods; a round that finds nothing changed that
//! goes into the maps leaves them alone ([`rounds::MapsWritten`]).

pub mod inventory;
pub mod kept;
pub mod leak;
pub mod obfuscation;
pub mod peer_label;
pub mod rounds;
pub mod topology;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use agent_common::maps::{IfaceConfig, PEER_UNKNOWN, wire::Endpoint};
use ipnet::IpNet;
use log::{info, warn};

use crate::{
    config::obfuscation::ObfuscationRule,
    datapath::{Datapath, DatapathError, PeerMaps},
    sources::errors,
    sources::mullvad::MullvadState,
    sources::netlink::{Link, Netlink},
    sources::wg,
    sync::inventory::{Backend, Inventory, Peer, Tunnel, Underlay, WgDevice},
    sync::kept::{KeptState, OnFailure},
};

/// How long a route lookup is trusted; routes rarely change, peers' endpoints do.
const ROUTE_TTL: Duration = Duration::from_secs(5);
const DEFAULT_ROUTE_PROBE_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
const DEFAULT_ROUTE_PROBE_V6: IpAddr =
    IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// `--tunnel`: watch exactly these; empty means every WireGuard interface found.
    pub tunnels: Vec<String>,
    /// `--underlay`: watch exactly these; empty means the routes to the peers' endpoints.
    pub underlays: Vec<String>,
    /// Base64 public key -> friendly name, from `--wg-config` files.
    pub friendly_names: HashMap<String, String>,
    /// Time kernel WireGuard's crypto with kprobes (the kernel has them).
    pub crypto_kprobes: bool,
    /// The Mullvad poller's state: its tunnel counts as up for leak detection only while
    /// the daemon says connected, and its obfuscators carry the tunnel's entry peer. None:
    /// Mullvad is not watched.
    pub mullvad: Option<Arc<RwLock<MullvadState>>>,
    /// `--obfuscation`: peers a local proxy carries, and the proxies' flows.
    pub obfuscation: Vec<ObfuscationRule>,
    /// `--peer-grace`: a peer gone for longer is forgotten (see [`PeerIds`]).
    pub peer_grace: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            tunnels: Vec::new(),
            underlays: Vec::new(),
            friendly_names: HashMap::new(),
            crypto_kprobes: false,
            mullvad: None,
            obfuscation: Vec::new(),
            peer_grace: crate::config::DEFAULT_PEER_GRACE,
        }
    }
}

/// Peer ids: interface name -> public key -> id, each given once and kept (across restarts
/// too, through the pinned PEER_IDS map) while its peer is there, and for
/// `--peer-grace` after it is gone ([`PeerIds::absent_longer_than`]): then the peer is
/// forgotten and its id released ([`PeerIds::release`]), to be given again once its map
/// entries are gone. Ids are unique over all interfaces and start at 1 (0 is
/// `PEER_UNKNOWN`, never given nor released).
#[derive(Debug)]
pub struct PeerIds {
    /// Nested so that a round looks ids up without allocating a key per peer.
    ids: HashMap<String, HashMap<[u8; 32], u32>>,
    next: u32,
    /// Given since the last [`PeerIds::take_new`], to be saved.
    new: Vec<(String, [u8; 32], u32)>,
    /// Released ids, given again lowest first (before `next`), so that ids stay small.
    free: BTreeSet<u32>,
    /// Ids whose peer was missing from the latest rounds, with the first round it missed.
    absent: HashMap<u32, Instant>,
}

impl Default for PeerIds {
    fn default() -> Self {
        PeerIds {
            ids: HashMap::new(),
            next: 1,
            new: Vec::new(),
            free: BTreeSet::new(),
            absent: HashMap::new(),
        }
    }
}

impl PeerIds {
    /// Ids given before (by an agent that ran earlier); new ones continue above the highest.
    /// Gaps below it are not reused: an id missing from the pinned map may still key counters
    /// (its save was refused), and only ids this agent released are known to key nothing.
    pub fn seeded(saved: impl IntoIterator<Item = (String, [u8; 32], u32)>) -> PeerIds {
        let mut p = PeerIds::default();
        for (iface, key, id) in saved {
            if id == PEER_UNKNOWN {
                continue;
            }
            p.next = p.next.max(id.saturating_add(1));
            p.ids.entry(iface).or_default().insert(key, id);
        }
        p
    }

    /// The id of `key` on `iface`, given now if it has none.
    pub fn get(&mut self, iface: &str, key: &[u8; 32]) -> u32 {
        if let Some(id) = self.ids.get(iface).and_then(|m| m.get(key)) {
            return *id;
        }
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => {
                let id = self.next;
                self.next = self.next.saturating_add(1);
                id
            }
        };
        self.ids
            .entry(iface.to_string())
            .or_default()
            .insert(*key, id);
        self.new.push((iface.to_string(), *key, id));
        id
    }

    /// The ids given since the last call.
    pub fn take_new(&mut self) -> Vec<(String, [u8; 32], u32)> {
        std::mem::take(&mut self.new)
    }

    /// Notes which ids this round's peers have (`present`: every peer read, on every
    /// interface; a peer of an interface gone is not) and returns the peers missing for
    /// longer than `grace` at `now`, by id, to be forgotten. A peer back within the grace
    /// is no longer missing. They stay known (and returned again by the next call) until
    /// [`PeerIds::release`]d, so a failed removal of their entries is retried.
    pub fn absent_longer_than(
        &mut self,
        present: &HashSet<u32>,
        now: Instant,
        grace: Duration,
    ) -> Vec<(String, [u8; 32], u32)> {
        let mut due = Vec::new();
        for (iface, keys) in &self.ids {
            for (key, id) in keys {
                if present.contains(id) {
                    self.absent.remove(id);
                    continue;
                }
                let since = *self.absent.entry(*id).or_insert(now);
                if now.saturating_duration_since(since) > grace {
                    due.push((iface.clone(), *key, *id));
                }
            }
        }
        due.sort_unstable_by_key(|d| d.2);
        due
    }

    /// Forgets `peers` (from [`PeerIds::absent_longer_than`]) and frees their ids: call once
    /// every map entry keyed by them is gone. A peer that comes back later gets an id
    /// afresh, and starts from zero.
    pub fn release(&mut self, peers: &[(String, [u8; 32], u32)]) {
        for (iface, key, id) in peers {
            let Some(keys) = self.ids.get_mut(iface) else {
                continue;
            };
            if keys.get(key) != Some(id) {
                continue;
            }
            keys.remove(key);
            if keys.is_empty() {
                self.ids.remove(iface);
            }
            self.absent.remove(id);
            self.new.retain(|n| n.2 != *id);
            if *id != PEER_UNKNOWN {
                self.free.insert(*id);
            }
        }
    }
}

pub struct Syncer {
    netlink: Netlink,
    opts: SyncOptions,
    /// The ids peers are counted under in the maps.
    ids: PeerIds,
    routes: HashMap<IpAddr, (Option<u32>, Instant)>,
    /// Messages already logged, so a persistent problem is logged once, not every second.
    logged: HashSet<String>,
    /// ifindex -> the UAPI socket name its peer state was last read from. wireguard-go
    /// names its socket after the interface at start and keeps it when the interface is
    /// renamed: a renamed device is still read through its old socket.
    uapi_sockets: HashMap<u32, String>,
    /// The tunnels whose control interface fails to answer while their last good state
    /// is kept.
    kept: KeptState,
    /// Peers counted by the last round, so "peers synced" is logged when the number
    /// changes (and at the first round), not every second.
    logged_peer_count: Option<usize>,
    /// Rounds completed.
    rounds: u64,
    /// What the peer maps were last written from, so an unchanged round writes nothing.
    maps: rounds::MapsWritten,
    /// When silent strangers were last looked for ([`Syncer::expire_strangers`]).
    strangers_swept: Option<Instant>,
}

/// How often silent strangers are looked for: each look reads every `UNKNOWN_WIRE` entry
/// (one syscall when it is empty, ~10 ms when full). An endpoint's last message is seen
/// changed at the next look at most, so its series go at most `--peer-grace` + two of
/// these after it.
const STRANGER_SWEEP: Duration = Duration::from_secs(5);

impl Syncer {
    pub fn new(netlink: Netlink, opts: SyncOptions) -> Self {
        Self {
            netlink,
            opts,
            ids: PeerIds::default(),
            routes: HashMap::new(),
            logged: HashSet::new(),
            uapi_sockets: HashMap::new(),
            kept: KeptState::default(),
            logged_peer_count: None,
            rounds: 0,
            maps: rounds::MapsWritten::default(),
            strangers_swept: None,
        }
    }

    /// Hands out `saved` ids (from [`crate::datapath::tunnel::TunnelMaps::saved_peer_ids`]) again to
    /// their peers, and new ids above them: a restarted agent counts every peer under its
    /// old id, whatever order the peers are read in. Call before the first [`Syncer::tick`].
    pub fn seed_peer_ids(&mut self, saved: Vec<(String, [u8; 32], u32)>) {
        self.ids = PeerIds::seeded(saved);
    }

    /// How long until the next round: [`rounds::sync_period`] of the peers the last round
    /// counted.
    pub fn period(&self) -> Duration {
        rounds::sync_period(self.logged_peer_count.unwrap_or(0))
    }

    fn warn_once(&mut self, msg: String) {
        if self.logged.insert(msg.clone()) {
            warn!("{msg}");
        }
    }

    /// One round. Errors of single interfaces are logged and leave the rest working; an
    /// error returned here means nothing could be synced (no netlink).
    pub async fn tick(
        &mut self,
        datapath: &Mutex<Datapath>,
        inventory: &RwLock<Inventory>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let links = self.netlink.links().await.inspect_err(|e| {
            errors::record(errors::RTNETLINK);
            self.warn_once(format!("reading the interfaces (rtnetlink): {e}"));
        })?;
        let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
        let link_names: HashMap<u32, String> =
            links.iter().map(|l| (l.index, l.name.clone())).collect();
        self.kept.retain(&link_names.keys().copied().collect());
        // Tunnels with peer state last round: still watched while their socket is missing.
        let had_state: HashSet<u32> = inventory
            .read()
            .map_err(|_| anyhow::anyhow!("inventory lock poisoned"))?
            .tunnels
            .iter()
            .filter(|t| t.backend != Backend::None)
            .map(|t| t.ifindex)
            .collect();

        let mut tunnels = Vec::new();
        for name in self.tunnel_names(&links, &had_state) {
            let Some(link) = by_name.get(name.as_str()) else {
                self.warn_once(format!(
                    "tunnel interface {name} does not exist (yet) in this network namespace"
                ));
                continue;
            };
            tunnels.push(self.read_tunnel(link, name, inventory).await);
        }
        let read_took = started.elapsed();

        // The obfuscation flows Mullvad and --obfuscation ask for: their remote ends are
        // routed too, so the underlays they leave through are watched.
        let wanted = {
            let mullvad = self.opts.mullvad.as_ref().and_then(|m| m.read().ok());
            obfuscation::wanted(&self.opts.obfuscation, mullvad.as_deref())
        };
        let routes_started = Instant::now();
        let routes = self
            .route_endpoints(&tunnels, obfuscation::remote_ips(&wanted))
            .await;
        let routes_took = routes_started.elapsed();
        topology::resolve(&mut tunnels, &routes, &link_names);
        let (flows, problems) = obfuscation::resolve(&wanted, &tunnels);
        for p in problems {
            self.warn_once(p);
        }
        obfuscation::set_via(&mut tunnels, &flows, &routes, &link_names);
        let underlays = self.underlays(&links, &tunnels, &routes);

        // None: the maps hold this round's peers already (only counters and handshake
        // times changed), so neither they nor the peer labels are touched.
        let want = self.maps.want(&tunnels, obfuscation::map_entries(&flows));
        let leak_cfg = self.leak_config(&by_name, &tunnels);
        // Labels first: a scrape must never meet a peer id in the counters it cannot name.
        let new_names = write_labels(inventory, &tunnels, &underlays, want.is_some())?;
        let (maps_result, maps_took) = {
            let mut dp = datapath
                .lock()
                .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?;
            if let Err(e) = dp.tunnel.save_iface_names(&new_names) {
                self.warn_once(format!(
                    "saving interface names: {e} (after a restart, counts of interfaces gone \
                     meanwhile show as ifindexN)"
                ));
            }
            // The maps before the hooks: a program that takes over a pinned link from the
            // previous agent's finds every peer already, and counts no packet as unknown.
            let written = self.write_maps(&mut dp, &tunnels, want.as_ref(), leak_cfg, inventory);
            self.watch(&mut dp, &by_name, &tunnels, &underlays);
            written
        };
        if let Err(e) = &maps_result {
            self.warn_once(format!("updating the peer maps: {e}"));
        }
        if want.is_some() {
            self.maps.done(maps_result.is_ok());
        }
        let times = [started.elapsed(), read_took, routes_took, maps_took];
        let changed = want.is_some();
        self.publish(
            inventory,
            (tunnels, flows),
            underlays,
            (maps_result, changed),
            times,
        )
    }

    /// One tunnel's peers from its control interface. A failed read keeps the state the
    /// previous round had for this interface (see [`kept`]); with none to keep, counting
    /// goes on without peer state (e.g. Mullvad's in-app WireGuard has no control socket)
    /// and traffic shows as peer "unknown".
    async fn read_tunnel(
        &mut self,
        link: &Link,
        name: String,
        inventory: &RwLock<Inventory>,
    ) -> Tunnel {
        // A renamed userspace device: its socket still has the old name.
        let read_as = self
            .uapi_sockets
            .get(&link.index)
            .filter(|s| **s != name && !wg::uapi_path(&name).exists() && wg::uapi_path(s).exists())
            .cloned()
            .unwrap_or_else(|| name.clone());
        let e = match read_device(&read_as).await {
            Ok((mut dev, backend)) => {
                if backend == Backend::Uapi {
                    self.uapi_sockets.insert(link.index, read_as.clone());
                }
                if let Some(failed) = self.kept.read_ok(link.index) {
                    info!("{name}: peer state read again after {failed} failed read(s)");
                }
                dev.name = name.clone();
                return self.tunnel(link, dev, backend);
            }
            Err(e) => e,
        };
        // What the previous round published for this interface; copied only now, when a
        // read failed, so that a good round copies nothing.
        let (was_uapi, outcome) = {
            let inv = inventory.read().ok();
            let previous = inv
                .as_ref()
                .and_then(|inv| inv.tunnels.iter().find(|t| t.ifindex == link.index));
            (
                previous.map(|t| t.backend) == Some(Backend::Uapi),
                self.kept
                    .read_failed(link.index, kept::failure_kind(&e), previous),
            )
        };
        let kernel = link.kind.as_deref() == Some("wireguard");
        if let Some(source) = failed_source(e.downcast_ref::<wg::WgError>(), kernel, was_uapi) {
            errors::record(source);
        }
        match outcome {
            OnFailure::Kept {
                dev,
                backend,
                first,
                log,
            } => {
                if first {
                    warn!(
                        "{name}: reading its peer state failed: {e}; keeping the last good \
                         state ({} peers) until a read succeeds or the interface is gone",
                        dev.peers.len()
                    );
                } else if log {
                    warn!("{name}: peer state still not read: {e}");
                }
                self.tunnel(link, dev, backend)
            }
            OnFailure::Nothing => {
                self.warn_once(format!("{name}: no peer state: {e}"));
                let dev = WgDevice {
                    name: name.clone(),
                    listen_port: 0,
                    public_key: None,
                    peers: Vec::new(),
                };
                self.tunnel(link, dev, Backend::None)
            }
        }
    }

    /// Attaches the programs to every watched interface with its role and framing, and
    /// detaches them from the interfaces no longer watched.
    fn watch(
        &mut self,
        dp: &mut Datapath,
        by_name: &HashMap<&str, &Link>,
        tunnels: &[Tunnel],
        underlays: &[Underlay],
    ) {
        let mut watched: HashMap<u32, (String, IfaceConfig)> = HashMap::new();
        for u in underlays {
            let l3 = by_name.get(u.name.as_str()).is_some_and(|l| l.l3);
            let flags = IfaceConfig::UNDERLAY | if l3 { IfaceConfig::L3 } else { 0 };
            watched.insert(u.ifindex, (u.name.clone(), IfaceConfig { flags }));
        }
        for t in tunnels {
            let l3 = by_name.get(t.name.as_str()).is_none_or(|l| l.l3);
            let flags = IfaceConfig::TUNNEL | if l3 { IfaceConfig::L3 } else { 0 };
            watched.insert(t.ifindex, (t.name.clone(), IfaceConfig { flags }));
        }
        let gone: Vec<u32> = dp
            .attachments()
            .map(|(i, _)| *i)
            .filter(|i| !watched.contains_key(i))
            .collect();
        for i in gone {
            dp.detach(i);
        }
        for (ifindex, (name, cfg)) in &watched {
            if let Err(e) = dp.attach(name, *ifindex, *cfg) {
                let msg = format!("{e}");
                if self.logged.insert(msg.clone()) {
                    warn!("{msg}");
                }
            }
        }
    }

    /// Until when the tunnels count as up for leak detection, and which (see [`leak`]): from
    /// their interfaces' flags, their peers and what the Mullvad daemon last said.
    fn leak_config(
        &self,
        by_name: &HashMap<&str, &Link>,
        tunnels: &[Tunnel],
    ) -> agent_common::maps::leak::LeakConfig {
        let mullvad = self
            .opts
            .mullvad
            .as_ref()
            .and_then(|m| m.read().ok().and_then(|m| m.tunnel_connected()));
        let views: Vec<leak::TunnelView> = tunnels
            .iter()
            .map(|t| leak::TunnelView {
                name: &t.name,
                ifindex: t.ifindex,
                link_up: by_name
                    .get(t.name.as_str())
                    .is_some_and(|l| l.up && l.carrier),
                peers: t.peers.len(),
            })
            .collect();
        let mullvad = mullvad
            .as_ref()
            .map(|(interface, connected)| leak::MullvadView {
                interface,
                connected: *connected,
            });
        leak::leak_config(&views, mullvad, crate::datapath::monotonic_ns())
    }

    /// Brings the peer maps, the leak window (`leak_cfg`, from [`Syncer::leak_config`]; what
    /// was held while it went unrenewed judged, [`leak::settle`]) and the crypto kprobes up
    /// to date; returns the peer maps' outcome and how long writing them took. `want`: None
    /// when the peer maps already hold what this round found.
    fn write_maps(
        &mut self,
        dp: &mut Datapath,
        tunnels: &[Tunnel],
        want: Option<&PeerMaps>,
        leak_cfg: agent_common::maps::leak::LeakConfig,
        inventory: &RwLock<Inventory>,
    ) -> (Result<(), DatapathError>, Duration) {
        let maps_started = Instant::now();
        // Ids given this round are saved before any packet is counted under them.
        let new_ids = self.ids.take_new();
        if let Err(e) = dp.tunnel.save_peer_ids(&new_ids) {
            self.warn_once(format!(
                "saving peer ids: {e} (a restarted agent may count those peers anew)"
            ));
        }
        let maps_result = want.map_or(Ok(()), |w| dp.sync_peers(w));
        self.forget_gone_peers(dp, tunnels, inventory);
        self.expire_strangers(dp);
        let maps_took = maps_started.elapsed();
        // Names for the verdict's log line, of interfaces gone too (pinned IFACE_NAMES); read
        // only when there is one to log. The sync loop is the inventory's only writer, so
        // this read under the datapath lock waits for nobody.
        let name = |i| inventory.read().ok().map(|inv| inv.iface_name(i));
        let now = crate::datapath::monotonic_ns();
        if let Err(e) = leak::settle(&mut dp.leak, leak_cfg, now, name) {
            self.warn_once(format!("leak detection: {e}"));
        }
        let kernel_wg = tunnels.iter().any(|t| t.backend == Backend::Netlink);
        if self.opts.crypto_kprobes && kernel_wg && !dp.crypto.attached() {
            let attached = crate::datapath::crypto::offsets()
                .map_err(|e| e.to_string())
                .and_then(|cfg| dp.attach_crypto(cfg).map_err(|e| e.to_string()));
            if let Err(e) = attached {
                self.warn_once(format!("no crypto timing: {e}"));
            }
        }
        (maps_result, maps_took)
    }

    /// Forgets the peers gone for longer than `--peer-grace` (see [`PeerIds`]): every map
    /// entry keyed by their ids, then their labels (so their series go from /metrics), then
    /// the ids themselves, free to be given again only now that nothing is keyed by them.
    /// After the peer maps are synced, so no program can still attribute a packet to them.
    /// One log line per batch; a failed removal is retried on the next round.
    fn forget_gone_peers(
        &mut self,
        dp: &mut Datapath,
        tunnels: &[Tunnel],
        inventory: &RwLock<Inventory>,
    ) {
        let present: HashSet<u32> = tunnels
            .iter()
            .flat_map(|t| t.peers.iter().map(|p| p.id))
            .collect();
        let grace = self.opts.peer_grace;
        let due = self.ids.absent_longer_than(&present, Instant::now(), grace);
        if due.is_empty() {
            return;
        }
        let ids: HashSet<u32> = due.iter().map(|d| d.2).collect();
        let removed = match dp.forget_peers(&ids, &due) {
            Ok(n) => n,
            Err(e) => {
                self.warn_once(format!(
                    "forgetting {} peer(s) gone for more than {}: {e} (retried every second)",
                    due.len(),
                    humantime::format_duration(grace)
                ));
                return;
            }
        };
        if let Ok(mut inv) = inventory.write() {
            for id in &ids {
                inv.peer_labels.remove(id);
            }
        }
        self.ids.release(&due);
        let mut per_iface: std::collections::BTreeMap<&str, usize> = Default::default();
        for (iface, _, _) in &due {
            *per_iface.entry(iface.as_str()).or_default() += 1;
        }
        let where_: Vec<String> = per_iface
            .iter()
            .map(|(iface, n)| format!("{n} of {iface}"))
            .collect();
        info!(
            "forgot {} peer(s) gone for more than {} ({}): their series and {removed} map \
             entries are removed",
            due.len(),
            humantime::format_duration(grace),
            where_.join(", ")
        );
    }

    /// Every [`STRANGER_SWEEP`]: removes the unknown endpoints silent for longer than
    /// `--peer-grace` ([`crate::datapath::wire::WireMaps::expire_strangers`]), so that a
    /// peer's old endpoint, a replaced peer's first handshake (before the relay knew its new
    /// key's endpoint) or a scan leaves the series of its own as a gone peer does; what they
    /// counted stays in `peer="endpoint:other"`.
    fn expire_strangers(&mut self, dp: &mut Datapath) {
        let now = Instant::now();
        if self
            .strangers_swept
            .is_some_and(|t| now.saturating_duration_since(t) < STRANGER_SWEEP)
        {
            return;
        }
        self.strangers_swept = Some(now);
        match dp.wire.expire_strangers(now, self.opts.peer_grace) {
            Ok(0) => {}
            Ok(n) => info!(
                "{n} unknown endpoint(s) silent for more than {}: their series are removed, \
                 their counts stay in endpoint:other",
                humantime::format_duration(self.opts.peer_grace)
            ),
            Err(e) => self.warn_once(format!("expiring silent unknown endpoints: {e}")),
        }
    }

    /// Replaces the inventory's tunnels and underlays with this round's (their counters and
    /// handshake times are fresh every round), and logs what changed. `changed`: false when
    /// nothing that goes into the maps or the change log did. `times`: the whole round,
    /// reading the control interfaces, routes, BPF maps.
    fn publish(
        &mut self,
        inventory: &RwLock<Inventory>,
        (tunnels, flows): (Vec<Tunnel>, Vec<obfuscation::ObfuscatedFlow>),
        underlays: Vec<Underlay>,
        (maps_result, changed): (Result<(), DatapathError>, bool),
        [took, read_took, routes_took, maps_took]: [Duration; 4],
    ) -> anyhow::Result<()> {
        let peers: usize = tunnels.iter().map(|t| t.peers.len()).sum();
        // The first round writes every peer into the maps: its duration is the time a
        // (re)started agent needs before it counts every peer.
        if self.logged_peer_count != Some(peers) {
            self.logged_peer_count = Some(peers);
            info!(
                "peers synced: {peers} peers on {} tunnel(s) in {:.1} ms (control interfaces \
                 {:.1} ms, routes {:.1} ms, BPF maps {:.1} ms)",
                tunnels.len(),
                took.as_secs_f64() * 1e3,
                read_took.as_secs_f64() * 1e3,
                routes_took.as_secs_f64() * 1e3,
                maps_took.as_secs_f64() * 1e3,
            );
        }
        let before = {
            let mut inv = inventory
                .write()
                .map_err(|_| anyhow::anyhow!("inventory lock poisoned"))?;
            inv.sync_duration = Some(took);
            inv.sync_interval = Some(rounds::sync_period(peers));
            inv.sync_rounds = (self.maps.written, self.maps.unchanged);
            if inv.obfuscation != flows {
                for f in flows.iter().filter(|f| !inv.obfuscation.contains(f)) {
                    info!("{}", obfuscation::describe(f));
                }
                for f in inv.obfuscation.iter().filter(|f| !flows.contains(f)) {
                    info!("no longer: {}", obfuscation::describe(f));
                }
                inv.obfuscation = flows;
            }
            let before = std::mem::replace(&mut inv.tunnels, tunnels);
            inv.underlays = underlays;
            inv.last_error = maps_result
                .err()
                .map(|e| format!("updating the peer maps: {e}"));
            inv.synced_at = Some(SystemTime::now());
            before
        };
        // Changes are logged from the second round on (the first one finds everything), and
        // compared with the tunnels this round replaced rather than with a copy of the
        // inventory taken beforehand: at 10,000 peers that copy cost more than the rest.
        // An unchanged round has nothing to log, and is not compared at all.
        if self.rounds > 0
            && changed
            && let Ok(inv) = inventory.read()
        {
            for line in tunnel_changes(&before, &inv.tunnels) {
                info!("{line}");
            }
        }
        self.rounds += 1;
        Ok(())
    }

    /// The tunnels to read: `--tunnel`, or every WireGuard interface here, every interface
    /// with a UAPI socket, and every one that had peer state last round (`had_state`:
    /// kept while its socket is missing for a while).
    fn tunnel_names(&self, links: &[Link], had_state: &HashSet<u32>) -> Vec<String> {
        if !self.opts.tunnels.is_empty() {
            return self.opts.tunnels.clone();
        }
        // The UAPI socket directory is shared by every namespace: only sockets whose
        // interface exists here belong to us.
        let here: HashSet<&str> = links.iter().map(|l| l.name.as_str()).collect();
        let mut names: Vec<String> = links
            .iter()
            .filter(|l| l.kind.as_deref() == Some("wireguard"))
            .map(|l| l.name.clone())
            .collect();
        let sockets = wg::list_uapi_sockets();
        for s in &sockets {
            if here.contains(s.as_str()) && !names.contains(s) {
                names.push(s.clone());
            }
        }
        // Renamed userspace devices, still reachable through their old socket.
        for l in links {
            if self
                .uapi_sockets
                .get(&l.index)
                .is_some_and(|s| sockets.contains(s))
                && !names.contains(&l.name)
            {
                names.push(l.name.clone());
            }
        }
        for l in links {
            if had_state.contains(&l.index) && !names.contains(&l.name) {
                names.push(l.name.clone());
            }
        }
        names.sort();
        names
    }

    fn tunnel(&mut self, link: &Link, dev: WgDevice, backend: Backend) -> Tunnel {
        let mut peers = Vec::with_capacity(dev.peers.len());
        for p in dev.peers {
            let id = self.ids.get(&link.name, &p.public_key);
            let public_key = wg::key_to_base64(&p.public_key);
            let friendly_name = self.opts.friendly_names.get(&public_key).cloned();
            peers.push(Peer {
                friendly_name,
                ..Peer::new(id, public_key, p)
            });
        }
        Tunnel {
            name: link.name.clone(),
            ifindex: link.index,
            mtu: link.mtu,
            backend,
            listen_port: dev.listen_port,
            peers,
        }
    }

    /// The routes to the peers' endpoints and to the `extra` addresses (the obfuscation
    /// flows' remote ends).
    async fn route_endpoints(
        &mut self,
        tunnels: &[Tunnel],
        extra: impl Iterator<Item = IpAddr>,
    ) -> topology::RouteOif {
        let now = Instant::now();
        let mut out = topology::RouteOif::new();
        let mut ips: HashSet<IpAddr> = tunnels
            .iter()
            .flat_map(|t| t.peers.iter())
            .filter_map(|p| p.wg.endpoint.map(|e| e.ip()))
            .chain(extra)
            .collect();
        // A peer without an endpoint (a relay's client before its first handshake) will
        // arrive wherever the default route points: look that up with documentation
        // addresses, which only ever match a default route and are never sent to.
        if tunnels
            .iter()
            .flat_map(|t| t.peers.iter())
            .any(|p| p.wg.endpoint.is_none())
        {
            ips.insert(DEFAULT_ROUTE_PROBE_V4);
            ips.insert(DEFAULT_ROUTE_PROBE_V6);
        }
        for ip in ips {
            let cached = self
                .routes
                .get(&ip)
                .filter(|(_, at)| now.duration_since(*at) < ROUTE_TTL)
                .map(|(oif, _)| *oif);
            let oif = match cached {
                Some(oif) => oif,
                None => match self.netlink.route_oif(ip).await {
                    Ok(oif) => {
                        self.routes.insert(ip, (oif, now));
                        oif
                    }
                    Err(e) => {
                        errors::record(errors::RTNETLINK);
                        self.warn_once(format!("route lookup for a peer endpoint failed: {e}"));
                        None
                    }
                },
            };
            out.insert(ip, oif);
        }
        self.routes.retain(|ip, _| out.contains_key(ip));
        out
    }

    fn underlays(
        &mut self,
        links: &[Link],
        tunnels: &[Tunnel],
        routes: &topology::RouteOif,
    ) -> Vec<Underlay> {
        let tunnel_idx: HashSet<u32> = tunnels.iter().map(|t| t.ifindex).collect();
        if !self.opts.underlays.is_empty() {
            let mut out = Vec::new();
            for name in self.opts.underlays.clone() {
                match links.iter().find(|l| l.name == name) {
                    Some(l) => out.push(Underlay {
                        name: l.name.clone(),
                        ifindex: l.index,
                    }),
                    None => self.warn_once(format!(
                        "underlay interface {name} does not exist (yet) in this network namespace"
                    )),
                }
            }
            return out;
        }
        let mut idx: Vec<u32> = routes
            .values()
            .flatten()
            .copied()
            .filter(|i| !tunnel_idx.contains(i))
            .collect();
        idx.sort();
        idx.dedup();
        idx.into_iter()
            .filter_map(|i| links.iter().find(|l| l.index == i))
            // The loopback device carries nothing of a peer's.
            .filter(|l| l.name != "lo")
            .map(|l| Underlay {
                name: l.name.clone(),
                ifindex: l.index,
            })
            .collect()
    }
}

/// Which source a failed [`wg::read_device`] counts against in
/// `wirescope_source_errors_total`, if any. `kernel`: the link is a kernel WireGuard
/// interface, so netlink should have answered; `was_uapi`: its state was last read through
/// a UAPI socket, so that socket should have answered. No control interface at all for a
/// userspace device never read (Mullvad's in-app WireGuard) is not a failed read, nor is a
/// join error.
pub fn failed_source(
    err: Option<&wg::WgError>,
    kernel: bool,
    was_uapi: bool,
) -> Option<&'static str> {
    use wg::WgError::*;
    match err? {
        NotFound { .. } if kernel => Some(errors::WIREGUARD_NETLINK),
        NotFound { .. } => was_uapi.then_some(errors::WIREGUARD_UAPI),
        InvalidName(_) => None,
        Io { .. }
        | Timeout { .. }
        | TooLarge { .. }
        | Truncated { .. }
        | Malformed { .. }
        | Errno { .. } => Some(errors::WIREGUARD_UAPI),
    }
}

async fn read_device(name: &str) -> anyhow::Result<(WgDevice, Backend)> {
    let name = name.to_string();
    Ok(tokio::task::spawn_blocking(move || wg::read_device(&name)).await??)
}

/// The peer maps the tunnels call for.
pub fn peer_maps(tunnels: &[Tunnel]) -> PeerMaps {
    let mut m = PeerMaps::default();
    for t in tunnels {
        if t.listen_port != 0 {
            m.wg_ports.insert(t.listen_port, 1);
        }
        for p in &t.peers {
            for net in &p.wg.allowed_ips {
                match net.trunc() {
                    IpNet::V4(n) => {
                        m.allowed_v4
                            .insert((t.ifindex, n.addr().octets(), n.prefix_len()), p.id);
                    }
                    IpNet::V6(n) => {
                        m.allowed_v6
                            .insert((t.ifindex, n.addr().octets(), n.prefix_len()), p.id);
                    }
                }
            }
            if let Some(ep) = p.wg.endpoint {
                m.endpoints.insert(endpoint_key(ep.ip(), ep.port()), p.id);
            }
        }
    }
    m
}

pub fn endpoint_key(ip: IpAddr, port: u16) -> Endpoint {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            // A v4-mapped endpoint travels as IPv4 on the wire.
            if let Some(v4) = a.to_ipv4_mapped() {
                addr[..4].copy_from_slice(&v4.octets());
                4
            } else {
                addr = a.octets();
                6
            }
        }
    };
    Endpoint {
        addr,
        port,
        family,
        _pad: 0,
    }
}

/// The interface and peer names the collectors need for this round's ids, written only
/// when new or changed: at 10,000 peers, rewriting them every second cost two allocations
/// per peer per round. Returns the interface names that were new or changed, to be pinned.
/// `peers`: false when the peers' names and keys are the last round's, so theirs are not
/// checked.
fn write_labels(
    inventory: &RwLock<Inventory>,
    tunnels: &[Tunnel],
    underlays: &[Underlay],
    peers: bool,
) -> anyhow::Result<Vec<(u32, String)>> {
    let mut inv = inventory
        .write()
        .map_err(|_| anyhow::anyhow!("inventory lock poisoned"))?;
    let mut new_names = Vec::new();
    for t in tunnels {
        if set_label(&mut inv.iface_names, t.ifindex, &t.name) {
            new_names.push((t.ifindex, t.name.clone()));
        }
        for p in t.peers.iter().filter(|_| peers) {
            let same = inv
                .peer_labels
                .get(&p.id)
                .is_some_and(|(i, k)| *i == t.name && *k == p.public_key);
            if !same {
                inv.peer_labels
                    .insert(p.id, (t.name.clone(), p.public_key.clone()));
            }
        }
    }
    for u in underlays {
        if set_label(&mut inv.iface_names, u.ifindex, &u.name) {
            new_names.push((u.ifindex, u.name.clone()));
        }
    }
    Ok(new_names)
}

/// `map[index] = name`, allocating only when it is new or changed; whether it was.
fn set_label(map: &mut HashMap<u32, String>, index: u32, name: &str) -> bool {
    let changed = map.get(&index).is_none_or(|n| n != name);
    if changed {
        map.insert(index, name.to_owned());
    }
    changed
}

/// Each change between two syncs, one line each (the sync loop logs them): a tunnel
/// appearing, going, re-created (same name, new ifindex: a restarted wireguard-go or `ip link
/// del/add`), renamed (same ifindex, new name), its MTU changed, and peers added, removed or
/// given a new endpoint (the address itself is not logged: it is private).
pub fn changes(before: &Inventory, after: &Inventory) -> Vec<String> {
    tunnel_changes(&before.tunnels, &after.tunnels)
}

/// [`changes`] between two lists of tunnels.
pub fn tunnel_changes(before: &[Tunnel], after: &[Tunnel]) -> Vec<String> {
    let mut out = Vec::new();
    fn by_name(tunnels: &[Tunnel]) -> HashMap<&str, &Tunnel> {
        tunnels.iter().map(|t| (t.name.as_str(), t)).collect()
    }
    let (b, a) = (by_name(before), by_name(after));
    let mut renamed_from: HashSet<&str> = HashSet::new();
    let mut names: Vec<&str> = a.keys().copied().collect();
    names.sort();
    for n in names {
        let t = a[n];
        let Some(old) = b.get(n) else {
            // A vanished name with this ifindex: renamed.
            match b
                .values()
                .find(|o| o.ifindex == t.ifindex && !a.contains_key(o.name.as_str()))
            {
                Some(o) => {
                    out.push(format!(
                        "tunnel {} renamed to {n} (ifindex {})",
                        o.name, t.ifindex
                    ));
                    renamed_from.insert(o.name.as_str());
                    peer_changes(&mut out, n, o, t);
                }
                None => out.push(format!("watching tunnel {n} (ifindex {})", t.ifindex)),
            }
            continue;
        };
        if old.ifindex != t.ifindex {
            out.push(format!(
                "tunnel {n} re-created (ifindex {} -> {})",
                old.ifindex, t.ifindex
            ));
        }
        if old.mtu != t.mtu {
            out.push(format!("tunnel {n}: MTU {} -> {}", old.mtu, t.mtu));
        }
        peer_changes(&mut out, n, old, t);
    }
    let mut gone: Vec<&str> = b
        .keys()
        .copied()
        .filter(|n| !a.contains_key(n) && !renamed_from.contains(n))
        .collect();
    gone.sort();
    for n in gone {
        out.push(format!("tunnel {n} is gone"));
    }
    out
}

/// Whether both list the same peers with the same endpoints, in any order: the common case,
/// checked without building maps of keys (wireguard-go lists its peers in a different order
/// on every read). Peers are paired through their map ids, sorted; a false "different" only
/// costs the full comparison.
fn same_peers(old: &Tunnel, new: &Tunnel) -> bool {
    if old.peers.len() != new.peers.len() {
        return false;
    }
    let by_id = |t: &Tunnel| {
        let mut v: Vec<(u32, u32)> = (0u32..).zip(&t.peers).map(|(i, p)| (p.id, i)).collect();
        v.sort_unstable();
        v
    };
    let (a, b) = (by_id(old), by_id(new));
    a.iter().zip(&b).all(|(&(_, i), &(_, j))| {
        let (p, q) = (&old.peers[i as usize], &new.peers[j as usize]);
        p.id == q.id && p.wg.public_key == q.wg.public_key && p.wg.endpoint == q.wg.endpoint
    })
}

fn peer_changes(out: &mut Vec<String>, name: &str, old: &Tunnel, new: &Tunnel) {
    if same_peers(old, new) {
        return;
    }
    fn keys(t: &Tunnel) -> HashMap<&str, Option<std::net::SocketAddr>> {
        t.peers
            .iter()
            .map(|p| (p.public_key.as_str(), p.wg.endpoint))
            .collect()
    }
    let (b, a) = (keys(old), keys(new));
    let mut added: Vec<&str> = a.keys().copied().filter(|k| !b.contains_key(k)).collect();
    let mut removed: Vec<&str> = b.keys().copied().filter(|k| !a.contains_key(k)).collect();
    let mut moved: Vec<&str> = a
        .iter()
        .filter(|(k, e)| b.get(*k).is_some_and(|old| old != *e && e.is_some()))
        .map(|(k, _)| *k)
        .collect();
    added.sort();
    removed.sort();
    moved.sort();
    for k in removed {
        out.push(format!("tunnel {name}: peer {k} removed"));
    }
    for k in added {
        out.push(format!("tunnel {name}: peer {k} added"));
    }
    for k in moved {
        out.push(format!("tunnel {name}: peer {k} has a new endpoint"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::inventory::WgPeer;

    fn peer(key: &str, ep: &str) -> Peer {
        let wg = WgPeer {
            endpoint: ep.parse().ok(),
            ..WgPeer::new([0; 32])
        };
        Peer::new(1, key.into(), wg)
    }

    fn tun(name: &str, ifindex: u32, mtu: u32, peers: Vec<Peer>) -> Tunnel {
        Tunnel {
            name: name.into(),
            ifindex,
            mtu,
            backend: Backend::Uapi,
            listen_port: 1,
            peers,
        }
    }

    fn inv(tunnels: Vec<Tunnel>) -> Inventory {
        Inventory {
            tunnels,
            ..Default::default()
        }
    }

    #[test]
    fn each_change_is_one_line() {
        let a = inv(vec![tun("wg0", 5, 1420, vec![peer("A", "192.0.2.1:1")])]);
        assert!(changes(&a, &a).is_empty());
        assert_eq!(
            changes(&inv(vec![]), &a),
            ["watching tunnel wg0 (ifindex 5)"]
        );
        assert_eq!(changes(&a, &inv(vec![])), ["tunnel wg0 is gone"]);
        let recreated = inv(vec![tun("wg0", 9, 1420, vec![peer("A", "192.0.2.1:1")])]);
        assert_eq!(
            changes(&a, &recreated),
            ["tunnel wg0 re-created (ifindex 5 -> 9)"]
        );
        let renamed = inv(vec![tun("wg1", 5, 1420, vec![peer("A", "192.0.2.1:1")])]);
        assert_eq!(
            changes(&a, &renamed),
            ["tunnel wg0 renamed to wg1 (ifindex 5)"]
        );
        let mtu = inv(vec![tun("wg0", 5, 1380, vec![peer("A", "192.0.2.1:1")])]);
        assert_eq!(changes(&a, &mtu), ["tunnel wg0: MTU 1420 -> 1380"]);
        let none = inv(vec![tun("wg0", 5, 1420, vec![])]);
        assert_eq!(changes(&a, &none), ["tunnel wg0: peer A removed"]);
        assert_eq!(changes(&none, &a), ["tunnel wg0: peer A added"]);
        let moved = inv(vec![tun("wg0", 5, 1420, vec![peer("A", "192.0.2.9:1")])]);
        let lines = changes(&a, &moved);
        assert_eq!(lines, ["tunnel wg0: peer A has a new endpoint"]);
        assert!(!lines[0].contains("192.0.2"), "no address in the log");
    }

    #[test]
    fn failed_reads_count_against_their_source() {
        let path = std::path::PathBuf::from("/x");
        let nf = wg::WgError::NotFound {
            name: "wg0".into(),
            netlink: "no device".into(),
            path: path.clone(),
        };
        assert_eq!(
            failed_source(Some(&nf), true, false),
            Some(errors::WIREGUARD_NETLINK)
        );
        assert_eq!(failed_source(Some(&nf), false, false), None);
        // The socket of a device read through it before is gone: a failed UAPI read.
        assert_eq!(
            failed_source(Some(&nf), false, true),
            Some(errors::WIREGUARD_UAPI)
        );
        let t = wg::WgError::Timeout {
            path: path.clone(),
            timeout: Duration::from_secs(2),
        };
        assert_eq!(
            failed_source(Some(&t), false, false),
            Some(errors::WIREGUARD_UAPI)
        );
        let big = wg::WgError::TooLarge { path, cap: 1 };
        assert_eq!(
            failed_source(Some(&big), true, false),
            Some(errors::WIREGUARD_UAPI)
        );
        assert_eq!(failed_source(None, true, true), None);
    }

    #[test]
    fn peer_ids_are_kept_whatever_the_read_order() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let mut ids = PeerIds::default();
        assert_eq!((ids.get("wg0", &a), ids.get("wg0", &b)), (1, 2));
        // The same peers read in the other order keep their ids; none is new.
        assert_eq!((ids.get("wg0", &b), ids.get("wg0", &a)), (2, 1));
        let saved = ids.take_new();
        assert_eq!(saved.len(), 2);
        assert!(ids.take_new().is_empty());

        // A restarted agent, seeded with what was saved, reads the peers in another order
        // and meets a new one: the old ids again, the new one above them.
        let mut again = PeerIds::seeded(saved);
        assert_eq!(again.get("wg0", &c), 3);
        assert_eq!(again.get("wg0", &b), 2);
        assert_eq!(again.get("wg0", &a), 1);
        assert_eq!(again.take_new(), vec![("wg0".to_string(), c, 3)]);
        // The same key on another interface is another peer (ids are unique over all).
        assert_eq!(again.get("wg1", &a), 4);
        // Nonsense in the map (id 0, PEER_UNKNOWN) is not handed out.
        let mut odd = PeerIds::seeded([("wg0".to_string(), a, 0)]);
        assert_eq!(odd.get("wg0", &a), 1);
    }

    /// A peer missing for the grace or less is kept, for longer it is due (and stays due
    /// until released); one back within the grace is missing afresh from its next absence.
    #[test]
    fn peers_are_due_after_the_grace_and_kept_within_it() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let grace = Duration::from_secs(10);
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut ids = PeerIds::default();
        let (ia, ib) = (ids.get("wg0", &a), ids.get("wg0", &b));
        let both: HashSet<u32> = [ia, ib].into();
        let only_a: HashSet<u32> = [ia].into();
        assert!(ids.absent_longer_than(&both, t0, grace).is_empty());
        // b missing from t0 + 1 s on: kept at exactly the grace, due just after it.
        assert!(ids.absent_longer_than(&only_a, t0 + s(1), grace).is_empty());
        assert!(
            ids.absent_longer_than(&only_a, t0 + s(11), grace)
                .is_empty()
        );
        let due = ids.absent_longer_than(&only_a, t0 + s(11) + Duration::from_millis(1), grace);
        assert_eq!(due, vec![("wg0".to_string(), b, ib)]);
        // Not released (its entries could not be removed): due again next round.
        assert_eq!(
            ids.absent_longer_than(&only_a, t0 + s(12), grace),
            due,
            "retried"
        );

        // a goes missing, comes back within the grace: its id is kept, and its next
        // absence counts from then.
        let none = HashSet::new();
        let mut ids = PeerIds::default();
        let ia = ids.get("wg0", &a);
        assert!(ids.absent_longer_than(&none, t0, grace).is_empty());
        assert!(ids.absent_longer_than(&none, t0 + s(9), grace).is_empty());
        assert!(
            ids.absent_longer_than(&[ia].into(), t0 + s(10), grace)
                .is_empty()
        );
        assert_eq!(ids.get("wg0", &a), ia, "back within the grace: the same id");
        assert!(ids.absent_longer_than(&none, t0 + s(15), grace).is_empty());
        assert!(ids.absent_longer_than(&none, t0 + s(25), grace).is_empty());
        assert_eq!(ids.absent_longer_than(&none, t0 + s(26), grace).len(), 1);
    }

    /// Every peer of an interface gone is missing (the sync reads no peer of it): all are
    /// due after the grace, those of other interfaces are not.
    #[test]
    fn peers_of_an_interface_gone_are_due_after_the_grace() {
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut ids = PeerIds::default();
        let gone: Vec<u32> = (1..=3u8).map(|k| ids.get("wg0", &[k; 32])).collect();
        let kept = ids.get("wg1", &[9; 32]);
        let present: HashSet<u32> = [kept].into();
        assert!(ids.absent_longer_than(&present, t0, grace).is_empty());
        let due = ids.absent_longer_than(&present, t0 + Duration::from_secs(6), grace);
        assert_eq!(
            due,
            (1..=3u8)
                .zip(&gone)
                .map(|(k, id)| ("wg0".to_string(), [k; 32], *id))
                .collect::<Vec<_>>()
        );
    }

    /// A released id is given again (lowest first, before new ones), only after release,
    /// and never 0; the peer itself, back, gets an id afresh. Seeded ids are tracked too.
    #[test]
    fn released_ids_are_given_again() {
        let (a, b, c, d) = ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32]);
        let grace = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut ids = PeerIds::seeded([
            ("wg0".to_string(), a, 1),
            ("wg0".to_string(), b, 2),
            ("wg0".to_string(), c, 3),
        ]);
        let present: HashSet<u32> = [3].into();
        assert!(ids.absent_longer_than(&present, t0, grace).is_empty());
        let due = ids.absent_longer_than(&present, t0 + Duration::from_secs(2), grace);
        assert_eq!(due.iter().map(|d| d.2).collect::<Vec<_>>(), [1, 2]);
        // Before release the ids hold: a new peer gets one above them.
        let mut before = PeerIds::seeded([("wg0".to_string(), a, 1)]);
        let _ = before.absent_longer_than(&HashSet::new(), t0, grace);
        assert_eq!(before.get("wg0", &d), 2);
        ids.release(&due);
        // Released: given again, lowest first, then new ones above the highest.
        assert_eq!(ids.get("wg1", &d), 1);
        assert_eq!(
            ids.get("wg0", &a),
            2,
            "a back after it was forgotten: afresh"
        );
        assert_eq!(ids.get("wg0", &b), 4);
        assert_eq!(ids.get("wg0", &c), 3, "present all along: kept");
        assert_eq!(
            ids.take_new(),
            vec![
                ("wg1".to_string(), d, 1),
                ("wg0".to_string(), a, 2),
                ("wg0".to_string(), b, 4)
            ]
        );
        // Releasing what is not known (a stale batch) changes nothing; 0 is never freed.
        ids.release(&[("wg0".to_string(), c, 7), ("wg9".to_string(), a, 0)]);
        assert_eq!(ids.get("wg0", &c), 3);
        assert_eq!(ids.get("wg2", &a), 5);
    }

    #[test]
    fn interface_names_to_pin_are_the_new_and_changed_ones() {
        let inv = RwLock::new(Inventory::default());
        let under = |name: &str, ifindex| Underlay {
            name: name.to_string(),
            ifindex,
        };
        let round = |tunnels: &[Tunnel], underlays: &[Underlay]| {
            write_labels(&inv, tunnels, underlays, true).expect("labels")
        };
        let named = |v: &[(u32, &str)]| -> Vec<(u32, String)> {
            v.iter().map(|(i, n)| (*i, n.to_string())).collect()
        };
        let t = [tun("wg0", 5, 1420, vec![])];
        assert_eq!(
            round(&t, &[under("eth0", 2)]),
            named(&[(5, "wg0"), (2, "eth0")])
        );
        assert_eq!(round(&t, &[under("eth0", 2)]), named(&[]), "nothing new");
        // Renamed, and re-created under a new ifindex: each is pinned.
        assert_eq!(
            round(&[tun("wg1", 5, 1420, vec![])], &[under("eth0", 2)]),
            named(&[(5, "wg1")])
        );
        assert_eq!(
            round(&[tun("wg1", 6, 1420, vec![])], &[]),
            named(&[(6, "wg1")])
        );
        // Seeded from the pins: known, not written again.
        let inv2 = RwLock::new(Inventory::default());
        inv2.write()
            .unwrap()
            .seed_labels(vec![(5, "wg0".to_string())], &[]);
        assert_eq!(write_labels(&inv2, &t, &[], true).unwrap(), named(&[]));
    }
}
