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
    topology, wg,
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
        let links = self.netlink.links().await?;
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
            let (dev, backend) = match read_device(&name).await {
                Ok(found) => found,
                Err(e) => {
                    // Datapath counting goes on without peer state (e.g. Mullvad's in-app
                    // WireGuard has no control socket); traffic then shows as peer "unknown".
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
        for s in wg::list_uapi_sockets() {
            if here.contains(s.as_str()) && !names.contains(&s) {
                names.push(s);
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

/// Log once when an interface appears or disappears: the caller compares inventories.
pub fn log_changes(before: &Inventory, after: &Inventory) {
    let names = |inv: &Inventory| -> HashSet<String> {
        inv.tunnels.iter().map(|t| t.name.clone()).collect()
    };
    let (b, a) = (names(before), names(after));
    for n in a.difference(&b) {
        info!("watching tunnel {n}");
    }
    for n in b.difference(&a) {
        info!("tunnel {n} is gone");
    }
}
