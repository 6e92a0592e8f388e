//! The `/api/v1/status` snapshot: every tunnel, peer and hop with traffic and overhead,
//! built from the inventory and the datapath counters of the same moment, with what the
//! other parts of the agent measured ([`Extra`]: wire health, probes, path MTU, leaks,
//! ICMP and fragments, failover, Mullvad). The document's types are in
//! [`doc`], shared with `wirescope status`, which renders it ([`crate::ops::status`]).

pub mod doc;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use agent_common::maps::Counter;
use serde_json::Value;

use crate::{
    metrics::{
        drops::Snapshot as Drops, health::Snapshot as Health, path::Snapshot as PathSnapshot,
        tunnel::Snapshot,
    },
    probes::{failover::ProbeWindow, icmp::TargetStats, pmtu::Measured},
    sources::mullvad::{MullvadState, RelayPlace},
    sync::{
        inventory::{Inventory, Peer},
        peer_label::EndpointLabeler,
    },
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
    pub health: Health,
    pub transit: crate::metrics::transit::Snapshot,
    pub probes: Vec<ProbeEntry>,
    pub pmtu: Measured,
    /// (underlay, kind) -> (packets, bytes).
    pub leaks: BTreeMap<(String, &'static str), (u64, u64)>,
    /// (tunnel, peer, direction, kind) -> the obfuscation flows' packets and bytes.
    pub obfuscation: BTreeMap<crate::metrics::obfuscation::ObfsSeries, Counter>,
    pub path: PathSnapshot,
    /// (interface, peer, healthy) as the failover logic last judged them.
    pub path_healthy: Vec<(String, String, bool)>,
    pub mullvad: Option<MullvadState>,
    /// Names the hop-1 endpoints as the path-MTU search does, to find their path MTU.
    pub labeler: Option<EndpointLabeler>,
    pub export_endpoints: bool,
}

fn pair(c: Option<&Counter>) -> doc::Count {
    let c = c.copied().unwrap_or_default();
    doc::Count {
        packets: c.packets,
        bytes: c.bytes,
    }
}

/// Overhead of a peer in one direction: wire data bytes minus the tunnel bytes they carry.
fn overhead(wire: Option<&Counter>, tunnel: Option<&Counter>) -> Option<doc::Overhead> {
    let (Some(w), Some(t)) = (wire, tunnel) else {
        return None;
    };
    if t.bytes == 0 || w.bytes < t.bytes {
        return None;
    }
    let extra = w.bytes - t.bytes;
    Some(doc::Overhead {
        bytes: extra,
        bytes_per_packet: if t.packets > 0 {
            extra as f64 / t.packets as f64
        } else {
            0.0
        },
        percent: extra as f64 * 100.0 / t.bytes as f64,
    })
}

/// The obfuscation flows' counts of peer `p` of `tunnel` in direction `dir`, summed over
/// kinds, when its endpoint is a local proxy that such flows carry; None otherwise.
fn obfuscation_of(
    x: &Extra,
    inv: &Inventory,
    tunnel: &str,
    p: &Peer,
    dir: &str,
) -> Option<Counter> {
    let local =
        p.wg.endpoint
            .is_some_and(|e| crate::config::obfuscation::is_local_proxy(e.ip()));
    if !local || inv.obfuscation_of(tunnel, p.id).next().is_none() {
        return None;
    }
    let mut sum = Counter::default();
    for ((i, peer, d, _), c) in &x.obfuscation {
        if i == tunnel && *peer == p.public_key && *d == dir {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
        }
    }
    Some(sum)
}

/// The snapshot of the inventory and the counters alone, as JSON.
pub fn build(inv: &Inventory, s: &Snapshot, d: &Drops, healthy: Result<(), String>) -> Value {
    build_with(inv, s, d, healthy, &Extra::default())
}

/// The full snapshot ([`document`]) as the JSON the server sends: through a `Value`, so
/// every object's keys are sorted, as they always were.
pub fn build_with(
    inv: &Inventory,
    s: &Snapshot,
    d: &Drops,
    healthy: Result<(), String>,
    x: &Extra,
) -> Value {
    to_json(&document(inv, s, d, healthy, x))
}

/// `doc` as JSON. It cannot fail (no map has keys other than strings); if it ever did, the
/// answer says why, as for a poisoned lock.
pub fn to_json(doc: &doc::StatusDoc) -> Value {
    serde_json::to_value(doc).unwrap_or_else(
        |e| serde_json::json!({"error": format!("status snapshot not serializable: {e}")}),
    )
}

/// Mean of a histogram series in seconds, with its count; none when empty.
fn hist(sum_ns: u64, count: u64) -> Option<doc::MeanTime> {
    (count > 0).then(|| doc::MeanTime {
        count,
        mean_seconds: sum_ns as f64 / 1e9 / count as f64,
    })
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

fn probe_doc(e: &ProbeEntry) -> doc::Probe {
    let s = &e.stats;
    let (sent, lost, rtts) = &e.recent;
    let recent_mean = (!rtts.is_empty())
        .then(|| rtts.iter().map(|d| d.as_secs_f64()).sum::<f64>() / rtts.len() as f64);
    doc::Probe {
        target: e.target.map(|t| t.to_string()),
        interface: e.iface.clone(),
        sent: s.sent,
        lost: s.lost,
        replies: s.replies,
        loss_percent: (s.sent > 0).then(|| s.lost as f64 * 100.0 / s.sent as f64),
        rtt_mean_seconds: (s.replies > 0).then(|| s.rtt_sum / s.replies as f64),
        recent: doc::ProbeRecent {
            window_seconds: PROBE_WINDOW.as_secs(),
            sent: *sent,
            lost: *lost,
            loss_percent: (*sent > 0).then(|| *lost as f64 * 100.0 / *sent as f64),
            rtt_mean_seconds: recent_mean,
            rtt_last_seconds: rtts.last().map(|d| d.as_secs_f64()),
        },
    }
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

/// Everything the wire-health and transit snapshots have for `peer`, summed over the
/// interfaces it was seen on (the underlay for hop 1, the carrying tunnel for deeper hops):
/// handshake RTT, loss, transit time and handshake timeouts.
/// What the snapshots hold by (interface, peer, ...), summed per peer in one pass over each,
/// so that the document costs O(peers): looking each peer up in every snapshot was
/// O(peers^2), 10^8 comparisons at 10,000 peers.
#[derive(Default)]
struct PerPeer<'a> {
    /// (peer, direction) -> its data messages, wherever they were seen.
    wire_data: HashMap<(&'a str, &'static str), Counter>,
    /// peer -> (count, sum ns) of handshake round trips.
    rtt: HashMap<&'a str, (u64, u64)>,
    gaps: HashMap<&'a str, u64>,
    late: HashMap<&'a str, u64>,
    timeouts: HashMap<&'a str, u64>,
    /// (peer, direction) -> (count, sum ns) of transit times.
    transit: HashMap<(&'a str, &'a str), (u64, u64)>,
    /// (interface, peer) -> as failover last judged it.
    healthy: HashMap<(&'a str, &'a str), bool>,
}

impl<'a> PerPeer<'a> {
    fn index(s: &'a Snapshot, x: &'a Extra) -> PerPeer<'a> {
        let mut i = PerPeer::default();
        for ((_, peer, d, msg), c) in &s.wire {
            if *msg == "data" {
                let e = i.wire_data.entry((peer.as_str(), *d)).or_default();
                e.packets += c.packets;
                e.bytes += c.bytes;
            }
        }
        for ((_, p), series) in &x.health.rtt {
            let e = i.rtt.entry(p.as_str()).or_default();
            e.0 += series.count;
            e.1 += series.sum_ns;
        }
        for (m, out) in [
            (&x.health.gaps, &mut i.gaps),
            (&x.health.late, &mut i.late),
            (&x.health.timeouts, &mut i.timeouts),
        ] {
            for ((_, p), n) in m {
                *out.entry(p.as_str()).or_default() += n;
            }
        }
        for ((_, p, d), series) in &x.transit {
            let e = i.transit.entry((p.as_str(), d)).or_default();
            e.0 += series.count;
            e.1 += series.sum_ns;
        }
        for (iface, peer, ok) in &x.path_healthy {
            i.healthy.insert((iface.as_str(), peer.as_str()), *ok);
        }
        i
    }

    fn wire(&self, peer: &str, dir: &'static str) -> Option<Counter> {
        self.wire_data.get(&(peer, dir)).copied()
    }
}

fn wire_health(
    idx: &PerPeer<'_>,
    peer: &str,
    rx_data_packets: u64,
) -> (
    Option<doc::MeanTime>,
    doc::TransitLoss,
    doc::TransitTime,
    u64,
) {
    let (rtt_n, rtt_sum) = idx.rtt.get(peer).copied().unwrap_or_default();
    let get = |m: &HashMap<&str, u64>| m.get(peer).copied().unwrap_or(0);
    let (gaps, late, timeouts) = (get(&idx.gaps), get(&idx.late), get(&idx.timeouts));
    let missing = gaps.saturating_sub(late);
    let loss = doc::TransitLoss {
        gaps,
        late,
        rx_data_packets,
        loss_percent: (rx_data_packets + missing > 0)
            .then(|| missing as f64 * 100.0 / (rx_data_packets + missing) as f64),
    };
    let transit = |dir: &str| {
        let (n, sum_ns) = idx.transit.get(&(peer, dir)).copied().unwrap_or_default();
        hist(sum_ns, n)
    };
    let transit = doc::TransitTime {
        rx: transit("rx"),
        tx: transit("tx"),
    };
    (hist(rtt_sum, rtt_n), loss, transit, timeouts)
}

/// What the Mullvad poller knows; none when the daemon is off or was never polled.
fn mullvad_doc(m: &MullvadState) -> Option<doc::Mullvad> {
    if m.off || m.polled_at.is_none() {
        return None;
    }
    let Some(s) = m.current() else {
        return Some(doc::Mullvad {
            up: false,
            state: None,
            error: m.last_error.clone(),
            connection: None,
        });
    };
    let loc = s.location.clone().unwrap_or_default();
    // Country and city as the metrics have them: the hostname's codes when unnamed.
    let relay = |p: RelayPlace| {
        let some = |v: String| (!v.is_empty()).then_some(v);
        (!(p.hostname.is_empty() && p.country.is_empty() && p.city.is_empty())).then(|| {
            doc::MullvadLocation {
                hostname: some(p.hostname),
                city: some(p.city),
                country: some(p.country),
            }
        })
    };
    Some(doc::Mullvad {
        up: true,
        state: Some(s.state.name().to_string()),
        error: s.error_cause.clone(),
        connection: Some(doc::MullvadConnection {
            exit: relay(loc.exit()),
            entry: relay(loc.entry()),
            multihop: s.multihop(),
            daita: s.daita(),
            quantum_resistant: s.quantum_resistant(),
            obfuscation: s.endpoint.as_ref().and_then(|e| e.obfuscation.clone()),
            tunnel_interface: s.endpoint.as_ref().and_then(|e| e.tunnel_interface.clone()),
            features: s.feature_indicators.clone(),
            locked_down: s.locked_down,
            device: s.device.name().map(str::to_owned),
        }),
    })
}

/// The capability drop's outcome, read back from [`crate::caps::status`] (null until the
/// drop happened, and then always of this shape).
fn capabilities() -> Option<doc::Capabilities> {
    serde_json::from_value(crate::caps::status()).ok().flatten()
}

/// The full snapshot: the inventory and the counters plus what `x` holds.
pub fn document(
    inv: &Inventory,
    s: &Snapshot,
    d: &Drops,
    healthy: Result<(), String>,
    x: &Extra,
) -> doc::StatusDoc {
    let now = SystemTime::now();
    // Probes by the path they go through.
    let mut probes_of: BTreeMap<(String, String), Vec<doc::Probe>> = BTreeMap::new();
    for e in &x.probes {
        let Some(t) = e.target else { continue };
        if let Some(k) = probe_peer(inv, t, &e.iface) {
            probes_of.entry(k).or_default().push(probe_doc(e));
        }
    }
    let roles = x
        .mullvad
        .as_ref()
        .map(|m| m.relay_roles())
        .unwrap_or_default();
    let idx = PerPeer::index(s, x);
    let mut tunnels = Vec::new();
    for t in &inv.tunnels {
        let mut peers = Vec::new();
        let mut tunnel_path_mtu: Option<u32> = None;
        for p in &t.peers {
            let direction = |dir: &'static str| {
                let tun_key = (t.name.clone(), p.public_key.clone(), dir);
                let tunnel = s.tunnel.get(&tun_key);
                // The peer's data messages are counted wherever they were seen: on the
                // underlay for hop 1, inside the carrying tunnel for deeper hops.
                let wire = idx.wire(&p.public_key, dir);
                // Through a local proxy, the wire role sees no message of this peer (it
                // talks to the proxy on loopback): what its hop costs is the proxy's flow.
                let obfs = obfuscation_of(x, inv, &t.name, p, dir);
                let carrier = obfs.as_ref().or(wire.as_ref());
                doc::DirectionTraffic {
                    tunnel: pair(tunnel),
                    wire_data: pair(wire.as_ref()),
                    obfuscation: obfs.as_ref().map(|c| pair(Some(c))),
                    overhead: overhead(carrier, tunnel),
                }
            };
            let traffic = doc::Traffic {
                rx: direction("rx"),
                tx: direction("tx"),
            };
            let handshake_age =
                p.wg.last_handshake
                    .and_then(|h| now.duration_since(h).ok())
                    .map(|d| d.as_secs_f64());
            let rx_data = idx.wire(&p.public_key, "rx").map_or(0, |c| c.packets);
            let (hs_rtt, loss, transit, timeouts) = wire_health(&idx, &p.public_key, rx_data);
            let key = (t.name.clone(), p.public_key.clone());
            let path_mtu = x
                .labeler
                .as_ref()
                .and_then(|l| endpoint_pmtu_key(inv, p, l))
                .and_then(|k| x.pmtu.path.get(&k).copied());
            if let Some(m) = path_mtu {
                tunnel_path_mtu = Some(tunnel_path_mtu.map_or(m, |t: u32| t.min(m)));
            }
            let healthy = idx
                .healthy
                .get(&(t.name.as_str(), p.public_key.as_str()))
                .copied();
            // Through a local proxy the relay is the obfuscation flow's remote end.
            let addrs = inv.relay_addrs(&t.name, p);
            let relay = {
                roles
                    .iter()
                    .find(|r| addrs.contains(&r.0))
                    .map(|r| doc::MullvadRelay {
                        role: r.1.to_string(),
                        hostname: r.2.clone(),
                        country: r.3.clone(),
                        city: r.4.clone(),
                    })
            };
            peers.push(doc::Peer {
                public_key: p.public_key.clone(),
                friendly_name: p.friendly_name.clone(),
                hop: p.hop,
                via: p.via.clone(),
                allowed_ips: crate::sync::topology::join_allowed_ips(&p.wg.allowed_ips),
                latest_handshake_age_seconds: handshake_age,
                rx_bytes: p.wg.rx_bytes,
                tx_bytes: p.wg.tx_bytes,
                traffic,
                handshake_rtt: hs_rtt,
                handshake_timeouts: timeouts,
                transit_loss: loss,
                transit_time: transit,
                probes: probes_of.remove(&key).unwrap_or_default(),
                path_mtu_bytes: path_mtu,
                path_healthy: healthy,
                mullvad_relay: relay,
                endpoint: x
                    .export_endpoints
                    .then(|| p.wg.endpoint.map(|e| e.to_string())),
            });
        }
        tunnels.push(doc::Tunnel {
            interface: t.name.clone(),
            ifindex: t.ifindex,
            mtu: t.mtu,
            listen_port: t.listen_port,
            backend: format!("{:?}", t.backend).to_lowercase(),
            path_mtu_bytes: tunnel_path_mtu,
            recommended_mtu: x.pmtu.recommended.get(&t.name).copied(),
            peers,
        });
    }
    doc::StatusDoc {
        time: now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        healthy: healthy.is_ok(),
        health_reason: healthy.err(),
        capabilities: capabilities(),
        tunnels,
        underlays: inv
            .underlays
            .iter()
            .map(|u| doc::Underlay {
                interface: u.name.clone(),
                ifindex: u.ifindex,
            })
            .collect(),
        drops: drops(d),
        udp_receive_errors: udp_errors(inv, d),
        leaks: x
            .leaks
            .iter()
            .map(|((i, k), (p, b))| doc::Leak {
                interface: i.clone(),
                kind: k.to_string(),
                packets: *p,
                bytes: *b,
            })
            .collect(),
        path: path(x),
        mullvad: x.mullvad.as_ref().and_then(mullvad_doc),
        export_endpoints: x.export_endpoints,
    }
}

