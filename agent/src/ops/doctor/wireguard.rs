//! WireGuard: the implementation behind each interface, its MTU against the path (measured
//! by the agent, or bounded by the first hop), persistent keepalive behind NAT, and peers
//! whose handshakes get no response.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, SystemTime},
};

use super::{Finding, Host};
use crate::{sources::netlink::Netlink, sources::wg};

/// Largest persistent-keepalive interval that keeps a NAT mapping alive everywhere.
pub const KEEPALIVE_MAX: u16 = 25;
/// WireGuard rejects a session older than this: a peer without a handshake for longer is
/// not talking to us.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);

pub(super) fn check_wireguard(f: &mut Vec<Finding>, host: &mut Host) {
    let module = Path::new("/sys/module/wireguard").exists();
    let mut names: BTreeSet<String> = host
        .links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("wireguard"))
        .map(|l| l.name.clone())
        .collect();
    let uapi = wg::list_uapi_sockets();
    for n in &uapi {
        if host.links.iter().any(|l| &l.name == n) {
            names.insert(n.clone());
        }
    }
    f.push(Finding::info(
        "wireguard",
        format!(
            "kernel WireGuard module {}",
            if module {
                "loaded"
            } else {
                "not loaded (userspace implementations only)"
            }
        ),
    ));
    if names.is_empty() {
        f.push(Finding::info(
            "wireguard",
            "no WireGuard interface in this network namespace",
        ));
    }
    for name in names {
        match wg::read_device(&name) {
            Ok((dev, backend)) => {
                let how = match backend {
                    crate::sync::inventory::Backend::Netlink => "kernel WireGuard",
                    _ => "userspace WireGuard (UAPI socket)",
                };
                f.push(Finding::info(
                    "wireguard",
                    format!(
                        "{name}: {how}, listen port {}, {} peer{}",
                        dev.listen_port,
                        dev.peers.len(),
                        if dev.peers.len() == 1 { "" } else { "s" }
                    ),
                ));
                host.devices.push((dev, how));
            }
            Err(e) => f.push(Finding::info(
                "wireguard",
                format!("{name}: peers not readable: {e}"),
            )),
        }
    }
    // Mullvad's in-app WireGuard: a tun device with no control socket.
    for l in &host.links {
        if l.kind.as_deref() == Some("tun")
            && l.name.starts_with("wg")
            && !host.devices.iter().any(|(d, _)| d.name == l.name)
        {
            f.push(Finding::info(
                "wireguard",
                format!(
                    "{}: a tun device without a WireGuard control socket (an in-app userspace \
                     WireGuard such as Mullvad's): only the datapath is measured",
                    l.name
                ),
            ));
        }
    }
}

/// WireGuard's overhead over an outer IPv4 (20 + 8 + 32) or IPv6 (40 + 8 + 32) header.
pub fn wg_overhead(endpoint: &IpAddr) -> u32 {
    if endpoint.is_ipv4() { 60 } else { 80 }
}

pub(super) async fn check_mtu(f: &mut Vec<Finding>, host: &Host) {
    let nl = Netlink::new().ok();
    for (dev, _) in &host.devices {
        let Some(link) = host.links.iter().find(|l| l.name == dev.name) else {
            continue;
        };
        let measured = host.metrics.as_ref().and_then(|m| {
            m.get(
                "wirescope_recommended_mtu_bytes",
                &[("interface", dev.name.as_str())],
            )
        });
        if let Some(rec) = measured.filter(|r| *r > 0.0) {
            let rec = rec as u32;
            if link.mtu > rec {
                f.push(Finding::problem(
                    "mtu",
                    format!(
                        "{}: MTU {} exceeds the {rec} the measured path MTU allows (the agent's \
                         wirescope_recommended_mtu_bytes): full-size packets fragment or vanish",
                        dev.name, link.mtu
                    ),
                    format!("ip link set dev {} mtu {rec}", dev.name),
                ));
            } else {
                f.push(Finding::ok(
                    "mtu",
                    format!(
                        "{}: MTU {} fits the measured path (recommended {rec})",
                        dev.name, link.mtu
                    ),
                ));
            }
            continue;
        }
        // No measurement: the first hop's MTU bounds the path.
        let mut limit: Option<(u32, String)> = None;
        if let Some(nl) = &nl {
            for p in &dev.peers {
                let Some(ep) = p.endpoint else { continue };
                let Ok(Some(oif)) = nl.route_oif(ep.ip()).await else {
                    continue;
                };
                let Some(under) = host.links.iter().find(|l| l.index == oif) else {
                    continue;
                };
                if under.name == dev.name {
                    continue;
                }
                let allowed = under.mtu.saturating_sub(wg_overhead(&ep.ip()));
                if limit.as_ref().is_none_or(|(l, _)| allowed < *l) {
                    limit = Some((allowed, under.name.clone()));
                }
            }
        }
        match limit {
            Some((allowed, under)) if link.mtu > allowed => f.push(Finding::problem(
                "mtu",
                format!(
                    "{}: MTU {} exceeds the {allowed} that {under}'s MTU leaves after \
                     WireGuard's overhead",
                    dev.name, link.mtu
                ),
                format!("ip link set dev {} mtu {allowed}", dev.name),
            )),
            Some((allowed, under)) => f.push(Finding::ok(
                "mtu",
                format!(
                    "{}: MTU {} fits {under} (at most {allowed}); the path beyond is measured \
                     only by a running agent",
                    dev.name, link.mtu
                ),
            )),
            None => {}
        }
    }
}

