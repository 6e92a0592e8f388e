//! `--obfuscation PEER=[KIND,]PROTO:ADDR:PORT` (repeatable; TOML `obfuscation = [...]`): a
//! tunnel peer whose WireGuard a local proxy carries to its relay in another protocol, for
//! setups the Mullvad daemon does not describe. PEER is the peer's base64 public key, or a
//! tunnel interface (then its hop-1 peer: the only one, or the one whose endpoint is on
//! loopback); KIND is the `kind` label (`manual` when left out); PROTO:ADDR:PORT is the
//! relay's end of the proxy's flow, as it leaves the underlay.

use std::net::{IpAddr, SocketAddr};

use agent_common::{
    maps::obfuscation::kind,
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};
use base64::Engine as _;

use super::{ConfigError, Origin, is_ifname};

/// Whose WireGuard the flow carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObfuscatedPeer {
    /// A peer's public key, in standard base64 (as `wg` prints it).
    Key(String),
    /// A tunnel interface: its hop-1 peer.
    Interface(String),
}

/// One `--obfuscation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObfuscationRule {
    pub peer: ObfuscatedPeer,
    /// `agent_common::maps::obfuscation::kind`.
    pub kind: u8,
    /// IPPROTO_UDP or IPPROTO_TCP.
    pub protocol: u8,
    /// The relay's end of the flow.
    pub remote: SocketAddr,
}

const ACCEPTED: &str = "accepted: PEER=[KIND,]PROTO:ADDR:PORT, where PEER is a tunnel \
    interface or a peer's base64 public key, KIND one of udp2tcp, shadowsocks, quic, lwo or \
    manual (the default), PROTO udp or tcp, and ADDR:PORT the relay's end of the proxy's flow \
    (IPv6 in brackets), e.g. wg0=shadowsocks,udp:198.51.100.1:8388 or \
    wg0-mullvad=udp2tcp,tcp:[2001:db8::1]:443";

/// Parses one value; `origin` says where it came from, for the message.
pub fn parse_obfuscation(value: &str, origin: &Origin) -> Result<ObfuscationRule, ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        key: "obfuscation",
        origin: origin.clone(),
        value: value.to_owned(),
        problem,
        accepted: ACCEPTED.into(),
    };
    let v = value.trim();
    // A base64 key ends in `=`: the separator is the last `=`, since nothing after it has one.
    let Some((peer, spec)) = v.rsplit_once('=') else {
        return Err(invalid(
            "has no `=` between the peer and the obfuscator".into(),
        ));
    };
    let peer = parse_peer(peer.trim()).ok_or_else(|| {
        invalid(format!(
            "names no peer: {:?} is neither a base64 WireGuard public key (44 characters) nor \
             an interface name",
            peer.trim()
        ))
    })?;
    let spec = spec.trim();
    let (kind_name, endpoint) = match spec.split_once(',') {
        Some((k, e)) => (Some(k.trim()), e.trim()),
        None => (None, spec),
    };
    let kind = match kind_name {
        None => kind::MANUAL,
        Some(k) => match kind::from_name(k) {
            Some(kind::OTHER) | None => {
                return Err(invalid(format!(
                    "has the kind {k:?}, which is not one of udp2tcp, shadowsocks, quic, lwo, \
                     manual"
                )));
            }
            Some(k) => k,
        },
    };
    let Some((proto, addr)) = endpoint.split_once(':') else {
        return Err(invalid(format!(
            "has no protocol in {endpoint:?}: start the obfuscator with udp: or tcp:"
        )));
    };
    let protocol = match proto.trim().to_ascii_lowercase().as_str() {
        "udp" => IPPROTO_UDP,
        "tcp" => IPPROTO_TCP,
        other => {
            return Err(invalid(format!(
                "has the protocol {other:?}, which is neither udp nor tcp"
            )));
        }
    };
    let remote: SocketAddr = addr.trim().parse().map_err(|_| {
        invalid(format!(
            "has {:?} where the relay's ADDRESS:PORT belongs (an IP address, IPv6 in \
             brackets; host names are not resolved)",
            addr.trim()
        ))
    })?;
    if remote.port() == 0 {
        return Err(invalid(
            "has port 0: give the relay's obfuscation port".into(),
        ));
    }
    let ip = remote.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return Err(invalid(format!(
            "gives {ip}, the local side: give the relay's end of the proxy's flow (where it \
             leaves the underlay to), not the proxy's local address"
        )));
    }
    let needs = match kind {
        kind::UDP2TCP => Some(("udp2tcp", IPPROTO_TCP, "tcp")),
        kind::QUIC => Some(("quic", IPPROTO_UDP, "udp")),
        kind::LWO => Some(("lwo", IPPROTO_UDP, "udp")),
        _ => None,
    };
    if let Some((name, p, pname)) = needs
        && p != protocol
    {
        return Err(invalid(format!(
            "says {name} over {}: {name} runs over {pname}",
            proto.trim()
        )));
    }
    Ok(ObfuscationRule {
        peer,
        kind,
        protocol,
        remote: SocketAddr::new(ip, remote.port()),
    })
}

fn parse_peer(s: &str) -> Option<ObfuscatedPeer> {
    if s.len() == 44 {
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        return (bytes.len() == 32).then(|| ObfuscatedPeer::Key(s.to_owned()));
    }
    is_ifname(s).then(|| ObfuscatedPeer::Interface(s.to_owned()))
}

