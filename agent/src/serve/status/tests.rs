//! The snapshot built from known inputs: each measurement on its peer, and the document's
//! exact JSON pinned against `golden.json` (captured from the `json!` builder this one
//! replaced: same names, nesting, nulls, absences and number formats).

use std::{net::SocketAddr, time::Duration};

use super::*;
use crate::{
    metrics::crypto::Series,
    serve::status::doc::StatusDoc,
    sync::inventory::{Backend, Peer, Tunnel, Underlay, WgPeer},
};

const ENTRY: &str = "FXUjJ9fcAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const EXIT: &str = "aAg5tydAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const LONE: &str = "bG9uZQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// A peer that handshook 30 s ago when it has an endpoint, never otherwise.
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

/// wg0 with a multihop pair: the entry relay over eth0, the exit relay through it.
fn inventory() -> Inventory {
    let mut inv = Inventory::default();
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
            peer(EXIT, 2, ENTRY, Some("10.0.0.2:51820"), &["0.0.0.0/0"]),
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

fn c(packets: u64, bytes: u64) -> Counter {
    Counter { packets, bytes }
}

fn connected_mullvad() -> MullvadState {
    let mut m = MullvadState::default();
    let text = r#"{"state":"connected","details":{"endpoint":{"address":"10.0.0.2:51820","protocol":"udp","quantum_resistant":true,"obfuscation":null,"entry_endpoint":{"address":"198.51.100.7:51820","protocol":"udp"},"tunnel_interface":"wg0","daita":true},"location":{"hostname":"se-got-wg-101","city":"Gothenburg","country":"Sweden","entry_hostname":"de-fra-wg-001","entry_city":"Frankfurt","entry_country":"Germany"},"feature_indicators":["Multihop","QuantumResistance"]}}"#;
    m.record(Ok(crate::sources::mullvad::parse_status(text).unwrap()));
    m
}

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
    let ifaces: Vec<&str> = v.iter().map(|i| i.interface.as_str()).collect();
    assert_eq!(ifaces, ["lo", "wg0", ""]);
    assert_eq!(v[1].packets, 16);
    assert_eq!(v[1].top_reasons[0].reason, "NO_SOCKET");
    assert_eq!(v[1].top_reasons.len(), 2, "zeros left out");

    let mut inv = Inventory::default();
    inv.tunnels.push(Tunnel {
        name: "wg0".into(),
        ifindex: 3,
        mtu: 1420,
        backend: Backend::Uapi,
        listen_port: 51820,
        peers: Vec::new(),
    });
    let u = udp_errors(&inv, &d);
    assert_eq!(u[0].port, 5555);
    assert!(!u[0].wireguard);
    assert!(u[1].wireguard);
    assert_eq!(u[1].interface.as_deref(), Some("wg0"));
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
    x.health.rtt.insert(k("eth0", ENTRY), series(2, 2_000_000));
    x.health.rtt.insert(k("wg0", EXIT), series(1, 5_000_000));
    x.health.gaps.insert(k("wg0", EXIT), 12);
    x.health.late.insert(k("wg0", EXIT), 2);
    x.health.timeouts.insert(k("eth0", ENTRY), 3);
    x.transit
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
    let ep: SocketAddr = "198.51.100.7:51820".parse().unwrap();
    x.pmtu.path.insert((labeler.label(ep), "eth0".into()), 1400);
    x.pmtu.recommended.insert("wg0".into(), 1280);
    x.path_healthy = vec![("wg0".into(), EXIT.into(), false)];
    x.leaks.insert(("eth0".into(), "dns"), (3, 180));

    let mut s = Snapshot::default();
    s.wire
        .insert(("eth0".into(), ENTRY.into(), "rx", "data"), c(0, 0));
    s.wire
        .insert(("wg0".into(), EXIT.into(), "rx", "data"), c(88, 8800));
    let v = document(&inv, &s, &Drops::default(), Ok(()), &x);
    let t = &v.tunnels[0];
    assert_eq!(t.path_mtu_bytes, Some(1400));
    assert_eq!(t.recommended_mtu, Some(1280));
    let (e, x2) = (&t.peers[0], &t.peers[1]);
    let rtt = e.handshake_rtt.unwrap();
    assert_eq!(rtt.count, 2);
    assert_eq!(rtt.mean_seconds, 0.001);
    assert_eq!(e.handshake_timeouts, 3);
    assert_eq!(e.path_mtu_bytes, Some(1400));
    assert!(e.probes.is_empty());
    assert_eq!(e.endpoint, None, "endpoints only when exported");
    assert_eq!(x2.handshake_rtt.unwrap().mean_seconds, 0.005);
    assert_eq!(x2.transit_loss.gaps, 12);
    assert_eq!(x2.transit_loss.late, 2);
    assert_eq!(x2.transit_loss.rx_data_packets, 88);
    // 10 never arrived of 98 sent.
    let loss = x2.transit_loss.loss_percent.unwrap();
    assert!((loss - 1000.0 / 98.0).abs() < 1e-9, "{loss}");
    assert_eq!(x2.transit_time.tx.unwrap().mean_seconds, 0.0001);
    assert_eq!(x2.transit_time.rx, None);
    assert_eq!(x2.path_healthy, Some(false));
    assert_eq!(e.path_healthy, None);
    let p = &x2.probes[0];
    assert_eq!(p.target.as_deref(), Some("10.64.0.1"));
    assert_eq!((p.sent, p.lost), (10, 1));
    assert_eq!(p.loss_percent, Some(10.0));
    assert!((p.rtt_mean_seconds.unwrap() - 0.01).abs() < 1e-12);
    assert_eq!(p.recent.rtt_last_seconds, Some(0.012));
    assert_eq!(p.recent.loss_percent, Some(25.0));
    assert_eq!(v.leaks[0].packets, 3);
    assert_eq!(v.mullvad, None);
    assert!(!v.export_endpoints);

    // With --export-endpoints: the endpoint is there.
    x.export_endpoints = true;
    let v = document(&inv, &s, &Drops::default(), Ok(()), &x);
    assert_eq!(
        v.tunnels[0].peers[0].endpoint,
        Some(Some("198.51.100.7:51820".into()))
    );
}

