//! The relay placed in the lab ([`Place`]): [`Lab::start_impairment`] (in the hop) and
//! [`Lab::start_impairment_at`] start it in the hop or in front of the exit relay, point the
//! client's peer endpoint (and, between the relays, its allowed IPs and route) at it, and
//! return an [`ImpairHandle`] that puts everything back when dropped.

use std::net::SocketAddr;

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};

use super::{ImpairStats, Impairer, Impairment};
use crate::lab::{Lab, RELAY_PORT, Role, WgImpl};
use crate::netns;

/// Where in the lab the impairing relay sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    /// In the hop namespace (needs `LabConfig::hop`), between the client and the first relay
    /// (entry, or the single relay): the client's peer endpoint of that relay is pointed at
    /// the hop's client-side address, port 51820; the relay then sees the client at the hop's
    /// other address. All of the client's WireGuard to that relay goes through it: in
    /// multihop, the entry layer, which carries the exit layer.
    Hop,
    /// Multihop only, in the entry namespace in front of the exit relay, on the entry's
    /// exit-side address port 51821: the client's exit peer endpoint points there, and the
    /// client's entry peer gets that address in its allowed IPs (and a route into wg), so the
    /// exit layer reaches it through the entry tunnel; the relay forwards it to the exit from
    /// its own socket. Only the exit layer goes through it: a delay here lengthens the exit
    /// peer's round trips and not the entry peer's. No new namespace and no change to the lab's
    /// addresses; everything is undone when the handle drops.
    Relays,
}

/// The port the relay listens on with [`Place::Relays`] (the entry's WireGuard has 51820).
pub const RELAYS_PORT: u16 = 51821;

/// A running impairing relay in a lab, see [`Lab::start_impairment`]. Use it like the
/// [`Impairer`] it derefs to (`set`, `stats`). Dropping it puts the client's configuration
/// back and stops the relay (threads and sockets gone).
pub struct ImpairHandle {
    relay: Option<Impairer>,
    place: Place,
    /// What undoes the client's changes (in order), in the client's namespace.
    undo: Vec<Change>,
    client: Client,
}

/// The client's tunnel, where the changes are made.
struct Client {
    netns: String,
    iface: String,
    wireguard: WgImpl,
}

/// One change to the client's configuration.
enum Change {
    /// A command (`ip route ...`).
    Exec(String),
    /// `wg set IFACE peer KEY ARGS` (see [`WgImpl::set_peer`]: boringtun re-adds the peer).
    Peer { key: String, args: String },
}

impl Change {
    fn apply(&self, c: &Client) -> Result<()> {
        match self {
            Change::Exec(cmd) => netns::exec(&c.netns, &argv(cmd)).map(|_| ()),
            Change::Peer { key, args } => {
                let args = argv(args);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                c.wireguard.set_peer(&c.netns, &c.iface, key, &args)
            }
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Exec(cmd) => f.write_str(cmd),
            Change::Peer { key, args } => write!(f, "wg set IFACE peer {key} {args}"),
        }
    }
}

impl std::ops::Deref for ImpairHandle {
    type Target = Impairer;
    fn deref(&self) -> &Impairer {
        self.relay.as_ref().expect("running")
    }
}

impl ImpairHandle {
    pub fn place(&self) -> Place {
        self.place
    }

    /// Restores the client's configuration, stops the relay and returns its counters.
    pub fn stop(mut self) -> Result<ImpairStats> {
        let undone = self.restore();
        let stats = self.relay.take().expect("running").stop();
        undone.map(|()| stats)
    }

    fn restore(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        for change in std::mem::take(&mut self.undo) {
            if let Err(e) = change.apply(&self.client) {
                failed.push(format!("{change}: {e:#}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("undoing the impairment: {}", failed.join("; ")))
        }
    }
}

impl Drop for ImpairHandle {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("{e:#}");
        }
    }
}

fn peer(key: &str, args: String) -> Change {
    Change::Peer {
        key: key.to_owned(),
        args,
    }
}

fn argv(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

impl Lab {
    /// Starts the impairing relay in the hop ([`Place::Hop`]): the lab needs `hop`.
    pub fn start_impairment(&self, rules: Impairment) -> Result<ImpairHandle> {
        self.start_impairment_at(Place::Hop, rules)
    }

    /// Starts the impairing relay at `place` with `rules` (see [`Place`]) and points the
    /// client at it. The client's sessions stay; only its endpoints change (except on
    /// boringtun, which re-adds a changed peer: see [`WgImpl::set_peer`]).
    pub fn start_impairment_at(&self, place: Place, rules: Impairment) -> Result<ImpairHandle> {
        let c = self.client();
        let cw = c.wg();
        let iface = cw.iface.as_str();
        let (ns, listen, upstream, steps): (String, SocketAddr, SocketAddr, Vec<(Change, Change)>) =
            match place {
                Place::Hop => {
                    let hop = self.hop().ok_or_else(|| {
                        anyhow!(
                            "lab `{}` has no hop: the impairing relay needs `--hop` \
                             (LabConfig::hop)",
                            self.prefix
                        )
                    })?;
                    let relay = self.first_relay();
                    let key = &relay.wg().public_key;
                    let listen = SocketAddr::new(hop.address().into(), RELAY_PORT);
                    let upstream = self.entry_endpoint();
                    let steps = vec![(
                        peer(key, format!("endpoint {listen}")),
                        peer(key, format!("endpoint {upstream}")),
                    )];
                    (hop.netns.clone(), listen, upstream, steps)
                }
                Place::Relays => {
                    let entry = self.entry().ok_or_else(|| {
                        anyhow!(
                            "lab `{}` is not multihop: no relays to impair between",
                            self.prefix
                        )
                    })?;
                    let exit = self.exit();
                    let at = entry.veths[1].address;
                    let listen = SocketAddr::new(at.into(), RELAYS_PORT);
                    let upstream = self.exit_endpoint();
                    let entry_peer = cw.peer(Role::Entry).expect("client has the entry peer");
                    let old = entry_peer.allowed_ips.join(",");
                    let (ek, xk) = (&entry.wg().public_key, &exit.wg().public_key);
                    let steps = vec![
                        (
                            peer(ek, format!("allowed-ips {old},{at}/32")),
                            peer(ek, format!("allowed-ips {old}")),
                        ),
                        (
                            Change::Exec(format!("ip route add {at}/32 dev {iface}")),
                            Change::Exec(format!("ip route del {at}/32 dev {iface}")),
                        ),
                        (
                            peer(xk, format!("endpoint {listen}")),
                            peer(xk, format!("endpoint {upstream}")),
                        ),
                    ];
                    (entry.netns.clone(), listen, upstream, steps)
                }
            };
        let relay = Impairer::start(Some(&ns), listen, upstream, rules)
            .with_context(|| format!("lab `{}`: impairing relay in {ns}", self.prefix))?;
        let mut handle = ImpairHandle {
            relay: Some(relay),
            place,
            undo: Vec::new(),
            client: Client {
                netns: c.netns.clone(),
                iface: iface.to_owned(),
                wireguard: self.wireguard,
            },
        };
        for (doit, undo) in steps {
            doit.apply(&handle.client)
                .with_context(|| format!("pointing the client at the impairing relay: {doit}"))?;
            handle.undo.insert(0, undo);
        }
        Ok(handle)
    }
}
