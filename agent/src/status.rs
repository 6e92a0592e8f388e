//! The `/api/v1/status` snapshot: every tunnel, peer and hop with traffic and overhead,
//! built from the inventory and the datapath counters of the same moment, with what the
//! other parts of the agent measured ([`Extra`]: wire health, probes, path MTU, leaks,
//! ICMP and fragments, failover, Mullvad). `wirescope status` renders it
//! ([`crate::status_view`]).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use agent_common::maps::Counter;
use serde_json::{Value, json};

use crate::{
    failover::ProbeWindow,
    inventory::{Inventory, Peer},
    metrics::{
        datapath::Snapshot, drops::Snapshot as Drops, path::Snapshot as PathSnapshot,
        wire_health::Snapshot as WireHealth,
    },
    mullvad::MullvadState,
    peer_label::EndpointLabeler,
    pmtu::Measured,
    probe::TargetStats,
};

/// One probe target: its lifetime counters and its recent window.
#[derive(Clone, Debug, Default)]
pub struct ProbeEntry {
    pub target: Option<IpAddr>,
    /// The interface it is bound to; empty when none.
    pub iface: String,
    pub stats: TargetStats,
    /// (sent, lost, round trips) over [`PROBE_WINDOW`].
    pub recent: ProbeWindow,
}

/// How far back the `recent` part of a probe looks.
pub const PROBE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// What the status shows beyond the inventory and the datapath counters, each part empty
/// when that part of the agent has nothing (yet).
#[derive(Default)]
pub struct Extra {
    pub wire: WireHealth,
    pub probes: Vec<ProbeEntry>,
    pub pmtu: Measured,
    /// (underlay, kind) -> (packets, bytes).
    pub leaks: BTreeMap<(String, &'static str), (u64, u64)>,
    pub path: PathSnapshot,
    /// (interface, peer, healthy) as the failover logic last judged them.
    pub path_healthy: Vec<(String, String, bool)>,
    pub mullvad: Option<MullvadState>,
    /// Names the hop-1 endpoints as the path-MTU search does, to find their path MTU.
    pub labeler: Option<EndpointLabeler>,
    pub export_endpoints: bool,
}

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
    build_with(inv, s, d, healthy, &Extra::default())
}

/// Mean of a histogram series in seconds, with its count; null when empty.
fn hist(sum_ns: u64, count: u64) -> Value {
    if count == 0 {
        return Value::Null;
    }
    json!({"count": count, "mean_seconds": sum_ns as f64 / 1e9 / count as f64})
}

/// The peer (tunnel, key) a probe to `target` goes through: the one whose allowed IPs hold
/// it most specifically, on the probe's interface (any tunnel when it has none), as the
/// failover logic judges paths.
fn probe_peer(inv: &Inventory, target: IpAddr, iface: &str) -> Option<(String, String)> {
    inv.tunnels
        .iter()
        .filter(|t| iface.is_empty() || t.name == iface)
        .flat_map(|t| {
            t.peers.iter().filter_map(move |p| {
                p.wg.allowed_ips
                    .iter()
                    .filter(|n| n.contains(&target))
                    .map(|n| n.prefix_len())
                    .max()
                    .map(|len| (len, t.name.clone(), p.public_key.clone()))
            })
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, t, p)| (t, p))
}

fn probe_json(e: &ProbeEntry) -> Value {
    let s = &e.stats;
    let (sent, lost, rtts) = &e.recent;
    let recent_mean = (!rtts.is_empty())
        .then(|| rtts.iter().map(|d| d.as_secs_f64()).sum::<f64>() / rtts.len() as f64);
    json!({
        "target": e.target.map(|t| t.to_string()),
        "interface": e.iface,
        "sent": s.sent,
        "lost": s.lost,
        "replies": s.replies,
        "loss_percent": (s.sent > 0).then(|| s.lost as f64 * 100.0 / s.sent as f64),
        "rtt_mean_seconds": (s.replies > 0).then(|| s.rtt_sum / s.replies as f64),
        "recent": {
            "window_seconds": PROBE_WINDOW.as_secs(),
            "sent": sent,
            "lost": lost,
            "loss_percent": (*sent > 0).then(|| *lost as f64 * 100.0 / *sent as f64),
            "rtt_mean_seconds": recent_mean,
            "rtt_last_seconds": rtts.last().map(|d| d.as_secs_f64()),
        },
    })
}

