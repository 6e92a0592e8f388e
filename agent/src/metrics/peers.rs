//! Peer state, drop-in compatible with prometheus_wireguard_exporter 3.6.6
//! (`wireguard_sent_bytes_total`, `wireguard_received_bytes_total`,
//! `wireguard_latest_handshake_seconds`), and the topology (`wirescope_peer_info`).
//!
//! Compatibility with that exporter, checked against its source:
//! - Same names, types, HELP texts, label names and label order: `interface`, `public_key`,
//!   `allowed_ips`, then `friendly_name` when a `--wg-config` names the peer, then (with
//!   `--export-endpoints`, its `-a`) `remote_ip` and `remote_port` when the peer has an
//!   endpoint. `allowed_ips` is `wg show dump`'s field: joined with `,`, `(none)` when empty.
//! - Same values: bytes as WireGuard reports them; the handshake as whole UNIX seconds, 0 if
//!   none. Interfaces in name order; peers in the order the control interface lists them.
//! - Differences: label values are escaped per the exposition formats (the exporter escapes
//!   only `"` in friendly names and nothing else, so a `\` or a newline broke its output);
//!   with an OpenMetrics Accept header the body is OpenMetrics (`# TYPE wireguard_sent_bytes
//!   counter`, `# EOF`), otherwise it is text 0.0.4 as the exporter writes it. Its
//!   `friendly_json`, `-s` (split allowed IPs) and `-d` (handshake delay) are not offered.
//! - Tunnels without a readable control interface (backend `None`, e.g. Mullvad's in-app
//!   WireGuard) have no `wireguard_*` series: their counters are unknown, and 0 would lie.
//!   They still get `wirescope_peer_info`.

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::UNIX_EPOCH,
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use super::{Labels, encode_counters, encode_gauges};
use crate::{
    sources::wg::format_allowed_ips,
    sync::inventory::{Backend, Inventory},
};

#[derive(Debug)]
pub struct PeerCollector {
    inventory: Arc<RwLock<Inventory>>,
    export_endpoints: bool,
}

impl PeerCollector {
    /// `export_endpoints`: add the peers' endpoint addresses as labels (`--export-endpoints`).
    pub fn new(inventory: Arc<RwLock<Inventory>>, export_endpoints: bool) -> Self {
        Self {
            inventory,
            export_endpoints,
        }
    }
}

/// One scrape's worth of rows, copied out so the inventory lock is not held while encoding.
struct Rows {
    /// (labels, tx_bytes, rx_bytes, latest handshake in UNIX seconds)
    state: Vec<(Labels, u64, u64, u64)>,
    info: Vec<Labels>,
}

impl PeerCollector {
    fn rows(&self) -> Rows {
        // A writer that panicked leaves a consistent-enough inventory (whole values are
        // swapped in); serving it beats failing every scrape from then on.
        let inv = self
            .inventory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut tunnels: Vec<_> = inv.tunnels.iter().collect();
        tunnels.sort_by(|a, b| a.name.cmp(&b.name));
        let mut rows = Rows {
            state: Vec::new(),
            info: Vec::new(),
        };
        for t in tunnels {
            for p in &t.peers {
                let mut info: Labels = vec![
                    ("interface", t.name.clone()),
                    ("peer", p.public_key.clone()),
                    ("hop", p.hop.to_string()),
                    ("via", p.via.clone()),
                ];
                if self.export_endpoints
                    && let Some(ep) = p.wg.endpoint
                {
                    info.push(("endpoint", ep.to_string()));
                }
                rows.info.push(info);

                if t.backend == Backend::None {
                    continue;
                }
                let mut labels: Labels = vec![
                    ("interface", t.name.clone()),
                    ("public_key", p.public_key.clone()),
                    ("allowed_ips", format_allowed_ips(&p.wg.allowed_ips)),
                ];
                if let Some(name) = &p.friendly_name {
                    labels.push(("friendly_name", name.clone()));
                }
                if self.export_endpoints
                    && let Some(ep) = p.wg.endpoint
                {
                    labels.push(("remote_ip", ep.ip().to_string()));
                    labels.push(("remote_port", ep.port().to_string()));
                }
                let handshake =
                    p.wg.last_handshake
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                rows.state
                    .push((labels, p.wg.tx_bytes, p.wg.rx_bytes, handshake));
            }
        }
        rows
    }
}