/// A hop 1 whose endpoint is a local obfuscation proxy: its overhead is the flow's bytes
/// less the tunnel's (the wire role saw none of its messages), its relay the flow's remote
/// end; without a flow known it has neither, as before.
#[test]
fn an_obfuscated_hop_costs_its_flow() {
    use crate::sync::obfuscation::ObfuscatedFlow;
    let mut inv = Inventory::default();
    inv.tunnels.push(Tunnel {
        name: "wg0".into(),
        ifindex: 3,
        mtu: 1380,
        backend: Backend::Uapi,
        listen_port: 51820,
        peers: vec![peer(
            LONE,
            1,
            "eth0",
            Some("127.0.0.1:51900"),
            &["0.0.0.0/0"],
        )],
    });
    let mut s = Snapshot::default();
    s.tunnel
        .insert(("wg0".into(), LONE.into(), "tx"), c(20, 2560));
    s.tunnel
        .insert(("wg0".into(), LONE.into(), "rx"), c(20, 2560));
    let mut x = Extra::default();
    for (dir, n, bytes) in [("tx", 21, 5_091), ("rx", 21, 4_995)] {
        x.obfuscation
            .insert(("wg0".into(), LONE.into(), dir, "shadowsocks"), c(n, bytes));
    }
    // Another peer's flow is not this one's.
    x.obfuscation
        .insert(("wg0".into(), EXIT.into(), "tx", "shadowsocks"), c(5, 500));
    let before = document(&inv, &s, &Drops::default(), Ok(()), &x);
    let t = &before.tunnels[0].peers[0].traffic.tx;
    assert_eq!((t.obfuscation, t.overhead), (None, None));

    inv.obfuscation.push(ObfuscatedFlow {
        tunnel: "wg0".into(),
        tunnel_ifindex: 3,
        peer: Some((1, LONE.into())),
        kind: agent_common::maps::obfuscation::kind::SHADOWSOCKS,
        protocol: agent_common::parse::IPPROTO_UDP,
        remote: "198.51.100.7:8388".parse().unwrap(),
        mullvad: false,
    });
    x.mullvad = Some(connected_mullvad());
    let v = document(&inv, &s, &Drops::default(), Ok(()), &x);
    let p = &v.tunnels[0].peers[0];
    let tx = &p.traffic.tx;
    assert_eq!(
        tx.obfuscation,
        Some(doc::Count {
            packets: 21,
            bytes: 5_091
        })
    );
    let o = tx.overhead.unwrap();
    assert_eq!(o.bytes, 5_091 - 2_560);
    assert_eq!(o.bytes_per_packet, 2_531.0 / 20.0);
    assert_eq!(p.traffic.rx.overhead.unwrap().bytes, 4_995 - 2_560);
    // The flow reaches 198.51.100.7, the entry relay of connected_mullvad().
    assert_eq!(
        p.mullvad_relay.as_ref().map(|r| r.role.as_str()),
        Some("entry")
    );
}

