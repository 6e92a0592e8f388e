//! The wire role's maps (agent-ebpf wire.rs): the peers' endpoints and the local listen
//! ports that make a UDP datagram on an underlay WireGuard, and `UNKNOWN_WIRE`, the
//! WireGuard traffic whose endpoint matches no known peer. Its counts per known peer go to
//! `COUNTERS` ([`super::tunnel`]) under the message kinds, and so does the total of the
//! unknown endpoints (peer `PEER_UNKNOWN`), per interface, kind and direction: anyone can
//! send WireGuard-shaped datagrams to a listen port, so `UNKNOWN_WIRE` is an LRU map that
//! evicts its stalest endpoints, and that total keeps what it evicted.

use std::{
    collections::HashMap as StdHashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::maps::{
    Counter, map_error, names, wire::Endpoint, wire::MAX_ENDPOINTS, wire::MAX_UNKNOWN_WIRE,
    wire::MAX_WG_PORTS, wire::UnknownWireKey,
};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap},
};

use super::{
    DatapathError, PeerMaps,
    maps::{
        Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, apply, remove_each, sum_per_cpu, take,
    },
};

pub struct WireMaps {
    endpoints: HashMap<MapData, Endpoint, u32>,
    wg_ports: HashMap<MapData, u16, u8>,
    /// `BPF_MAP_TYPE_LRU_PERCPU_HASH`, which aya reads as a per-CPU hash map.
    unknown_wire: PerCpuHashMap<MapData, UnknownWireKey, Counter>,
    /// What was last written, so a sync only touches what changed.
    applied_endpoints: StdHashMap<Endpoint, u32>,
    applied_ports: StdHashMap<u16, u8>,
    /// Each unknown endpoint's counts and since when they have not changed, as
    /// [`WireMaps::expire_strangers`] last read them.
    strangers_seen: StdHashMap<UnknownWireKey, (Counter, Instant)>,
    errors: Arc<ErrorSlots>,
}

impl WireMaps {
    pub(crate) fn take(ebpf: &mut Ebpf, errors: Arc<ErrorSlots>) -> Result<Self, DatapathError> {
        Ok(Self {
            endpoints: take(ebpf, names::ENDPOINTS)?,
            wg_ports: take(ebpf, names::WG_PORTS)?,
            unknown_wire: take(ebpf, names::UNKNOWN_WIRE)?,
            applied_endpoints: StdHashMap::new(),
            applied_ports: StdHashMap::new(),
            strangers_seen: StdHashMap::new(),
            errors,
        })
    }

    /// Brings the endpoints and listen ports to `want`; returns each map's first refusal.
    pub(crate) fn sync(&mut self, want: &PeerMaps) -> [Result<(), DatapathError>; 2] {
        let (eps, ports) = (&mut self.endpoints, &mut self.wg_ports);
        [
            apply(
                &mut self.applied_endpoints,
                &want.endpoints,
                |k, v| match v {
                    Some(v) => eps.insert(k, v, 0),
                    None => eps.remove(k),
                },
            )
            .map_err(DatapathError::map(names::ENDPOINTS)),
            apply(&mut self.applied_ports, &want.wg_ports, |k, v| match v {
                Some(v) => ports.insert(k, v, 0),
                None => ports.remove(k),
            })
            .map_err(DatapathError::map(names::WG_PORTS)),
        ]
    }

    /// WireGuard traffic from or to endpoints of no known peer, summed over CPUs; each
    /// endpoint once.
    pub fn unknown_wire(&self) -> Result<Vec<(UnknownWireKey, Counter)>, DatapathError> {
        // The kernel's walk starts over when the key it stands on was evicted meanwhile
        // (BPF_MAP_GET_NEXT_KEY of a missing key gives the first one), which the LRU does
        // under a stream of strangers: an endpoint read twice counts once, as its later read.
        let once: StdHashMap<UnknownWireKey, Counter> =
            sum_per_cpu(&self.unknown_wire, names::UNKNOWN_WIRE)?
                .into_iter()
                .collect();
        Ok(once.into_iter().collect())
    }

    /// Removes the `UNKNOWN_WIRE` entries whose counts have not changed for `idle`, as far as
    /// these calls tell (an entry first read now is silent from now on). What a removed
    /// entry counted stays in its interface's total in `COUNTERS` and is exported under
    /// `endpoint:other`, as an evicted one's is; a message counted between the read and the
    /// removal goes there too. Returns how many went.
    pub fn expire_strangers(&mut self, now: Instant, idle: Duration) -> Result<u64, DatapathError> {
        let mut doomed = Vec::new();
        let mut seen = StdHashMap::new();
        for (key, counts) in self.unknown_wire()? {
            let since = match self.strangers_seen.get(&key) {
                Some((was, since)) if *was == counts => *since,
                _ => now,
            };
            if now.saturating_duration_since(since) >= idle {
                doomed.push(key);
            } else {
                seen.insert(key, (counts, since));
            }
        }
        self.strangers_seen = seen;
        let m = &mut self.unknown_wire;
        remove_each(doomed, names::UNKNOWN_WIRE, |k| m.remove(k))
    }
}

impl FeatureMaps for WireMaps {
    /// Nothing here is kept per peer.
    fn forget_peers(
        &mut self,
        _ids: &std::collections::HashSet<u32>,
    ) -> Result<u64, DatapathError> {
        Ok(0)
    }

    fn clear(&mut self) -> Result<(), DatapathError> {
        self.endpoints.clear(names::ENDPOINTS)?;
        self.wg_ports.clear(names::WG_PORTS)?;
        self.unknown_wire.clear(names::UNKNOWN_WIRE)?;
        self.applied_endpoints.clear();
        self.applied_ports.clear();
        self.strangers_seen.clear();
        Ok(())
    }

    fn usage(&self) -> Vec<MapUsage> {
        vec![
            (
                names::ENDPOINTS,
                self.applied_endpoints.len() as u64,
                MAX_ENDPOINTS as u64,
            ),
            (
                names::WG_PORTS,
                self.applied_ports.len() as u64,
                MAX_WG_PORTS as u64,
            ),
            (
                names::UNKNOWN_WIRE,
                self.unknown_wire.entries(),
                MAX_UNKNOWN_WIRE as u64,
            ),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors
            .list(&[(map_error::UNKNOWN_WIRE, names::UNKNOWN_WIRE)])
    }
}

/// The socket address of an endpoint key.
pub fn endpoint_addr(e: &Endpoint) -> SocketAddr {
    let ip: std::net::IpAddr = if e.family == 4 {
        std::net::Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]).into()
    } else {
        std::net::Ipv6Addr::from(e.addr).into()
    };
    SocketAddr::new(ip, e.port)
}
