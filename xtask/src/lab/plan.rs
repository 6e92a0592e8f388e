//! The lab's names and addresses, worked out from its configuration before anything is
//! created. Everything here is pure, so it is unit-tested without root.
//!
//! Hosts form a chain, client first: `client [hop] relay` (single) or
//! `client [hop] entry exit` (multihop). Link i joins chain[i] and chain[i+1]; the host on the
//! client side of a link gets `.2`, the other `.1`, on these TEST-NET style /24s in order:
//! 198.51.100.0/24 (from the client), 192.0.2.0/24 (hop to first relay, only with a hop),
//! 203.0.113.0/24 (entry to exit).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, bail};

use super::{Host, Lab, LabConfig, PeerConf, Role, Topology, Veth, WgHost};

/// The in-tunnel gateway owned by the relay (the exit relay in multihop), as on Mullvad.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xbbbb, 0xbbbb, 0xbb01, 0, 0, 0, 1);
/// The client's tunnel addresses.
pub const CLIENT_TUNNEL_V4: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 2);
pub const CLIENT_TUNNEL_V6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xbbbb, 0xbbbb, 0xbb01, 0, 0, 1, 2);
/// What the client routes into its tunnel (it keeps its default route on the veth).
pub const TUNNEL_NET_V4: &str = "10.64.0.0/10";
pub const TUNNEL_NET_V6: &str = "fc00:bbbb:bbbb:bb01::/64";
/// Listen port of every relay, and of the client.
pub const RELAY_PORT: u16 = 51820;
pub const CLIENT_PORT: u16 = 40001;
/// The entry relay's wg MTU is the client's plus this, so that it can carry exit-layer
/// packets back to the client.
pub const ENTRY_MTU_EXTRA: u32 = 80;
/// Routing table the exit relay uses for its own WireGuard replies (multihop).
pub const EXIT_REPLY_TABLE: u32 = 100;

pub const DEFAULT_PREFIX: &str = "ws";
pub const DEFAULT_WG_MTU: u32 = 1420;
pub const DEFAULT_VETH_MTU: u32 = 1500;
/// Longest prefix: veth names are PREFIX + 3 characters and must fit in 15.
pub const MAX_PREFIX_LEN: usize = 10;

const SUBNET_FROM_CLIENT: [u8; 3] = [198, 51, 100];
const SUBNET_HOP_RELAY: [u8; 3] = [192, 0, 2];
const SUBNET_ENTRY_EXIT: [u8; 3] = [203, 0, 113];

impl Role {
    /// Namespace name is `PREFIX-SUFFIX`.
    pub fn ns_suffix(self) -> &'static str {
        match self {
            Role::Client => "cli",
            Role::Hop => "hop",
            Role::Relay => "relay",
            Role::Entry => "entry",
            Role::Exit => "exit",
        }
    }

    /// One letter used in interface names.
    pub fn letter(self) -> char {
        match self {
            Role::Client => 'c',
            Role::Hop => 'h',
            Role::Relay => 'r',
            Role::Entry => 'e',
            Role::Exit => 'x',
        }
    }

    pub const ALL: [Role; 5] = [
        Role::Client,
        Role::Hop,
        Role::Relay,
        Role::Entry,
        Role::Exit,
    ];
}

pub fn ns_name(prefix: &str, role: Role) -> String {
    format!("{prefix}-{}", role.ns_suffix())
}

/// WireGuard interface of a host: PREFIX + letter + `0`, e.g. `wsc0`.
pub fn wg_iface(prefix: &str, role: Role) -> String {
    format!("{prefix}{}0", role.letter())
}

/// The end of a veth in `host` that faces `other`: PREFIX + letter + `-` + letter, e.g. `wsc-e`.
pub fn veth_name(prefix: &str, host: Role, other: Role) -> String {
    format!("{prefix}{}-{}", host.letter(), other.letter())
}

/// True for every interface name a lab with this prefix can create (wg or veth).
pub fn is_lab_iface(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let letters: Vec<char> = Role::ALL.iter().map(|r| r.letter()).collect();
    let c: Vec<char> = rest.chars().collect();
    match c.as_slice() {
        [a, '0'] => letters.contains(a),
        [a, '-', b] => letters.contains(a) && letters.contains(b),
        _ => false,
    }
}

