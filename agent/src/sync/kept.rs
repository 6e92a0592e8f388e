//! A tunnel's last good peer state, kept through failed reads of its control interface.
//!
//! One bad answer (a daemon busy past the deadline, its socket replaced for a moment) must
//! not empty the peer maps for a round: the traffic would count as `unknown` and under
//! permanent `endpoint:` series, leak detection would turn off, and the log would call every
//! peer removed and added again. So a failed read reuses what the previous round had for
//! the same interface index (the inventory it published) until a read succeeds again or
//! the interface is gone: vanished, or re-created under a new index, which has no state.
//! A tunnel that never had a good read has nothing to keep and stays without peer state.

use std::{
    collections::{HashMap, HashSet},
    mem::Discriminant,
};

use crate::sources::wg::{Backend, WgDevice, WgError};

use super::inventory::Tunnel;

/// The kind of a failed read: the [`WgError`] variant, or None for anything else (a task
/// that could not run). Kinds, not messages: a message can differ on every read.
pub type FailureKind = Option<Discriminant<WgError>>;

/// The kind of the failure `e`.
pub fn failure_kind(e: &anyhow::Error) -> FailureKind {
    e.downcast_ref::<WgError>().map(std::mem::discriminant)
}

/// A run of failed reads of one interface whose last good state is being kept.
#[derive(Debug, Default)]
struct Episode {
    failed: u64,
    /// Kinds already logged in this run: each is logged once, however long it lasts.
    logged: HashSet<FailureKind>,
}

/// What a failed read of an interface leaves the round with.
#[derive(Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// The last good state (peers, listen port, backend) again. `first`: this run of
    /// failures starts now; `log`: this kind of failure is new in the run.
    Kept {
        dev: WgDevice,
        backend: Backend,
        first: bool,
        log: bool,
    },
    /// Nothing to keep: no peer state this round.
    Nothing,
}

/// The runs of failed reads per interface index.
#[derive(Debug, Default)]
pub struct KeptState {
    failing: HashMap<u32, Episode>,
}

impl KeptState {
    /// A good read of `ifindex`: ends its run of failures, returning how many reads failed
    /// while its state was kept (None when none did).
    pub fn read_ok(&mut self, ifindex: u32) -> Option<u64> {
        self.failing.remove(&ifindex).map(|e| e.failed)
    }

    /// A failed read of `ifindex`, of `kind`. `previous` is what the previous round had for
    /// this index (None when it was not watched then).
    pub fn read_failed(
        &mut self,
        ifindex: u32,
        kind: FailureKind,
        previous: Option<&Tunnel>,
    ) -> OnFailure {
        let Some(prev) = previous.filter(|t| t.ifindex == ifindex && t.backend != Backend::None)
        else {
            self.failing.remove(&ifindex);
            return OnFailure::Nothing;
        };
        let episode = self.failing.entry(ifindex).or_default();
        let first = episode.failed == 0;
        episode.failed = episode.failed.saturating_add(1);
        let log = episode.logged.insert(kind);
        OnFailure::Kept {
            dev: device_of(prev),
            backend: prev.backend,
            first,
            log,
        }
    }

    /// Forgets the interfaces not in `alive` (gone from the namespace).
    pub fn retain(&mut self, alive: &HashSet<u32>) {
        self.failing.retain(|i, _| alive.contains(i));
    }

    /// Whether `ifindex` is in a run of failed reads.
    pub fn is_failing(&self, ifindex: u32) -> bool {
        self.failing.contains_key(&ifindex)
    }
}

