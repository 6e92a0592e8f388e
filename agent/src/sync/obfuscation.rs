//! Which tunnel peer each obfuscation flow carries. With udp2tcp, Shadowsocks or QUIC the
//! Mullvad app points the entry peer's endpoint at a local proxy (127.0.0.1:PORT), and the
//! proxy carries it to the relay's obfuscation port: the flow that leaves the underlay is
//! the proxy's, not WireGuard. The flows come from the Mullvad daemon (the obfuscators of
//! `mullvad status --json`, for the hop-1 peer of its tunnel, while connected or connecting)
//! and from `--obfuscation`; the sync loop looks up the routes to their remote ends (so their
//! underlays are watched), writes them into the programs' `OBFS_ENDPOINTS` with the peer
//! each carries, and publishes them in the inventory, where the collectors find a
//! loopback-endpoint peer's relay and its obfuscation bytes.
//!
//! The hop-1 peer of a tunnel: its only hop-1 peer, else the only one whose endpoint is on
//! loopback. A tunnel whose peers cannot be read (Mullvad's in-app WireGuard has no control
//! socket) has its flows counted for peer `unknown`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use agent_common::{
    maps::{
        PEER_UNKNOWN,
        obfuscation::{ObfsEndpoint, ObfsTarget, kind},
    },
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    config::obfuscation::{ObfuscatedPeer, ObfuscationRule, is_local_proxy, protocol_name},
    sources::mullvad::{DEFAULT_TUNNEL_INTERFACE, MullvadState},
    sync::{endpoint_key, inventory::Tunnel, topology::RouteOif},
};

/// A flow asked for, before it is matched with a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub peer: ObfuscatedPeer,
    pub kind: u8,
    pub protocol: u8,
    pub remote: SocketAddr,
    /// From the Mullvad daemon rather than `--obfuscation`.
    pub mullvad: bool,
}

/// A flow matched with the peer whose WireGuard it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObfuscatedFlow {
    pub tunnel: String,
    pub tunnel_ifindex: u32,
    /// The peer's id and base64 public key; None when the tunnel's peers are not known.
    pub peer: Option<(u32, String)>,
    pub kind: u8,
    pub protocol: u8,
    pub remote: SocketAddr,
    pub mullvad: bool,
}

impl ObfuscatedFlow {
    /// The `kind` label.
    pub fn kind_name(&self) -> &'static str {
        kind::name(self.kind)
    }
}

/// The flows `rules` and the Mullvad daemon ask for; a flow given by both counts once, as
/// the option says.
pub fn wanted(rules: &[ObfuscationRule], mullvad: Option<&MullvadState>) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = rules
        .iter()
        .map(|r| Wanted {
            peer: r.peer.clone(),
            kind: r.kind,
            protocol: r.protocol,
            remote: r.remote,
            mullvad: false,
        })
        .collect();
    let Some(m) = mullvad else { return out };
    let Some(s) = m.current().filter(|s| s.has_relays()) else {
        return out;
    };
    let Some(ep) = &s.endpoint else { return out };
    let iface = ep
        .tunnel_interface
        .clone()
        .filter(|i| !i.is_empty())
        .or_else(|| m.last_tunnel_interface.clone())
        .unwrap_or_else(|| DEFAULT_TUNNEL_INTERFACE.to_owned());
    for o in &ep.obfuscators {
        let Some(remote) = o.address.filter(|a| a.port() != 0) else {
            continue;
        };
        let k = kind::from_name(&o.kind).unwrap_or(kind::OTHER);
        let protocol = match o
            .protocol
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("tcp") => IPPROTO_TCP,
            Some("udp") => IPPROTO_UDP,
            // Not said: udp2tcp is TCP by its name, the others UDP.
            _ if k == kind::UDP2TCP => IPPROTO_TCP,
            _ => IPPROTO_UDP,
        };
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        if out
            .iter()
            .any(|w| w.protocol == protocol && w.remote == remote)
        {
            continue;
        }
        out.push(Wanted {
            peer: ObfuscatedPeer::Interface(iface.clone()),
            kind: k,
            protocol,
            remote,
            mullvad: true,
        });
    }
    out
}

