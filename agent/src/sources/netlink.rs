//! The rtnetlink questions the agent asks: which links exist, and which interface a route
//! to an address leaves through.
//!
//! The connection is reopened after a request fails or goes unanswered: netlink-proto
//! closes a connection for good on a socket error or a message it cannot decode, and every
//! later request on it would fail too. Dumps on a connection go one at a time: the kernel
//! answers a second dump on a socket while one runs with EBUSY, or with nothing.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

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
    #[error("rtnetlink {what}: no answer within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
}

/// Deadline of one request. The kernel answers a link dump of thousands of interfaces in
/// milliseconds; past this the connection is taken for broken.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

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

/// Clones share one connection, and reopen it for each other.
#[derive(Clone)]
pub struct Netlink {
    conn: Arc<Mutex<Conn>>,
    /// Held for the length of a dump (see the module doc).
    dump: Arc<tokio::sync::Mutex<()>>,
    timeout: Duration,
}

/// The current connection, and how many were opened before it: a request that failed on
/// connection N reopens only if N is still the current one, so that two requests failing
/// together open one new connection, not two.
struct Conn {
    handle: Handle,
    generation: u64,
}

impl Netlink {
    /// Must be called inside a tokio runtime: the connection runs as a task.
    pub fn new() -> Result<Self, NetlinkError> {
        Ok(Self::with_handle(open()?, REQUEST_TIMEOUT))
    }

    fn with_handle(handle: Handle, timeout: Duration) -> Self {
        Self {
            conn: Arc::new(Mutex::new(Conn {
                handle,
                generation: 0,
            })),
            dump: Arc::default(),
            timeout,
        }
    }

    /// The current connection's handle and generation.
    fn current(&self) -> (Handle, u64) {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        (c.handle.clone(), c.generation)
    }

    /// After a failed request on connection `generation`: a new connection for the next
    /// request. If even the socket cannot be opened (out of file descriptors), the old one
    /// stays and the next failure tries again.
    fn reopen(&self, generation: u64) {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if c.generation != generation {
            return;
        }
        if let Ok(handle) = open() {
            c.handle = handle;
            c.generation = generation.wrapping_add(1);
        }
    }

    /// Runs `request` on the current connection within the deadline; a failure (but
    /// `answer_ok`: an error answer the caller takes as an answer) reopens it.
    async fn run<T, F>(
        &self,
        what: &'static str,
        request: impl FnOnce(Handle) -> F,
        answer_ok: impl FnOnce(&rtnetlink::Error) -> bool,
    ) -> Result<Result<T, rtnetlink::Error>, NetlinkError>
    where
        F: std::future::Future<Output = Result<T, rtnetlink::Error>>,
    {
        let (handle, generation) = self.current();
        match tokio::time::timeout(self.timeout, request(handle)).await {
            Err(_) => {
                self.reopen(generation);
                Err(NetlinkError::Timeout {
                    what,
                    timeout: self.timeout,
                })
            }
            Ok(Ok(v)) => Ok(Ok(v)),
            Ok(Err(e)) if answer_ok(&e) => Ok(Err(e)),
            Ok(Err(source)) => {
                self.reopen(generation);
                Err(NetlinkError::Request { what, source })
            }
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let what = "link dump";
        // Waiting here counts against no deadline: each dump has its own.
        let _one_at_a_time = self.dump.lock().await;
        let msgs: Vec<LinkMessage> = self
            .run(what, |h| h.link().get().execute().try_collect(), |_| false)
            .await?
            .map_err(|source| NetlinkError::Request { what, source })?;
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
        let routes: Vec<RouteMessage> = match self
            .run(
                "route lookup",
                |h| h.route().get(msg).execute().try_collect(),
                // No route (ENETUNREACH and friends) is an answer, not a failure.
                |e| matches!(e, rtnetlink::Error::NetlinkError(_)),
            )
            .await?
        {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        Ok(routes.iter().find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }))
    }
}

/// A new rtnetlink connection, its task spawned on the current runtime.
fn open() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    /// A connection whose task is gone (as when netlink-proto closes it on a socket error)
    /// fails one request; the next one runs on a new connection.
    #[test]
    fn a_closed_connection_is_reopened() {
        let first = runtime();
        let netlink = first.block_on(async { Netlink::new() }).expect("rtnetlink");
        // The connection's task goes with its runtime.
        drop(first);
        let rt = runtime();
        let err = rt
            .block_on(netlink.links())
            .expect_err("a request on the closed connection fails");
        assert!(
            matches!(
                err,
                NetlinkError::Request {
                    source: rtnetlink::Error::RequestFailed,
                    ..
                }
            ),
            "{err}"
        );
        let links = rt.block_on(netlink.links()).expect("the next one succeeds");
        assert!(
            links.iter().any(|l| l.name == "lo" && l.index == 1),
            "the loopback device is listed: {links:?}"
        );
        // And on a clone, which shares the new connection.
        let again = netlink.clone();
        assert_eq!(
            rt.block_on(again.links()).expect("clone").len(),
            links.len()
        );
    }

    /// Dumps asked for at once on one connection all answer, whole: the kernel refuses a
    /// second dump on a socket while one runs (EBUSY), and the path-MTU search, 32 targets
    /// at a time, lost half a relay's endpoints to that.
    #[test]
    fn concurrent_dumps_all_answer() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async {
            let netlink = Netlink::new().expect("rtnetlink");
            let want = netlink.links().await.expect("one dump").len();
            let dumps: Vec<_> = (0..64)
                .map(|_| {
                    let n = netlink.clone();
                    tokio::spawn(async move { n.links().await })
                })
                .collect();
            for d in dumps {
                let links = d.await.expect("task").expect("every dump answers");
                assert_eq!(links.len(), want);
                assert!(links.iter().any(|l| l.name == "lo"));
            }
        });
    }

    /// A connection that never answers (its task not running) times out, and the next
    /// request runs on a new connection.
    #[test]
    fn an_unanswered_request_times_out_and_reopens() {
        let rt = runtime();
        rt.block_on(async {
            // Kept, never polled: requests are queued and never answered.
            let (_conn, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
            let netlink = Netlink::with_handle(handle, Duration::from_millis(200));
            let err = netlink
                .route_oif("127.0.0.1".parse().unwrap())
                .await
                .expect_err("no answer");
            assert!(
                matches!(
                    err,
                    NetlinkError::Timeout {
                        what: "route lookup",
                        ..
                    }
                ),
                "{err}"
            );
            assert_eq!(
                netlink
                    .route_oif("127.0.0.1".parse().unwrap())
                    .await
                    .expect("answered"),
                Some(1),
                "127.0.0.1 leaves through lo"
            );
        });
    }
}
