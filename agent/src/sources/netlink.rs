//! The rtnetlink questions the agent asks: which links exist, and which interface a route
//! to an address leaves through.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage},
    route::{RouteAttribute, RouteMessage},
};
use rtnetlink::{Handle, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening an rtnetlink socket failed: {0}")]
    Socket(#[source] std::io::Error),
    #[error("rtnetlink {what} failed: {source}")]
    Request {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// A network interface in the agent's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "wireguard", "tun", "veth", ...
    pub kind: Option<String>,
    pub mtu: u32,
    /// Packets start at the IP header (no Ethernet header) on this link type.
    pub l3: bool,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// With a carrier (IFF_LOWER_UP): for a TUN device, a process holds it open.
    pub carrier: bool,
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Must be called inside a tokio runtime: the connection runs as a task.
    pub fn new() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "link dump",
                source,
            })?;
        Ok(msgs.iter().map(link_from_message).collect())
    }

    /// The interface the kernel would send a packet to `dst` through (`ip route get DST`).
    pub async fn route_oif(&self, dst: IpAddr) -> Result<Option<u32>, NetlinkError> {
        let msg = match dst {
            IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let routes: Vec<RouteMessage> =
            match self.handle.route().get(msg).execute().try_collect().await {
                Ok(r) => r,
                // No route (ENETUNREACH and friends) is an answer, not a failure.
                Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
                Err(source) => {
                    return Err(NetlinkError::Request {
                        what: "route lookup",
                        source,
                    });
                }
            };
        Ok(routes.iter().find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }))
    }
}

fn link_from_message(m: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut kind = None;
    let mut mtu = 0;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        kind = Some(kind_name(k));
                    }
                }
            }
            _ => {}
        }
    }
    Link {
        index: m.header.index,
        name,
        kind,
        mtu,
        // TC sees an Ethernet header only on Ethernet-like links (loopback has a zeroed one).
        l3: !matches!(
            m.header.link_layer_type,
            LinkLayerType::Ether | LinkLayerType::Loopback
        ),
        up: m.header.flags.contains(LinkFlags::Up),
        carrier: m.header.flags.contains(LinkFlags::LowerUp),
    }
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Wireguard => "wireguard".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}
