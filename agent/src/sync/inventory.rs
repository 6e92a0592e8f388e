//! What the agent knows about the tunnels it watches, rebuilt by the sync loop and read by
//! the collectors and the status API.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

// What a control interface reports is part of the model as read: a `Peer` holds its
// `WgPeer`, a `Tunnel` its `Backend`.
pub use crate::sources::wg::{Backend, WgDevice, WgPeer};

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

impl Inventory {
    /// The `interface` label of an ifindex: its latest name, `ifindexN` if it never had one.
    pub fn iface_name(&self, ifindex: u32) -> String {
        self.iface_names
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| format!("ifindex{ifindex}"))
    }

    /// The `peer` label of a peer id: its base64 key, `unknown` for traffic of an endpoint
    /// no peer has, None for an id this inventory cannot name yet (a scrape between the
    /// maps' and the labels' update): its counts wait until it can.
    pub fn peer_label(&self, id: u32) -> Option<String> {
        if id == agent_common::maps::PEER_UNKNOWN {
            return Some("unknown".to_string());
        }
        self.peer_labels.get(&id).map(|(_, key)| key.clone())
    }
}
