//! The `/api/v1/status` document as types: what the agent serves (built in
//! [`super`]) and what `wirescope status` reads back, so both sides agree on one
//! definition instead of string paths into JSON.
//!
//! The wire shape is the contract, kept exactly: the field names, the nesting, which fields
//! are `null` and which are left out, and the number formats (integers stay integers, every
//! mean and percentage is a float). The server serializes through `serde_json::Value`, whose
//! objects sort their keys, so the field order here is for reading, not for the bytes.
//!
//! Decoding is tolerant as the readers always were: every field has a default, so an agent
//! older than a field still gives a document (only a field of the wrong type is an error),
//! and fields this version does not know are ignored. Plain data only: serde and std, so
//! this file can move with whatever serves or reads the document.

use serde::{Deserialize, Deserializer, Serialize};

/// The whole snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusDoc {
    /// UNIX seconds when it was taken.
    pub time: u64,
    pub healthy: bool,
    /// Why the agent is not healthy; null when it is.
    pub health_reason: Option<String>,
    /// What the capability drop kept; null until it happened.
    pub capabilities: Option<Capabilities>,
    pub tunnels: Vec<Tunnel>,
    pub underlays: Vec<Underlay>,
    /// Per interface, busiest first.
    pub drops: Vec<InterfaceDrops>,
    /// Per local port.
    pub udp_receive_errors: Vec<UdpReceiveErrors>,
    pub leaks: Vec<Leak>,
    pub path: PathReport,
    /// Null when the Mullvad daemon is off or was never polled.
    pub mullvad: Option<Mullvad>,
    /// Whether peers carry their `endpoint` (`--export-endpoints`).
    pub export_endpoints: bool,
}

/// The capability sets after the agent dropped what it does not need.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    pub kept: Vec<String>,
    pub dropped: Vec<String>,
    pub bounding: Vec<String>,
}

/// A watched WireGuard interface.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tunnel {
    pub interface: String,
    pub ifindex: u32,
    pub mtu: u32,
    pub listen_port: u16,
    /// The control interface read: `netlink`, `uapi` or `none`.
    pub backend: String,
    /// The smallest path MTU measured to its hop-1 peers' endpoints.
    pub path_mtu_bytes: Option<u32>,
    pub recommended_mtu: Option<u32>,
    pub peers: Vec<Peer>,
}

/// A peer of a tunnel, with everything measured for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Peer {
    /// Standard base64.
    pub public_key: String,
    pub friendly_name: Option<String>,
    /// 1 over an underlay, 2 through a hop-1 peer's tunnel, ...
    pub hop: u32,
    /// The underlay interface, or the carrying peer's public key.
    pub via: String,
    /// Comma-separated.
    pub allowed_ips: String,
    /// Null before the first handshake.
    pub latest_handshake_age_seconds: Option<f64>,
    /// WireGuard's own counters.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub traffic: Traffic,
    /// Null when no handshake round trip was measured.
    pub handshake_rtt: Option<MeanTime>,
    pub handshake_timeouts: u64,
    pub transit_loss: TransitLoss,
    pub transit_time: TransitTime,
    /// The probes whose path goes through this peer.
    pub probes: Vec<Probe>,
    /// The path MTU to its endpoint (hop 1 only).
    pub path_mtu_bytes: Option<u32>,
    /// As the failover logic last judged the path; null when it did not.
    pub path_healthy: Option<bool>,
    /// The Mullvad relay behind the endpoint, when it is one.
    pub mullvad_relay: Option<MullvadRelay>,
    /// Only with `--export-endpoints`: absent otherwise, `Some(None)` (null) for a peer
    /// without an endpoint.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint: Option<Option<String>>,
}

/// A peer's traffic per direction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Traffic {
    pub rx: DirectionTraffic,
    pub tx: DirectionTraffic,
}

/// One direction of a peer: the inner packets, the WireGuard data messages that carry
/// them, and what the difference costs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DirectionTraffic {
    pub tunnel: Count,
    pub wire_data: Count,
    /// A hop 1 whose endpoint is a local obfuscation proxy: the proxy's flow to the relay
    /// (`wirescope_obfuscation_*`), against which `overhead` is then computed (WireGuard
    /// and the obfuscation together). Absent for other peers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub obfuscation: Option<Count>,
    /// Null when there is nothing to compare (no tunnel bytes, or fewer wire bytes).
    pub overhead: Option<Overhead>,
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Wire data bytes minus the tunnel bytes they carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Overhead {
    pub bytes: u64,
    pub bytes_per_packet: f64,
    pub percent: f64,
}

/// A histogram series as its count and mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeanTime {
    pub count: u64,
    pub mean_seconds: f64,
}

