//! Leak detection (agent-ebpf leak.rs): until when the tunnels count as up, the
//! `--leak-allow` CIDRs, and the leaks counted per (interface, kind). When a tunnel counts as
//! up, and whether what left after an unrenewed deadline counts, is the sync loop's call
//! (sync/leak.rs); this module writes the one and carries out the other.

use agent_common::maps::{
    Counter,
    leak::{LEAKS, LeakConfig, LeakKey, state},
};
use aya::{
    Ebpf,
    maps::{
        Array, MapData, MapError, PerCpuHashMap, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
};

use super::{
    DatapathError,
    maps::{Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, sum_per_cpu, tail_program, take},
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
    /// What LEAK_CFG last held: at start, what the previous agent last wrote (pinned).
    last: LeakConfig,
}

impl LeakMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        use agent_common::maps::leak as l;
        let prog = tail_program(ebpf, l::LEAK_PROG, l::PROG)?;
        let cfg: Array<MapData, LeakConfig> = take(ebpf, l::LEAK_CFG)?;
        // A fresh (unpinned or new) map reads as zeros: nobody said a tunnel was up.
        let last = cfg.get(&0, 0).map_err(DatapathError::map(l::LEAK_CFG))?;
        Ok(Self {
            _prog: prog,
            last,
            cfg,
            allow_v4: take(ebpf, l::LEAK_ALLOW_V4)?,
            allow_v6: take(ebpf, l::LEAK_ALLOW_V6)?,
            leaks: take(ebpf, l::LEAKS)?,
            errors: ErrorSlots(take(ebpf, l::LEAK_ERRORS)?),
            allowed: (0, 0),
        })
    }

    /// Packets leaving an underlay count as leaks until `until_ns` (bpf_ktime_get_ns, i.e.
    /// CLOCK_MONOTONIC), and are held for judgement after it ([`state::UNRENEWED`]); 0 turns
    /// leak detection off. No tunnel named: see [`LeakMaps::set_config`].
    pub fn set_tunnel_up_until(&mut self, until_ns: u64) -> Result<LeakConfig, DatapathError> {
        self.set_config(LeakConfig {
            tunnel_up_until_ns: until_ns,
            ..LeakConfig::default()
        })
    }

    /// Writes `cfg` into LEAK_CFG; returns what it held before (at the first call, what the
    /// previous agent last wrote).
    pub fn set_config(&mut self, cfg: LeakConfig) -> Result<LeakConfig, DatapathError> {
        self.cfg
            .set(0, cfg, 0)
            .map_err(DatapathError::map(agent_common::maps::leak::LEAK_CFG))?;
        Ok(std::mem::replace(&mut self.last, cfg))
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

    /// Leaks per (ifindex, kind), summed over CPUs: those counted while a tunnel was up and
    /// those judged leaks afterwards, under keys of state [`state::UP`]; not the ones still
    /// held for judgement.
    pub fn leaks(&self) -> Result<Vec<(LeakKey, Counter)>, DatapathError> {
        let mut out: Vec<(LeakKey, Counter)> = Vec::new();
        for (k, c) in sum_per_cpu(&self.leaks, LEAKS)? {
            if k.state != state::UP && k.state != state::JUDGED {
                continue;
            }
            let key = LeakKey {
                state: state::UP,
                ..k
            };
            match out.iter_mut().find(|(o, _)| *o == key) {
                Some((_, sum)) => {
                    sum.packets += c.packets;
                    sum.bytes += c.bytes;
                }
                None => out.push((key, c)),
            }
        }
        Ok(out)
    }

    /// Leaks held for judgement ([`state::UNRENEWED`]), per key, summed over CPUs.
    pub fn unrenewed(&self) -> Result<Vec<(LeakKey, Counter)>, DatapathError> {
        Ok(sum_per_cpu(&self.leaks, LEAKS)?
            .into_iter()
            .filter(|(k, _)| k.state == state::UNRENEWED)
            .collect())
    }

    /// Ends the wait of the leaks held for judgement: with `count`, they are added to the
    /// exported leaks of their interface and kind ([`state::JUDGED`], a key only the agent
    /// writes, so no program's increment is lost to the read-modify-write); either way their
    /// keys go. Returns what they were, summed. Call after writing a renewed deadline, so
    /// that no program adds to them meanwhile (but one already past its clock read).
    pub fn settle_unrenewed(&mut self, count: bool) -> Result<Counter, DatapathError> {
        let mut total = Counter::default();
        let keys: Vec<LeakKey> = self
            .leaks
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.state == state::UNRENEWED)
            .collect();
        for key in keys {
            let held = match self.leaks.get(&key, 0) {
                Ok(v) => v,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => {
                    return Err(DatapathError::Map {
                        map: LEAKS,
                        source: e,
                    });
                }
            };
            for c in held.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
            if count {
                let judged_key = LeakKey {
                    state: state::JUDGED,
                    ..key
                };
                let sum: Vec<Counter> = match self.leaks.get(&judged_key, 0) {
                    Ok(before) => held
                        .iter()
                        .zip(before.iter())
                        .map(|(h, b)| Counter {
                            packets: h.packets + b.packets,
                            bytes: h.bytes + b.bytes,
                        })
                        .collect(),
                    Err(MapError::KeyNotFound) => held.to_vec(),
                    Err(e) => {
                        return Err(DatapathError::Map {
                            map: LEAKS,
                            source: e,
                        });
                    }
                };
                // As many values as the map has CPUs, since `held` came from it.
                let values = PerCpuValues::try_from(sum).map_err(|io_error| {
                    DatapathError::map(LEAKS)(MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_elem",
                        io_error,
                    }))
                })?;
                self.leaks
                    .insert(judged_key, values, 0)
                    .map_err(DatapathError::map(LEAKS))?;
            }
            match self.leaks.remove(&key) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(DatapathError::Map {
                        map: LEAKS,
                        source: e,
                    });
                }
            }
        }
        Ok(total)
    }
}

impl FeatureMaps for LeakMaps {
    /// Nothing here is kept per peer.
    fn forget_peers(
        &mut self,
        _ids: &std::collections::HashSet<u32>,
    ) -> Result<u64, DatapathError> {
        Ok(0)
    }

    fn clear(&mut self) -> Result<(), DatapathError> {
        use agent_common::maps::leak as l;
        self.cfg.clear(l::LEAK_CFG)?;
        self.allow_v4.clear(l::LEAK_ALLOW_V4)?;
        self.allow_v6.clear(l::LEAK_ALLOW_V6)?;
        self.leaks.clear(l::LEAKS)?;
        self.errors.clear(l::LEAK_ERRORS)?;
        self.allowed = (0, 0);
        self.last = LeakConfig::default();
        Ok(())
    }

    fn usage(&self) -> Vec<MapUsage> {
        use agent_common::maps::leak::*;
        vec![
            (LEAK_ALLOW_V4, self.allowed.0 as u64, MAX_LEAK_ALLOW as u64),
            (LEAK_ALLOW_V6, self.allowed.1 as u64, MAX_LEAK_ALLOW as u64),
            (LEAKS, self.leaks.entries(), MAX_LEAKS as u64),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        use agent_common::maps::leak::{LEAKS, error};
        self.errors.list(&[(error::LEAKS, LEAKS)])
    }
}