/// Prefixes are 1 to 10 characters, lowercase ASCII letters and digits, starting with a
/// letter (no `-`, so `PREFIX-*` namespaces belong to exactly one prefix).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok {
        bail!(
            "bad lab prefix {prefix:?}: use 1 to {MAX_PREFIX_LEN} lowercase letters or digits, \
             starting with a letter (e.g. `ws`), so that interface names fit in 15 characters"
        );
    }
    Ok(())
}

fn addr(subnet: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host)
}

fn cidr4(a: Ipv4Addr, len: u8) -> String {
    format!("{a}/{len}")
}

fn cidr6(a: Ipv6Addr, len: u8) -> String {
    format!("{a}/{len}")
}

/// Works out every name, address, peer and route of the lab; keys and pids stay empty.
pub fn plan(cfg: &LabConfig) -> Result<Lab> {
    validate_prefix(&cfg.prefix)?;
    if cfg.wg_mtu < 1280 || cfg.veth_mtu < 1280 {
        bail!(
            "MTU too small (wg {} / veth {}): at least 1280 is needed for IPv6 in the tunnel",
            cfg.wg_mtu,
            cfg.veth_mtu
        );
    }
    if let Some(mtu) = cfg.path_mtu {
        if !cfg.hop {
            bail!("a path MTU ({mtu}) needs the hop (`--hop`): the hop is the router that has it");
        }
        if !(576..cfg.veth_mtu).contains(&mtu) {
            bail!(
                "path MTU {mtu}: use at least 576 and less than the veth MTU {}",
                cfg.veth_mtu
            );
        }
    }
    let p = cfg.prefix.as_str();
    let mut chain = vec![Role::Client];
    if cfg.hop {
        chain.push(Role::Hop);
    }
    match cfg.topology {
        Topology::Single => chain.push(Role::Relay),
        Topology::Multihop => chain.extend([Role::Entry, Role::Exit]),
    }
    let mut subnets = vec![SUBNET_FROM_CLIENT];
    if cfg.hop {
        subnets.push(SUBNET_HOP_RELAY);
    }
    if cfg.topology == Topology::Multihop {
        subnets.push(SUBNET_ENTRY_EXIT);
    }

    let mut hosts: Vec<Host> = chain
        .iter()
        .map(|&role| Host {
            role,
            netns: ns_name(p, role),
            veths: Vec::new(),
            ip_forward: matches!(role, Role::Hop | Role::Entry),
            wg: None,
            routes: Vec::new(),
        })
        .collect();

    for (i, subnet) in subnets.iter().enumerate() {
        let (left, right) = (chain[i], chain[i + 1]);
        let (la, ra) = (addr(*subnet, 2), addr(*subnet, 1));
        let (ln, rn) = (veth_name(p, left, right), veth_name(p, right, left));
        let (lns, rns) = (hosts[i].netns.clone(), hosts[i + 1].netns.clone());
        hosts[i].veths.push(Veth {
            name: ln.clone(),
            address: la,
            prefix_len: 24,
            peer_netns: rns,
            peer_name: rn.clone(),
            peer_address: ra,
        });
        hosts[i + 1].veths.push(Veth {
            name: rn,
            address: ra,
            prefix_len: 24,
            peer_netns: lns,
            peer_name: ln,
            peer_address: la,
        });
    }

    // The address other hosts reach a host at: its client-side veth (the only one for the
    // client).
    let addr_of = |hosts: &[Host], role: Role| -> Ipv4Addr {
        hosts
            .iter()
            .find(|h| h.role == role)
            .expect("role in chain")
            .veths[0]
            .address
    };
    let client_v4 = cidr4(CLIENT_TUNNEL_V4, 32);
    let client_v6 = cidr6(CLIENT_TUNNEL_V6, 128);
    let any = vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()];
    let wg = |role: Role, port: u16, addresses: Vec<String>, peers: Vec<PeerConf>| WgHost {
        iface: wg_iface(p, role),
        public_key: String::new(),
        private_key: Default::default(),
        listen_port: port,
        addresses,
        mtu: cfg.wg_mtu,
        pid: 0,
        peers,
    };
    let gateway_addrs = vec![cidr4(GATEWAY_V4, 32), cidr6(GATEWAY_V6, 128)];
    let client_ifc = wg_iface(p, Role::Client);
    let client_veth = hosts[0].veths[0].clone();
    let first_relay = chain[if cfg.hop { 2 } else { 1 }];
    let first_relay_ip = addr_of(&hosts, first_relay);

    // Client: default route on its veth; the tunnel nets (and in multihop the exit relay's
    // address, so that exit-layer WireGuard UDP goes through the entry peer) on wg.
    let mut client_routes = vec![
        format!(
            "route add default via {} dev {}",
            client_veth.peer_address, client_veth.name
        ),
        format!("route add {TUNNEL_NET_V4} dev {client_ifc} src {CLIENT_TUNNEL_V4}"),
        format!("-6 route add {TUNNEL_NET_V6} dev {client_ifc}"),
    ];
    if cfg.hop {
        client_routes.push(format!(
            "route add {first_relay_ip}/32 via {} dev {}",
            client_veth.peer_address, client_veth.name
        ));
    }
    let client_peers = match cfg.topology {
        Topology::Single => vec![PeerConf {
            role: Role::Relay,
            public_key: String::new(),
            endpoint: Some(SocketAddr::new(first_relay_ip.into(), RELAY_PORT)),
            allowed_ips: any.clone(),
        }],
        Topology::Multihop => {
            let exit_ip = addr_of(&hosts, Role::Exit);
            client_routes.push(format!("route add {exit_ip}/32 dev {client_ifc}"));
            vec![
                PeerConf {
                    role: Role::Entry,
                    public_key: String::new(),
                    endpoint: Some(SocketAddr::new(first_relay_ip.into(), RELAY_PORT)),
                    allowed_ips: vec![cidr4(exit_ip, 32)],
                },
                PeerConf {
                    role: Role::Exit,
                    public_key: String::new(),
                    endpoint: Some(SocketAddr::new(exit_ip.into(), RELAY_PORT)),
                    allowed_ips: any.clone(),
                },
            ]
        }
    };
    hosts[0].wg = Some(wg(
        Role::Client,
        CLIENT_PORT,
        vec![client_v4.clone(), client_v6.clone()],
        client_peers,
    ));
    hosts[0].routes = client_routes;

    let client_peer = |allowed: Vec<String>| PeerConf {
        role: Role::Client,
        public_key: String::new(),
        endpoint: None,
        allowed_ips: allowed,
    };
    for host in hosts.iter_mut().skip(1) {
        let role = host.role;
        let ifc = wg_iface(p, role);
        let mut routes = Vec::new();
        // A relay behind the hop reaches the client's subnet through the hop.
        if cfg.hop && role == first_relay {
            let hop_side = host.veths[0].clone();
            routes.push(format!(
                "route add {}.0/24 via {} dev {}",
                SUBNET_FROM_CLIENT.map(|b| b.to_string()).join("."),
                hop_side.peer_address,
                hop_side.name
            ));
        }
        match role {
            Role::Hop | Role::Client => {}
            Role::Relay => {
                host.wg = Some(wg(
                    role,
                    RELAY_PORT,
                    gateway_addrs.clone(),
                    vec![client_peer(vec![client_v4.clone(), client_v6.clone()])],
                ));
                routes.push(format!("route add {client_v4} dev {ifc} src {GATEWAY_V4}"));
                routes.push(format!("-6 route add {client_v6} dev {ifc}"));
            }
            Role::Entry => {
                // Forwards the exit layer: decrypted packets from the client leave towards
                // the exit over the second veth; the exit's replies to the client's tunnel
                // address come back through wg. Those replies are whole exit-layer packets,
                // up to the client's MTU plus one WireGuard encapsulation (IPv6 outer: 40 + 8
                // + 32 bytes), sent with DF: a tunnel MTU like the client's would drop them.
                let mut entry_wg = wg(
                    role,
                    RELAY_PORT,
                    Vec::new(),
                    vec![client_peer(vec![client_v4.clone()])],
                );
                entry_wg.mtu = cfg.wg_mtu + ENTRY_MTU_EXTRA;
                host.wg = Some(entry_wg);
                routes.push(format!("route add {client_v4} dev {ifc}"));
            }
            Role::Exit => {
                host.wg = Some(wg(
                    role,
                    RELAY_PORT,
                    gateway_addrs.clone(),
                    vec![client_peer(vec![client_v4.clone(), client_v6.clone()])],
                ));
                routes.push(format!("route add {client_v4} dev {ifc} src {GATEWAY_V4}"));
                routes.push(format!("-6 route add {client_v6} dev {ifc}"));
                // The exit learns the client's endpoint as 10.64.1.2:40001 (the entry relay
                // forwards the client's tunnel packets unchanged, without NAT). The main table
                // sends 10.64.1.2 into wg, which would wrap the exit's own WireGuard replies
                // again; so UDP from port 51820 looks up a table that sends the tunnel net
                // back to the entry relay over the veth. (Policy routing rather than
                // masquerading on the entry keeps the client's tunnel address visible on the
                // exit, as on Mullvad, and needs no nftables.)
                let veth = host.veths[0].clone();
                routes.push(format!(
                    "route add {TUNNEL_NET_V4} via {} dev {} table {EXIT_REPLY_TABLE}",
                    veth.peer_address, veth.name
                ));
                routes.push(format!(
                    "rule add ipproto udp sport {RELAY_PORT} lookup {EXIT_REPLY_TABLE} priority 100"
                ));
            }
        }
        host.routes = routes;
    }

    Ok(Lab {
        prefix: cfg.prefix.clone(),
        topology: cfg.topology,
        wg_mtu: cfg.wg_mtu,
        veth_mtu: cfg.veth_mtu,
        wireguard: cfg.wireguard,
        hosts,
        path_mtu: cfg.path_mtu,
        impairment: None,
        owned: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(topology: Topology, hop: bool) -> LabConfig {
        LabConfig {
            topology,
            prefix: "ws".into(),
            hop,
            ..LabConfig::default()
        }
    }

    #[test]
    fn names() {
        assert_eq!(ns_name("ws", Role::Client), "ws-cli");
        assert_eq!(wg_iface("ws", Role::Exit), "wsx0");
        assert_eq!(veth_name("ws", Role::Client, Role::Entry), "wsc-e");
        assert!(is_lab_iface("ws", "wsc0"));
        assert!(is_lab_iface("ws", "wse-x"));
        assert!(!is_lab_iface("ws", "wsac0"));
        assert!(!is_lab_iface("ws", "wsz0"));
        assert!(!is_lab_iface("ws", "eth0"));
        assert!(!is_lab_iface("wsa", "wsc0"));
    }

    #[test]
    fn prefixes() {
        assert!(validate_prefix("ws").is_ok());
        assert!(validate_prefix("wst2").is_ok());
        for bad in ["", "Ws", "2ws", "w-s", "abcdefghijk"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
        // The longest prefix still gives names within IFNAMSIZ - 1.
        let p = "a".repeat(MAX_PREFIX_LEN);
        assert!(veth_name(&p, Role::Entry, Role::Exit).len() <= 15);
    }

    #[test]
    fn single() {
        let lab = plan(&cfg(Topology::Single, false)).unwrap();
        let ns: Vec<&str> = lab.hosts.iter().map(|h| h.netns.as_str()).collect();
        assert_eq!(ns, ["ws-cli", "ws-relay"]);
        let c = lab.client();
        assert_eq!(c.veths[0].name, "wsc-r");
        assert_eq!(c.veths[0].address, Ipv4Addr::new(198, 51, 100, 2));
        let w = c.wg();
        assert_eq!(w.iface, "wsc0");
        assert_eq!(w.listen_port, CLIENT_PORT);
        assert_eq!(
            w.addresses,
            ["10.64.1.2/32", "fc00:bbbb:bbbb:bb01::1:2/128"]
        );
        assert_eq!(w.peers.len(), 1);
        assert_eq!(
            w.peers[0].endpoint,
            Some("198.51.100.1:51820".parse().unwrap())
        );
        assert_eq!(w.peers[0].allowed_ips, ["0.0.0.0/0", "::/0"]);
        let r = lab.exit();
        assert_eq!(r.role, Role::Relay);
        assert_eq!(r.wg().iface, "wsr0");
        assert_eq!(
            r.wg().addresses,
            ["10.64.0.1/32", "fc00:bbbb:bbbb:bb01::1/128"]
        );
        assert_eq!(
            r.wg().peers[0].allowed_ips,
            ["10.64.1.2/32", "fc00:bbbb:bbbb:bb01::1:2/128"]
        );
        assert!(lab.entry().is_none());
        assert_eq!(lab.exit_endpoint(), "198.51.100.1:51820".parse().unwrap());
    }

    #[test]
    fn multihop() {
        let lab = plan(&cfg(Topology::Multihop, false)).unwrap();
        let ns: Vec<&str> = lab.hosts.iter().map(|h| h.netns.as_str()).collect();
        assert_eq!(ns, ["ws-cli", "ws-entry", "ws-exit"]);
        let entry = lab.entry().unwrap();
        assert!(entry.ip_forward);
        assert_eq!(entry.wg().mtu, 1500);
        assert_eq!(lab.client().wg().mtu, 1420);
        assert_eq!(entry.veths.len(), 2);
        assert_eq!(entry.veths[1].name, "wse-x");
        let exit_ip = lab.exit().address();
        assert_eq!(exit_ip, Ipv4Addr::new(203, 0, 113, 1));
        let cw = lab.client().wg();
        assert_eq!(cw.peers[0].role, Role::Entry);
        assert_eq!(cw.peers[0].allowed_ips, ["203.0.113.1/32"]);
        assert_eq!(
            cw.peers[1].endpoint,
            Some("203.0.113.1:51820".parse().unwrap())
        );
        assert!(
            lab.client()
                .routes
                .contains(&"route add 203.0.113.1/32 dev wsc0".to_owned())
        );
        assert!(
            lab.exit()
                .routes
                .contains(&"route add 10.64.0.0/10 via 203.0.113.2 dev wsx-e table 100".into())
        );
        assert_eq!(lab.entry_endpoint(), "198.51.100.1:51820".parse().unwrap());
    }

    #[test]
    fn hop_in_between() {
        let lab = plan(&cfg(Topology::Multihop, true)).unwrap();
        let ns: Vec<&str> = lab.hosts.iter().map(|h| h.netns.as_str()).collect();
        assert_eq!(ns, ["ws-cli", "ws-hop", "ws-entry", "ws-exit"]);
        assert!(lab.hop().unwrap().wg.is_none());
        assert_eq!(lab.entry().unwrap().address(), Ipv4Addr::new(192, 0, 2, 1));
        assert!(
            lab.entry()
                .unwrap()
                .routes
                .contains(&"route add 198.51.100.0/24 via 192.0.2.2 dev wse-h".into())
        );
        assert!(
            lab.client()
                .routes
                .contains(&"route add 192.0.2.1/32 via 198.51.100.1 dev wsc-h".into())
        );
        assert_eq!(lab.hop_onward().unwrap().name, "wsh-e");
        assert_eq!(lab.path_mtu, None);
    }

    #[test]
    fn path_mtu_needs_the_hop_and_fits() {
        let mut c = cfg(Topology::Single, true);
        c.path_mtu = Some(1400);
        let lab = plan(&c).unwrap();
        assert_eq!(lab.path_mtu, Some(1400));
        assert_eq!(lab.hop_onward().unwrap().peer_name, "wsr-h");
        assert!(lab.summary().contains("path MTU 1400 on wsh-r <-> wsr-h"));
        c.path_mtu = Some(1500);
        assert!(plan(&c).is_err());
        c.path_mtu = Some(500);
        assert!(plan(&c).is_err());
        let mut c = cfg(Topology::Single, false);
        c.path_mtu = Some(1400);
        assert!(plan(&c).is_err());
    }
}
