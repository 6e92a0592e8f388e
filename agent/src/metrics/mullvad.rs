//! The Mullvad daemon's state (docs/CONTRACT.md "Mullvad daemon"), from what the poller
//! ([`crate::sources::mullvad::spawn`]) last read:
//!
//! - `mullvad_up`: 1 when the last `mullvad status --json` call succeeded.
//! - `mullvad_tunnel_state{state}`: one series per known state, 1 for the current one and 0
//!   for the others (all 0 while the daemon cannot be read); a state the agent does not know
//!   gets its own series at 1.
//! - `mullvad_relay_info{hostname,country,city,entry_hostname,entry_country,entry_city,
//!   multihop,daita,quantum_resistant,obfuscation}` = 1 while connected or connecting.
//! - `mullvad_peer_relay_info{interface,peer,role,hostname,country,city}` = 1 for each
//!   WireGuard peer whose endpoint IP is the relay the daemon names as `entry`
//!   (`entry_endpoint`) or `exit` (`endpoint`), so that hops can be named by relay.

use std::sync::{Arc, RwLock};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    metrics::{Labels, encode_gauges},
    sources::mullvad::{MullvadState, TunnelState},
    sync::inventory::Inventory,
};

#[derive(Debug)]
pub struct MullvadCollector {
    state: Arc<RwLock<MullvadState>>,
    inventory: Arc<RwLock<Inventory>>,
}

/// Everything one scrape exports, computed under the locks and encoded after.
#[derive(Debug, Default, PartialEq)]
pub struct Samples {
    pub up: i64,
    pub states: Vec<(Labels, i64)>,
    pub relay: Vec<(Labels, i64)>,
    pub peers: Vec<(Labels, i64)>,
}

fn bool_label(b: bool) -> String {
    if b { "true" } else { "false" }.to_owned()
}

impl MullvadCollector {
    pub fn new(state: Arc<RwLock<MullvadState>>, inventory: Arc<RwLock<Inventory>>) -> Self {
        Self { state, inventory }
    }

    pub fn samples(&self) -> Samples {
        // A poisoned lock: export what is there rather than nothing (the writer replaces the
        // state wholesale, so it is never half-written).
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let inv = self.inventory.read().unwrap_or_else(|p| p.into_inner());
        samples(&state, &inv)
    }
}

/// The samples for `state`, naming the peers of `inv`.
pub fn samples(state: &MullvadState, inv: &Inventory) -> Samples {
    let current = state.current();
    let mut out = Samples {
        up: i64::from(state.up),
        ..Samples::default()
    };
    for known in TunnelState::KNOWN {
        let v = current.is_some_and(|s| s.state == known);
        out.states
            .push((vec![("state", known.name().to_owned())], i64::from(v)));
    }
    if let Some(TunnelState::Other(name)) = current.map(|s| &s.state) {
        out.states.push((vec![("state", name.clone())], 1));
    }
    let Some(s) = current.filter(|s| s.has_relays()) else {
        return out;
    };
    if s.endpoint.is_some() || s.location.is_some() {
        let loc = s.location.clone().unwrap_or_default();
        let t = |v: Option<String>| v.unwrap_or_default();
        let obfuscation = s
            .endpoint
            .as_ref()
            .and_then(|e| e.obfuscation.clone())
            .unwrap_or_else(|| "none".to_owned());
        out.relay.push((
            vec![
                ("hostname", t(loc.hostname)),
                ("country", t(loc.country)),
                ("city", t(loc.city)),
                ("entry_hostname", t(loc.entry_hostname)),
                ("entry_country", t(loc.entry_country)),
                ("entry_city", t(loc.entry_city)),
                ("multihop", bool_label(s.multihop())),
                ("daita", bool_label(s.daita())),
                ("quantum_resistant", bool_label(s.quantum_resistant())),
                ("obfuscation", obfuscation),
            ],
            1,
        ));
    }
    let roles = state.relay_roles();
    for tunnel in &inv.tunnels {
        for peer in &tunnel.peers {
            let Some(ep) = peer.wg.endpoint else { continue };
            let ip = ep.ip().to_canonical();
            for (addr, role, hostname, country, city) in &roles {
                if *addr == ip {
                    out.peers.push((
                        vec![
                            ("interface", tunnel.name.clone()),
                            ("peer", peer.public_key.clone()),
                            ("role", (*role).to_owned()),
                            ("hostname", hostname.clone()),
                            ("country", country.clone()),
                            ("city", city.clone()),
                        ],
                        1,
                    ));
                }
            }
        }
    }
    out
}

