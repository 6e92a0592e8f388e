//! Leak detection (agent-ebpf leak.rs): until when the tunnels count as up, the
//! `--leak-allow` CIDRs, and the leaks counted per (interface, kind). When a tunnel counts as
//! up is the sync loop's call (sync/leak.rs); this module only writes it.

use agent_common::maps::Counter;
use aya::{
    Ebpf,
    maps::{
        Array, MapData, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
};

use super::{
    DatapathError,
    maps::{ErrorSlots, FeatureMaps, MapUsage, sum_per_cpu, tail_program, take},
};

/// The leak-detection maps (`agent_common::maps::leak`): the "tunnel up" time, the
/// `--leak-allow` CIDRs, and the counts.
pub struct LeakMaps {
    cfg: Array<MapData, agent_common::maps::leak::LeakConfig>,
    allow_v4: LpmTrie<MapData, agent_common::maps::leak::AllowV4, u8>,
    allow_v6: LpmTrie<MapData, agent_common::maps::leak::AllowV6, u8>,
    leaks: PerCpuHashMap<MapData, agent_common::maps::leak::LeakKey, Counter>,
    errors: ErrorSlots,
    /// Holds `wirescope_leak` for wirescope_egress's tail call (kept open: the kernel
    /// empties a program array when the last user-space reference to it goes).
    _prog: aya::maps::ProgramArray<MapData>,
    /// Allowed CIDRs written, per family.
    allowed: (usize, usize),
}

impl LeakMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        use agent_common::maps::leak as l;
        let prog = tail_program(ebpf, l::LEAK_PROG, l::PROG)?;
        Ok(Self {
            _prog: prog,
            cfg: take(ebpf, l::LEAK_CFG)?,
            allow_v4: take(ebpf, l::LEAK_ALLOW_V4)?,
            allow_v6: take(ebpf, l::LEAK_ALLOW_V6)?,
            leaks: take(ebpf, l::LEAKS)?,
            errors: ErrorSlots(take(ebpf, l::LEAK_ERRORS)?),
            allowed: (0, 0),
        })
    }

    /// Packets leaving an underlay count as leaks until `until_ns` (bpf_ktime_get_ns, i.e.
    /// CLOCK_MONOTONIC); 0 turns leak detection off.
    pub fn set_tunnel_up_until(&mut self, until_ns: u64) -> Result<(), DatapathError> {
        let v = agent_common::maps::leak::LeakConfig {
            tunnel_up_until_ns: until_ns,
        };
        self.cfg.set(0, v, 0).map_err(|source| DatapathError::Map {
            map: agent_common::maps::leak::LEAK_CFG,
            source,
        })
    }

    /// Writes the `--leak-allow` CIDRs (once, at start).
    pub fn set_allowed(&mut self, nets: &[ipnet::IpNet]) -> Result<(), DatapathError> {
        use agent_common::maps::leak::{AllowV4, AllowV6, LEAK_ALLOW_V4, LEAK_ALLOW_V6};
        for net in nets {
            match net.trunc() {
                ipnet::IpNet::V4(n) => {
                    let key = Key::new(
                        n.prefix_len() as u32,
                        AllowV4 {
                            addr: n.addr().octets(),
                        },
                    );
                    self.allow_v4
                        .insert(&key, 1, 0)
                        .map_err(|source| DatapathError::Map {
                            map: LEAK_ALLOW_V4,
                            source,
                        })?;
                    self.allowed.0 += 1;
                }
                ipnet::IpNet::V6(n) => {
                    let key = Key::new(
                        n.prefix_len() as u32,
                        AllowV6 {
                            addr: n.addr().octets(),
                        },
                    );
                    self.allow_v6
                        .insert(&key, 1, 0)
                        .map_err(|source| DatapathError::Map {
                            map: LEAK_ALLOW_V6,
                            source,
                        })?;
                    self.allowed.1 += 1;
                }
            }
        }
        Ok(())
    }

    /// Leaks per (ifindex, kind), summed over CPUs.
    pub fn leaks(
        &self,
    ) -> Result<Vec<(agent_common::maps::leak::LeakKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.leaks, agent_common::maps::leak::LEAKS)
    }
}

impl FeatureMaps for LeakMaps {
    fn usage(&self) -> Vec<MapUsage> {
        use agent_common::maps::leak::*;
        vec![
            (LEAK_ALLOW_V4, self.allowed.0 as u64, MAX_LEAK_ALLOW as u64),
            (LEAK_ALLOW_V6, self.allowed.1 as u64, MAX_LEAK_ALLOW as u64),
            (LEAKS, self.leaks.keys().count() as u64, MAX_LEAKS as u64),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        use agent_common::maps::leak::{LEAKS, error};
        self.errors.list(&[(error::LEAKS, LEAKS)])
    }
}