/// The device a tunnel was built from, as its control interface last reported it (the
/// device's own public key is not kept in a [`Tunnel`]: nothing after the read uses it).
pub fn device_of(t: &Tunnel) -> WgDevice {
    WgDevice {
        name: t.name.clone(),
        listen_port: t.listen_port,
        public_key: None,
        peers: t.peers.iter().map(|p| p.wg.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::sync::inventory::{Peer, WgPeer};

    fn wg_peer(k: u8) -> WgPeer {
        WgPeer {
            endpoint: Some(format!("192.0.2.{k}:51820").parse().unwrap()),
            allowed_ips: vec![format!("10.{k}.0.0/16").parse().unwrap()],
            rx_bytes: u64::from(k) * 100,
            tx_bytes: u64::from(k) * 200,
            ..WgPeer::new([k; 32])
        }
    }

    /// The tunnel a round publishes for a read of `dev` on `ifindex`.
    fn published(ifindex: u32, backend: Backend, dev: &WgDevice) -> Tunnel {
        Tunnel {
            name: dev.name.clone(),
            ifindex,
            mtu: 1420,
            backend,
            listen_port: dev.listen_port,
            peers: (1..)
                .zip(&dev.peers)
                .map(|(id, p)| Peer {
                    id,
                    public_key: String::new(),
                    wg: p.clone(),
                    friendly_name: None,
                    hop: 1,
                    via: "eth0".into(),
                })
                .collect(),
        }
    }

    fn malformed() -> FailureKind {
        failure_kind(&anyhow::Error::new(WgError::Malformed {
            name: "wg0".into(),
            line_no: 1,
            line: "x".into(),
            reason: "expected key=value".into(),
        }))
    }

    fn timeout() -> FailureKind {
        failure_kind(&anyhow::Error::new(WgError::Timeout {
            path: PathBuf::from("/var/run/wireguard/wg0.sock"),
            timeout: Duration::from_secs(2),
        }))
    }

    #[test]
    fn a_failed_read_keeps_the_last_good_state_until_a_good_one() {
        let dev = WgDevice {
            name: "wg0".into(),
            listen_port: 51821,
            public_key: Some([9; 32]),
            peers: vec![wg_peer(1), wg_peer(2)],
        };
        let mut kept = KeptState::default();
        assert_eq!(kept.read_ok(7), None, "a good read ends no run");
        let round1 = published(7, Backend::Uapi, &dev);

        // The same peers, listen port and backend as read, from the published round.
        let want = WgDevice {
            public_key: None,
            ..dev.clone()
        };
        let first = kept.read_failed(7, malformed(), Some(&round1));
        assert_eq!(
            first,
            OnFailure::Kept {
                dev: want.clone(),
                backend: Backend::Uapi,
                first: true,
                log: true
            }
        );
        assert!(kept.is_failing(7));
        // The next round's previous tunnel is the kept one: the same state again, the same
        // kind of failure not logged again, a new kind logged once.
        let round2 = published(7, Backend::Uapi, &want);
        let kinds = [malformed(), malformed(), timeout(), timeout(), malformed()];
        let logs: Vec<bool> = kinds
            .iter()
            .map(|k| match kept.read_failed(7, *k, Some(&round2)) {
                OnFailure::Kept {
                    dev, first, log, ..
                } => {
                    assert_eq!(dev, want);
                    assert!(!first);
                    log
                }
                OnFailure::Nothing => panic!("state dropped"),
            })
            .collect();
        assert_eq!(logs, [false, false, true, false, false]);
        assert_eq!(kept.read_ok(7), Some(6), "6 failed reads, then a good one");
        assert!(!kept.is_failing(7));
        // A new run logs again from its first failure.
        assert!(matches!(
            kept.read_failed(7, malformed(), Some(&round2)),
            OnFailure::Kept {
                first: true,
                log: true,
                ..
            }
        ));
    }

    #[test]
    fn nothing_is_kept_without_a_good_read_of_the_same_interface() {
        let dev = WgDevice {
            name: "wg0".into(),
            listen_port: 1,
            public_key: None,
            peers: vec![wg_peer(1)],
        };
        let mut kept = KeptState::default();
        // Never read: no previous round.
        assert_eq!(kept.read_failed(7, malformed(), None), OnFailure::Nothing);
        // Read without a control interface before (Mullvad's in-app WireGuard).
        let none = published(
            7,
            Backend::None,
            &WgDevice {
                peers: vec![],
                ..dev.clone()
            },
        );
        assert_eq!(
            kept.read_failed(7, malformed(), Some(&none)),
            OnFailure::Nothing
        );
        assert!(!kept.is_failing(7));
        assert_eq!(
            kept.read_ok(7),
            None,
            "nothing was kept: no recovery to log"
        );
        // Re-created under a new index: the old index's state is not the new one's.
        let old = published(7, Backend::Netlink, &dev);
        assert_eq!(
            kept.read_failed(8, malformed(), Some(&old)),
            OnFailure::Nothing
        );
        // Gone: its run is forgotten.
        assert!(matches!(
            kept.read_failed(7, timeout(), Some(&old)),
            OnFailure::Kept { .. }
        ));
        kept.retain(&HashSet::from([8]));
        assert!(!kept.is_failing(7));
        assert_eq!(kept.read_ok(7), None);
    }
}
