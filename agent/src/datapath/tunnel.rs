//! The tunnel role's maps (agent-ebpf tunnel.rs): the allowed-IP tries that tell which peer
//! a packet on a WireGuard interface belongs to, `COUNTERS` (packets and bytes per
//! interface, peer, kind and direction: the tunnel role counts kind `TUNNEL`, the wire role
//! its WireGuard message kinds), and the labels of its keys pinned beside it: `PEER_IDS`, the
//! peer numbering, and `IFACE_NAMES`, the interfaces' names.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    sync::Arc,
};

use agent_common::maps::{
    Counter, CounterKey, IfaceName, MAX_COUNTERS, MAX_IFACE_NAMES, MAX_PEER_IDS, PeerIdKey,
    map_error, names, tunnel::AllowedV4, tunnel::AllowedV6, tunnel::MAX_ALLOWED_IPS,
};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, PerCpuHashMap, lpm_trie::Key},
};

use super::{
    DatapathError, PeerMaps,
    maps::{
        Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, apply, forget_keys, remove_each,
        sum_per_cpu, take,
    },
};

pub struct TunnelMaps {
    allowed_v4: LpmTrie<MapData, AllowedV4, u32>,
    allowed_v6: LpmTrie<MapData, AllowedV6, u32>,
    counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    /// The peer numbering, pinned with the counters (see [`TunnelMaps::saved_peer_ids`]).
    peer_ids: HashMap<MapData, PeerIdKey, u32>,
    /// Entries in `peer_ids`, counted as they are read and written (walking the map on
    /// every scrape would cost a syscall per peer).
    peer_ids_len: u64,
    /// ifindex -> name of every interface watched, pinned (see
    /// [`TunnelMaps::saved_iface_names`]).
    iface_names: HashMap<MapData, u32, IfaceName>,
    /// Entries in `iface_names`, counted as for `peer_ids`.
    iface_names_len: u64,
    /// What was last written to the allowed-IP tries, so a sync only touches what changed.
    applied_v4: StdHashMap<(u32, [u8; 4], u8), u32>,
    applied_v6: StdHashMap<(u32, [u8; 16], u8), u32>,
    errors: Arc<ErrorSlots>,
}

impl TunnelMaps {
    pub(crate) fn take(ebpf: &mut Ebpf, errors: Arc<ErrorSlots>) -> Result<Self, DatapathError> {
        Ok(Self {
            allowed_v4: take(ebpf, names::ALLOWED_V4)?,
            allowed_v6: take(ebpf, names::ALLOWED_V6)?,
            counters: take(ebpf, names::COUNTERS)?,
            peer_ids: take(ebpf, names::PEER_IDS)?,
            peer_ids_len: 0,
            iface_names: take(ebpf, names::IFACE_NAMES)?,
            iface_names_len: 0,
            applied_v4: StdHashMap::new(),
            applied_v6: StdHashMap::new(),
            errors,
        })
    }

    /// Brings the allowed-IP tries to `want`; returns each trie's first refusal.
    pub(crate) fn sync(&mut self, want: &PeerMaps) -> [Result<(), DatapathError>; 2] {
        let (v4, v6) = (&mut self.allowed_v4, &mut self.allowed_v6);
        [
            apply(&mut self.applied_v4, &want.allowed_v4, |k, v| match v {
                Some(v) => v4.insert(&lpm_v4(k), *v, 0),
                None => v4.remove(&lpm_v4(k)),
            })
            .map_err(DatapathError::map(names::ALLOWED_V4)),
            apply(&mut self.applied_v6, &want.allowed_v6, |k, v| match v {
                Some(v) => v6.insert(&lpm_v6(k), *v, 0),
                None => v6.remove(&lpm_v6(k)),
            })
            .map_err(DatapathError::map(names::ALLOWED_V6)),
        ]
    }

    /// Every counter (tunnel and wire kinds), summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.counters, names::COUNTERS)
    }

    /// The peer ids given by this agent or, through the pinned map, by the one before it:
    /// (interface name, public key, id). The sync hands them out again, so a restarted agent
    /// continues each peer's counters under the same id.
    pub fn saved_peer_ids(&mut self) -> Vec<(String, [u8; 32], u32)> {
        let saved: Vec<_> = self
            .peer_ids
            .iter()
            .flatten()
            .map(|(k, id)| {
                let len = k
                    .ifname
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(k.ifname.len());
                (
                    String::from_utf8_lossy(&k.ifname[..len]).into_owned(),
                    k.public_key,
                    id,
                )
            })
            .collect();
        self.peer_ids_len = saved.len() as u64;
        saved
    }

    /// Removes the pinned ids of forgotten peers (interface, public key, id): a restarted
    /// agent must not give them their old ids back. Only entries that still hold that id
    /// go. Returns how many went.
    pub fn forget_peer_ids(
        &mut self,
        peers: &[(String, [u8; 32], u32)],
    ) -> Result<u64, DatapathError> {
        let keys: Vec<PeerIdKey> = peers
            .iter()
            .map(|(iface, key, _)| peer_id_key(iface, key))
            .collect();
        let doomed: Vec<PeerIdKey> = keys
            .into_iter()
            .zip(peers)
            .filter(|(k, (_, _, id))| self.peer_ids.get(k, 0).ok() == Some(*id))
            .map(|(k, _)| k)
            .collect();
        let ids = &mut self.peer_ids;
        let n = remove_each(doomed, names::PEER_IDS, |k| ids.remove(k))?;
        self.peer_ids_len = self.peer_ids_len.saturating_sub(n);
        Ok(n)
    }

    /// Saves newly given peer ids (see [`TunnelMaps::saved_peer_ids`]); tries every one and
    /// returns the first refusal (a full map: the id still holds for this agent's life).
    pub fn save_peer_ids(&mut self, ids: &[(String, [u8; 32], u32)]) -> Result<(), DatapathError> {
        let mut first = Ok(());
        for (iface, key, id) in ids {
            let k = peer_id_key(iface, key);
            // The same key saved again replaces its entry: counted once.
            let known = self.peer_ids.get(&k, 0).is_ok();
            match self.peer_ids.insert(k, *id, 0) {
                Ok(()) => self.peer_ids_len += u64::from(!known),
                Err(source) if first.is_ok() => {
                    first = Err(DatapathError::Map {
                        map: names::PEER_IDS,
                        source,
                    });
                }
                Err(_) => {}
            }
        }
        first
    }
}

