//! Which hop each peer is: 1 when its endpoint is reached over an underlay, n+1 when the
//! route to its endpoint goes into a tunnel and that tunnel's allowed IPs give it to a
//! hop-n peer (Mullvad multihop: the exit relay's endpoint is routed through the entry peer).

use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;

use crate::sync::inventory::Tunnel;

/// Where the route to an endpoint leaves: the interface index, if any route exists.
pub type RouteOif = HashMap<IpAddr, Option<u32>>;

/// Fill in `hop` and `via` of every peer of `tunnels`.
///
/// `routes` answers "which interface does the route to this endpoint address use", and
/// `link_names` names interfaces. A peer without an endpoint, or whose endpoint has no
/// route, stays at hop 1 with an empty `via`.
pub fn resolve(tunnels: &mut [Tunnel], routes: &RouteOif, link_names: &HashMap<u32, String>) {
    // (tunnel ifindex) -> index into tunnels, for "the route goes into one of our tunnels".
    let by_ifindex: HashMap<u32, usize> = tunnels
        .iter()
        .enumerate()
        .map(|(i, t)| (t.ifindex, i))
        .collect();
    // First pass: the carrier of each peer, as (tunnel index, peer index), or the underlay.
    let mut carrier: Vec<Vec<Result<(usize, usize), String>>> = Vec::new();
    for t in tunnels.iter() {
        let mut row = Vec::new();
        for p in &t.peers {
            let c = match p.wg.endpoint {
                None => Err(String::new()),
                Some(ep) => match routes.get(&ep.ip()).copied().flatten() {
                    None => Err(String::new()),
                    Some(oif) => match by_ifindex.get(&oif) {
                        Some(&ti) => match longest_match(&tunnels[ti], ep.ip()) {
                            Some(pi) => Ok((ti, pi)),
                            // Routed into a tunnel that has no peer for it: the packet
                            // would be dropped there; call it hop 1 via that tunnel.
                            None => Err(tunnels[ti].name.clone()),
                        },
                        None => Err(link_names.get(&oif).cloned().unwrap_or_default()),
                    },
                },
            };
            row.push(c);
        }
        carrier.push(row);
    }
    // Second pass: walk each chain of carriers; a chain longer than the number of peers is
    // a routing loop and stops there.
    let total: usize = tunnels.iter().map(|t| t.peers.len()).sum();
    let mut results = Vec::new();
    for (ti, row) in carrier.iter().enumerate() {
        for (pi, c) in row.iter().enumerate() {
            let via = match c {
                Ok((cti, cpi)) => tunnels[*cti].peers[*cpi].public_key.clone(),
                Err(underlay) => underlay.clone(),
            };
            let mut hop = 1u32;
            let mut cur = c.clone();
            while let Ok((cti, cpi)) = cur {
                hop += 1;
                if hop as usize > total + 1 {
                    break;
                }
                cur = carrier[cti][cpi].clone();
            }
            results.push((ti, pi, hop, via));
        }
    }
    for (ti, pi, hop, via) in results {
        let p = &mut tunnels[ti].peers[pi];
        p.hop = hop;
        p.via = via;
    }
}

/// The peer of `t` whose allowed IPs match `addr` most specifically (WireGuard's own
/// cryptokey routing).
pub fn longest_match(t: &Tunnel, addr: IpAddr) -> Option<usize> {
    let mut best: Option<(usize, u8)> = None;
    for (i, p) in t.peers.iter().enumerate() {
        for net in &p.wg.allowed_ips {
            if net.contains(&addr) && best.is_none_or(|(_, len)| net.prefix_len() > len) {
                best = Some((i, net.prefix_len()));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Allowed IPs as prometheus_wireguard_exporter writes them.
pub fn join_allowed_ips(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::inventory::{Backend, Peer, WgPeer};

    fn peer(key: &str, endpoint: Option<&str>, allowed: &[&str]) -> Peer {
        let wg = WgPeer {
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            ..WgPeer::new([0; 32])
        };
        Peer {
            hop: 0,
            ..Peer::new(0, key.into(), wg)
        }
    }

    fn tunnel(peers: Vec<Peer>) -> Tunnel {
        Tunnel {
            name: "wg0-mullvad".into(),
            ifindex: 7,
            mtu: 1380,
            backend: Backend::Uapi,
            listen_port: 0,
            peers,
        }
    }

    #[test]
    fn mullvad_multihop_entry_is_hop1_exit_is_hop2_via_entry() {
        let mut t = vec![tunnel(vec![
            peer("EXIT", Some("203.0.113.2:51820"), &["0.0.0.0/0", "::/0"]),
            peer("ENTRY", Some("198.51.100.1:51820"), &["203.0.113.2/32"]),
        ])];
        let routes: RouteOif = [
            ("203.0.113.2".parse().unwrap(), Some(7)),
            ("198.51.100.1".parse().unwrap(), Some(3)),
        ]
        .into();
        let names = [(3, "eth0".to_string()), (7, "wg0-mullvad".to_string())].into();
        resolve(&mut t, &routes, &names);
        let exit = &t[0].peers[0];
        let entry = &t[0].peers[1];
        assert_eq!((entry.hop, entry.via.as_str()), (1, "eth0"));
        assert_eq!((exit.hop, exit.via.as_str()), (2, "ENTRY"));
    }

    #[test]
    fn no_endpoint_or_no_route_is_hop1_with_empty_via() {
        let mut t = vec![tunnel(vec![
            peer("A", None, &["10.0.0.2/32"]),
            peer("B", Some("192.0.2.9:51820"), &["10.0.0.3/32"]),
        ])];
        resolve(&mut t, &RouteOif::new(), &HashMap::new());
        assert_eq!((t[0].peers[0].hop, t[0].peers[0].via.as_str()), (1, ""));
        assert_eq!((t[0].peers[1].hop, t[0].peers[1].via.as_str()), (1, ""));
    }

    #[test]
    fn a_routing_loop_terminates() {
        // Each peer's endpoint is routed into the tunnel and matched by the other peer.
        let mut t = vec![tunnel(vec![
            peer("A", Some("192.0.2.1:1"), &["192.0.2.2/32"]),
            peer("B", Some("192.0.2.2:1"), &["192.0.2.1/32"]),
        ])];
        let routes: RouteOif = [
            ("192.0.2.1".parse().unwrap(), Some(7)),
            ("192.0.2.2".parse().unwrap(), Some(7)),
        ]
        .into();
        resolve(&mut t, &routes, &HashMap::new());
        assert!(t[0].peers[0].hop <= 4);
        assert_eq!(t[0].peers[0].via, "B");
    }

    #[test]
    fn allowed_ips_join_like_the_exporter() {
        let nets: Vec<IpNet> = vec!["10.64.0.1/32".parse().unwrap(), "::/0".parse().unwrap()];
        assert_eq!(join_allowed_ips(&nets), "10.64.0.1/32,::/0");
    }
}