/// The (target, interface) key under which the path-MTU search keeps a hop-1 peer's
/// endpoint: bound to its underlay when `via` is a watched one (as `pmtu` does).
fn endpoint_pmtu_key(inv: &Inventory, p: &Peer, l: &EndpointLabeler) -> Option<(String, String)> {
    if p.hop != 1 {
        return None;
    }
    let e = p.wg.endpoint?;
    let iface = if !p.via.is_empty() && inv.underlays.iter().any(|u| u.name == p.via) {
        p.via.clone()
    } else {
        String::new()
    };
    Some((l.label(e), iface))
}

/// Everything the wire-health snapshot has for `peer`, summed over the interfaces it was
/// seen on (the underlay for hop 1, the carrying tunnel for deeper hops).
fn wire_health(w: &WireHealth, peer: &str, rx_data_packets: u64) -> (Value, Value, Value, u64) {
    let (mut rtt_n, mut rtt_sum) = (0u64, 0u64);
    for ((_, p), series) in &w.rtt {
        if p == peer {
            rtt_n += series.count;
            rtt_sum += series.sum_ns;
        }
    }
    let sum = |m: &BTreeMap<(String, String), u64>| -> u64 {
        m.iter()
            .filter(|((_, p), _)| p == peer)
            .map(|(_, n)| *n)
            .sum()
    };
    let (gaps, late, timeouts) = (sum(&w.gaps), sum(&w.late), sum(&w.timeouts));
    let missing = gaps.saturating_sub(late);
    let loss = json!({
        "gaps": gaps,
        "late": late,
        "rx_data_packets": rx_data_packets,
        "loss_percent": (rx_data_packets + missing > 0)
            .then(|| missing as f64 * 100.0 / (rx_data_packets + missing) as f64),
    });
    let mut transit = serde_json::Map::new();
    for dir in ["rx", "tx"] {
        let (mut n, mut sum_ns) = (0u64, 0u64);
        for ((_, p, d), series) in &w.transit {
            if p == peer && *d == dir {
                n += series.count;
                sum_ns += series.sum_ns;
            }
        }
        transit.insert(dir.to_string(), hist(sum_ns, n));
    }
    (hist(rtt_sum, rtt_n), loss, Value::Object(transit), timeouts)
}

fn mullvad_json(m: &MullvadState) -> Value {
    if m.off || m.polled_at.is_none() {
        return Value::Null;
    }
    let Some(s) = m.current() else {
        return json!({"up": false, "state": Value::Null, "error": m.last_error});
    };
    let loc = s.location.clone().unwrap_or_default();
    let relay = |h: &Option<String>, c: &Option<String>, k: &Option<String>| {
        if h.is_none() && c.is_none() && k.is_none() {
            Value::Null
        } else {
            json!({"hostname": h, "city": c, "country": k})
        }
    };
    json!({
        "up": true,
        "state": s.state.name(),
        "error": s.error_cause,
        "exit": relay(&loc.hostname, &loc.city, &loc.country),
        "entry": relay(&loc.entry_hostname, &loc.entry_city, &loc.entry_country),
        "multihop": s.multihop(),
        "daita": s.daita(),
        "quantum_resistant": s.quantum_resistant(),
        "obfuscation": s.endpoint.as_ref().and_then(|e| e.obfuscation.clone()),
        "tunnel_interface": s.endpoint.as_ref().and_then(|e| e.tunnel_interface.clone()),
        "features": s.feature_indicators,
        "locked_down": s.locked_down,
    })
}

