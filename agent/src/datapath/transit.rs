//! The transit-time maps (`agent_common::maps::transit`): the histogram the TC programs
//! fill, and the sweep that keeps their queues bounded.
//!
//! The programs delete a slot when its packet is matched, and stale or passed-over slots
//! as their queue moves on; what they cannot see is a queue that stopped moving (a peer
//! gone quiet or removed). The agent's sweep, on every sync tick, deletes slots older than
//! [`STALE_NS`] plus a margin and queues left empty since the previous sweep.

use std::collections::{HashMap as StdHashMap, HashSet};

use agent_common::maps::{
    HistValue,
    transit::{
        HistKey, MAX_TRANSIT_HIST, MAX_TRANSIT_SEQ, MAX_TRANSIT_SLOTS, PROG, Queue, QueueKey,
        STALE_NS, Slot, SlotKey, TRANSIT_ERRORS, TRANSIT_HIST, TRANSIT_PROG, TRANSIT_SEQ,
        TRANSIT_SLOTS, error,
    },
};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuHashMap, ProgramArray},
};

use super::{
    DatapathError,
    maps::{
        Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, all_entries, forget_keys, sum_hist,
        tail_program, take,
    },
};

/// A slot this much past [`STALE_NS`] is left by its queue: the programs would only delete
/// it when the queue passes it again.
const SWEEP_MARGIN_NS: u64 = 1_000_000_000;

pub struct TransitMaps {
    seq: HashMap<MapData, QueueKey, Queue>,
    slots: HashMap<MapData, SlotKey, Slot>,
    hist: PerCpuHashMap<MapData, HistKey, HistValue>,
    errors: ErrorSlots,
    /// Holds `wirescope_transit` for the TC programs' tail call. Kept open: the kernel
    /// empties a program array when the last user-space reference to it goes.
    _prog: ProgramArray<MapData>,
    /// Queues found empty by the previous sweep, with their tail then.
    idle: StdHashMap<QueueKey, u64>,
}

impl TransitMaps {
    /// Takes the maps and puts the (loaded) `wirescope_transit` into the program array.
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let prog = tail_program(ebpf, TRANSIT_PROG, PROG)?;
        Ok(Self {
            seq: take(ebpf, TRANSIT_SEQ)?,
            slots: take(ebpf, TRANSIT_SLOTS)?,
            hist: take(ebpf, TRANSIT_HIST)?,
            errors: ErrorSlots(take(ebpf, TRANSIT_ERRORS)?),
            _prog: prog,
            idle: StdHashMap::new(),
        })
    }

    /// The transit histogram, summed over CPUs.
    pub fn hist(&self) -> Result<Vec<(HistKey, HistValue)>, DatapathError> {
        sum_hist(&self.hist, TRANSIT_HIST)
    }

    /// The slots in flight (for tests and the status of the maps).
    pub fn slots(&self) -> Vec<(SlotKey, Slot)> {
        all_entries(&self.slots)
    }

    pub fn queues(&self) -> Vec<(QueueKey, Queue)> {
        all_entries(&self.seq)
    }

    /// Run on every sync tick with `now_ns` = [`crate::datapath::monotonic_ns`]. Returns
    /// (slots deleted, queues deleted).
    pub fn expire(&mut self, now_ns: u64) -> (u64, u64) {
        let mut slots = 0;
        for k in stale_slots(self.slots(), now_ns) {
            if self.slots.remove(&k).is_ok() {
                slots += 1;
            }
        }
        // A queue with no slot in flight is empty whatever its head says: its packets were
        // all lost (no session, a removed peer) and their slots swept above.
        let live: std::collections::HashSet<(u32, u8)> = self
            .slots()
            .into_iter()
            .map(|(k, _)| (k.peer, k.dir))
            .collect();
        let queues = self.queues().into_iter().map(|(k, mut q)| {
            if !live.contains(&(k.peer, k.dir)) {
                q.head = q.tail;
            }
            (k, q)
        });
        let (gone, idle) = idle_queues(queues, &self.idle);
        let mut queues = 0;
        for k in gone {
            if self.seq.remove(&k).is_ok() {
                queues += 1;
            }
        }
        self.idle = idle;
        (slots, queues)
    }
}

