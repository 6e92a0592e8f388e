//! The Mullvad daemon's state (docs/CONTRACT.md "Mullvad daemon"), from what the poller
//! ([`crate::sources::mullvad::spawn`]) last read:
//!
//! - `mullvad_up`: 1 when the last `mullvad status --json` call succeeded.
//! - `mullvad_tunnel_state{state}`: one series per known state, 1 for the current one and 0
//!   for the others (all 0 while the daemon cannot be read); a state the agent does not know
//!   gets its own series at 1.
//! - `mullvad_device_state{state}`: `logged_in`, `logged_out`, `revoked`, 1 for what the CLI
//!   says (its warning line before the JSON), all 0 when it does not say (it checks only while
//!   connecting, connected or in error) or cannot be read.
//! - `mullvad_relay_info{hostname,country,city,entry_hostname,entry_country,entry_city,
//!   multihop,daita,quantum_resistant,obfuscation}` = 1 while connected or connecting;
//!   country and city are the codes in the hostname when the daemon names none (the entry
//!   relay's, in every released version); obfuscation in lower case, `none` when off.
//! - `mullvad_feature_indicator{feature}`: while connected or connecting, 1 for each feature
//!   indicator the app shows, 0 for the other known ones.
//! - `mullvad_peer_relay_info{interface,peer,role,hostname,country,city}` = 1 for each
//!   WireGuard peer whose endpoint IP is the relay the daemon names as `entry`
//!   (`entry_endpoint`) or `exit` (`endpoint`), so that hops can be named by relay. A peer
//!   whose endpoint is a local obfuscation proxy (udp2tcp, Shadowsocks, QUIC) is matched by
//!   where the proxy carries it: its obfuscation flow's remote address.

