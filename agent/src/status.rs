//! The `/api/v1/status` snapshot: every tunnel, peer and hop with traffic and overhead,
//! built from the inventory and the datapath counters of the same moment.

use std::time::{SystemTime, UNIX_EPOCH};

use agent_common::maps::Counter;
use serde_json::{Value, json};

use crate::{
    inventory::Inventory,
    metrics::{datapath::Snapshot, drops::Snapshot as Drops},
};

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

pub fn build(inv: &Inventory, s: &Snapshot, d: &Drops, healthy: Result<(), String>) -> Value {
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
        "drops": drops(d),
        "udp_receive_errors": udp_errors(inv, d),
    })
}

/// How many reasons per interface the status shows.
const TOP_REASONS: usize = 5;

/// Per interface (busiest first), its drops and their top reasons.
fn drops(d: &Drops) -> Value {
    let mut per_iface: std::collections::BTreeMap<&str, Vec<(&str, u64)>> = Default::default();
    for ((iface, reason), n) in &d.drops {
        if *n > 0 {
            per_iface.entry(iface).or_default().push((reason, *n));
        }
    }
    let mut out: Vec<(u64, Value)> = per_iface
        .into_iter()
        .map(|(iface, mut reasons)| {
            reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let total: u64 = reasons.iter().map(|r| r.1).sum();
            let top: Vec<Value> = reasons
                .iter()
                .take(TOP_REASONS)
                .map(|(r, n)| json!({"reason": r, "packets": n}))
                .collect();
            (
                total,
                json!({"interface": iface, "packets": total, "top_reasons": top}),
            )
        })
        .collect();
    out.sort_by_key(|o| std::cmp::Reverse(o.0));
    Value::Array(out.into_iter().map(|(_, v)| v).collect())
}

/// Failed UDP receives per local port, marking the ports WireGuard listens on.
fn udp_errors(inv: &Inventory, d: &Drops) -> Value {
    d.udp_errors
        .iter()
        .map(|(port, n)| {
            let wg = inv
                .tunnels
                .iter()
                .find(|t| t.listen_port != 0 && t.listen_port == *port)
                .map(|t| t.name.clone());
            json!({"port": port, "errors": n, "wireguard": wg.is_some(), "interface": wg})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_busiest_interface_first_top_reasons_by_count() {
        let mut d = Drops::default();
        for (iface, reason, n) in [
            ("wg0", "NETFILTER_DROP", 7),
            ("wg0", "NO_SOCKET", 9),
            ("wg0", "PKT_TOO_SMALL", 0),
            ("lo", "SOCKET_RCVBUFF", 199),
            ("", "QUEUE_PURGE", 1),
        ] {
            d.drops.insert((iface.into(), reason.into()), n);
        }
        d.udp_errors.insert(51820, 3);
        d.udp_errors.insert(5555, 199);
        let v = drops(&d);
        let ifaces: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["interface"].as_str().unwrap())
            .collect();
        assert_eq!(ifaces, ["lo", "wg0", ""]);
        assert_eq!(v[1]["packets"], 16);
        assert_eq!(v[1]["top_reasons"][0]["reason"], "NO_SOCKET");
        assert_eq!(
            v[1]["top_reasons"].as_array().unwrap().len(),
            2,
            "zeros left out"
        );

        let mut inv = Inventory::default();
        inv.tunnels.push(crate::inventory::Tunnel {
            name: "wg0".into(),
            ifindex: 3,
            mtu: 1420,
            backend: crate::inventory::Backend::Uapi,
            listen_port: 51820,
            peers: Vec::new(),
        });
        let u = udp_errors(&inv, &d);
        assert_eq!(u[0]["port"], 5555);
        assert_eq!(u[0]["wireguard"], false);
        assert_eq!(u[1]["wireguard"], true);
        assert_eq!(u[1]["interface"], "wg0");
    }
}