impl TunnelMaps {
    /// The interface names saved by this agent or, through the pinned map, by the one before
    /// it: a restarted agent still names the counters of an interface deleted or re-created
    /// (Mullvad: on every connect) while it was down, instead of `ifindexN`.
    pub fn saved_iface_names(&mut self) -> Vec<(u32, String)> {
        let saved: Vec<(u32, String)> = self
            .iface_names
            .iter()
            .flatten()
            .filter_map(|(i, n)| Some((i, n.as_str()?.to_string())))
            .collect();
        self.iface_names_len = saved.len() as u64;
        saved
    }

    /// Saves new or changed interface names; tries every one and returns the first refusal
    /// (a full map: the name still holds for this agent's life).
    pub fn save_iface_names(&mut self, names_: &[(u32, String)]) -> Result<(), DatapathError> {
        let mut first = Ok(());
        for (ifindex, name) in names_ {
            let known = self.iface_names.get(ifindex, 0).is_ok();
            match self.iface_names.insert(ifindex, IfaceName::new(name), 0) {
                Ok(()) => self.iface_names_len += u64::from(!known),
                Err(source) if first.is_ok() => {
                    first = Err(DatapathError::Map {
                        map: names::IFACE_NAMES,
                        source,
                    });
                }
                Err(_) => {}
            }
        }
        first
    }
}

impl FeatureMaps for TunnelMaps {
    /// The counters of the forgotten peers, of every kind, direction and interface (the
    /// tunnel's and every underlay's). `PEER_IDS` goes last, in
    /// [`TunnelMaps::forget_peer_ids`].
    fn forget_peers(&mut self, ids: &HashSet<u32>) -> Result<u64, DatapathError> {
        forget_keys(
            &mut self.counters,
            names::COUNTERS,
            ids,
            |k: &CounterKey| k.peer,
        )
    }

    fn clear(&mut self) -> Result<(), DatapathError> {
        self.allowed_v4.clear(names::ALLOWED_V4)?;
        self.allowed_v6.clear(names::ALLOWED_V6)?;
        self.counters.clear(names::COUNTERS)?;
        self.peer_ids.clear(names::PEER_IDS)?;
        self.iface_names.clear(names::IFACE_NAMES)?;
        self.applied_v4.clear();
        self.applied_v6.clear();
        self.peer_ids_len = 0;
        self.iface_names_len = 0;
        Ok(())
    }

    fn usage(&self) -> Vec<MapUsage> {
        vec![
            (
                names::ALLOWED_V4,
                self.applied_v4.len() as u64,
                MAX_ALLOWED_IPS as u64,
            ),
            (
                names::ALLOWED_V6,
                self.applied_v6.len() as u64,
                MAX_ALLOWED_IPS as u64,
            ),
            (
                names::COUNTERS,
                self.counters.entries(),
                MAX_COUNTERS as u64,
            ),
            (names::PEER_IDS, self.peer_ids_len, MAX_PEER_IDS as u64),
            (
                names::IFACE_NAMES,
                self.iface_names_len,
                MAX_IFACE_NAMES as u64,
            ),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors.list(&[(map_error::COUNTERS, names::COUNTERS)])
    }
}

/// The `PEER_IDS` key of a peer: the interface name NUL-padded (cut at IFNAMSIZ).
fn peer_id_key(iface: &str, key: &[u8; 32]) -> PeerIdKey {
    let mut ifname = [0u8; 16];
    let n = iface.len().min(ifname.len());
    ifname[..n].copy_from_slice(&iface.as_bytes()[..n]);
    PeerIdKey {
        ifname,
        public_key: *key,
    }
}

fn lpm_v4(&(ifindex, addr, plen): &(u32, [u8; 4], u8)) -> Key<AllowedV4> {
    Key::new(
        32 + plen as u32,
        AllowedV4 {
            ifindex_be: ifindex.to_be(),
            addr,
        },
    )
}

fn lpm_v6(&(ifindex, addr, plen): &(u32, [u8; 16], u8)) -> Key<AllowedV6> {
    Key::new(
        32 + plen as u32,
        AllowedV6 {
            ifindex_be: ifindex.to_be(),
            addr,
        },
    )
}