use std::sync::{Arc, RwLock};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    metrics::{Labels, encode_gauges},
    sources::mullvad::{DeviceState, FEATURE_INDICATORS, MullvadState, TunnelState},
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
    pub device: Vec<(Labels, i64)>,
    pub relay: Vec<(Labels, i64)>,
    pub features: Vec<(Labels, i64)>,
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
    let device = current.map(|s| &s.device).unwrap_or(&DeviceState::Unknown);
    for known in DeviceState::KNOWN {
        if let Some(name) = known.name() {
            out.device.push((
                vec![("state", name.to_owned())],
                i64::from(*device == known),
            ));
        }
    }
    let Some(s) = current.filter(|s| s.has_relays()) else {
        return out;
    };
    for f in FEATURE_INDICATORS {
        let on = s.feature_indicators.iter().any(|x| x == f);
        out.features
            .push((vec![("feature", f.to_owned())], i64::from(on)));
    }
    let mut others: Vec<&String> = s
        .feature_indicators
        .iter()
        .filter(|x| !FEATURE_INDICATORS.contains(&x.as_str()))
        .collect();
    others.sort();
    others.dedup();
    for f in others {
        out.features.push((vec![("feature", f.clone())], 1));
    }
    if s.endpoint.is_some() || s.location.is_some() {
        let loc = s.location.clone().unwrap_or_default();
        let (exit, entry) = (loc.exit(), loc.entry());
        let obfuscation = s
            .endpoint
            .as_ref()
            .and_then(|e| e.obfuscation.clone())
            .unwrap_or_else(|| "none".to_owned());
        out.relay.push((
            vec![
                ("hostname", exit.hostname),
                ("country", exit.country),
                ("city", exit.city),
                ("entry_hostname", entry.hostname),
                ("entry_country", entry.country),
                ("entry_city", entry.city),
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
            // The endpoint's address, or, for an entry peer whose endpoint is a local
            // obfuscation proxy, where the proxy carries it.
            let addrs = inv.relay_addrs(&tunnel.name, peer);
            for (addr, role, hostname, country, city) in &roles {
                if addrs.contains(addr) {
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
            "mullvad_device_state",
            "1 for what the Mullvad CLI says about this device's account (logged_in, logged_out, revoked); all 0 when it does not say (it checks only while connecting, connected or in error) or cannot be read.",
            s.device,
        )?;
        encode_gauges(
            &mut encoder,
            "mullvad_relay_info",
            "The Mullvad relays in use (1 while connected or connecting); country and city are the hostname's codes when the daemon names none.",
            s.relay,
        )?;
        encode_gauges(
            &mut encoder,
            "mullvad_feature_indicator",
            "The Mullvad app's feature indicators while connected or connecting: 1 for each it shows, 0 for the other known ones (LanSharing: local-network traffic bypasses the tunnel).",
            s.features,
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
        metrics::{Format, encode_string},
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
        let wg = WgPeer {
            endpoint: Some(endpoint.parse().unwrap()),
            ..WgPeer::new([hop as u8; 32])
        };
        Peer {
            hop,
            via: "eth0".into(),
            ..Peer::new(hop, key.into(), wg)
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
        encode_string(&registry, Format::Prometheus).unwrap()
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
    const HEAD_DEVICE: &str = "# HELP mullvad_device_state 1 for what the Mullvad CLI says about this device's account (logged_in, logged_out, revoked); all 0 when it does not say (it checks only while connecting, connected or in error) or cannot be read.\n\
        # TYPE mullvad_device_state gauge\n";
    const HEAD_RELAY: &str = "# HELP mullvad_relay_info The Mullvad relays in use (1 while connected or connecting); country and city are the hostname's codes when the daemon names none.\n\
        # TYPE mullvad_relay_info gauge\n";
    const HEAD_FEATURE: &str = "# HELP mullvad_feature_indicator The Mullvad app's feature indicators while connected or connecting: 1 for each it shows, 0 for the other known ones (LanSharing: local-network traffic bypasses the tunnel).\n\
        # TYPE mullvad_feature_indicator gauge\n";
    const HEAD_PEER: &str = "# HELP mullvad_peer_relay_info 1 for each WireGuard peer whose endpoint is the Mullvad entry or exit relay.\n\
        # TYPE mullvad_peer_relay_info gauge\n";

    /// Every tunnel state's series, `current` at 1 ("" for none).
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

    /// The device state family, `current` at 1 ("" for none).
    fn device(current: &str) -> String {
        let lines: String = ["logged_in", "logged_out", "revoked"]
            .iter()
            .map(|s| {
                format!(
                    "mullvad_device_state{{state=\"{s}\"}} {}\n",
                    u8::from(*s == current)
                )
            })
            .collect();
        format!("{HEAD_DEVICE}{lines}")
    }

    /// The feature family while connected or connecting: every known indicator, those in
    /// `on` at 1, then `extra` (unknown ones) at 1.
    fn features(on: &[&str], extra: &[&str]) -> String {
        let known = [
            "QuantumResistance",
            "Multihop",
            "SplitTunneling",
            "LockdownMode",
            "Udp2Tcp",
            "Shadowsocks",
            "Quic",
            "Lwo",
            "LanSharing",
            "DnsContentBlockers",
            "CustomDns",
            "ServerIpOverride",
            "CustomMtu",
            "Daita",
            "DaitaMultihop",
        ];
        let mut out = HEAD_FEATURE.to_string();
        for f in known {
            out.push_str(&format!(
                "mullvad_feature_indicator{{feature=\"{f}\"}} {}\n",
                u8::from(on.contains(&f))
            ));
        }
        for f in extra {
            out.push_str(&format!("mullvad_feature_indicator{{feature=\"{f}\"}} 1\n"));
        }
        out
    }

    /// One `mullvad_relay_info` line.
    fn relay(exit: [&str; 3], entry: [&str; 3], flags: [bool; 3], obfuscation: &str) -> String {
        let [h, c, t] = exit;
        let [eh, ec, et] = entry;
        let [m, d, q] = flags;
        format!(
            "{HEAD_RELAY}mullvad_relay_info{{hostname=\"{h}\",country=\"{c}\",city=\"{t}\",entry_hostname=\"{eh}\",entry_country=\"{ec}\",entry_city=\"{et}\",multihop=\"{m}\",daita=\"{d}\",quantum_resistant=\"{q}\",obfuscation=\"{obfuscation}\"}} 1\n"
        )
    }

    const SE_GOT_001: [&str; 3] = ["se-got-wg-001", "Sweden", "Gothenburg"];
    const SE_GOT_101: [&str; 3] = ["se-got-wg-101", "Sweden", "Gothenburg"];
    const NO_ENTRY: [&str; 3] = ["", "", ""];

    #[test]
    fn multihop() {
        let got = metrics(with("connected_multihop.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{}{}{HEAD_PEER}\
             mullvad_peer_relay_info{{interface=\"wg0-mullvad\",peer=\"ENTRY=\",role=\"entry\",hostname=\"de-fra-wg-001\",country=\"Germany\",city=\"Frankfurt\"}} 1\n\
             mullvad_peer_relay_info{{interface=\"wg0-mullvad\",peer=\"EXIT=\",role=\"exit\",hostname=\"se-got-wg-101\",country=\"Sweden\",city=\"Gothenburg\"}} 1\n",
            states("connected"),
            device("logged_in"),
            relay(
                SE_GOT_101,
                ["de-fra-wg-001", "Germany", "Frankfurt"],
                [true; 3],
                "none"
            ),
            features(&["Multihop", "Daita", "QuantumResistance"], &[]),
        );
        assert_eq!(got, want);
    }

    /// Released versions name no entry country or city: the hostname's codes stand in, in
    /// the relay info and in the peer's.
    #[test]
    fn current_multihop_entry_codes() {
        let got = metrics(with("connected_multihop_current.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{}{}{HEAD_PEER}\
             mullvad_peer_relay_info{{interface=\"wg0-mullvad\",peer=\"ENTRY=\",role=\"entry\",hostname=\"de-fra-wg-001\",country=\"de\",city=\"fra\"}} 1\n\
             mullvad_peer_relay_info{{interface=\"wg0-mullvad\",peer=\"EXIT=\",role=\"exit\",hostname=\"se-got-wg-101\",country=\"Sweden\",city=\"Gothenburg\"}} 1\n",
            states("connected"),
            device("logged_in"),
            relay(
                SE_GOT_101,
                ["de-fra-wg-001", "de", "fra"],
                [true; 3],
                "none"
            ),
            features(&["QuantumResistance", "Daita", "Multihop"], &[]),
        );
        assert_eq!(got, want);
    }

    #[test]
    fn single_hop_and_connecting() {
        let got = metrics(with("connected_single.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{}{}{HEAD_PEER}",
            states("connected"),
            device("logged_in"),
            relay(SE_GOT_001, NO_ENTRY, [false; 3], "none"),
            features(&[], &[]),
        );
        assert_eq!(got, want);
        let got = metrics(with("connecting.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{}{}{HEAD_PEER}",
            states("connecting"),
            device("logged_in"),
            relay(NO_ENTRY, NO_ENTRY, [false; 3], "udp2tcp"),
            features(&["Udp2Tcp"], &[]),
        );
        assert_eq!(got, want);
    }

    /// With Shadowsocks the relay's peer has its endpoint on the local proxy (127.0.0.1): it
    /// is the relay its obfuscation flow reaches, and a loopback peer no flow carries is none.
    #[test]
    fn a_peer_behind_a_local_proxy_is_the_relay_its_flow_reaches() {
        use crate::sync::obfuscation::ObfuscatedFlow;
        let state = with("connected_shadowsocks.json");
        let mut inv = Inventory {
            tunnels: vec![Tunnel {
                name: "wg0-mullvad".into(),
                ifindex: 7,
                mtu: 1380,
                backend: Backend::Uapi,
                listen_port: 0,
                peers: vec![
                    peer("PROXIED=", "127.0.0.1:51900", 1),
                    peer("LOOPBACK=", "127.0.0.1:51901", 2),
                ],
            }],
            ..Inventory::default()
        };
        assert!(samples(&state, &inv).peers.is_empty(), "no flow known yet");
        inv.obfuscation.push(ObfuscatedFlow {
            tunnel: "wg0-mullvad".into(),
            tunnel_ifindex: 7,
            peer: Some((1, "PROXIED=".into())),
            kind: agent_common::maps::obfuscation::kind::SHADOWSOCKS,
            protocol: agent_common::parse::IPPROTO_UDP,
            remote: "185.213.154.68:51900".parse().unwrap(),
            mullvad: true,
        });
        let label = |l: &Labels| l.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>();
        let peers: Vec<Vec<String>> = samples(&state, &inv)
            .peers
            .iter()
            .map(|(l, _)| label(l))
            .collect();
        assert_eq!(
            peers,
            [[
                "wg0-mullvad",
                "PROXIED=",
                "exit",
                "se-got-wg-001",
                "Sweden",
                "Gothenburg"
            ]]
        );
    }

    /// Every obfuscation of 2025.13 and later, in lower case, with the app's indicators.
    #[test]
    fn obfuscation_in_lower_case() {
        for (f, kind, daita, pq, on) in [
            (
                "connected_quic.json",
                "quic",
                false,
                false,
                vec!["Quic", "LanSharing"],
            ),
            (
                "connected_shadowsocks.json",
                "shadowsocks",
                true,
                false,
                vec!["Daita", "Shadowsocks"],
            ),
            (
                "connected_udp2tcp.json",
                "udp2tcp",
                false,
                false,
                vec!["LockdownMode", "Udp2Tcp"],
            ),
            (
                "connected_lwo.json",
                "lwo",
                false,
                true,
                vec!["Lwo", "QuantumResistance"],
            ),
            (
                "connected_multiplexer.json",
                "multiplexer",
                false,
                false,
                vec!["Shadowsocks", "Quic", "Udp2Tcp"],
            ),
        ] {
            let got = metrics(with(f));
            let want = format!(
                "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{}{}{HEAD_PEER}",
                states("connected"),
                device("logged_in"),
                relay(SE_GOT_001, NO_ENTRY, [false, daita, pq], kind),
                features(&on, &[]),
            );
            assert_eq!(got, want, "{f}");
        }
        // An indicator this agent does not know: its own series at 1, after the known ones.
        let got = metrics(with("connected_future_fields.json"));
        assert!(
            got.contains(&features(&["Multihop"], &["TeleportationV2"])),
            "{got}"
        );
    }

    /// The CLI's warnings: the status after them is read (mullvad_up 1, its state and
    /// relays), and the device state says what the warning said.
    #[test]
    fn revoked_and_logged_out() {
        let got = metrics(with("revoked_connected.txt"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{}{}{HEAD_PEER}",
            states("connected"),
            device("revoked"),
            relay(SE_GOT_001, NO_ENTRY, [false; 3], "none"),
            features(&[], &[]),
        );
        assert_eq!(got, want);
        let got = metrics(with("logged_out_error.txt"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{HEAD_RELAY}{HEAD_FEATURE}{HEAD_PEER}",
            states("error"),
            device("logged_out"),
        );
        assert_eq!(got, want);
    }

    #[test]
    fn disconnected_error_unknown_and_down() {
        for (f, state, dev) in [
            ("disconnected_locked.json", "disconnected", ""),
            ("error.json", "error", "logged_in"),
        ] {
            let got = metrics(with(f));
            let want = format!(
                "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}{}{HEAD_RELAY}{HEAD_FEATURE}{HEAD_PEER}",
                states(state),
                device(dev),
            );
            assert_eq!(got, want, "{f}");
        }
        let got = metrics(with("unknown_state.json"));
        let want = format!(
            "{HEAD_UP}mullvad_up 1\n{HEAD_STATE}{}mullvad_tunnel_state{{state=\"hibernating\"}} 1\n{}{HEAD_RELAY}{HEAD_FEATURE}{HEAD_PEER}",
            states(""),
            device(""),
        );
        assert_eq!(got, want);

        let mut st = with("revoked_connected.txt");
        st.record(Err(&MullvadError::Timeout {
            cli: "mullvad".into(),
            timeout: Duration::from_secs(5),
        }));
        let want = format!(
            "{HEAD_UP}mullvad_up 0\n{HEAD_STATE}{}{}{HEAD_RELAY}{HEAD_FEATURE}{HEAD_PEER}",
            states(""),
            device(""),
        );
        assert_eq!(metrics(st), want);
        // Never polled yet: down.
        assert_eq!(metrics(MullvadState::default()), want);
    }
}
