//! `wirescope_drops_total` and `wirescope_udp_receive_errors_total`, read from the drop
//! programs' maps on every scrape.
//!
//! The kernel map is keyed by interface index; the series by interface name. A counter
//! must never go down, also when an interface is renamed or deleted and created again
//! (a new index under an old name): so each scrape adds what every (index, reason) grew by
//! since the last one to the series of the name the index has now, and series are kept
//! for as long as the agent runs.
//!
//! Every watched tunnel's listen port has a UDP-error series from the start (0 until the
//! kernel fails to queue a datagram there), so alerts and dashboards see a rate of 0
//! rather than no series at all.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
};

use agent_common::maps::drops::{DropKey, NO_DEVICE};
use log::warn;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    datapath::Datapath, datapath::drops::DropReasons, metrics::encode_counters,
    sync::inventory::Inventory,
};

#[derive(Debug, Default)]
struct State {
    /// What each (ifindex, reason) had at the last scrape.
    last: HashMap<DropKey, u64>,
    /// The latest name of every index seen.
    names: HashMap<u32, String>,
    /// By (interface name, reason name).
    totals: BTreeMap<(String, String), u64>,
}

#[derive(Debug)]
pub struct DropsCollector {
    datapath: Arc<Mutex<Datapath>>,
    reasons: Arc<DropReasons>,
    inventory: Arc<RwLock<Inventory>>,
    state: Mutex<State>,
}

/// The name of interface `ifindex` in this namespace, if it exists now.
pub fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Drop and UDP-error counts as the collector exports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// By (interface, reason).
    pub drops: BTreeMap<(String, String), u64>,
    /// By local port.
    pub udp_errors: BTreeMap<u16, u64>,
}

impl DropsCollector {
    pub fn new(
        datapath: Arc<Mutex<Datapath>>,
        reasons: Arc<DropReasons>,
        inventory: Arc<RwLock<Inventory>>,
    ) -> Self {
        Self {
            datapath,
            reasons,
            inventory,
            state: Mutex::new(State::default()),
        }
    }

    /// Reads the maps and folds them into the monotonic totals.
    pub fn snapshot(&self) -> Snapshot {
        let (drops, udp) = {
            let Ok(dp) = self.datapath.lock() else {
                return Snapshot::default();
            };
            let drops = dp.drops.drops().unwrap_or_else(|e| {
                warn!("reading kernel drops: {e}");
                Vec::new()
            });
            let udp = dp.drops.udp_errors().unwrap_or_else(|e| {
                warn!("reading UDP receive errors: {e}");
                Vec::new()
            });
            (drops, udp)
        };
        let listen_ports: Vec<u16> = self
            .inventory
            .read()
            .map(|inv| inv.tunnels.iter().map(|t| t.listen_port).collect())
            .unwrap_or_default();
        let Ok(mut st) = self.state.lock() else {
            return Snapshot::default();
        };
        fold(
            &mut st,
            &self.reasons,
            drops.into_iter().map(|(k, c)| (k, c.packets)),
            if_name,
        );
        Snapshot {
            drops: st.totals.clone(),
            udp_errors: udp_errors(
                udp.into_iter().map(|(port, c)| (port as u16, c.packets)),
                listen_ports,
            ),
        }
    }
}

/// The kernel's counts by port, with a 0 for every listen port (0 = none) that has none.
fn udp_errors(
    counted: impl IntoIterator<Item = (u16, u64)>,
    listen_ports: impl IntoIterator<Item = u16>,
) -> BTreeMap<u16, u64> {
    let mut out: BTreeMap<u16, u64> = counted.into_iter().collect();
    for port in listen_ports.into_iter().filter(|p| *p != 0) {
        out.entry(port).or_insert(0);
    }
    out
}