#[test]
fn mullvad_object_when_the_poller_has_one() {
    let inv = inventory();
    let x = Extra {
        mullvad: Some(connected_mullvad()),
        ..Extra::default()
    };
    let v = document(&inv, &Snapshot::default(), &Drops::default(), Ok(()), &x);
    let mv = v.mullvad.unwrap();
    assert_eq!(mv.state.as_deref(), Some("connected"));
    let conn = mv.connection.unwrap();
    let exit = conn.exit.unwrap();
    assert_eq!(exit.hostname.as_deref(), Some("se-got-wg-101"));
    assert_eq!(conn.entry.unwrap().city.as_deref(), Some("Frankfurt"));
    assert!(conn.multihop);
    assert_eq!(conn.features, ["Multihop", "QuantumResistance"]);
    let peers = &v.tunnels[0].peers;
    let role = |i: usize| peers[i].mullvad_relay.clone().unwrap();
    assert_eq!(role(0).role, "entry");
    assert_eq!(role(1).hostname, "se-got-wg-101");

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
    let v = document(&inv, &Snapshot::default(), &Drops::default(), Ok(()), &x);
    let mv = v.mullvad.unwrap();
    assert!(!mv.up);
    assert_eq!(mv.error.as_deref(), Some("timed out"));
    m.off = true;
    let x = Extra {
        mullvad: Some(m),
        ..Extra::default()
    };
    let v = document(&inv, &Snapshot::default(), &Drops::default(), Ok(()), &x);
    assert_eq!(v.mullvad, None);
}

/// Two tunnels (a multihop one, a userspace one with a peer that has no endpoint and no
/// handshake), everything measured, Mullvad connected, endpoints exported, unhealthy.
fn rich() -> StatusDoc {
    let mut inv = inventory();
    let exit = &mut inv.tunnels[0].peers[1];
    exit.wg.allowed_ips.push("::/0".parse().unwrap());
    exit.friendly_name = Some("exit relay".into());
    inv.tunnels.push(Tunnel {
        name: "wg1".into(),
        ifindex: 7,
        mtu: 1280,
        backend: Backend::Uapi,
        listen_port: 0,
        peers: vec![peer(LONE, 1, "", None, &["192.168.9.0/24"])],
    });
    inv.underlays.push(Underlay {
        name: "eth1".into(),
        ifindex: 4,
    });

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
        mullvad: Some(connected_mullvad()),
        ..Extra::default()
    };
    let k = |i: &str, p: &str| (i.to_string(), p.to_string());
    x.health.rtt.insert(k("eth0", ENTRY), series(2, 2_000_000));
    x.health.rtt.insert(k("wg0", EXIT), series(3, 5_000_000));
    x.health.gaps.insert(k("wg0", EXIT), 12);
    x.health.late.insert(k("wg0", EXIT), 2);
    x.health.timeouts.insert(k("eth0", ENTRY), 3);
    x.transit
        .insert(("wg0".into(), EXIT.into(), "tx"), series(4, 400_000));
    x.transit
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

    document(&inv, &s, &d, Err("no collection yet".into()), &x)
}