/// The full snapshot: [`build`] plus what `x` holds.
pub fn build_with(
    inv: &Inventory,
    s: &Snapshot,
    d: &Drops,
    healthy: Result<(), String>,
    x: &Extra,
) -> Value {
    let now = SystemTime::now();
    // Probes by the path they go through.
    let mut probes_of: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for e in &x.probes {
        let Some(t) = e.target else { continue };
        if let Some(k) = probe_peer(inv, t, &e.iface) {
            probes_of.entry(k).or_default().push(probe_json(e));
        }
    }
    let roles = x
        .mullvad
        .as_ref()
        .map(|m| m.relay_roles())
        .unwrap_or_default();
    let mut tunnels = Vec::new();
    for t in &inv.tunnels {
        let mut peers = Vec::new();
        let mut tunnel_path_mtu: Option<u32> = None;
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
            let rx_data: u64 = s
                .wire
                .iter()
                .filter(|((_, peer, d, msg), _)| {
                    peer == &p.public_key && *d == "rx" && *msg == "data"
                })
                .map(|(_, c)| c.packets)
                .sum();
            let (hs_rtt, loss, transit, timeouts) = wire_health(&x.wire, &p.public_key, rx_data);
            let key = (t.name.clone(), p.public_key.clone());
            let path_mtu = x
                .labeler
                .as_ref()
                .and_then(|l| endpoint_pmtu_key(inv, p, l))
                .and_then(|k| x.pmtu.path.get(&k).copied());
            if let Some(m) = path_mtu {
                tunnel_path_mtu = Some(tunnel_path_mtu.map_or(m, |t: u32| t.min(m)));
            }
            let healthy = x
                .path_healthy
                .iter()
                .find(|(i, k, _)| *i == t.name && *k == p.public_key)
                .map(|h| h.2);
            let relay = p.wg.endpoint.and_then(|e| {
                roles
                    .iter()
                    .find(|r| r.0 == e.ip().to_canonical())
                    .map(|r| json!({"role": r.1, "hostname": r.2, "country": r.3, "city": r.4}))
            });
            let mut peer = json!({
                "public_key": p.public_key,
                "friendly_name": p.friendly_name,
                "hop": p.hop,
                "via": p.via,
                "allowed_ips": crate::topology::join_allowed_ips(&p.wg.allowed_ips),
                "latest_handshake_age_seconds": handshake_age,
                "rx_bytes": p.wg.rx_bytes,
                "tx_bytes": p.wg.tx_bytes,
                "traffic": dirs,
                "handshake_rtt": hs_rtt,
                "handshake_timeouts": timeouts,
                "transit_loss": loss,
                "transit_time": transit,
                "probes": probes_of.remove(&key).unwrap_or_default(),
                "path_mtu_bytes": path_mtu,
                "path_healthy": healthy,
                "mullvad_relay": relay,
            });
            if x.export_endpoints
                && let Some(obj) = peer.as_object_mut()
            {
                obj.insert(
                    "endpoint".into(),
                    json!(p.wg.endpoint.map(|e| e.to_string())),
                );
            }
            peers.push(peer);
        }
        tunnels.push(json!({
            "interface": t.name,
            "ifindex": t.ifindex,
            "mtu": t.mtu,
            "listen_port": t.listen_port,
            "backend": format!("{:?}", t.backend).to_lowercase(),
            "path_mtu_bytes": tunnel_path_mtu,
            "recommended_mtu": x.pmtu.recommended.get(&t.name),
            "peers": peers,
        }));
    }
    let probe_mtus: Vec<Value> = x
        .pmtu
        .path
        .iter()
        .map(|((target, iface), b)| json!({"target": target, "interface": iface, "bytes": b}))
        .collect();
    json!({
        "time": now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "healthy": healthy.is_ok(),
        "health_reason": healthy.err(),
        "capabilities": crate::caps::status(),
        "tunnels": tunnels,
        "underlays": inv.underlays.iter().map(|u| json!({"interface": u.name, "ifindex": u.ifindex})).collect::<Vec<_>>(),
        "drops": drops(d),
        "udp_receive_errors": udp_errors(inv, d),
        "leaks": x.leaks.iter().map(|((i, k), (p, b))| json!({"interface": i, "kind": k, "packets": p, "bytes": b})).collect::<Vec<_>>(),
        "path": {
            "mtu": probe_mtus,
            "fragments": x.path.fragments.iter().map(|((i, d, l), n)| json!({"interface": i, "direction": d, "layer": l, "packets": n})).collect::<Vec<_>>(),
            "icmp_too_big": x.path.too_big.iter().map(|((i, f), n)| json!({"interface": i, "family": f, "messages": n})).collect::<Vec<_>>(),
            "icmp_reported_mtu": x.path.reported_mtu.iter().map(|(i, m)| json!({"interface": i, "bytes": m})).collect::<Vec<_>>(),
        },
        "mullvad": x.mullvad.as_ref().map_or(Value::Null, mullvad_json),
        "export_endpoints": x.export_endpoints,
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

#[cfg(test)]
mod extra_tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        inventory::{Backend, Peer, Tunnel, Underlay, WgPeer},
        metrics::crypto::Series,
    };

    const ENTRY: &str = "FXUjJ9fcAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const EXIT: &str = "aAg5tydAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn peer(id: u32, key: &str, hop: u32, via: &str, ep: &str, allowed: &str) -> Peer {
        Peer {
            id,
            public_key: key.into(),
            wg: WgPeer {
                public_key: [0; 32],
                endpoint: Some(ep.parse().unwrap()),
                allowed_ips: vec![allowed.parse().unwrap()],
                last_handshake: Some(SystemTime::now() - Duration::from_secs(30)),
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: None,
            },
            friendly_name: None,
            hop,
            via: via.into(),
        }
    }

    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        inv.tunnels.push(Tunnel {
            name: "wg0".into(),
            ifindex: 3,
            mtu: 1420,
            backend: Backend::Netlink,
            listen_port: 51820,
            peers: vec![
                peer(1, ENTRY, 1, "eth0", "198.51.100.7:51820", "10.0.0.2/32"),
                peer(2, EXIT, 2, ENTRY, "10.0.0.2:51820", "0.0.0.0/0"),
            ],
        });
        inv.underlays.push(Underlay {
            name: "eth0".into(),
            ifindex: 2,
        });
        inv
    }

    fn series(count: u64, sum_ns: u64) -> Series {
        Series {
            count,
            sum_ns,
            ..Series::default()
        }
    }

    #[test]
    fn everything_measured_lands_on_its_peer() {
        let inv = inventory();
        let labeler = EndpointLabeler::with_salt([7; 32], false);
        let mut x = Extra {
            labeler: Some(labeler.clone()),
            ..Extra::default()
        };
        let k = |i: &str, p: &str| (i.to_string(), p.to_string());
        x.wire.rtt.insert(k("eth0", ENTRY), series(2, 2_000_000));
        x.wire.rtt.insert(k("wg0", EXIT), series(1, 5_000_000));
        x.wire.gaps.insert(k("wg0", EXIT), 12);
        x.wire.late.insert(k("wg0", EXIT), 2);
        x.wire.timeouts.insert(k("eth0", ENTRY), 3);
        x.wire
            .transit
            .insert(("wg0".into(), EXIT.into(), "tx"), series(4, 400_000));
        // A probe of 10.64.0.1 through wg0 goes through the exit peer (0.0.0.0/0).
        let mut stats = TargetStats::default();
        stats.sent = 10;
        stats.lost = 1;
        stats.replies = 9;
        stats.rtt_sum = 0.09;
        stats.buckets[0] = 9;
        x.probes.push(ProbeEntry {
            target: Some("10.64.0.1".parse().unwrap()),
            iface: "wg0".into(),
            stats,
            recent: (
                4,
                1,
                vec![Duration::from_millis(8), Duration::from_millis(12)],
            ),
        });
        let ep: std::net::SocketAddr = "198.51.100.7:51820".parse().unwrap();
        x.pmtu.path.insert((labeler.label(ep), "eth0".into()), 1400);
        x.pmtu.recommended.insert("wg0".into(), 1280);
        x.path_healthy = vec![("wg0".into(), EXIT.into(), false)];
        x.leaks.insert(("eth0".into(), "dns"), (3, 180));

        let mut s = Snapshot::default();
        s.wire.insert(
            ("eth0".into(), ENTRY.into(), "rx", "data"),
            Counter {
                packets: 0,
                bytes: 0,
            },
        );
        s.wire.insert(
            ("wg0".into(), EXIT.into(), "rx", "data"),
            Counter {
                packets: 88,
                bytes: 8800,
            },
        );
        let v = build_with(&inv, &s, &Drops::default(), Ok(()), &x);
        let t = &v["tunnels"][0];
        assert_eq!(t["path_mtu_bytes"], 1400);
        assert_eq!(t["recommended_mtu"], 1280);
        let (e, x2) = (&t["peers"][0], &t["peers"][1]);
        assert_eq!(e["handshake_rtt"]["count"], 2);
        assert_eq!(e["handshake_rtt"]["mean_seconds"], 0.001);
        assert_eq!(e["handshake_timeouts"], 3);
        assert_eq!(e["path_mtu_bytes"], 1400);
        assert_eq!(e["probes"], json!([]));
        assert!(e.get("endpoint").is_none(), "endpoints only when exported");
        assert_eq!(x2["handshake_rtt"]["mean_seconds"], 0.005);
        assert_eq!(x2["transit_loss"]["gaps"], 12);
        assert_eq!(x2["transit_loss"]["late"], 2);
        assert_eq!(x2["transit_loss"]["rx_data_packets"], 88);
        // 10 never arrived of 98 sent.
        let loss = x2["transit_loss"]["loss_percent"].as_f64().unwrap();
        assert!((loss - 1000.0 / 98.0).abs() < 1e-9, "{loss}");
        assert_eq!(x2["transit_time"]["tx"]["mean_seconds"], 0.0001);
        assert_eq!(x2["transit_time"]["rx"], Value::Null);
        assert_eq!(x2["path_healthy"], false);
        assert_eq!(e["path_healthy"], Value::Null);
        let p = &x2["probes"][0];
        assert_eq!(p["target"], "10.64.0.1");
        assert_eq!(
            (p["sent"].clone(), p["lost"].clone()),
            (json!(10), json!(1))
        );
        assert_eq!(p["loss_percent"], 10.0);
        assert!((p["rtt_mean_seconds"].as_f64().unwrap() - 0.01).abs() < 1e-12);
        assert_eq!(p["recent"]["rtt_last_seconds"], 0.012);
        assert_eq!(p["recent"]["loss_percent"], 25.0);
        assert_eq!(v["leaks"][0]["packets"], 3);
        assert_eq!(v["mullvad"], Value::Null);
        assert_eq!(v["export_endpoints"], false);

        // With --export-endpoints: the endpoint is there.
        x.export_endpoints = true;
        let v = build_with(&inv, &s, &Drops::default(), Ok(()), &x);
        assert_eq!(
            v["tunnels"][0]["peers"][0]["endpoint"],
            "198.51.100.7:51820"
        );
    }

    #[test]
    fn mullvad_object_when_the_poller_has_one() {
        let inv = inventory();
        let mut m = MullvadState::default();
        let text = r#"{"state":"connected","details":{"endpoint":{"address":"10.0.0.2:51820","protocol":"udp","quantum_resistant":true,"obfuscation":null,"entry_endpoint":{"address":"198.51.100.7:51820","protocol":"udp"},"tunnel_interface":"wg0","daita":{}},"location":{"hostname":"se-got-wg-101","city":"Gothenburg","country":"Sweden","entry_hostname":"de-fra-wg-001","entry_city":"Frankfurt","entry_country":"Germany"},"feature_indicators":["Multihop","QuantumResistance"]}}"#;
        m.record(Ok(crate::mullvad::parse_status(text).unwrap()));
        let x = Extra {
            mullvad: Some(m),
            ..Extra::default()
        };
        let v = build_with(&inv, &Snapshot::default(), &Drops::default(), Ok(()), &x);
        let mv = &v["mullvad"];
        assert_eq!(mv["state"], "connected");
        assert_eq!(mv["exit"]["hostname"], "se-got-wg-101");
        assert_eq!(mv["entry"]["city"], "Frankfurt");
        assert_eq!(mv["multihop"], true);
        assert_eq!(mv["features"], json!(["Multihop", "QuantumResistance"]));
        let peers = &v["tunnels"][0]["peers"];
        assert_eq!(peers[0]["mullvad_relay"]["role"], "entry");
        assert_eq!(peers[1]["mullvad_relay"]["hostname"], "se-got-wg-101");

        // A daemon that cannot be read: said so; one that is not installed: nothing.
        let mut m = MullvadState {
            polled_at: Some(SystemTime::now()),
            last_error: Some("timed out".into()),
            ..MullvadState::default()
        };
        let x = Extra {
            mullvad: Some(m.clone()),
            ..Extra::default()
        };
        let v = build_with(&inv, &Snapshot::default(), &Drops::default(), Ok(()), &x);
        assert_eq!(v["mullvad"]["up"], false);
        assert_eq!(v["mullvad"]["error"], "timed out");
        m.off = true;
        let x = Extra {
            mullvad: Some(m),
            ..Extra::default()
        };
        let v = build_with(&inv, &Snapshot::default(), &Drops::default(), Ok(()), &x);
        assert_eq!(v["mullvad"], Value::Null);
    }
}