/// Adds what each (index, reason) grew by since the last call to the totals of the name
/// the index has now (`name_of`, else the last name it had, else `ifindex{N}`).
fn fold(
    st: &mut State,
    reasons: &DropReasons,
    counts: impl IntoIterator<Item = (DropKey, u64)>,
    name_of: impl Fn(u32) -> Option<String>,
) {
    for (k, n) in counts {
        let before = st.last.insert(k, n).unwrap_or(0);
        // The kernel map only grows while the agent runs; a smaller value would be a new
        // map, whose whole count is new.
        let grew = if n >= before { n - before } else { n };
        let name = if k.ifindex == NO_DEVICE {
            String::new()
        } else if let Some(name) = name_of(k.ifindex) {
            st.names.insert(k.ifindex, name.clone());
            name
        } else {
            st.names
                .get(&k.ifindex)
                .cloned()
                .unwrap_or_else(|| format!("ifindex{}", k.ifindex))
        };
        *st.totals.entry((name, reasons.name(k.reason))).or_default() += grew;
    }
}

impl Collector for DropsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot();
        encode_counters(
            &mut encoder,
            "wirescope_drops",
            "packets the kernel dropped in the agent's network namespace, by the running kernel's drop reason",
            s.drops.iter().map(|((iface, reason), n)| {
                (
                    vec![("interface", iface.clone()), ("reason", reason.clone())],
                    *n,
                )
            }),
        )?;
        encode_counters(
            &mut encoder,
            "wirescope_udp_receive_errors",
            "UDP datagrams the kernel failed to queue on a local socket bound to this port (receive buffer full)",
            s.udp_errors
                .iter()
                .map(|(port, n)| (vec![("port", port.to_string())], *n)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Listen ports get a 0 series; counted ports keep their counts, listening or not;
    /// port 0 (no listen port reported) gets none.
    #[test]
    fn listen_ports_have_udp_error_series_from_the_start() {
        let got = udp_errors([(53, 7), (51820, 2)], [51820, 51821, 0]);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![(53, 7), (51820, 2), (51821, 0)]
        );
    }

    fn reasons() -> DropReasons {
        DropReasons::from_values(
            [
                (2, "SKB_DROP_REASON_NOT_SPECIFIED"),
                (12, "SKB_DROP_REASON_NETFILTER_DROP"),
            ]
            .into_iter()
            .map(|(v, n)| (v, n.to_string()))
            .collect(),
        )
    }

    fn key(ifindex: u32, reason: u32) -> DropKey {
        DropKey { ifindex, reason }
    }

    #[test]
    fn totals_stay_monotonic_across_renames_and_recreation() {
        let r = reasons();
        let mut st = State::default();
        let names = |m: &'static [(u32, &'static str)]| {
            move |i: u32| m.iter().find(|(x, _)| *x == i).map(|(_, n)| n.to_string())
        };
        fold(
            &mut st,
            &r,
            [(key(5, 12), 3), (key(0, 2), 1)],
            names(&[(5, "wg0")]),
        );
        assert_eq!(st.totals[&("wg0".into(), "NETFILTER_DROP".into())], 3);
        assert_eq!(st.totals[&(String::new(), "NOT_SPECIFIED".into())], 1);
        // wg0 deleted and created again as index 9; the old index's count stays.
        fold(
            &mut st,
            &r,
            [(key(5, 12), 3), (key(9, 12), 2)],
            names(&[(9, "wg0")]),
        );
        assert_eq!(st.totals[&("wg0".into(), "NETFILTER_DROP".into())], 5);
        // Index 9 renamed: what it adds from now on goes to the new name; wg0 keeps its 5.
        fold(
            &mut st,
            &r,
            [(key(9, 12), 4), (key(7, 99), 1)],
            names(&[(9, "wg1")]),
        );
        assert_eq!(st.totals[&("wg0".into(), "NETFILTER_DROP".into())], 5);
        assert_eq!(st.totals[&("wg1".into(), "NETFILTER_DROP".into())], 2);
        // An index never named, and a value the kernel does not name.
        assert_eq!(st.totals[&("ifindex7".into(), "unknown_99".into())], 1);
    }
}
