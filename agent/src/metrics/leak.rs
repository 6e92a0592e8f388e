//! Leaks: `wirescope_leaked_packets_total` and `wirescope_leaked_bytes_total` per
//! (interface, kind), read from the TC programs' `LEAKS` map on every scrape. Every watched
//! underlay has its three series (`dns`, `ipv4`, `ipv6`) from the start, at 0, so that
//! `increase()` sees the first leak. Destination addresses are never kept or exported.
//!
//! Also here: when the tunnels count as up ([`tunnel_up_until_ns`]), which the sync loop
//! writes into the programs' `LEAK_CFG` on every tick.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use agent_common::maps::leak::{TUNNEL_UP_NS, kind};
use log::warn;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    datapath::Datapath,
    metrics::{Labels, encode_counters},
    sync::inventory::{Inventory, Tunnel},
};

/// The `kind` label of a `LeakKey.kind`.
pub fn kind_name(k: u8) -> Option<&'static str> {
    match k {
        kind::DNS => Some("dns"),
        kind::IPV4 => Some("ipv4"),
        kind::IPV6 => Some("ipv6"),
        _ => None,
    }
}

/// Until when (CLOCK_MONOTONIC ns, `now_mono` being `now_wall`) a tunnel counts as up: the
/// latest handshake of any peer of `tunnels` plus 180 s; 0 when none had a handshake in the
/// last 180 s. A handshake time in the future (a clock step) counts as now.
pub fn tunnel_up_until_ns(tunnels: &[Tunnel], now_wall: SystemTime, now_mono: u64) -> u64 {
    let latest = tunnels
        .iter()
        .flat_map(|t| t.peers.iter())
        .filter_map(|p| p.wg.last_handshake)
        .max();
    let Some(latest) = latest else { return 0 };
    let age = now_wall.duration_since(latest).unwrap_or(Duration::ZERO);
    let up = Duration::from_nanos(TUNNEL_UP_NS);
    match up.checked_sub(age) {
        Some(left) if !left.is_zero() => now_mono.saturating_add(left.as_nanos() as u64),
        _ => 0,
    }
}

#[derive(Debug)]
pub struct LeakCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
}

impl LeakCollector {
    pub fn new(datapath: Arc<Mutex<Datapath>>, inventory: Arc<RwLock<Inventory>>) -> Self {
        Self {
            datapath,
            inventory,
        }
    }

    /// (interface, kind) -> (packets, bytes).
    pub fn snapshot(&self) -> BTreeMap<(String, &'static str), (u64, u64)> {
        let leaks = match self.datapath.lock() {
            Ok(dp) => dp.leak.leaks().unwrap_or_else(|e| {
                warn!("reading leaks: {e}");
                Vec::new()
            }),
            Err(_) => return BTreeMap::new(),
        };
        let Ok(inv) = self.inventory.read() else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for u in &inv.underlays {
            for k in [kind::DNS, kind::IPV4, kind::IPV6] {
                let name = kind_name(k).expect("known kind");
                out.insert((u.name.clone(), name), (0, 0));
            }
        }
        for (k, c) in leaks {
            let Some(name) = kind_name(k.kind) else {
                continue;
            };
            let iface = inv
                .iface_names
                .get(&k.ifindex)
                .cloned()
                .unwrap_or_else(|| format!("ifindex{}", k.ifindex));
            let e = out.entry((iface, name)).or_insert((0, 0));
            e.0 += c.packets;
            e.1 += c.bytes;
        }
        out
    }
}

fn labels((interface, kind): &(String, &'static str)) -> Labels {
    vec![("interface", interface.clone()), ("kind", kind.to_string())]
}

impl Collector for LeakCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        encode_counters(
            &mut encoder,
            "wirescope_leaked_packets",
            "packets that left an underlay outside every tunnel while a tunnel was up; kind is dns, ipv4 or ipv6",
            s.iter().map(|(k, (p, _))| (labels(k), *p)),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_leaked_bytes",
            "L3 bytes of the leaked packets",
            s.iter().map(|(k, (_, b))| (labels(k), *b)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::inventory::{Backend, Peer, WgPeer};

    fn tunnel(handshakes: &[Option<SystemTime>]) -> Tunnel {
        Tunnel {
            name: "wg0".into(),
            ifindex: 3,
            mtu: 1420,
            backend: Backend::Netlink,
            listen_port: 51820,
            peers: handshakes
                .iter()
                .enumerate()
                .map(|(i, h)| Peer {
                    id: i as u32 + 1,
                    public_key: String::new(),
                    wg: WgPeer {
                        public_key: [i as u8; 32],
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        last_handshake: *h,
                        rx_bytes: 0,
                        tx_bytes: 0,
                        persistent_keepalive: None,
                    },
                    friendly_name: None,
                    hop: 1,
                    via: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn up_for_180_s_after_the_latest_handshake() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = 1_000_000_000u64;
        let mono = 5_000 * s;
        assert_eq!(tunnel_up_until_ns(&[], now, mono), 0);
        assert_eq!(tunnel_up_until_ns(&[tunnel(&[None])], now, mono), 0);
        let ago = |secs| Some(now - Duration::from_secs(secs));
        // The latest of every peer of every tunnel counts.
        let t = [tunnel(&[ago(100), None]), tunnel(&[ago(30)])];
        assert_eq!(tunnel_up_until_ns(&t, now, mono), mono + 150 * s);
        // 180 s or more ago: down.
        assert_eq!(tunnel_up_until_ns(&[tunnel(&[ago(180)])], now, mono), 0);
        assert_eq!(tunnel_up_until_ns(&[tunnel(&[ago(500)])], now, mono), 0);
        // In the future (clock stepped back): up for 180 s from now.
        let future = Some(now + Duration::from_secs(60));
        assert_eq!(
            tunnel_up_until_ns(&[tunnel(&[future])], now, mono),
            mono + 180 * s
        );
    }

    #[test]
    fn kind_names() {
        assert_eq!(kind_name(kind::DNS), Some("dns"));
        assert_eq!(kind_name(kind::IPV4), Some("ipv4"));
        assert_eq!(kind_name(kind::IPV6), Some("ipv6"));
        assert_eq!(kind_name(kind::COUNT), None);
    }
}
