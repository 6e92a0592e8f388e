//! The sync loop: find the tunnels and underlays in this namespace, read their peers, hook
//! the programs to new interfaces, unhook vanished ones, and bring the peer maps up to date.
//! It runs every second, so a change shows in the maps within two.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use agent_common::maps::{Endpoint, IfaceConfig};
use ipnet::IpNet;
use log::{info, warn};

use crate::{
    datapath::{Datapath, PeerMaps},
    inventory::{Backend, Inventory, Peer, Tunnel, Underlay, WgDevice},
    netlink::{Link, Netlink},
    source_errors, topology, wg,
};

/// How long a route lookup is trusted; routes rarely change, peers' endpoints do.
const ROUTE_TTL: Duration = Duration::from_secs(5);
const DEFAULT_ROUTE_PROBE_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
const DEFAULT_ROUTE_PROBE_V6: IpAddr =
    IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// `--tunnel`: watch exactly these; empty means every WireGuard interface found.
    pub tunnels: Vec<String>,
    /// `--underlay`: watch exactly these; empty means the routes to the peers' endpoints.
    pub underlays: Vec<String>,
    /// Base64 public key -> friendly name, from `--wg-config` files.
    pub friendly_names: HashMap<String, String>,
    /// Time kernel WireGuard's crypto with kprobes (the kernel has them).
    pub crypto_kprobes: bool,
}

pub struct Syncer {
    netlink: Netlink,
    opts: SyncOptions,
    ids: HashMap<(String, [u8; 32]), u32>,
    next_id: u32,
    routes: HashMap<IpAddr, (Option<u32>, Instant)>,
    /// Messages already logged, so a persistent problem is logged once, not every second.
    logged: HashSet<String>,
    /// ifindex -> the UAPI socket name its peer state was last read from. wireguard-go
    /// names its socket after the interface at start and keeps it when the interface is
    /// renamed: a renamed device is still read through its old socket.
    uapi_sockets: HashMap<u32, String>,
}