/// Every rule of the list, and no flow given for two peers (a packet can count for one).
pub fn parse_obfuscations(
    values: &[String],
    origin: &Origin,
) -> Result<Vec<ObfuscationRule>, ConfigError> {
    let mut out: Vec<ObfuscationRule> = Vec::with_capacity(values.len());
    for v in values {
        let rule = parse_obfuscation(v, origin)?;
        if let Some(other) = out
            .iter()
            .find(|o| o.protocol == rule.protocol && o.remote == rule.remote)
        {
            if *other == rule {
                continue;
            }
            return Err(ConfigError::Invalid {
                key: "obfuscation",
                origin: origin.clone(),
                value: v.clone(),
                problem: format!(
                    "gives the flow to {} for a second peer or kind: one flow carries one peer",
                    rule.remote
                ),
                accepted: "accepted: each PROTO:ADDR:PORT once".into(),
            });
        }
        out.push(rule);
    }
    Ok(out)
}

/// The protocol's name, for messages.
pub fn protocol_name(p: u8) -> &'static str {
    if p == IPPROTO_TCP { "tcp" } else { "udp" }
}

/// Whether `ip` is where a local proxy listens: a peer endpoint there is obfuscated.
pub fn is_local_proxy(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn ok(v: &str) -> ObfuscationRule {
        parse_obfuscation(v, &Origin::Flag).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn err(v: &str) -> String {
        parse_obfuscation(v, &Origin::Flag)
            .expect_err(v)
            .to_string()
    }

    #[test]
    fn rules_by_interface_and_by_key() {
        assert_eq!(
            ok("wg0=shadowsocks,udp:198.51.100.1:8388"),
            ObfuscationRule {
                peer: ObfuscatedPeer::Interface("wg0".into()),
                kind: kind::SHADOWSOCKS,
                protocol: IPPROTO_UDP,
                remote: "198.51.100.1:8388".parse().unwrap(),
            }
        );
        // The key's own `=` stays with the key; the kind may be left out, in any case.
        assert_eq!(
            ok(&format!(" {KEY}=TCP:[2001:db8::1]:443 ")),
            ObfuscationRule {
                peer: ObfuscatedPeer::Key(KEY.into()),
                kind: kind::MANUAL,
                protocol: IPPROTO_TCP,
                remote: "[2001:db8::1]:443".parse().unwrap(),
            }
        );
        assert_eq!(
            ok("wg0-mullvad=Udp2Tcp,tcp:192.0.2.7:80").kind,
            kind::UDP2TCP
        );
        // A v4-mapped address is the IPv4 one it travels as.
        assert_eq!(
            ok("wg0=quic,udp:[::ffff:192.0.2.7]:443").remote,
            "192.0.2.7:443".parse().unwrap()
        );
    }

    /// Every bad value names its problem, the option, and what is accepted.
    #[test]
    fn errors_name_the_problem_and_the_fix() {
        let cases = [
            ("wg0", "has no `=`"),
            ("=udp:192.0.2.1:1", "names no peer"),
            ("not/an/iface=udp:192.0.2.1:1", "names no peer"),
            ("a-name-longer-than-15=udp:192.0.2.1:1", "names no peer"),
            (
                // 44 characters but not a key.
                "############################################=udp:192.0.2.1:1",
                "names no peer",
            ),
            ("wg0=openvpn,udp:192.0.2.1:1", "not one of udp2tcp"),
            ("wg0=other,udp:192.0.2.1:1", "not one of udp2tcp"),
            ("wg0=shadowsocks,192.0.2.1", "has no protocol"),
            ("wg0=sctp:192.0.2.1:1", "neither udp nor tcp"),
            ("wg0=udp:relay.example:443", "host names are not resolved"),
            (
                "wg0=udp:192.0.2.1",
                "where the relay's ADDRESS:PORT belongs",
            ),
            (
                "wg0=udp:2001:db8::1:443",
                "where the relay's ADDRESS:PORT belongs",
            ),
            ("wg0=udp:192.0.2.1:0", "has port 0"),
            ("wg0=udp:127.0.0.1:51900", "the local side"),
            ("wg0=tcp:[::1]:443", "the local side"),
            ("wg0=udp:0.0.0.0:443", "the local side"),
            ("wg0=udp2tcp,udp:192.0.2.1:443", "udp2tcp runs over tcp"),
            ("wg0=quic,tcp:192.0.2.1:443", "quic runs over udp"),
            ("wg0=lwo,tcp:192.0.2.1:443", "lwo runs over udp"),
        ];
        for (value, problem) in cases {
            let msg = err(value);
            assert!(msg.contains(problem), "{value}: {msg}");
            assert!(msg.starts_with("--obfuscation: "), "{value}: {msg}");
            assert!(
                msg.contains("accepted: PEER=[KIND,]PROTO:ADDR:PORT"),
                "{msg}"
            );
        }
    }

    #[test]
    fn one_flow_carries_one_peer() {
        let list = |v: &[&str]| {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            parse_obfuscations(&v, &Origin::File("/etc/wirescope.toml".into()))
        };
        let two = list(&[
            "wg0=shadowsocks,udp:192.0.2.1:8388",
            "wg1=shadowsocks,udp:192.0.2.1:8389",
            // The same rule twice is one.
            "wg0=shadowsocks,udp:192.0.2.1:8388",
            // The same address and port over TCP is another flow.
            "wg1=udp2tcp,tcp:192.0.2.1:8388",
        ])
        .unwrap();
        assert_eq!(two.len(), 3);
        let e = list(&[
            "wg0=shadowsocks,udp:192.0.2.1:8388",
            "wg1=udp:192.0.2.1:8388",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("obfuscation in /etc/wirescope.toml: \"wg1=udp:192.0.2.1:8388\""),
            "{e}"
        );
        assert!(e.contains("for a second peer or kind"), "{e}");
    }
}
