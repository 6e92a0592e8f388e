//! `wirescope_obfuscation_packets_total` and `wirescope_obfuscation_bytes_total`
//! `{interface,peer,direction,kind}`: the IP packets of the flows that carry a peer's
//! WireGuard through an obfuscation proxy (udp2tcp, Shadowsocks, QUIC, ...), counted on the
//! underlays and read from `OBFS_COUNTERS` on every scrape. `interface` and `peer` are the
//! tunnel's and the peer's, as in `wirescope_tunnel_bytes_total`, so the overhead of an
//! obfuscated hop 1 (WireGuard and the obfuscation layer together) is
//! `sum without (kind) (wirescope_obfuscation_bytes_total) - wirescope_tunnel_bytes_total`.
//! Every flow the agent knows has its two directions from the start, at 0.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use agent_common::maps::{Counter, DIR_RX, DIR_TX, obfuscation::kind};
use log::warn;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Labels, direction, encode_counters, tunnel::add};
use crate::{datapath::Datapath, sync::inventory::Inventory};

/// (interface, peer, direction, kind).
pub type ObfsSeries = (String, String, &'static str, &'static str);

#[derive(Debug)]
pub struct ObfuscationCollector {
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
}

impl ObfuscationCollector {
    pub fn new(datapath: Arc<Mutex<Datapath>>, inventory: Arc<RwLock<Inventory>>) -> Self {
        Self {
            datapath,
            inventory,
        }
    }

    /// The counts as label sets, summed (an interface re-created under a new ifindex
    /// continues its series).
    pub fn snapshot(&self) -> BTreeMap<ObfsSeries, Counter> {
        let counters = match self.datapath.lock() {
            Ok(dp) => dp.obfuscation.counters().unwrap_or_else(|e| {
                warn!("reading obfuscation counters: {e}");
                Vec::new()
            }),
            Err(_) => return BTreeMap::new(),
        };
        let Ok(inv) = self.inventory.read() else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for f in &inv.obfuscation {
            let peer = f
                .peer
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |p| p.1.clone());
            for dir in [DIR_RX, DIR_TX] {
                out.entry((
                    f.tunnel.clone(),
                    peer.clone(),
                    direction(dir),
                    f.kind_name(),
                ))
                .or_insert_with(Counter::default);
            }
        }
        for (k, c) in counters {
            let Some(peer) = inv.peer_label(k.peer) else {
                continue;
            };
            let key = (
                inv.iface_name(k.ifindex),
                peer,
                direction(k.dir),
                kind::name(k.kind),
            );
            add(out.entry(key).or_default(), &c);
        }
        out
    }
}

fn labels((interface, peer, dir, kind): &ObfsSeries) -> Labels {
    vec![
        ("interface", interface.clone()),
        ("peer", peer.clone()),
        ("direction", dir.to_string()),
        ("kind", kind.to_string()),
    ]
}

impl Collector for ObfuscationCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        encode_counters(
            &mut encoder,
            "wirescope_obfuscation_packets",
            "IP packets of the flows that carry a peer's WireGuard through an obfuscation proxy \
             (udp2tcp, shadowsocks, quic, lwo, manual), on the underlays; interface and peer are \
             the tunnel's and the peer's",
            s.iter().map(|(k, c)| (labels(k), c.packets)),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_obfuscation_bytes",
            "L3 bytes of those packets; minus wirescope_tunnel_bytes_total of the same \
             interface, peer and direction (summed over kind), the overhead of WireGuard and \
             the obfuscation together on a hop whose endpoint is a local proxy",
            s.iter().map(|(k, c)| (labels(k), c.bytes)),
        )
    }
}