/// The path MTUs measured, and the fragments and ICMP too-big messages seen.
fn path(x: &Extra) -> doc::PathReport {
    let p = &x.path;
    doc::PathReport {
        mtu: x
            .pmtu
            .path
            .iter()
            .map(|((target, iface), b)| doc::ProbeMtu {
                target: target.clone(),
                interface: iface.clone(),
                bytes: *b,
            })
            .collect(),
        fragments: p
            .fragments
            .iter()
            .map(|((i, d, l), n)| doc::Fragments {
                interface: i.clone(),
                direction: d.to_string(),
                layer: l.to_string(),
                packets: *n,
            })
            .collect(),
        icmp_too_big: p
            .too_big
            .iter()
            .map(|((i, f), n)| doc::IcmpTooBig {
                interface: i.clone(),
                family: f.to_string(),
                messages: *n,
            })
            .collect(),
        icmp_reported_mtu: p
            .reported_mtu
            .iter()
            .map(|(i, m)| doc::IcmpReportedMtu {
                interface: i.clone(),
                bytes: *m,
            })
            .collect(),
    }
}

/// How many reasons per interface the status shows.
const TOP_REASONS: usize = 5;

/// Per interface (busiest first), its drops and their top reasons.
fn drops(d: &Drops) -> Vec<doc::InterfaceDrops> {
    let mut per_iface: BTreeMap<&str, Vec<(&str, u64)>> = Default::default();
    for ((iface, reason), n) in &d.drops {
        if *n > 0 {
            per_iface.entry(iface).or_default().push((reason, *n));
        }
    }
    let mut out: Vec<doc::InterfaceDrops> = per_iface
        .into_iter()
        .map(|(iface, mut reasons)| {
            reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            doc::InterfaceDrops {
                interface: iface.to_string(),
                packets: reasons.iter().map(|r| r.1).sum(),
                top_reasons: reasons
                    .iter()
                    .take(TOP_REASONS)
                    .map(|(r, n)| doc::DropReason {
                        reason: r.to_string(),
                        packets: *n,
                    })
                    .collect(),
            }
        })
        .collect();
    out.sort_by_key(|o| std::cmp::Reverse(o.packets));
    out
}

/// Failed UDP receives per local port, marking the ports WireGuard listens on.
fn udp_errors(inv: &Inventory, d: &Drops) -> Vec<doc::UdpReceiveErrors> {
    d.udp_errors
        .iter()
        .map(|(port, n)| {
            let wg = inv
                .tunnels
                .iter()
                .find(|t| t.listen_port != 0 && t.listen_port == *port)
                .map(|t| t.name.clone());
            doc::UdpReceiveErrors {
                port: *port,
                errors: *n,
                wireguard: wg.is_some(),
                interface: wg,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