/// No tunnel, nothing measured, a Mullvad daemon that cannot be read.
fn bare() -> StatusDoc {
    let x = Extra {
        mullvad: Some(MullvadState {
            polled_at: Some(SystemTime::now()),
            last_error: Some("timed out".into()),
            ..MullvadState::default()
        }),
        ..Extra::default()
    };
    document(
        &Inventory::default(),
        &Snapshot::default(),
        &Drops::default(),
        Ok(()),
        &x,
    )
}

/// What depends on the clock, fixed: the time and the handshake ages.
fn pin_clock(mut d: StatusDoc) -> StatusDoc {
    d.time = 1_790_000_000;
    for p in d.tunnels.iter_mut().flat_map(|t| t.peers.iter_mut()) {
        if p.latest_handshake_age_seconds.is_some() {
            p.latest_handshake_age_seconds = Some(30.5);
        }
    }
    d
}

/// The rich snapshot's JSON, as the server emits it (`to_string_pretty` and a newline).
const RICH: &str = include_str!("golden.json");

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

/// The body the server sends for `v` (see `serve/mod.rs`).
fn body(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap() + "\n"
}

#[test]
fn the_json_is_exactly_the_golden_one() {
    assert_eq!(body(&to_json(&pin_clock(rich()))), RICH);
    assert_eq!(body(&to_json(&pin_clock(bare()))), BARE);
}

/// Equal, but for floats within a few ULPs: serde_json parses floats with a fast algorithm
/// that can land one ULP off (its `float_roundtrip` feature is off), as every reader of the
/// document always did.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, x), (ky, y))| kx == ky && same(x, y))
        }
        _ => a == b,
    }
}

#[test]
fn the_golden_json_round_trips_through_the_types() {
    for (built, golden) in [(pin_clock(rich()), RICH), (pin_clock(bare()), BARE)] {
        let decoded: StatusDoc = serde_json::from_str(golden).unwrap();
        // The types lose nothing a plain JSON parse keeps: every field, null and absence,
        // integers as integers, floats as floats.
        let parsed: Value = serde_json::from_str(golden).unwrap();
        assert_eq!(body(&to_json(&decoded)), body(&parsed));
        // What was decoded is what was built (floats to the parser's precision).
        assert!(same(&to_json(&decoded), &to_json(&built)));
        // And serialize -> deserialize -> serialize is stable from there.
        let again: StatusDoc = serde_json::from_str(&body(&to_json(&decoded))).unwrap();
        assert_eq!(again, decoded);
        assert_eq!(body(&to_json(&again)), body(&to_json(&decoded)));
    }
}

#[test]
fn build_with_is_the_document_as_json() {
    let (inv, s, d) = (inventory(), Snapshot::default(), Drops::default());
    let x = Extra {
        mullvad: Some(connected_mullvad()),
        export_endpoints: true,
        ..Extra::default()
    };
    let served: StatusDoc = serde_json::from_value(build_with(&inv, &s, &d, Ok(()), &x)).unwrap();
    // Only the clock may differ between the two.
    let built = document(&inv, &s, &d, Ok(()), &x);
    assert_eq!(pin_clock(served), pin_clock(built));
}

#[test]
fn capabilities_read_back_as_the_drop_reports_them() {
    let dropped = crate::caps::Dropped {
        kept: vec!["CAP_BPF".into(), "CAP_NET_ADMIN".into()],
        dropped: vec!["CAP_SYS_ADMIN".into()],
        bounding: vec!["CAP_BPF".into()],
        threads: 4,
    };
    // What caps::status() serves once the drop happened.
    let served = serde_json::json!({
        "kept": dropped.kept,
        "dropped": dropped.dropped,
        "bounding": dropped.bounding,
    });
    let c: crate::serve::status::doc::Capabilities =
        serde_json::from_value(served.clone()).unwrap();
    assert_eq!(c.kept, dropped.kept);
    assert_eq!(serde_json::to_value(&c).unwrap(), served);
    assert_eq!(capabilities(), None, "no drop in a unit test");
}
