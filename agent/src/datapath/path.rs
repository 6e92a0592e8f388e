//! The path-MTU signals (agent-ebpf path.rs): fragments per layer, ICMP too-big messages
//! and the MTUs they reported, and the endpoint addresses (any port) that make a fragment
//! `outer`.

use std::collections::HashMap as StdHashMap;

use agent_common::maps::{Counter, CounterKey, wire::Endpoint};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap},
};

use super::{
    DatapathError,
    maps::{
        Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, all_entries, apply, sum_per_cpu, take,
    },
};

/// The maps of the path-MTU signals (agent-ebpf path.rs): fragments per layer,
/// ICMP too-big messages and the MTUs they reported, and the endpoint addresses (any port)
/// that make a fragment `outer`.
pub struct PathMaps {
    fragments: PerCpuHashMap<MapData, CounterKey, Counter>,
    icmp_too_big: PerCpuHashMap<MapData, CounterKey, Counter>,
    icmp_mtu: HashMap<MapData, agent_common::maps::path::MtuKey, u64>,
    endpoint_addrs: HashMap<MapData, Endpoint, u8>,
    errors: ErrorSlots,
    applied_addrs: StdHashMap<Endpoint, u8>,
}

impl PathMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        use agent_common::maps::path;
        Ok(Self {
            fragments: take(ebpf, path::FRAGMENTS)?,
            icmp_too_big: take(ebpf, path::ICMP_TOO_BIG)?,
            icmp_mtu: take(ebpf, path::ICMP_MTU)?,
            endpoint_addrs: take(ebpf, path::ENDPOINT_ADDRS)?,
            errors: ErrorSlots(take(ebpf, path::PATH_ERRORS)?),
            applied_addrs: StdHashMap::new(),
        })
    }

    /// The endpoints' addresses with port 0: a fragment to or from one is `outer`.
    pub(crate) fn sync_endpoint_addrs<'a>(
        &mut self,
        endpoints: impl Iterator<Item = &'a Endpoint>,
    ) -> Result<(), DatapathError> {
        let want: StdHashMap<Endpoint, u8> =
            endpoints.map(|e| (Endpoint { port: 0, ..*e }, 1)).collect();
        let map = &mut self.endpoint_addrs;
        apply(&mut self.applied_addrs, &want, |k, v| match v {
            Some(v) => map.insert(k, v, 0),
            None => map.remove(k),
        })
        .map_err(|source| DatapathError::Map {
            map: agent_common::maps::path::ENDPOINT_ADDRS,
            source,
        })
    }

    /// Fragments per (ifindex, 0, layer, direction), summed over CPUs.
    pub fn fragments(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.fragments, agent_common::maps::path::FRAGMENTS)
    }

    /// ICMP too-big messages per (ifindex, 0, family, rx), summed over CPUs.
    pub fn icmp_too_big(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.icmp_too_big, agent_common::maps::path::ICMP_TOO_BIG)
    }

    /// (ifindex, MTU) -> monotonic time (ns) of the latest report of that MTU.
    pub fn icmp_mtus(&self) -> Vec<(agent_common::maps::path::MtuKey, u64)> {
        all_entries(&self.icmp_mtu)
    }

    /// Lowest MTU per ifindex among those reported at or after `now_ns - MTU_WINDOW_NS`.
    pub fn lowest_mtus(&self, now_ns: u64) -> StdHashMap<u32, u32> {
        lowest_mtus(self.icmp_mtus(), now_ns)
    }

    /// Removes the MTUs not reported within the window; run on every sync tick, so the map
    /// stays bounded. Returns how many went. (A report of the same MTU racing this delete
    /// can be lost; the next report brings it back.)
    pub fn expire(&mut self, now_ns: u64) -> u64 {
        let cutoff = now_ns.saturating_sub(agent_common::maps::path::MTU_WINDOW_NS);
        let old: Vec<_> = self
            .icmp_mtus()
            .into_iter()
            .filter(|(_, t)| *t < cutoff)
            .map(|(k, _)| k)
            .collect();
        old.into_iter()
            .filter(|k| self.icmp_mtu.remove(k).is_ok())
            .count() as u64
    }
}

impl FeatureMaps for PathMaps {
    /// Nothing here is kept per peer.
    fn forget_peers(
        &mut self,
        _ids: &std::collections::HashSet<u32>,
    ) -> Result<u64, DatapathError> {
        Ok(0)
    }

    fn clear(&mut self) -> Result<(), DatapathError> {
        use agent_common::maps::path;
        self.fragments.clear(path::FRAGMENTS)?;
        self.icmp_too_big.clear(path::ICMP_TOO_BIG)?;
        self.icmp_mtu.clear(path::ICMP_MTU)?;
        self.endpoint_addrs.clear(path::ENDPOINT_ADDRS)?;
        self.errors.clear(path::PATH_ERRORS)?;
        self.applied_addrs.clear();
        Ok(())
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        use agent_common::maps::path::{self, error};
        self.errors.list(&[
            (error::FRAGMENTS, path::FRAGMENTS),
            (error::ICMP_TOO_BIG, path::ICMP_TOO_BIG),
            (error::ICMP_MTU, path::ICMP_MTU),
        ])
    }

    fn usage(&self) -> Vec<MapUsage> {
        use agent_common::maps::path::*;
        vec![
            (FRAGMENTS, self.fragments.entries(), MAX_FRAGMENTS as u64),
            (
                ICMP_TOO_BIG,
                self.icmp_too_big.entries(),
                MAX_ICMP_TOO_BIG as u64,
            ),
            (ICMP_MTU, self.icmp_mtu.entries(), MAX_ICMP_MTU as u64),
            (
                ENDPOINT_ADDRS,
                self.applied_addrs.len() as u64,
                MAX_ENDPOINT_ADDRS as u64,
            ),
        ]
    }
}
/// The lowest MTU per ifindex reported at or after `now_ns - MTU_WINDOW_NS`.
pub fn lowest_mtus(
    reports: impl IntoIterator<Item = (agent_common::maps::path::MtuKey, u64)>,
    now_ns: u64,
) -> StdHashMap<u32, u32> {
    let cutoff = now_ns.saturating_sub(agent_common::maps::path::MTU_WINDOW_NS);
    let mut out: StdHashMap<u32, u32> = StdHashMap::new();
    for (k, t) in reports {
        if t < cutoff {
            continue;
        }
        let m = out.entry(k.ifindex).or_insert(k.mtu);
        *m = (*m).min(k.mtu);
    }
    out
}
