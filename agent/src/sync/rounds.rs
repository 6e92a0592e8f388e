//! What a sync round may leave out, and how often rounds run (issue 15: at 10,000 idle peers
//! the agent spent 1.55 CPU s/min rebuilding and diffing maps nothing had changed).
//!
//! A round always reads every peer: the collectors export the byte counters and handshake
//! times it reads, fresh. What goes into the peer maps (and into the change log) changes
//! rarely: interfaces' names, indexes, MTUs and listen ports, peers' keys, endpoints and
//! allowed IPs. [`MapsWritten`] keeps a fingerprint of those as last written; a round that
//! finds the same builds no peer maps, writes none and compares no peer lists.
//!
//! The period grows with the peer count ([`sync_period`]), so that a round's cost, which
//! grows with it, stays about the same per second.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, Hasher, RandomState},
    time::Duration,
};

use agent_common::maps::obfuscation::{ObfsEndpoint, ObfsTarget};

use crate::{datapath::PeerMaps, sync::inventory::Tunnel};

/// Peers per extra second of sync period.
pub const PEERS_PER_SECOND: usize = 10_000;
/// The longest period: the leak window each round renews holds 5 s
/// (`agent_common::maps::leak::TUNNEL_UP_HOLD_NS`), and a round at that many peers may
/// itself take most of a second; 3 s leaves it room.
pub const MAX_PERIOD: Duration = Duration::from_secs(3);

/// How long between two sync rounds with `peers` peers: 1 s below 10,000, 2 s from 10,000,
/// 3 s from 20,000 on. A change (a new peer, a new endpoint) shows in the maps within two
/// periods.
pub fn sync_period(peers: usize) -> Duration {
    let secs = 1 + (peers / PEERS_PER_SECOND) as u64;
    Duration::from_secs(secs).min(MAX_PERIOD)
}

/// What goes into the peer maps of one round, as a fingerprint: per tunnel (in the round's
/// order, sorted by name), a hash of its name, ifindex, MTU and listen port and the wrapping
/// sum of its peers' hashes (of key, endpoint and the sum of their allowed IPs' hashes).
/// Sums, because wireguard-go lists its peers in another order on every read. The hasher's
/// keys are random per agent, so no peer can choose a key or address that collides; by
/// chance, a change is missed with a probability of 2^-64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<u64>);

/// The peer maps as last written, to tell whether a round would write the same.
#[derive(Debug, Default)]
pub struct MapsWritten {
    hasher: RandomState,
    /// What the last write (that the kernel took whole) was made of.
    last: Option<(Fingerprint, HashMap<ObfsEndpoint, ObfsTarget>)>,
    /// What the pending write is made of, until [`MapsWritten::done`].
    pending: Option<(Fingerprint, HashMap<ObfsEndpoint, ObfsTarget>)>,
    /// Rounds that built and wrote the peer maps, and rounds that found them unchanged.
    pub written: u64,
    pub unchanged: u64,
}

impl MapsWritten {
    pub fn fingerprint(&self, tunnels: &[Tunnel]) -> Fingerprint {
        let one = |v: &dyn Fn(&mut dyn Hasher)| {
            let mut h = self.hasher.build_hasher();
            v(&mut h);
            h.finish()
        };
        Fingerprint(
            tunnels
                .iter()
                .map(|t| {
                    let peers = t.peers.iter().fold(0u64, |sum, p| {
                        let ips = p.wg.allowed_ips.iter().fold(0u64, |s, net| {
                            s.wrapping_add(one(&|mut h| net.hash(&mut h)))
                        });
                        sum.wrapping_add(one(&|mut h| {
                            p.wg.public_key.hash(&mut h);
                            p.wg.endpoint.hash(&mut h);
                            p.wg.allowed_ips.len().hash(&mut h);
                            ips.hash(&mut h);
                        }))
                    });
                    one(&|mut h| {
                        t.name.hash(&mut h);
                        t.ifindex.hash(&mut h);
                        t.mtu.hash(&mut h);
                        t.listen_port.hash(&mut h);
                        t.peers.len().hash(&mut h);
                        peers.hash(&mut h);
                    })
                })
                .collect(),
        )
    }