impl Collector for MullvadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.samples();
        encode_gauges(
            &mut encoder,
            "mullvad_up",
            "1 when the last `mullvad status --json` call succeeded.",
            [(Labels::new(), s.up)],
        )?;
        encode_gauges(
            &mut encoder,
            "mullvad_tunnel_state",
            "1 for the Mullvad tunnel's current state, 0 for the others (all 0 while the daemon cannot be read).",
            s.states,
        )?;
        encode_gauges(
            &mut encoder,
            "mullvad_relay_info",
            "The Mullvad relays in use (1 while connected or connecting).",
            s.relay,
        )?;
        encode_gauges(
            &mut encoder,
            "mullvad_peer_relay_info",
            "1 for each WireGuard peer whose endpoint is the Mullvad entry or exit relay.",
            s.peers,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        metrics::{Format, encode},
        sources::mullvad::{MullvadError, parse_status},
        sync::inventory::{Backend, Peer, Tunnel, WgPeer},
    };

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/mullvad/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn peer(key: &str, endpoint: &str, hop: u32) -> Peer {
        Peer {
            id: hop,
            public_key: key.into(),
            wg: WgPeer {
                public_key: [hop as u8; 32],
                endpoint: Some(endpoint.parse().unwrap()),
                allowed_ips: vec![],
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: None,
            },
            friendly_name: None,
            hop,
            via: "eth0".into(),
        }
    }

    fn inventory() -> Inventory {
        Inventory {
            tunnels: vec![Tunnel {
                name: "wg0-mullvad".into(),
                ifindex: 7,
                mtu: 1380,
                backend: Backend::None,
                listen_port: 0,
                peers: vec![
                    peer("ENTRY=", "185.65.135.117:3228", 1),
                    peer("EXIT=", "185.213.154.69:51820", 2),
                    peer("OTHER=", "192.0.2.1:51820", 1),
                ],
            }],
            ..Inventory::default()
        }
    }

    fn metrics(state: MullvadState) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(MullvadCollector::new(
            Arc::new(RwLock::new(state)),
            Arc::new(RwLock::new(inventory())),
        )));
        encode(&registry, Format::Prometheus).unwrap()
    }

    fn with(fixture_name: &str) -> MullvadState {
        let mut st = MullvadState::default();
        st.record(Ok(parse_status(&fixture(fixture_name)).unwrap()));
        st
    }

    const HEAD_UP: &str = "# HELP mullvad_up 1 when the last `mullvad status --json` call succeeded.\n\
        # TYPE mullvad_up gauge\n";
    const HEAD_STATE: &str = "# HELP mullvad_tunnel_state 1 for the Mullvad tunnel's current state, 0 for the others (all 0 while the daemon cannot be read).\n\
        # TYPE mullvad_tunnel_state gauge\n";
    const HEAD_RELAY: &str = "# HELP mullvad_relay_info The Mullvad relays in use (1 while connected or connecting).\n\
        # TYPE mullvad_relay_info gauge\n";
    const HEAD_PEER: &str = "# HELP mullvad_peer_relay_info 1 for each WireGuard peer whose endpoint is the Mullvad entry or exit relay.\n\
        # TYPE mullvad_peer_relay_info gauge\n";

    fn states(current: &str) -> String {
        [
            "connected",
            "connecting",
            "disconnected",
            "disconnecting",
            "error",
        ]
        .iter()
        .map(|s| {
            format!(
                "mullvad_tunnel_state{{state=\"{s}\"}} {}\n",
                u8::from(*s == current)
            )
        })
        .collect()
    }

    #[test]
    fn multihop() {
        let got = metrics(with("connected_multihop.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{HEAD_RELAY}\
             mullvad_relay_info{{hostname=\"se-got-wg-101\",country=\"Sweden\",city=\"Gothenburg\",entry_hostname=\"de-fra-wg-001\",entry_country=\"Germany\",entry_city=\"Frankfurt\",multihop=\"true\",daita=\"true\",quantum_resistant=\"true\",obfuscation=\"none\"}} 1\n\
             {HEAD_PEER}\
             mullvad_peer_relay_info{{interface=\"wg0-mullvad\",peer=\"ENTRY=\",role=\"entry\",hostname=\"de-fra-wg-001\",country=\"Germany\",city=\"Frankfurt\"}} 1\n\
             mullvad_peer_relay_info{{interface=\"wg0-mullvad\",peer=\"EXIT=\",role=\"exit\",hostname=\"se-got-wg-101\",country=\"Sweden\",city=\"Gothenburg\"}} 1\n",
            states("connected")
        );
        assert_eq!(got, want);
    }

    #[test]
    fn single_hop_and_connecting() {
        let got = metrics(with("connected_single.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{HEAD_RELAY}\
             mullvad_relay_info{{hostname=\"se-got-wg-001\",country=\"Sweden\",city=\"Gothenburg\",entry_hostname=\"\",entry_country=\"\",entry_city=\"\",multihop=\"false\",daita=\"false\",quantum_resistant=\"false\",obfuscation=\"none\"}} 1\n\
             {HEAD_PEER}",
            states("connected")
        );
        assert_eq!(got, want);
        let got = metrics(with("connecting.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{HEAD_RELAY}\
             mullvad_relay_info{{hostname=\"\",country=\"\",city=\"\",entry_hostname=\"\",entry_country=\"\",entry_city=\"\",multihop=\"false\",daita=\"false\",quantum_resistant=\"false\",obfuscation=\"udp2tcp\"}} 1\n\
             {HEAD_PEER}",
            states("connecting")
        );
        assert_eq!(got, want);
    }

    #[test]
    fn disconnected_error_unknown_and_down() {
        for (f, state) in [
            ("disconnected_locked.json", "disconnected"),
            ("error.json", "error"),
        ] {
            let got = metrics(with(f));
            let want = format!(
                "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{HEAD_RELAY}{HEAD_PEER}",
                states(state)
            );
            assert_eq!(got, want, "{f}");
        }
        let got = metrics(with("unknown_state.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}mullvad_tunnel_state{{state=\"hibernating\"}} 1\n{HEAD_RELAY}{HEAD_PEER}",
            states("")
        );
        assert_eq!(got, want);

        let mut st = with("connected_multihop.json");
        st.record(Err(&MullvadError::Timeout {
            cli: "mullvad".into(),
            timeout: Duration::from_secs(5),
        }));
        let want = format!(
            "{HEAD_UP}mullvad_up 0\n{HEAD_STATE}{}{HEAD_RELAY}{HEAD_PEER}",
            states("")
        );
        assert_eq!(metrics(st), want);
        // Never polled yet: down.
        assert_eq!(metrics(MullvadState::default()), want);
    }
}
