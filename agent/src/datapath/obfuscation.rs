//! Obfuscation carriers (agent-ebpf obfuscation.rs): the remote endpoints of the obfuscation
//! flows with the peer each carries (`OBFS_ENDPOINTS`, and their number in `OBFS_CFG`, which
//! lets the programs skip the lookup while there are none), and the flows' packets and bytes
//! per (tunnel interface, peer, kind, direction) (`OBFS_COUNTERS`). Which flow carries which
//! peer is the sync loop's call (sync/obfuscation.rs); this module only writes it.

use std::collections::{HashMap as StdHashMap, HashSet};

use agent_common::maps::{
    Counter,
    obfuscation::{
        MAX_OBFS_COUNTERS, MAX_OBFS_ENDPOINTS, OBFS_CFG, OBFS_COUNTERS, OBFS_ENDPOINTS,
        OBFS_ERRORS, ObfsEndpoint, ObfsKey, ObfsTarget, error,
    },
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuHashMap},
};

use super::{
    DatapathError,
    maps::{Entries, ErrorSlots, FeatureMaps, MapUsage, apply, forget_keys, sum_per_cpu, take},
};

pub struct ObfuscationMaps {
    endpoints: HashMap<MapData, ObfsEndpoint, ObfsTarget>,
    cfg: Array<MapData, u32>,
    counters: PerCpuHashMap<MapData, ObfsKey, Counter>,
    errors: ErrorSlots,
    /// What `OBFS_ENDPOINTS` holds, so a sync only touches what changed.
    applied: StdHashMap<ObfsEndpoint, ObfsTarget>,
    /// What `OBFS_CFG` holds.
    applied_count: Option<u32>,
}

impl ObfuscationMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            endpoints: take(ebpf, OBFS_ENDPOINTS)?,
            cfg: take(ebpf, OBFS_CFG)?,
            counters: take(ebpf, OBFS_COUNTERS)?,
            errors: ErrorSlots(take(ebpf, OBFS_ERRORS)?),
            applied: StdHashMap::new(),
            applied_count: None,
        })
    }

    /// Brings `OBFS_ENDPOINTS` to `want`, then `OBFS_CFG` to the number of entries it
    /// holds (entries before the count, so the programs never look into a map the count
    /// says is empty while it is not, for more than a moment).
    pub(crate) fn sync(
        &mut self,
        want: &StdHashMap<ObfsEndpoint, ObfsTarget>,
    ) -> Result<(), DatapathError> {
        let eps = &mut self.endpoints;
        let written = apply(&mut self.applied, want, |k, v| match v {
            Some(v) => eps.insert(k, v, 0),
            None => eps.remove(k),
        })
        .map_err(DatapathError::map(OBFS_ENDPOINTS));
        let count = self.applied.len() as u32;
        if self.applied_count != Some(count) {
            self.cfg
                .set(0, count, 0)
                .map_err(DatapathError::map(OBFS_CFG))?;
            self.applied_count = Some(count);
        }
        written
    }

    /// Packets and bytes per (tunnel ifindex, peer, kind, direction), summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(ObfsKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.counters, OBFS_COUNTERS)
    }
}

impl FeatureMaps for ObfuscationMaps {
    /// Their flows' counters; `OBFS_ENDPOINTS` follows the sync's flows, which name no
    /// forgotten peer.
    fn forget_peers(&mut self, ids: &HashSet<u32>) -> Result<u64, DatapathError> {
        forget_keys(&mut self.counters, OBFS_COUNTERS, ids, |k: &ObfsKey| k.peer)
    }

    fn clear(&mut self) -> Result<(), DatapathError> {
        use super::maps::Clear as _;
        self.endpoints.clear(OBFS_ENDPOINTS)?;
        self.cfg.clear(OBFS_CFG)?;
        self.counters.clear(OBFS_COUNTERS)?;
        self.errors.clear(OBFS_ERRORS)?;
        self.applied.clear();
        self.applied_count = None;
        Ok(())
    }

    fn usage(&self) -> Vec<MapUsage> {
        vec![
            (
                OBFS_ENDPOINTS,
                self.applied.len() as u64,
                MAX_OBFS_ENDPOINTS as u64,
            ),
            (
                OBFS_COUNTERS,
                self.counters.entries(),
                MAX_OBFS_COUNTERS as u64,
            ),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors.list(&[(error::OBFS_COUNTERS, OBFS_COUNTERS)])
    }
}
