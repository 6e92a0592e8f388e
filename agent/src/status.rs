//! The `/api/v1/status` snapshot: every tunnel, peer and hop with traffic and overhead,
//! built from the inventory and the datapath counters of the same moment.

use std::time::{SystemTime, UNIX_EPOCH};

use agent_common::maps::Counter;
use serde_json::{Value, json};

use crate::{inventory::Inventory, metrics::datapath::Snapshot};

fn pair(c: Option<&Counter>) -> Value {
    let c = c.copied().unwrap_or_default();
    json!({ "packets": c.packets, "bytes": c.bytes })
}

/// Overhead of a peer in one direction: wire data bytes minus the tunnel bytes they carry.
fn overhead(wire: Option<&Counter>, tunnel: Option<&Counter>) -> Value {
    let (Some(w), Some(t)) = (wire, tunnel) else {
        return Value::Null;
    };
    if t.bytes == 0 || w.bytes < t.bytes {
        return Value::Null;
    }
    let extra = w.bytes - t.bytes;
    json!({
        "bytes": extra,
        "bytes_per_packet": if t.packets > 0 { extra as f64 / t.packets as f64 } else { 0.0 },
        "percent": extra as f64 * 100.0 / t.bytes as f64,
    })
}

pub fn build(inv: &Inventory, s: &Snapshot, healthy: Result<(), String>) -> Value {
    let now = SystemTime::now();
    let mut tunnels = Vec::new();
    for t in &inv.tunnels {
        let mut peers = Vec::new();
        for p in &t.peers {
            let mut dirs = serde_json::Map::new();
            for dir in ["rx", "tx"] {
                let tun_key = (t.name.clone(), p.public_key.clone(), dir);
                let tunnel = s.tunnel.get(&tun_key);
                // The peer's data messages are counted wherever they were seen: on the
                // underlay for hop 1, inside the carrying tunnel for deeper hops.
                let mut wire = Counter::default();
                let mut seen = false;
                for ((_, peer, d, msg), c) in &s.wire {
                    if peer == &p.public_key && *d == dir && *msg == "data" {
                        wire.packets += c.packets;
                        wire.bytes += c.bytes;
                        seen = true;
                    }
                }
                let wire = seen.then_some(wire);
                dirs.insert(
                    dir.to_string(),
                    json!({
                        "tunnel": pair(tunnel),
                        "wire_data": pair(wire.as_ref()),
                        "overhead": overhead(wire.as_ref(), tunnel),
                    }),
                );
            }
            let handshake_age =
                p.wg.last_handshake
                    .and_then(|h| now.duration_since(h).ok())
                    .map(|d| d.as_secs_f64());
            peers.push(json!({
                "public_key": p.public_key,
                "friendly_name": p.friendly_name,
                "hop": p.hop,
                "via": p.via,
                "allowed_ips": crate::topology::join_allowed_ips(&p.wg.allowed_ips),
                "latest_handshake_age_seconds": handshake_age,
                "rx_bytes": p.wg.rx_bytes,
                "tx_bytes": p.wg.tx_bytes,
                "traffic": dirs,
            }));
        }
        tunnels.push(json!({
            "interface": t.name,
            "ifindex": t.ifindex,
            "mtu": t.mtu,
            "listen_port": t.listen_port,
            "backend": format!("{:?}", t.backend).to_lowercase(),
            "peers": peers,
        }));
    }
    json!({
        "time": now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "healthy": healthy.is_ok(),
        "health_reason": healthy.err(),
        "tunnels": tunnels,
        "underlays": inv.underlays.iter().map(|u| json!({"interface": u.name, "ifindex": u.ifindex})).collect::<Vec<_>>(),
    })
}