impl Collector for PeerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.rows();
        encode_counters(
            &mut encoder,
            "wireguard_sent_bytes",
            "Bytes sent to the peer",
            rows.state.iter().map(|(l, tx, _, _)| (l.as_slice(), *tx)),
        )?;
        encode_counters(
            &mut encoder,
            "wireguard_received_bytes",
            "Bytes received from the peer",
            rows.state.iter().map(|(l, _, rx, _)| (l.as_slice(), *rx)),
        )?;
        encode_gauges(
            &mut encoder,
            "wireguard_latest_handshake_seconds",
            "UNIX timestamp seconds of the last handshake",
            rows.state.iter().map(|(l, _, _, hs)| (l.as_slice(), *hs)),
        )?;
        encode_gauges(
            &mut encoder,
            "wirescope_peer_info",
            "One per peer: hop is 1 for a peer reached over an underlay, 2 through a hop-1 \
             peer's tunnel, and so on; via is that underlay interface or carrying peer",
            rows.info.iter().map(|l| (l.as_slice(), 1u32)),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        time::{Duration, SystemTime},
    };

    use ipnet::IpNet;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        metrics::{Format, encode_string},
        sync::inventory::{Peer, Tunnel, WgPeer},
    };

    const K_ENTRY: &str = "2S7mA0vEMethCNQrJpJKE81/JmhgtB+tHHLYQhgM6kk=";
    const K_EXIT: &str = "qnoxQoQI8KKMupLnSSureORV0wMmH7JryZNsmGVISzU=";
    const K_IDLE: &str = "928vO9Lf4+Mo84cWu4k1oRyzf0AR7FTGoPKHGoTMSHk=";
    const K_APP: &str = "MdVOIPKt9K2MPj/sO2NlWQbOnFJ6L/qX80mmhQwsUlA=";

    #[allow(clippy::too_many_arguments)]
    fn peer(
        id: u32,
        key: &str,
        endpoint: Option<&str>,
        ips: &[&str],
        handshake: Option<u64>,
        rx: u64,
        tx: u64,
        friendly: Option<&str>,
        hop: u32,
        via: &str,
    ) -> Peer {
        let wg = WgPeer {
            endpoint: endpoint.map(|e| e.parse::<SocketAddr>().unwrap()),
            allowed_ips: ips.iter().map(|i| i.parse::<IpNet>().unwrap()).collect(),
            last_handshake: handshake.map(|s| UNIX_EPOCH + Duration::new(s, 123_456_789)),
            rx_bytes: rx,
            tx_bytes: tx,
            ..WgPeer::new([0; 32])
        };
        Peer {
            friendly_name: friendly.map(str::to_owned),
            hop,
            via: via.to_owned(),
            ..Peer::new(id, key.to_owned(), wg)
        }
    }

    fn inventory() -> Inventory {
        let wg1 = Tunnel {
            name: "wg1".into(),
            ifindex: 9,
            mtu: 1420,
            backend: Backend::Netlink,
            listen_port: 51821,
            peers: vec![peer(3, K_IDLE, None, &[], None, 0, 0, None, 1, "eth0")],
        };
        let wg0 = Tunnel {
            name: "wg0".into(),
            ifindex: 7,
            mtu: 1380,
            backend: Backend::Uapi,
            listen_port: 0,
            peers: vec![
                peer(
                    1,
                    K_ENTRY,
                    Some("37.159.76.245:29159"),
                    &["10.70.0.2/32", "10.70.0.66/32"],
                    Some(1_555_771_458),
                    10_288_508,
                    139_524_160,
                    Some("entry \"se\""),
                    1,
                    "eth0",
                ),
                peer(
                    2,
                    K_EXIT,
                    Some("[2001:db8::1]:51820"),
                    &["0.0.0.0/0", "::/0"],
                    Some(1_555_344_925),
                    283_012,
                    6_604_620,
                    None,
                    2,
                    K_ENTRY,
                ),
            ],
        };
        let app = Tunnel {
            name: "wg0-mullvad".into(),
            ifindex: 11,
            mtu: 1380,
            backend: Backend::None,
            listen_port: 0,
            peers: vec![peer(
                4,
                K_APP,
                None,
                &["10.64.0.1/32"],
                None,
                0,
                0,
                None,
                1,
                "eth0",
            )],
        };
        Inventory {
            // Deliberately not in name order: the exporter sorts interfaces.
            tunnels: vec![wg1, app, wg0],
            ..Default::default()
        }
    }

    fn scrape(export_endpoints: bool, format: Format) -> String {
        let mut registry = Registry::default();
        let inv = Arc::new(RwLock::new(inventory()));
        registry.register_collector(Box::new(PeerCollector::new(inv, export_endpoints)));
        encode_string(&registry, format).unwrap()
    }

    const ENTRY: &str = r#"interface="wg0",public_key="2S7mA0vEMethCNQrJpJKE81/JmhgtB+tHHLYQhgM6kk=",allowed_ips="10.70.0.2/32,10.70.0.66/32",friendly_name="entry \"se\"""#;
    const EXIT: &str = r#"interface="wg0",public_key="qnoxQoQI8KKMupLnSSureORV0wMmH7JryZNsmGVISzU=",allowed_ips="0.0.0.0/0,::/0""#;
    const IDLE: &str = r#"interface="wg1",public_key="928vO9Lf4+Mo84cWu4k1oRyzf0AR7FTGoPKHGoTMSHk=",allowed_ips="(none)""#;

    /// What prometheus_wireguard_exporter 3.6.6 renders for these peers (render_with_names,
    /// text format 0.0.4), byte for byte except the empty line it puts between families;
    /// then our topology family.
    #[test]
    fn prometheus_text_matches_the_exporter() {
        let exporter = format!(
            "# HELP wireguard_sent_bytes_total Bytes sent to the peer\n\
             # TYPE wireguard_sent_bytes_total counter\n\
             wireguard_sent_bytes_total{{{ENTRY}}} 139524160\n\
             wireguard_sent_bytes_total{{{EXIT}}} 6604620\n\
             wireguard_sent_bytes_total{{{IDLE}}} 0\n\
             \n\
             # HELP wireguard_received_bytes_total Bytes received from the peer\n\
             # TYPE wireguard_received_bytes_total counter\n\
             wireguard_received_bytes_total{{{ENTRY}}} 10288508\n\
             wireguard_received_bytes_total{{{EXIT}}} 283012\n\
             wireguard_received_bytes_total{{{IDLE}}} 0\n\
             \n\
             # HELP wireguard_latest_handshake_seconds UNIX timestamp seconds of the last handshake\n\
             # TYPE wireguard_latest_handshake_seconds gauge\n\
             wireguard_latest_handshake_seconds{{{ENTRY}}} 1555771458\n\
             wireguard_latest_handshake_seconds{{{EXIT}}} 1555344925\n\
             wireguard_latest_handshake_seconds{{{IDLE}}} 0\n"
        );
        let expected = exporter.replace("\n\n", "\n");
        assert_eq!(exporter.len(), expected.len() + 2);
        let got = scrape(false, Format::Prometheus);
        let (exporter_part, info_part) = got.split_at(expected.len());
        assert_eq!(exporter_part, expected);
        assert_eq!(
            info_part,
            "# HELP wirescope_peer_info One per peer: hop is 1 for a peer reached over an underlay, 2 through a hop-1 peer's tunnel, and so on; via is that underlay interface or carrying peer\n\
             # TYPE wirescope_peer_info gauge\n\
             wirescope_peer_info{interface=\"wg0\",peer=\"2S7mA0vEMethCNQrJpJKE81/JmhgtB+tHHLYQhgM6kk=\",hop=\"1\",via=\"eth0\"} 1\n\
             wirescope_peer_info{interface=\"wg0\",peer=\"qnoxQoQI8KKMupLnSSureORV0wMmH7JryZNsmGVISzU=\",hop=\"2\",via=\"2S7mA0vEMethCNQrJpJKE81/JmhgtB+tHHLYQhgM6kk=\"} 1\n\
             wirescope_peer_info{interface=\"wg0-mullvad\",peer=\"MdVOIPKt9K2MPj/sO2NlWQbOnFJ6L/qX80mmhQwsUlA=\",hop=\"1\",via=\"eth0\"} 1\n\
             wirescope_peer_info{interface=\"wg1\",peer=\"928vO9Lf4+Mo84cWu4k1oRyzf0AR7FTGoPKHGoTMSHk=\",hop=\"1\",via=\"eth0\"} 1\n"
        );
    }

    #[test]
    fn openmetrics_has_the_same_samples() {
        let got = scrape(false, Format::OpenMetrics);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(
            lines[0],
            "# HELP wireguard_sent_bytes Bytes sent to the peer"
        );
        assert_eq!(lines[1], "# TYPE wireguard_sent_bytes counter");
        assert_eq!(
            lines[2],
            format!("wireguard_sent_bytes_total{{{ENTRY}}} 139524160")
        );
        assert_eq!(
            lines[5],
            "# HELP wireguard_received_bytes Bytes received from the peer"
        );
        assert_eq!(lines[6], "# TYPE wireguard_received_bytes counter");
        assert_eq!(
            lines[12],
            format!("wireguard_latest_handshake_seconds{{{ENTRY}}} 1555771458")
        );
        assert_eq!(lines.last(), Some(&"# EOF"));
        // Same sample lines as the text format.
        let samples = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&got), samples(&scrape(false, Format::Prometheus)));
    }

    #[test]
    fn endpoints_only_when_asked() {
        let got = scrape(true, Format::Prometheus);
        assert!(got.contains(&format!(
            "wireguard_sent_bytes_total{{{ENTRY},remote_ip=\"37.159.76.245\",remote_port=\"29159\"}} 139524160\n"
        )));
        assert!(got.contains(&format!(
            "wireguard_sent_bytes_total{{{EXIT},remote_ip=\"2001:db8::1\",remote_port=\"51820\"}} 6604620\n"
        )));
        // No endpoint, no endpoint labels.
        assert!(got.contains(&format!("wireguard_sent_bytes_total{{{IDLE}}} 0\n")));
        assert!(got.contains(
            "wirescope_peer_info{interface=\"wg0\",peer=\"2S7mA0vEMethCNQrJpJKE81/JmhgtB+tHHLYQhgM6kk=\",hop=\"1\",via=\"eth0\",endpoint=\"37.159.76.245:29159\"} 1\n"
        ));
        let plain = scrape(false, Format::Prometheus);
        assert!(!plain.contains("remote_") && !plain.contains("endpoint="));
    }

    #[test]
    fn reads_the_inventory_on_every_scrape() {
        let inv = Arc::new(RwLock::new(inventory()));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(PeerCollector::new(inv.clone(), false)));
        assert!(
            encode_string(&registry, Format::Prometheus)
                .unwrap()
                .contains(K_EXIT)
        );
        {
            let mut w = inv.write().unwrap();
            for t in &mut w.tunnels {
                t.peers.retain(|p| p.public_key != K_EXIT);
            }
            w.tunnels[2].peers[0].wg.tx_bytes += 1;
            w.tunnels[2].peers[0].wg.last_handshake = Some(SystemTime::UNIX_EPOCH);
        }
        let after = encode_string(&registry, Format::Prometheus).unwrap();
        assert!(!after.contains(K_EXIT), "a removed peer's series must go");
        assert!(after.contains(&format!(
            "wireguard_sent_bytes_total{{{ENTRY}}} 139524161\n"
        )));
        // A handshake at the epoch itself still reads 0 ("none"), as in `wg`.
        assert!(after.contains(&format!(
            "wireguard_latest_handshake_seconds{{{ENTRY}}} 0\n"
        )));
    }
}