impl Syncer {
    pub fn new(netlink: Netlink, opts: SyncOptions) -> Self {
        Self {
            netlink,
            opts,
            ids: HashMap::new(),
            next_id: 1,
            routes: HashMap::new(),
            logged: HashSet::new(),
            uapi_sockets: HashMap::new(),
        }
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
        let links = self.netlink.links().await.inspect_err(|e| {
            source_errors::record(source_errors::RTNETLINK);
            self.warn_once(format!("reading the interfaces (rtnetlink): {e}"));
        })?;
        let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
        let link_names: HashMap<u32, String> =
            links.iter().map(|l| (l.index, l.name.clone())).collect();

        let mut tunnels = Vec::new();
        for name in self.tunnel_names(&links) {
            let Some(link) = by_name.get(name.as_str()) else {
                self.warn_once(format!(
                    "tunnel interface {name} does not exist (yet) in this network namespace"
                ));
                continue;
            };
            // A renamed userspace device: its socket still has the old name.
            let read_as = self
                .uapi_sockets
                .get(&link.index)
                .filter(|s| {
                    **s != name && !wg::uapi_path(&name).exists() && wg::uapi_path(s).exists()
                })
                .cloned()
                .unwrap_or_else(|| name.clone());
            let (dev, backend) = match read_device(&read_as).await {
                Ok((mut dev, backend)) => {
                    if backend == Backend::Uapi {
                        self.uapi_sockets.insert(link.index, read_as.clone());
                    }
                    dev.name = name.clone();
                    (dev, backend)
                }
                Err(e) => {
                    // Datapath counting goes on without peer state (e.g. Mullvad's in-app
                    // WireGuard has no control socket); traffic then shows as peer "unknown".
                    let kernel = link.kind.as_deref() == Some("wireguard");
                    if let Some(source) = failed_source(e.downcast_ref::<wg::WgError>(), kernel) {
                        source_errors::record(source);
                    }
                    self.warn_once(format!("{name}: no peer state: {e}"));
                    (
                        WgDevice {
                            name: name.clone(),
                            listen_port: 0,
                            public_key: None,
                            peers: Vec::new(),
                        },
                        Backend::None,
                    )
                }
            };
            tunnels.push(self.tunnel(link, dev, backend));
        }

        let routes = self.route_endpoints(&tunnels).await;
        topology::resolve(&mut tunnels, &routes, &link_names);
        let underlays = self.underlays(&links, &tunnels, &routes);

        let want = peer_maps(&tunnels);
        // Labels first: a scrape must never meet a peer id in the counters it cannot name.
        {
            let mut inv = inventory
                .write()
                .map_err(|_| anyhow::anyhow!("inventory lock poisoned"))?;
            for t in &tunnels {
                inv.iface_names.insert(t.ifindex, t.name.clone());
                for p in &t.peers {
                    inv.peer_labels
                        .insert(p.id, (t.name.clone(), p.public_key.clone()));
                }
            }
            for u in &underlays {
                inv.iface_names.insert(u.ifindex, u.name.clone());
            }
        }
        let maps_result;
        {
            let mut dp = datapath
                .lock()
                .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?;
            let mut watched: HashMap<u32, (String, IfaceConfig)> = HashMap::new();
            for u in &underlays {
                let l3 = by_name.get(u.name.as_str()).is_some_and(|l| l.l3);
                let flags = IfaceConfig::UNDERLAY | if l3 { IfaceConfig::L3 } else { 0 };
                watched.insert(u.ifindex, (u.name.clone(), IfaceConfig { flags }));
            }
            for t in &tunnels {
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
            maps_result = dp.sync_peers(&want);
            // Leak detection is on while a handshake is less than 180 s old.
            let up_until = crate::metrics::leak::tunnel_up_until_ns(
                &tunnels,
                SystemTime::now(),
                crate::health::monotonic_ns(),
            );
            if let Err(e) = dp.leak.set_tunnel_up_until(up_until) {
                self.warn_once(format!("leak detection: {e}"));
            }
            let kernel_wg = tunnels.iter().any(|t| t.backend == Backend::Netlink);
            if self.opts.crypto_kprobes && kernel_wg && !dp.crypto_attached() {
                let attached = crate::crypto::offsets()
                    .map_err(|e| e.to_string())
                    .and_then(|cfg| dp.attach_crypto(cfg).map_err(|e| e.to_string()));
                if let Err(e) = attached {
                    self.warn_once(format!("no crypto timing: {e}"));
                }
            }
        }
        if let Err(e) = &maps_result {
            self.warn_once(format!("updating the peer maps: {e}"));
        }

        let mut inv = inventory
            .write()
            .map_err(|_| anyhow::anyhow!("inventory lock poisoned"))?;
        inv.tunnels = tunnels;
        inv.underlays = underlays;
        inv.last_error = maps_result
            .err()
            .map(|e| format!("updating the peer maps: {e}"));
        inv.synced_at = Some(SystemTime::now());
        Ok(())
    }

    fn tunnel_names(&self, links: &[Link]) -> Vec<String> {
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
        names.sort();
        names
    }

    fn tunnel(&mut self, link: &Link, dev: WgDevice, backend: Backend) -> Tunnel {
        let mut peers = Vec::with_capacity(dev.peers.len());
        for p in dev.peers {
            let key = (link.name.clone(), p.public_key);
            let id = *self.ids.entry(key).or_insert_with(|| {
                let id = self.next_id;
                self.next_id += 1;
                id
            });
            let public_key = wg::key_to_base64(&p.public_key);
            peers.push(Peer {
                id,
                friendly_name: self.opts.friendly_names.get(&public_key).cloned(),
                public_key,
                wg: p,
                hop: 1,
                via: String::new(),
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

    async fn route_endpoints(&mut self, tunnels: &[Tunnel]) -> topology::RouteOif {
        let now = Instant::now();
        let mut out = topology::RouteOif::new();
        let mut ips: HashSet<IpAddr> = tunnels
            .iter()
            .flat_map(|t| t.peers.iter())
            .filter_map(|p| p.wg.endpoint.map(|e| e.ip()))
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
                        source_errors::record(source_errors::RTNETLINK);
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
/// interface, so netlink should have answered. No control interface at all for a userspace
/// device (Mullvad's in-app WireGuard) is not a failed read, nor is a join error.
pub fn failed_source(err: Option<&wg::WgError>, kernel: bool) -> Option<&'static str> {
    use wg::WgError::*;
    match err? {
        NotFound { .. } => kernel.then_some(source_errors::WIREGUARD_NETLINK),
        InvalidName(_) => None,
        Io { .. }
        | Timeout { .. }
        | TooLarge { .. }
        | Truncated { .. }
        | Malformed { .. }
        | Errno { .. } => Some(source_errors::WIREGUARD_UAPI),
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

pub fn endpoint_addr(e: &Endpoint) -> std::net::SocketAddr {
    let ip: IpAddr = if e.family == 4 {
        std::net::Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]).into()
    } else {
        std::net::Ipv6Addr::from(e.addr).into()
    };
    std::net::SocketAddr::new(ip, e.port)
}

/// Logs each change between two syncs once: a tunnel appearing, going, re-created (same
/// name, new ifindex: a restarted wireguard-go or `ip link del/add`), renamed (same ifindex,
/// new name), its MTU changed, and peers added, removed or given a new endpoint (the address
/// itself is not logged: it is private).
pub fn log_changes(before: &Inventory, after: &Inventory) {
    for line in changes(before, after) {
        info!("{line}");
    }
}

/// The lines [`log_changes`] logs.
pub fn changes(before: &Inventory, after: &Inventory) -> Vec<String> {
    let mut out = Vec::new();
    let by_name = |inv: &Inventory| -> HashMap<String, Tunnel> {
        inv.tunnels
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect()
    };
    let (b, a) = (by_name(before), by_name(after));
    let mut renamed_from: HashSet<String> = HashSet::new();
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    for n in names {
        let t = &a[n];
        let Some(old) = b.get(n) else {
            // A vanished name with this ifindex: renamed.
            match b
                .values()
                .find(|o| o.ifindex == t.ifindex && !a.contains_key(&o.name))
            {
                Some(o) => {
                    out.push(format!(
                        "tunnel {} renamed to {n} (ifindex {})",
                        o.name, t.ifindex
                    ));
                    renamed_from.insert(o.name.clone());
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
    let mut gone: Vec<&String> = b
        .keys()
        .filter(|n| !a.contains_key(*n) && !renamed_from.contains(*n))
        .collect();
    gone.sort();
    for n in gone {
        out.push(format!("tunnel {n} is gone"));
    }
    out
}

fn peer_changes(out: &mut Vec<String>, name: &str, old: &Tunnel, new: &Tunnel) {
    let keys = |t: &Tunnel| -> HashMap<String, Option<std::net::SocketAddr>> {
        t.peers
            .iter()
            .map(|p| (p.public_key.clone(), p.wg.endpoint))
            .collect()
    };
    let (b, a) = (keys(old), keys(new));
    let mut added: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let mut removed: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    let mut moved: Vec<&String> = a
        .iter()
        .filter(|(k, e)| b.get(*k).is_some_and(|old| old != *e && e.is_some()))
        .map(|(k, _)| k)
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
    use crate::inventory::WgPeer;

    fn peer(key: &str, ep: &str) -> Peer {
        Peer {
            id: 1,
            public_key: key.into(),
            wg: WgPeer {
                public_key: [0; 32],
                endpoint: ep.parse().ok(),
                allowed_ips: Vec::new(),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: None,
            },
            friendly_name: None,
            hop: 1,
            via: String::new(),
        }
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
            failed_source(Some(&nf), true),
            Some(source_errors::WIREGUARD_NETLINK)
        );
        assert_eq!(failed_source(Some(&nf), false), None);
        let t = wg::WgError::Timeout {
            path: path.clone(),
            timeout: Duration::from_secs(2),
        };
        assert_eq!(
            failed_source(Some(&t), false),
            Some(source_errors::WIREGUARD_UAPI)
        );
        let big = wg::WgError::TooLarge { path, cap: 1 };
        assert_eq!(
            failed_source(Some(&big), true),
            Some(source_errors::WIREGUARD_UAPI)
        );
        assert_eq!(failed_source(None, true), None);
    }
}