/// The remote addresses whose routes say which underlays the flows leave through.
pub fn remote_ips(wanted: &[Wanted]) -> impl Iterator<Item = IpAddr> + '_ {
    wanted.iter().map(|w| w.remote.ip())
}

/// Matches every wanted flow with its tunnel and peer in `tunnels` (hops resolved). A flow
/// whose peer is not there (yet) is left out, with why in the second list (to be logged
/// once).
pub fn resolve(wanted: &[Wanted], tunnels: &[Tunnel]) -> (Vec<ObfuscatedFlow>, Vec<String>) {
    let mut flows = Vec::new();
    let mut problems = Vec::new();
    for w in wanted {
        let from = if w.mullvad {
            "Mullvad's obfuscation".to_owned()
        } else {
            "--obfuscation".to_owned()
        };
        let found = match &w.peer {
            ObfuscatedPeer::Key(key) => tunnels
                .iter()
                .find_map(|t| {
                    t.peers
                        .iter()
                        .find(|p| p.public_key == *key)
                        .map(|p| (t, Some((p.id, p.public_key.clone()))))
                })
                .ok_or_else(|| format!("{from}: no watched tunnel has the peer {key} (yet)")),
            ObfuscatedPeer::Interface(name) => match tunnels.iter().find(|t| t.name == *name) {
                None => Err(format!(
                    "{from}: the tunnel {name} is not watched (does it exist? see --tunnel)"
                )),
                Some(t) if t.peers.is_empty() => Ok((t, None)),
                Some(t) => entry_peer(t)
                    .map(|i| (t, Some((t.peers[i].id, t.peers[i].public_key.clone()))))
                    .ok_or_else(|| {
                        format!(
                            "{from}: the tunnel {name} has several hop-1 peers and not one \
                             whose endpoint is a local proxy on loopback: name the peer by its \
                             public key (--obfuscation KEY=...)"
                        )
                    }),
            },
        };
        match found {
            Ok((t, peer)) => flows.push(ObfuscatedFlow {
                tunnel: t.name.clone(),
                tunnel_ifindex: t.ifindex,
                peer,
                kind: w.kind,
                protocol: w.protocol,
                remote: w.remote,
                mullvad: w.mullvad,
            }),
            Err(why) => problems.push(why),
        }
    }
    (flows, problems)
}

/// The index of `t`'s hop-1 peer: the only one, or the only one whose endpoint is on
/// loopback (a local proxy's).
fn entry_peer(t: &Tunnel) -> Option<usize> {
    let hop1: Vec<usize> = (0..t.peers.len())
        .filter(|&i| t.peers[i].hop == 1)
        .collect();
    if let [only] = hop1.as_slice() {
        return Some(*only);
    }
    let proxied: Vec<usize> = hop1
        .into_iter()
        .filter(|&i| {
            t.peers[i]
                .wg
                .endpoint
                .is_some_and(|e| is_local_proxy(e.ip()))
        })
        .collect();
    match proxied.as_slice() {
        [only] => Some(*only),
        _ => None,
    }
}

/// An obfuscated peer whose endpoint is its local proxy was reached "via lo": it is reached
/// via the underlay its flow leaves through.
pub fn set_via(
    tunnels: &mut [Tunnel],
    flows: &[ObfuscatedFlow],
    routes: &RouteOif,
    link_names: &HashMap<u32, String>,
) {
    for f in flows {
        let Some((id, _)) = &f.peer else { continue };
        let Some(name) = routes
            .get(&f.remote.ip())
            .copied()
            .flatten()
            .and_then(|oif| link_names.get(&oif))
        else {
            continue;
        };
        for t in tunnels.iter_mut().filter(|t| t.ifindex == f.tunnel_ifindex) {
            for p in t.peers.iter_mut().filter(|p| p.id == *id) {
                if p.wg.endpoint.is_some_and(|e| is_local_proxy(e.ip())) {
                    p.via = name.clone();
                }
            }
        }
    }
}

/// `OBFS_ENDPOINTS` for `flows`.
pub fn map_entries(flows: &[ObfuscatedFlow]) -> HashMap<ObfsEndpoint, ObfsTarget> {
    flows
        .iter()
        .map(|f| {
            let e = endpoint_key(f.remote.ip(), f.remote.port());
            (
                ObfsEndpoint {
                    addr: e.addr,
                    port: e.port,
                    family: e.family,
                    proto: f.protocol,
                },
                ObfsTarget {
                    ifindex: f.tunnel_ifindex,
                    peer: f.peer.as_ref().map_or(PEER_UNKNOWN, |(id, _)| *id),
                    kind: f.kind,
                    _pad: [0; 3],
                },
            )
        })
        .collect()
}