/// Loss seen in the data messages' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransitLoss {
    /// Counter gaps: messages that did not arrive (yet).
    pub gaps: u64,
    /// Gaps filled later: reordered, not lost.
    pub late: u64,
    pub rx_data_packets: u64,
    /// Null before any data message.
    pub loss_percent: Option<f64>,
}

/// How long WireGuard held packets, per direction; null where nothing was measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransitTime {
    pub rx: Option<MeanTime>,
    pub tx: Option<MeanTime>,
}

/// An ICMP probe target: lifetime counters and the recent window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Probe {
    pub target: Option<String>,
    /// The interface it is bound to; empty when none.
    pub interface: String,
    pub sent: u64,
    pub lost: u64,
    pub replies: u64,
    /// Null before the first probe.
    pub loss_percent: Option<f64>,
    /// Null before the first reply.
    pub rtt_mean_seconds: Option<f64>,
    pub recent: ProbeRecent,
}

/// A probe target over the last `window_seconds`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProbeRecent {
    pub window_seconds: u64,
    pub sent: u64,
    pub lost: u64,
    pub loss_percent: Option<f64>,
    pub rtt_mean_seconds: Option<f64>,
    pub rtt_last_seconds: Option<f64>,
}

/// The Mullvad relay a peer's endpoint is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MullvadRelay {
    /// `entry` or `exit`.
    pub role: String,
    pub hostname: String,
    pub country: String,
    pub city: String,
}

/// A watched carrier interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Underlay {
    pub interface: String,
    pub ifindex: u32,
}

/// The kernel's drops on one interface (empty: no device).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InterfaceDrops {
    pub interface: String,
    pub packets: u64,
    /// Busiest first, at most a few.
    pub top_reasons: Vec<DropReason>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DropReason {
    pub reason: String,
    pub packets: u64,
}

/// Failed UDP receives on one local port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UdpReceiveErrors {
    pub port: u16,
    pub errors: u64,
    /// Whether a watched WireGuard interface listens on it.
    pub wireguard: bool,
    /// That interface; null when none.
    pub interface: Option<String>,
}

/// Packets that left an underlay outside the tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Leak {
    pub interface: String,
    /// `dns`, `ipv4`, `ipv6`, ...
    pub kind: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The path: MTUs measured, fragments and ICMP too-big messages seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PathReport {
    pub mtu: Vec<ProbeMtu>,
    pub fragments: Vec<Fragments>,
    pub icmp_too_big: Vec<IcmpTooBig>,
    pub icmp_reported_mtu: Vec<IcmpReportedMtu>,
}

/// A path MTU the search measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProbeMtu {
    /// A probe target, or an endpoint's label.
    pub target: String,
    /// Empty when unbound.
    pub interface: String,
    pub bytes: u32,
}

/// IP fragments seen on an interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fragments {
    pub interface: String,
    /// `rx` or `tx`.
    pub direction: String,
    /// `outer` (WireGuard's own UDP), `inner` or `other`.
    pub layer: String,
    pub packets: u64,
}

/// ICMP too-big / fragmentation-needed messages received.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IcmpTooBig {
    pub interface: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    pub messages: u64,
}

/// The lowest MTU ICMP reported on an interface lately.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IcmpReportedMtu {
    pub interface: String,
    pub bytes: u32,
}

/// The Mullvad daemon: `up` with its connection, or not readable with why.
///
/// On the wire one flat object: `{"up": false, "state": null, "error": ...}` when the
/// daemon could not be read, and the connection's fields beside those when it could.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "MullvadWire")]
pub struct Mullvad {
    pub up: bool,
    /// The tunnel state (`connected`, `error`, ...); null when not up.
    pub state: Option<String>,
    /// The daemon's error cause, or why it could not be read.
    pub error: Option<String>,
    /// Present exactly when `up`.
    #[serde(flatten)]
    pub connection: Option<MullvadConnection>,
}

/// What the Mullvad daemon says about its tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MullvadConnection {
    /// Null when the daemon names none.
    pub exit: Option<MullvadLocation>,
    pub entry: Option<MullvadLocation>,
    pub multihop: bool,
    pub daita: bool,
    pub quantum_resistant: bool,
    pub obfuscation: Option<String>,
    pub tunnel_interface: Option<String>,
    pub features: Vec<String>,
    pub locked_down: Option<bool>,
    /// `logged_in`, `logged_out` or `revoked` (the CLI's warning); null when it does not say.
    pub device: Option<String>,
}

/// A relay as Mullvad names it (country and city: the hostname's codes when unnamed); each
/// part null when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MullvadLocation {
    pub hostname: Option<String>,
    pub city: Option<String>,
    pub country: Option<String>,
}

