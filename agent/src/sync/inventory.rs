//! What the agent knows about the tunnels it watches, rebuilt by the sync loop and read by
//! the collectors and the status API.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;

/// Where peer state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's WireGuard generic netlink family.
    Netlink,
    /// A userspace implementation's UAPI socket (/var/run/wireguard/IFACE.sock).
    Uapi,
    /// No control interface could be read (e.g. Mullvad's in-app WireGuard): datapath only.
    None,
}

/// A peer as the control interface reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

/// An interface as the control interface reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgDevice {
    pub name: String,
    pub listen_port: u16,
    pub public_key: Option<[u8; 32]>,
    pub peers: Vec<WgPeer>,
}

/// A watched tunnel interface.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    pub backend: Backend,
    pub listen_port: u16,
    pub peers: Vec<Peer>,
}

/// A peer with what the agent derived for it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The id the BPF maps use for it; stable for the agent's lifetime.
    pub id: u32,
    /// Standard base64 of the public key.
    pub public_key: String,
    pub wg: WgPeer,
    pub friendly_name: Option<String>,
    /// 1 when reached over an underlay, 2 through a hop-1 peer's tunnel, ...
    pub hop: u32,
    /// The underlay interface, or the carrying peer's public key.
    pub via: String,
}

/// A watched carrier interface.
#[derive(Clone, Debug)]
pub struct Underlay {
    pub name: String,
    pub ifindex: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub tunnels: Vec<Tunnel>,
    pub underlays: Vec<Underlay>,
    /// Every peer id ever handed out, to its (interface, base64 key): counters of a peer
    /// that went away keep their labels, so they never vanish or go backwards.
    pub peer_labels: HashMap<u32, (String, String)>,
    /// Every interface index ever watched, to its latest name: counters outlive interfaces.
    pub iface_names: HashMap<u32, String>,
    /// Set when the last sync failed, with why; cleared by the next good one.
    pub last_error: Option<String>,
    /// When the last sync completed.
    pub synced_at: Option<SystemTime>,
    /// How long the last sync round took, start to end: interfaces, peers (control
    /// interface), routes and the BPF peer maps (`wirescope_peer_sync_duration_seconds`).
    pub sync_duration: Option<Duration>,
}