impl FeatureMaps for TransitMaps {
    /// Their histograms, queues and slots in flight.
    fn forget_peers(&mut self, ids: &HashSet<u32>) -> Result<u64, DatapathError> {
        let n_hist = forget_keys(&mut self.hist, TRANSIT_HIST, ids, |k: &HistKey| k.peer)?;
        let n_slots = forget_keys(&mut self.slots, TRANSIT_SLOTS, ids, |k: &SlotKey| k.peer)?;
        let n_seq = forget_keys(&mut self.seq, TRANSIT_SEQ, ids, |k: &QueueKey| k.peer)?;
        self.idle.retain(|k, _| !ids.contains(&k.peer));
        Ok(n_hist + n_slots + n_seq)
    }

    fn clear(&mut self) -> Result<(), DatapathError> {
        self.seq.clear(TRANSIT_SEQ)?;
        self.slots.clear(TRANSIT_SLOTS)?;
        self.hist.clear(TRANSIT_HIST)?;
        self.errors.clear(TRANSIT_ERRORS)?;
        self.idle.clear();
        Ok(())
    }

    fn usage(&self) -> Vec<MapUsage> {
        vec![
            (TRANSIT_SEQ, self.seq.entries(), MAX_TRANSIT_SEQ as u64),
            (
                TRANSIT_SLOTS,
                self.slots.entries(),
                MAX_TRANSIT_SLOTS as u64,
            ),
            (TRANSIT_HIST, self.hist.entries(), MAX_TRANSIT_HIST as u64),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors.list(&[
            (error::SEQ, TRANSIT_SEQ),
            (error::SLOTS, TRANSIT_SLOTS),
            (error::HIST, TRANSIT_HIST),
        ])
    }
}

/// Slots older than [`STALE_NS`] + [`SWEEP_MARGIN_NS`] at `now_ns`.
pub fn stale_slots(slots: impl IntoIterator<Item = (SlotKey, Slot)>, now_ns: u64) -> Vec<SlotKey> {
    slots
        .into_iter()
        .filter(|(_, s)| now_ns.saturating_sub(s.start_ns) > STALE_NS + SWEEP_MARGIN_NS)
        .map(|(k, _)| k)
        .collect()
}

/// Queues to delete (empty now and at the previous sweep, with the same tail: nothing
/// entered in between), and the empty queues to remember for the next sweep. Deleting a
/// queue a packet is entering at that instant costs at most that packet's match.
pub fn idle_queues(
    queues: impl IntoIterator<Item = (QueueKey, Queue)>,
    before: &StdHashMap<QueueKey, u64>,
) -> (Vec<QueueKey>, StdHashMap<QueueKey, u64>) {
    let mut gone = Vec::new();
    let mut idle = StdHashMap::new();
    for (k, q) in queues {
        if q.head < q.tail {
            continue;
        }
        if before.get(&k) == Some(&q.tail) {
            gone.push(k);
        } else {
            idle.insert(k, q.tail);
        }
    }
    (gone, idle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u16, start_ns: u64) -> (SlotKey, Slot) {
        (
            SlotKey {
                peer: 1,
                dir: 0,
                _pad: 0,
                slot: n,
            },
            Slot {
                number: n as u64,
                start_ns,
                ..Default::default()
            },
        )
    }

    #[test]
    fn only_slots_past_stale_and_margin_go() {
        let now = 100 * STALE_NS;
        let limit = STALE_NS + SWEEP_MARGIN_NS;
        let got = stale_slots(
            [slot(1, now - limit), slot(2, now - limit - 1), slot(3, now)],
            now,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].slot, 2);
    }

    #[test]
    fn a_queue_goes_after_two_empty_sweeps_without_traffic() {
        let k = |peer| QueueKey {
            peer,
            dir: 1,
            _pad: [0; 3],
        };
        let q = |head, tail| Queue { tail, head };
        // 1: empty; 2: in flight; 3: empty.
        let (gone, idle) = idle_queues(
            [(k(1), q(5, 5)), (k(2), q(5, 7)), (k(3), q(0, 0))],
            &StdHashMap::new(),
        );
        assert!(gone.is_empty());
        assert_eq!(idle.len(), 2);
        // 1 still empty at the same tail: gone; 3 had traffic (tail moved): remembered anew.
        let (gone, idle) = idle_queues([(k(1), q(5, 5)), (k(3), q(9, 9))], &idle);
        assert_eq!(gone, vec![k(1)]);
        assert_eq!(idle.get(&k(3)), Some(&9));
    }
}