/// [`Mullvad`] as it is decoded: flat, every field optional; the connection is kept when
/// `up`.
#[derive(Default, Deserialize)]
#[serde(default)]
struct MullvadWire {
    up: bool,
    state: Option<String>,
    error: Option<String>,
    exit: Option<MullvadLocation>,
    entry: Option<MullvadLocation>,
    multihop: bool,
    daita: bool,
    quantum_resistant: bool,
    obfuscation: Option<String>,
    tunnel_interface: Option<String>,
    features: Vec<String>,
    locked_down: Option<bool>,
    device: Option<String>,
}

impl From<MullvadWire> for Mullvad {
    fn from(w: MullvadWire) -> Self {
        let connection = w.up.then_some(MullvadConnection {
            exit: w.exit,
            entry: w.entry,
            multihop: w.multihop,
            daita: w.daita,
            quantum_resistant: w.quantum_resistant,
            obfuscation: w.obfuscation,
            tunnel_interface: w.tunnel_interface,
            features: w.features,
            locked_down: w.locked_down,
            device: w.device,
        });
        Self {
            up: w.up,
            state: w.state,
            error: w.error,
            connection,
        }
    }
}

/// A field that may be absent, null or a value: absent is `None`, null `Some(None)`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialized as the server does: through a `Value` (sorted keys), pretty.
    fn emit(d: &StatusDoc) -> String {
        serde_json::to_string_pretty(&serde_json::to_value(d).unwrap()).unwrap()
    }

    fn peer(endpoint: Option<Option<&str>>) -> Peer {
        Peer {
            public_key: "k".into(),
            hop: 1,
            endpoint: endpoint.map(|e| e.map(str::to_string)),
            ..Peer::default()
        }
    }

    #[test]
    fn endpoint_absent_null_or_set_round_trips() {
        for ep in [None, Some(None), Some(Some("192.0.2.1:51820"))] {
            let p = peer(ep);
            let v = serde_json::to_value(&p).unwrap();
            let text = v.to_string();
            match ep {
                None => assert!(!text.contains("endpoint"), "{text}"),
                Some(None) => assert!(text.contains(r#""endpoint":null"#), "{text}"),
                Some(Some(e)) => assert!(text.contains(e), "{text}"),
            }
            let back: Peer = serde_json::from_value(v).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn mullvad_down_and_up_round_trip() {
        let down = Mullvad {
            up: false,
            state: None,
            error: Some("timed out".into()),
            connection: None,
        };
        let v = serde_json::to_value(&down).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"error":"timed out","state":null,"up":false}"#
        );
        assert_eq!(serde_json::from_value::<Mullvad>(v).unwrap(), down);

        let up = Mullvad {
            up: true,
            state: Some("connected".into()),
            error: None,
            connection: Some(MullvadConnection {
                exit: Some(MullvadLocation {
                    hostname: Some("se-got-wg-101".into()),
                    city: None,
                    country: Some("Sweden".into()),
                }),
                entry: None,
                multihop: true,
                features: vec!["Multihop".into()],
                device: Some("revoked".into()),
                ..MullvadConnection::default()
            }),
        };
        let v = serde_json::to_value(&up).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"daita":false,"device":"revoked","entry":null,"error":null,"exit":{"city":null,"country":"Sweden","hostname":"se-got-wg-101"},"features":["Multihop"],"locked_down":null,"multihop":true,"obfuscation":null,"quantum_resistant":false,"state":"connected","tunnel_interface":null,"up":true}"#
        );
        assert_eq!(serde_json::from_value::<Mullvad>(v).unwrap(), up);
    }

    #[test]
    fn an_older_agent_missing_fields_still_decodes() {
        let d: StatusDoc = serde_json::from_str(
            r#"{"time": 5, "tunnels": [{"interface": "wg0", "peers": [{"public_key": "k"}]}],
                "mullvad": {"up": true, "state": "connected"}, "some_newer_field": [1]}"#,
        )
        .unwrap();
        assert_eq!(d.time, 5);
        assert!(!d.healthy);
        let p = &d.tunnels[0].peers[0];
        assert_eq!(p.public_key, "k");
        assert_eq!(p.traffic.tx.tunnel, Count::default());
        assert_eq!(p.handshake_rtt, None);
        assert_eq!(p.endpoint, None);
        let m = d.mullvad.as_ref().unwrap();
        assert!(m.connection.as_ref().is_some_and(|c| c.features.is_empty()));
        // And it serializes to the full shape, every field there.
        let again: StatusDoc = serde_json::from_str(&emit(&d)).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn a_field_of_the_wrong_type_is_an_error_naming_it() {
        let e = serde_json::from_str::<StatusDoc>(r#"{"tunnels": [{"peers": [{"hop": "two"}]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid type: string \"two\", expected u32"),
            "{e}"
        );
        let e = serde_json::from_str::<StatusDoc>(r#"{"tunnels": "nope"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a sequence"), "{e}");
    }
}