    /// The peer maps this round calls for (`tunnels` and the obfuscation flows' entries),
    /// or None when they are what the last write made them: nothing to build, write or log.
    /// A write that is pending or failed (the kernel refused entries, to be retried) is never
    /// taken as done. Follow a Some with [`MapsWritten::done`].
    pub fn want(
        &mut self,
        tunnels: &[Tunnel],
        obfuscation: HashMap<ObfsEndpoint, ObfsTarget>,
    ) -> Option<PeerMaps> {
        let fp = self.fingerprint(tunnels);
        if self
            .last
            .as_ref()
            .is_some_and(|(f, o)| *f == fp && *o == obfuscation)
        {
            self.unchanged += 1;
            return None;
        }
        self.written += 1;
        let mut maps = super::peer_maps(tunnels);
        maps.obfuscation = obfuscation.clone();
        self.last = None;
        self.pending = Some((fp, obfuscation));
        Some(maps)
    }

    /// The outcome of writing what [`MapsWritten::want`] returned: `ok` when every entry was
    /// taken.
    pub fn done(&mut self, ok: bool) {
        let pending = self.pending.take();
        self.last = if ok { pending } else { None };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{
        endpoint_key,
        inventory::{Backend, Peer, WgPeer},
        tunnel_changes,
    };
    use std::time::SystemTime;

    fn peer(id: u32, key: u8, ep: &str, ips: &[&str]) -> Peer {
        let wg = WgPeer {
            endpoint: ep.parse().ok(),
            allowed_ips: ips.iter().map(|s| s.parse().expect("test net")).collect(),
            ..WgPeer::new([key; 32])
        };
        Peer::new(id, format!("key{key}"), wg)
    }

    fn wg0(peers: Vec<Peer>) -> Vec<Tunnel> {
        vec![Tunnel {
            name: "wg0".into(),
            ifindex: 5,
            mtu: 1420,
            backend: Backend::Uapi,
            listen_port: 51820,
            peers,
        }]
    }

    fn two() -> Vec<Peer> {
        vec![
            peer(1, 1, "192.0.2.1:51820", &["10.0.0.1/32", "fd00::1/128"]),
            peer(2, 2, "192.0.2.2:51820", &["10.0.0.2/32"]),
        ]
    }

    /// What changes all the time (counters, handshakes, persistent keepalive, the order
    /// wireguard-go lists peers and allowed IPs in) is not a change of the maps.
    fn restless() -> Vec<Tunnel> {
        let mut peers = two();
        peers.reverse();
        for p in &mut peers {
            p.wg.rx_bytes += 1_000;
            p.wg.tx_bytes += 2_000;
            p.wg.last_handshake = Some(SystemTime::now());
            p.wg.persistent_keepalive = Some(25);
            p.wg.allowed_ips.reverse();
        }
        wg0(peers)
    }

    #[test]
    fn an_unchanged_round_writes_no_map_and_logs_no_change() {
        let mut m = MapsWritten::default();
        let first = wg0(two());
        let maps = m
            .want(&first, HashMap::new())
            .expect("the first round writes");
        assert_eq!(
            (
                maps.allowed_v4.len(),
                maps.allowed_v6.len(),
                maps.endpoints.len()
            ),
            (2, 1, 2)
        );
        m.done(true);
        for round in 0..3 {
            let now = restless();
            assert!(m.want(&now, HashMap::new()).is_none(), "round {round}");
            assert!(tunnel_changes(&first, &now).is_empty());
        }
        assert_eq!((m.written, m.unchanged), (1, 3));
    }

    #[test]
    fn a_changed_endpoint_allowed_ip_or_key_is_written_in_the_same_round() {
        type Change = fn(&mut Peer);
        let changes: [(&str, Change); 4] = [
            ("endpoint", |p| {
                p.wg.endpoint = "192.0.2.9:51820".parse().ok();
            }),
            ("allowed IP", |p| {
                p.wg.allowed_ips.push("10.0.9.0/24".parse().expect("net"));
            }),
            ("key", |p| {
                p.wg.public_key = [9; 32];
                p.public_key = "key9".into();
                p.id = 3;
            }),
            ("endpoint gone", |p| p.wg.endpoint = None),
        ];
        for (what, change) in changes {
            let mut m = MapsWritten::default();
            let before = wg0(two());
            m.want(&before, HashMap::new()).expect("first");
            m.done(true);
            let mut after = restless();
            change(&mut after[0].peers[0]);
            let maps = m
                .want(&after, HashMap::new())
                .unwrap_or_else(|| panic!("{what}: written"));
            m.done(true);
            assert_eq!(maps, super::super::peer_maps(&after), "{what}");
            let p = &after[0].peers[0];
            match what {
                "endpoint" => assert_eq!(
                    maps.endpoints
                        .get(&endpoint_key([192, 0, 2, 9].into(), 51820)),
                    Some(&2)
                ),
                "allowed IP" => {
                    assert_eq!(maps.allowed_v4.get(&(5, [10, 0, 9, 0], 24)), Some(&2))
                }
                "key" => assert_eq!(maps.allowed_v4.get(&(5, [10, 0, 0, 2], 32)), Some(&3)),
                _ => assert_eq!(maps.endpoints.len(), 1),
            }
            let lines = tunnel_changes(&before, &after);
            match what {
                "endpoint" => assert_eq!(
                    lines,
                    [format!(
                        "tunnel wg0: peer {} has a new endpoint",
                        p.public_key
                    )]
                ),
                "key" => assert_eq!(
                    lines,
                    [
                        "tunnel wg0: peer key2 removed",
                        "tunnel wg0: peer key9 added"
                    ]
                ),
                _ => assert!(lines.is_empty(), "{what}: {lines:?}"),
            }
            // And the round after it is unchanged again.
            assert!(m.want(&after, HashMap::new()).is_none(), "{what}");
            assert_eq!((m.written, m.unchanged), (2, 1), "{what}");
        }
    }

    #[test]
    fn interface_and_obfuscation_changes_are_written_too() {
        let base = wg0(two());
        type Change = fn(&mut Tunnel);
        let changes: [(&str, Change); 5] = [
            ("name", |t| t.name = "wg1".into()),
            ("ifindex", |t| t.ifindex = 6),
            ("mtu", |t| t.mtu = 1380),
            ("listen port", |t| t.listen_port = 51821),
            ("peer gone", |t| {
                t.peers.pop();
            }),
        ];
        for (what, change) in changes {
            let mut m = MapsWritten::default();
            m.want(&base, HashMap::new()).expect("first");
            m.done(true);
            let mut after = base.clone();
            change(&mut after[0]);
            assert!(m.want(&after, HashMap::new()).is_some(), "{what}");
        }
        let mut m = MapsWritten::default();
        m.want(&base, HashMap::new()).expect("first");
        m.done(true);
        let flow = HashMap::from([(ObfsEndpoint::default(), ObfsTarget::default())]);
        assert!(m.want(&base, flow).is_some(), "a new obfuscation flow");
    }

    #[test]
    fn a_refused_or_unfinished_write_is_done_again() {
        let t = wg0(two());
        let mut m = MapsWritten::default();
        m.want(&t, HashMap::new()).expect("first");
        m.done(false);
        assert!(
            m.want(&t, HashMap::new()).is_some(),
            "after a refused entry"
        );
        // Never reported done (the round failed in between): written again.
        assert!(m.want(&t, HashMap::new()).is_some(), "after no outcome");
        m.done(true);
        assert!(m.want(&t, HashMap::new()).is_none());
        assert_eq!((m.written, m.unchanged), (3, 1));
    }

    #[test]
    fn the_period_grows_a_second_per_10000_peers_up_to_3() {
        let s = |peers| sync_period(peers).as_secs();
        let steps: Vec<(usize, u64)> = [0, 1, 9_999, 10_000, 19_999, 20_000, 29_999, 1_000_000]
            .iter()
            .map(|&n| (n, s(n)))
            .collect();
        assert_eq!(
            steps,
            [
                (0, 1),
                (1, 1),
                (9_999, 1),
                (10_000, 2),
                (19_999, 2),
                (20_000, 3),
                (29_999, 3),
                (1_000_000, 3)
            ]
        );
        assert!(MAX_PERIOD.as_nanos() < agent_common::maps::leak::TUNNEL_UP_HOLD_NS as u128);
    }
}
