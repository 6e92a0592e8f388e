//! What the agent knows about the tunnels it watches, rebuilt by the sync loop and read by
//! the collectors and the status API.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

// What a control interface reports is part of the model as read: a `Peer` holds its
// `WgPeer`, a `Tunnel` its `Backend`.
pub use crate::sources::wg::{Backend, WgDevice, WgPeer};
pub use crate::sync::obfuscation::ObfuscatedFlow;

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

impl Peer {
    /// A hop-1 peer over an underlay not yet resolved, without a friendly name.
    pub fn new(id: u32, public_key: String, wg: WgPeer) -> Peer {
        Peer {
            id,
            public_key,
            wg,
            friendly_name: None,
            hop: 1,
            via: String::new(),
        }
    }
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
    /// Every peer id handed out and not yet forgotten, to its (interface, base64 key):
    /// counters of a peer that went away keep their labels through `--peer-grace`, so they
    /// neither vanish nor go backwards while it may come back; a forgotten peer's label goes
    /// with its map entries, and its series with it.
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
    /// The period until the next round, set by the last one from its peer count
    /// (`wirescope_peer_sync_interval_seconds`, [`crate::sync::rounds::sync_period`]).
    pub sync_interval: Option<Duration>,
    /// Rounds that wrote the peer maps, and rounds that found them unchanged
    /// (`wirescope_peer_sync_rounds_total`).
    pub sync_rounds: (u64, u64),
    /// The obfuscation flows and the peers they carry (`--obfuscation`, Mullvad's).
    pub obfuscation: Vec<ObfuscatedFlow>,
}

impl Inventory {
    /// The labels a previous agent pinned: the interfaces' names (ifindex, name) and the peer
    /// ids (interface, public key, id). Its counters of interfaces or peers gone while no
    /// agent ran then keep their labels, instead of `ifindexN` or nothing.
    pub fn seed_labels(&mut self, names: Vec<(u32, String)>, ids: &[(String, [u8; 32], u32)]) {
        self.iface_names.extend(names);
        for (iface, key, id) in ids {
            self.peer_labels
                .entry(*id)
                .or_insert_with(|| (iface.clone(), crate::sources::wg::key_to_base64(key)));
        }
    }

    /// The `interface` label of an ifindex: its latest name, `ifindexN` if it never had one.
    pub fn iface_name(&self, ifindex: u32) -> String {
        self.iface_names
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| format!("ifindex{ifindex}"))
    }

    /// The addresses a peer's WireGuard really goes to: its endpoint's, or, when the endpoint
    /// is a local proxy on loopback, the remote ends of the obfuscation flows that carry it.
    pub fn relay_addrs(&self, tunnel: &str, peer: &Peer) -> Vec<std::net::IpAddr> {
        let Some(ep) = peer.wg.endpoint else {
            return Vec::new();
        };
        let ip = ep.ip().to_canonical();
        if !crate::config::obfuscation::is_local_proxy(ip) {
            return vec![ip];
        }
        let mut out: Vec<std::net::IpAddr> = self
            .obfuscation_of(tunnel, peer.id)
            .map(|f| f.remote.ip())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The obfuscation flows that carry peer `id` of `tunnel`.
    pub fn obfuscation_of<'a>(
        &'a self,
        tunnel: &'a str,
        id: u32,
    ) -> impl Iterator<Item = &'a ObfuscatedFlow> + 'a {
        self.obfuscation
            .iter()
            .filter(move |f| f.tunnel == tunnel && f.peer.as_ref().is_some_and(|p| p.0 == id))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_labels_name_counts_of_interfaces_and_peers_gone() {
        let mut inv = Inventory::default();
        inv.peer_labels
            .insert(2, ("wg0".to_string(), "current".to_string()));
        inv.seed_labels(
            vec![(7, "wg0-mullvad".to_string()), (9, "wg1".to_string())],
            &[
                ("wg0-mullvad".to_string(), [1; 32], 1),
                ("wg1".to_string(), [2; 32], 2),
            ],
        );
        assert_eq!(inv.iface_name(7), "wg0-mullvad");
        assert_eq!(inv.iface_name(9), "wg1");
        assert_eq!(inv.iface_name(8), "ifindex8");
        assert_eq!(
            inv.peer_label(1).as_deref(),
            Some("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=")
        );
        // What this agent already knows stays.
        assert_eq!(inv.peer_label(2).as_deref(), Some("current"));
        assert_eq!(inv.peer_label(3), None);
    }
}