/// Whether an address looks like one behind NAT: not globally routable (private, CGNAT,
/// link-local, unique-local, documentation and benchmarking ranges).
pub fn behind_nat(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_link_local()
                || a.is_loopback()
                || a.is_documentation()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || a.is_loopback()
                || (s[0] == 0x2001 && s[1] == 0xdb8)
        }
    }
}

/// The source address the kernel would use towards `dst` (no packet sent).
fn local_addr_towards(dst: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(dst).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// The keepalive verdict for one peer: `Some(reason)` when it needs one.
pub fn keepalive_problem(keepalive: Option<u16>, local_behind_nat: bool) -> Option<String> {
    match keepalive.filter(|k| *k > 0) {
        None if local_behind_nat => Some(
            "persistent keepalive is off and this host's address towards it is not public (NAT): \
             the mapping expires and the peer can no longer reach us"
                .into(),
        ),
        Some(k) if k > KEEPALIVE_MAX && local_behind_nat => Some(format!(
            "persistent keepalive {k} s is above {KEEPALIVE_MAX} s behind NAT: mappings can \
             expire between keepalives"
        )),
        _ => None,
    }
}

pub(super) async fn check_keepalive(f: &mut Vec<Finding>, host: &Host) {
    let nl = Netlink::new().ok();
    // WireGuard interfaces: an endpoint routed through one is a multihop exit.
    let tunnels: Vec<u32> = host
        .links
        .iter()
        .filter(|l| host.devices.iter().any(|(d, _)| d.name == l.name))
        .map(|l| l.index)
        .collect();
    for (dev, _) in &host.devices {
        for p in &dev.peers {
            let Some(ep) = p.endpoint else { continue };
            let key = wg::key_to_base64(&p.public_key);
            let oif = match &nl {
                Some(nl) => nl.route_oif(ep.ip()).await.ok().flatten(),
                None => None,
            };
            if let Some(via) = oif.and_then(|i| host.links.iter().find(|l| l.index == i))
                && tunnels.contains(&via.index)
            {
                f.push(Finding::ok(
                    "keepalive",
                    format!(
                        "{} peer {key}: reached through {} (multihop exit): the carrying \
                         peer's keepalives hold the NAT mapping",
                        dev.name, via.name
                    ),
                ));
                continue;
            }
            let nat = local_addr_towards(ep).is_some_and(behind_nat);
            match keepalive_problem(p.persistent_keepalive, nat) {
                Some(why) => f.push(Finding::problem(
                    "keepalive",
                    format!("{} peer {key} ({ep}): {why}", dev.name),
                    format!(
                        "wg set {} peer {key} persistent-keepalive {KEEPALIVE_MAX}",
                        dev.name
                    ),
                )),
                None => f.push(Finding::ok(
                    "keepalive",
                    format!(
                        "{} peer {key}: persistent keepalive {}",
                        dev.name,
                        p.persistent_keepalive
                            .filter(|k| *k > 0)
                            .map_or("off (public address)".to_string(), |k| format!("{k} s"))
                    ),
                )),
            }
        }
    }
}

pub(super) fn check_handshakes(f: &mut Vec<Finding>, host: &Host) {
    let now = SystemTime::now();
    for (dev, _) in &host.devices {
        for p in &dev.peers {
            let Some(ep) = p.endpoint else { continue };
            let key = wg::key_to_base64(&p.public_key);
            let age = p.last_handshake.and_then(|t| now.duration_since(t).ok());
            let timeouts = host.metrics.as_ref().map(|m| {
                m.sum(
                    // Counted on whichever interface carries the handshakes (the underlay).
                    "wirescope_handshake_timeouts_total",
                    &[("peer", key.as_str())],
                )
            });
            let stale = age.is_none_or(|a| a > REJECT_AFTER);
            let tried = p.tx_bytes > 0 || timeouts.is_some_and(|t| t > 0.0);
            if stale && tried {
                let age_s = age.map_or("never".to_string(), |a| format!("{} s ago", a.as_secs()));
                let t = match timeouts {
                    Some(t) if t > 0.0 => {
                        format!(", {t} initiations unanswered (wirescope_handshake_timeouts_total)")
                    }
                    Some(_) => ", no initiation timed out yet".to_string(),
                    None => String::new(),
                };
                f.push(Finding::problem(
                    "handshake",
                    format!(
                        "{} peer {key} ({ep}): no response from peer: last handshake {age_s}{t}; \
                         the peer is down, its port blocked, or it does not know our key",
                        dev.name
                    ),
                    format!(
                        "check the path and the peer: ping -c 3 {}; nft list ruleset | grep -n {}; \
                         then on the peer: wg show (our public key must be listed)",
                        ep.ip(),
                        ep.port()
                    ),
                ));
            } else if let Some(a) = age {
                f.push(Finding::ok(
                    "handshake",
                    format!(
                        "{} peer {key}: last handshake {} s ago",
                        dev.name,
                        a.as_secs()
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_heuristic() {
        for a in [
            "10.1.2.3",
            "192.168.1.2",
            "172.16.0.1",
            "100.64.0.1",
            "198.51.100.2",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(behind_nat(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "185.65.135.1", "100.128.0.1", "2a03:1b20::1"] {
            assert!(!behind_nat(a.parse().unwrap()), "{a}");
        }
        assert!(keepalive_problem(None, true).is_some());
        assert!(keepalive_problem(Some(0), true).is_some());
        assert!(keepalive_problem(Some(60), true).is_some());
        assert!(keepalive_problem(Some(25), true).is_none());
        assert!(keepalive_problem(None, false).is_none());
    }
}