/// One line per flow, for the log when the set changes; no address (it is private).
pub fn describe(f: &ObfuscatedFlow) -> String {
    format!(
        "tunnel {}: peer {} reaches its relay through {} obfuscation over {} ({})",
        f.tunnel,
        f.peer.as_ref().map_or("unknown", |(_, k)| k.as_str()),
        f.kind_name(),
        protocol_name(f.protocol),
        if f.mullvad {
            "from the Mullvad daemon"
        } else {
            "from --obfuscation"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        sources::mullvad::parse_status,
        sync::inventory::{Backend, Peer, WgPeer},
    };

    fn peer(id: u32, key: &str, endpoint: &str, hop: u32) -> Peer {
        let wg = WgPeer {
            endpoint: endpoint.parse().ok(),
            ..WgPeer::new([id as u8; 32])
        };
        Peer {
            hop,
            via: "lo".into(),
            ..Peer::new(id, key.into(), wg)
        }
    }

    fn tunnel(name: &str, ifindex: u32, peers: Vec<Peer>) -> Tunnel {
        Tunnel {
            name: name.into(),
            ifindex,
            mtu: 1380,
            backend: Backend::Uapi,
            listen_port: 0,
            peers,
        }
    }

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/mullvad/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn mullvad(fixture_name: &str) -> MullvadState {
        let mut m = MullvadState::default();
        m.record(Ok(parse_status(&fixture(fixture_name)).expect("fixture")));
        m
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Each obfuscation the app prints becomes flows for its tunnel's hop-1 peer: the
    /// Shadowsocks entry peer on 127.0.0.1 is the one of two hop-1 peers whose endpoint is
    /// loopback, its flow the obfuscator's UDP endpoint at the relay; udp2tcp is TCP;
    /// Mullvad's multiplexer gives one flow per obfuscator.
    #[test]
    fn mullvad_obfuscators_become_the_entry_peers_flows() {
        let m = mullvad("connected_shadowsocks.json");
        let w = wanted(&[], Some(&m));
        assert_eq!(
            w,
            [Wanted {
                peer: ObfuscatedPeer::Interface("wg0-mullvad".into()),
                kind: kind::SHADOWSOCKS,
                protocol: IPPROTO_UDP,
                remote: sa("185.213.154.68:51900"),
                mullvad: true,
            }]
        );
        let tunnels = [
            tunnel(
                "wg0-mullvad",
                7,
                vec![
                    peer(1, "OTHER=", "192.0.2.1:51820", 1),
                    peer(2, "ENTRY=", "127.0.0.1:51900", 1),
                ],
            ),
            tunnel("wg1", 8, vec![peer(3, "WG1=", "127.0.0.1:51901", 1)]),
        ];
        let (flows, problems) = resolve(&w, &tunnels);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            flows,
            [ObfuscatedFlow {
                tunnel: "wg0-mullvad".into(),
                tunnel_ifindex: 7,
                peer: Some((2, "ENTRY=".into())),
                kind: kind::SHADOWSOCKS,
                protocol: IPPROTO_UDP,
                remote: sa("185.213.154.68:51900"),
                mullvad: true,
            }]
        );
        let entries = map_entries(&flows);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[185, 213, 154, 68]);
        assert_eq!(
            entries,
            [(
                ObfsEndpoint {
                    addr,
                    port: 51900,
                    family: 4,
                    proto: IPPROTO_UDP
                },
                ObfsTarget {
                    ifindex: 7,
                    peer: 2,
                    kind: kind::SHADOWSOCKS,
                    _pad: [0; 3]
                }
            )]
            .into()
        );

        let tcp = wanted(&[], Some(&mullvad("connected_udp2tcp.json")));
        assert_eq!(tcp.len(), 1);
        assert_eq!((tcp[0].kind, tcp[0].protocol), (kind::UDP2TCP, IPPROTO_TCP));

        let mux = wanted(&[], Some(&mullvad("connected_multiplexer.json")));
        assert!(mux.len() >= 2, "{mux:?}");
        assert!(mux.iter().all(|w| w.mullvad));

        // Disconnected: no flows from the daemon.
        assert!(wanted(&[], Some(&mullvad("disconnected_locked.json"))).is_empty());
    }

    #[test]
    fn option_flows_by_key_and_interface_and_what_cannot_be_matched() {
        let rule = |peer: ObfuscatedPeer, remote: &str| ObfuscationRule {
            peer,
            kind: kind::MANUAL,
            protocol: IPPROTO_UDP,
            remote: sa(remote),
        };
        let tunnels = [
            tunnel(
                "wg0",
                5,
                vec![
                    peer(1, "A=", "192.0.2.1:51820", 1),
                    peer(2, "B=", "192.0.2.2:51820", 1),
                    peer(3, "EXIT=", "10.0.0.1:51820", 2),
                ],
            ),
            tunnel("wg1", 6, vec![]),
            tunnel("wg2", 9, vec![peer(4, "C=", "[::1]:7000", 1)]),
        ];
        let rules = [
            rule(ObfuscatedPeer::Key("B=".into()), "198.51.100.9:443"),
            rule(ObfuscatedPeer::Interface("wg1".into()), "198.51.100.9:444"),
            rule(ObfuscatedPeer::Interface("wg2".into()), "198.51.100.9:445"),
            rule(ObfuscatedPeer::Interface("wg0".into()), "198.51.100.9:446"),
            rule(ObfuscatedPeer::Key("NOPE=".into()), "198.51.100.9:447"),
            rule(ObfuscatedPeer::Interface("wg9".into()), "198.51.100.9:448"),
        ];
        let (flows, problems) = resolve(&wanted(&rules, None), &tunnels);
        let got: Vec<(&str, Option<u32>, u16)> = flows
            .iter()
            .map(|f| {
                (
                    f.tunnel.as_str(),
                    f.peer.as_ref().map(|p| p.0),
                    f.remote.port(),
                )
            })
            .collect();
        // wg1's peers are unknown: its flow counts for peer `unknown`.
        assert_eq!(
            got,
            [
                ("wg0", Some(2), 443),
                ("wg1", None, 444),
                ("wg2", Some(4), 445)
            ]
        );
        assert_eq!(
            map_entries(&flows).values().filter(|t| t.peer == 0).count(),
            1
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains("several hop-1 peers"),
            "{}",
            problems[0]
        );
        assert!(problems[1].contains("no watched tunnel has the peer NOPE="));
        assert!(problems[2].contains("the tunnel wg9 is not watched"));

        // The same flow from the option and from Mullvad is the option's.
        let m = mullvad("connected_shadowsocks.json");
        let mine = rule(
            ObfuscatedPeer::Interface("wg0-mullvad".into()),
            "185.213.154.68:51900",
        );
        let w = wanted(std::slice::from_ref(&mine), Some(&m));
        assert_eq!(w.len(), 1);
        assert!(!w[0].mullvad);
    }

    #[test]
    fn an_obfuscated_peer_is_via_its_flows_underlay() {
        let mut tunnels = [tunnel(
            "wg0",
            5,
            vec![
                peer(1, "ENTRY=", "127.0.0.1:51900", 1),
                peer(2, "EXIT=", "10.0.0.1:51820", 2),
            ],
        )];
        let w = [Wanted {
            peer: ObfuscatedPeer::Interface("wg0".into()),
            kind: kind::QUIC,
            protocol: IPPROTO_UDP,
            remote: sa("198.51.100.1:443"),
            mullvad: false,
        }];
        let (flows, _) = resolve(&w, &tunnels);
        let routes: RouteOif = [(sa("198.51.100.1:443").ip(), Some(2))].into();
        let names = [(2, "eth0".to_string())].into();
        set_via(&mut tunnels, &flows, &routes, &names);
        assert_eq!(tunnels[0].peers[0].via, "eth0");
        assert_eq!(tunnels[0].peers[1].via, "lo", "not obfuscated: unchanged");
        assert_eq!(
            describe(&flows[0]),
            "tunnel wg0: peer ENTRY= reaches its relay through quic obfuscation over udp \
             (from --obfuscation)"
        );
    }
}