/// The document's exact JSON, pinned: a rich snapshot (every part filled, every null and
/// absent case present) and a bare one, serialized as the server does.
#[cfg(test)]
mod golden_tests {
    use std::{net::SocketAddr, time::Duration};

    use super::*;
    use crate::{
        inventory::{Backend, Peer, Tunnel, Underlay, WgPeer},
        metrics::crypto::Series,
    };

    const ENTRY: &str = "FXUjJ9fcAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const EXIT: &str = "aAg5tydAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const LONE: &str = "bG9uZQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn peer(key: &str, hop: u32, via: &str, ep: Option<&str>, allowed: &[&str]) -> Peer {
        Peer {
            id: 1,
            public_key: key.into(),
            wg: WgPeer {
                public_key: [0; 32],
                endpoint: ep.map(|e| e.parse().unwrap()),
                allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
                last_handshake: ep.map(|_| SystemTime::now() - Duration::from_secs(30)),
                rx_bytes: 123_456,
                tx_bytes: 654_321,
                persistent_keepalive: Some(25),
            },
            friendly_name: None,
            hop,
            via: via.into(),
        }
    }

    fn series(count: u64, sum_ns: u64) -> Series {
        Series {
            count,
            sum_ns,
            ..Series::default()
        }
    }

    fn c(packets: u64, bytes: u64) -> Counter {
        Counter { packets, bytes }
    }

    /// Two tunnels (a multihop one, a userspace one with a peer that has no endpoint and no
    /// handshake), everything measured, Mullvad connected, endpoints exported, unhealthy.
    fn rich() -> Value {
        let mut inv = Inventory::default();
        let mut exit = peer(
            EXIT,
            2,
            ENTRY,
            Some("10.0.0.2:51820"),
            &["0.0.0.0/0", "::/0"],
        );
        exit.friendly_name = Some("exit relay".into());
        inv.tunnels.push(Tunnel {
            name: "wg0".into(),
            ifindex: 3,
            mtu: 1420,
            backend: Backend::Netlink,
            listen_port: 51820,
            peers: vec![
                peer(
                    ENTRY,
                    1,
                    "eth0",
                    Some("198.51.100.7:51820"),
                    &["10.0.0.2/32"],
                ),
                exit,
            ],
        });
        inv.tunnels.push(Tunnel {
            name: "wg1".into(),
            ifindex: 7,
            mtu: 1280,
            backend: Backend::Uapi,
            listen_port: 0,
            peers: vec![peer(LONE, 1, "", None, &["192.168.9.0/24"])],
        });
        for (name, ifindex) in [("eth0", 2), ("eth1", 4)] {
            inv.underlays.push(Underlay {
                name: name.into(),
                ifindex,
            });
        }

        let mut s = Snapshot::default();
        let t = |i: &str, p: &str, d| (i.to_string(), p.to_string(), d);
        s.tunnel.insert(t("wg0", ENTRY, "tx"), c(200, 37_600));
        s.tunnel.insert(t("wg0", ENTRY, "rx"), c(10, 5_000));
        s.tunnel.insert(t("wg0", EXIT, "tx"), c(0, 100));
        s.tunnel.insert(t("wg0", EXIT, "rx"), c(3, 0));
        let w = |i: &str, p: &str, d, m| (i.to_string(), p.to_string(), d, m);
        s.wire
            .insert(w("eth0", ENTRY, "tx", "data"), c(200, 50_400));
        s.wire.insert(w("eth1", ENTRY, "tx", "data"), c(1, 77));
        s.wire.insert(w("eth0", ENTRY, "rx", "data"), c(10, 4_000));
        s.wire
            .insert(w("eth0", ENTRY, "tx", "initiation"), c(2, 296));
        s.wire.insert(w("wg0", EXIT, "tx", "data"), c(0, 160));
        s.wire.insert(w("wg0", EXIT, "rx", "data"), c(88, 8_800));

        let mut d = Drops::default();
        d.drops.insert(("wg0".into(), "NO_SOCKET".into()), 9);
        d.drops.insert(("lo".into(), "SOCKET_RCVBUFF".into()), 199);
        d.udp_errors.insert(51820, 3);
        d.udp_errors.insert(5353, 1);

        let labeler = EndpointLabeler::with_salt([7; 32], false);
        let mut x = Extra {
            labeler: Some(labeler.clone()),
            export_endpoints: true,
            ..Extra::default()
        };
        let k = |i: &str, p: &str| (i.to_string(), p.to_string());
        x.wire.rtt.insert(k("eth0", ENTRY), series(2, 2_000_000));
        x.wire.rtt.insert(k("wg0", EXIT), series(3, 5_000_000));
        x.wire.gaps.insert(k("wg0", EXIT), 12);
        x.wire.late.insert(k("wg0", EXIT), 2);
        x.wire.timeouts.insert(k("eth0", ENTRY), 3);
        x.wire
            .transit
            .insert(("wg0".into(), EXIT.into(), "tx"), series(4, 400_000));
        x.wire
            .transit
            .insert(("eth0".into(), ENTRY.into(), "rx"), series(7, 1_234_567));
        let mut stats = TargetStats::default();
        stats.sent = 10;
        stats.lost = 1;
        stats.replies = 9;
        stats.rtt_sum = 0.09;
        x.probes.push(ProbeEntry {
            target: Some("10.64.0.1".parse().unwrap()),
            iface: "wg0".into(),
            stats,
            recent: (
                4,
                1,
                vec![Duration::from_millis(8), Duration::from_millis(12)],
            ),
        });
        x.probes.push(ProbeEntry {
            target: Some("10.0.0.2".parse().unwrap()),
            iface: String::new(),
            stats: TargetStats::default(),
            recent: (0, 0, Vec::new()),
        });
        x.probes.push(ProbeEntry {
            target: None,
            ..ProbeEntry::default()
        });
        let ep: SocketAddr = "198.51.100.7:51820".parse().unwrap();
        x.pmtu.path.insert((labeler.label(ep), "eth0".into()), 1400);
        x.pmtu
            .path
            .insert(("10.64.0.1".into(), String::new()), 1380);
        x.pmtu.recommended.insert("wg0".into(), 1280);
        x.path_healthy = vec![
            ("wg0".into(), EXIT.into(), false),
            ("wg0".into(), ENTRY.into(), true),
        ];
        x.leaks.insert(("eth0".into(), "dns"), (3, 180));
        x.leaks.insert(("eth1".into(), "ipv6"), (0, 0));
        x.path.fragments.insert(("eth0".into(), "tx", "outer"), 4);
        x.path.too_big.insert(("eth0".into(), "ipv4"), 2);
        x.path.reported_mtu.insert("eth0".into(), 1400);
        let mut m = MullvadState::default();
        let text = r#"{"state":"connected","details":{"endpoint":{"address":"10.0.0.2:51820","protocol":"udp","quantum_resistant":true,"obfuscation":null,"entry_endpoint":{"address":"198.51.100.7:51820","protocol":"udp"},"tunnel_interface":"wg0","daita":{}},"location":{"hostname":"se-got-wg-101","city":"Gothenburg","country":"Sweden","entry_hostname":"de-fra-wg-001","entry_city":"Frankfurt","entry_country":"Germany"},"feature_indicators":["Multihop","QuantumResistance"]}}"#;
        m.record(Ok(crate::mullvad::parse_status(text).unwrap()));
        x.mullvad = Some(m);

        build_with(&inv, &s, &d, Err("no collection yet".into()), &x)
    }

    /// No tunnel, nothing measured, a Mullvad daemon that cannot be read.
    fn bare() -> Value {
        let x = Extra {
            mullvad: Some(MullvadState {
                polled_at: Some(SystemTime::now()),
                last_error: Some("timed out".into()),
                ..MullvadState::default()
            }),
            ..Extra::default()
        };
        build_with(
            &Inventory::default(),
            &Snapshot::default(),
            &Drops::default(),
            Ok(()),
            &x,
        )
    }

    /// What depends on the clock, fixed: the time and the handshake ages.
    fn pin_clock(mut v: Value) -> Value {
        v["time"] = json!(1_790_000_000u64);
        if let Some(ts) = v["tunnels"].as_array_mut() {
            for t in ts {
                if let Some(ps) = t["peers"].as_array_mut() {
                    for p in ps {
                        if p["latest_handshake_age_seconds"].is_number() {
                            p["latest_handshake_age_seconds"] = json!(30.5);
                        }
                    }
                }
            }
        }
        v
    }

    /// The rich snapshot's JSON, as the server emits it (`to_string_pretty` and a newline).
    const RICH: &str = include_str!("status.golden.json");

    const BARE: &str = r#"{
  "capabilities": null,
  "drops": [],
  "export_endpoints": false,
  "health_reason": null,
  "healthy": true,
  "leaks": [],
  "mullvad": {
    "error": "timed out",
    "state": null,
    "up": false
  },
  "path": {
    "fragments": [],
    "icmp_reported_mtu": [],
    "icmp_too_big": [],
    "mtu": []
  },
  "time": 1790000000,
  "tunnels": [],
  "udp_receive_errors": [],
  "underlays": []
}
"#;

    /// The body the server sends for `v`.
    fn body(v: &Value) -> String {
        serde_json::to_string_pretty(v).unwrap() + "\n"
    }

    #[test]
    fn the_json_is_exactly_the_golden_one() {
        assert_eq!(body(&pin_clock(rich())), RICH);
        assert_eq!(body(&pin_clock(bare())), BARE);
    }
}
