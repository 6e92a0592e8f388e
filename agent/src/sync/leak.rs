//! When the tunnels count as up for leak detection: the sync loop writes
//! [`up_until_ns`] into the programs' `LEAK_CFG` on every tick, and until then every
//! packet that leaves an underlay outside the tunnel counts as a leak.
//!
//! A tunnel counts as up while its interface is up (administratively, with a carrier) with at
//! least one peer configured, and, for Mullvad's tunnel while its daemon answers, while the
//! daemon says connected. Traffic through it is not required: a tunnel that carries nothing,
//! because everything bypasses it, is exactly when leaks matter. A tunnel whose peers cannot be
//! read is never up: without its endpoints, its own WireGuard traffic would count as a leak.
//!
//! What leaves after the deadline written last, while that word was "up" (the agent was
//! killed, crashed, or its sync stalled for longer than the hold), the programs count apart;
//! the next round that writes a deadline judges it ([`judge_unrenewed`], [`settle`]): leaks
//! when a tunnel up at that last word (the same interface, by ifindex) is up again now,
//! since it then stayed up meanwhile as far as anyone can tell; dropped otherwise (the
//! tunnel was taken down, deleted, or re-created as Mullvad does on every reconnect, so what
//! left may have left with no tunnel up). The log says which, with the counts.

use agent_common::maps::{
    Counter,
    leak::{LeakConfig, MAX_UP_TUNNELS, TUNNEL_UP_HOLD_NS},
};
use log::{info, warn};

use crate::datapath::{DatapathError, leak::LeakMaps};

/// What the rule needs of one watched tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelView<'a> {
    pub name: &'a str,
    pub ifindex: u32,
    /// Up with a carrier (IFF_UP and IFF_LOWER_UP).
    pub link_up: bool,
    /// Peers read from its control interface.
    pub peers: usize,
}

/// What the Mullvad daemon says, when it answers: its tunnel interface and whether it says
/// connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MullvadView<'a> {
    pub interface: &'a str,
    pub connected: bool,
}

/// Whether `t` counts as up. `mullvad`: None when Mullvad is off or its daemon does not
/// answer (nothing is known then, so the interface and its peers decide alone).
pub fn tunnel_up(t: &TunnelView, mullvad: Option<MullvadView>) -> bool {
    if !t.link_up || t.peers == 0 {
        return false;
    }
    match mullvad {
        // Connecting, disconnecting, error: the daemon's firewall blocks, and what still
        // leaves is not the tunnel's to judge.
        Some(m) if m.interface == t.name => m.connected,
        _ => true,
    }
}

/// Until when (CLOCK_MONOTONIC ns, `now_mono` being now) the tunnels count as up: a few
/// seconds ahead ([`TUNNEL_UP_HOLD_NS`]) while any of them is, so that an agent that stops
/// renewing it (killed, or upgraded) leaves no stale "up" behind; 0 at once when none is.
pub fn up_until_ns(tunnels: &[TunnelView], mullvad: Option<MullvadView>, now_mono: u64) -> u64 {
    if tunnels.iter().any(|t| tunnel_up(t, mullvad)) {
        now_mono.saturating_add(TUNNEL_UP_HOLD_NS)
    } else {
        0
    }
}

/// What the sync round writes into the programs' LEAK_CFG: [`up_until_ns`] and the tunnels
/// up (the first [`MAX_UP_TUNNELS`]).
pub fn leak_config(
    tunnels: &[TunnelView],
    mullvad: Option<MullvadView>,
    now_mono: u64,
) -> LeakConfig {
    let mut up_ifindexes = [0; MAX_UP_TUNNELS];
    let up = tunnels.iter().filter(|t| tunnel_up(t, mullvad));
    for (slot, t) in up_ifindexes.iter_mut().zip(up) {
        *slot = t.ifindex;
    }
    LeakConfig {
        tunnel_up_until_ns: up_until_ns(tunnels, mullvad, now_mono),
        up_ifindexes,
    }
}

/// Whether the programs may have held leaks for judgement before `now_mono`: the deadline
/// written last was "up" and has passed.
pub fn unrenewed_since(previous: &LeakConfig, now_mono: u64) -> bool {
    previous.tunnel_up_until_ns != 0 && now_mono >= previous.tunnel_up_until_ns
}

/// The verdict on what left after the deadline of `previous`, given `now` (this round's
/// word): the ifindex of a tunnel up in both, whose staying up makes them leaks; None when
/// no tunnel up then is up now.
pub fn judge_unrenewed(previous: &LeakConfig, now: &LeakConfig) -> Option<u32> {
    if now.tunnel_up_until_ns == 0 {
        return None;
    }
    previous
        .up_ifindexes
        .iter()
        .copied()
        .find(|i| *i != 0 && now.up_ifindexes.contains(i))
}

/// Writes this round's `cfg` and, when the deadline written before it passed unrenewed,
/// judges what the programs held meanwhile ([`judge_unrenewed`]) and logs the verdict with
/// the counts (nothing when nothing was held). `name` names an ifindex for the log line.
pub fn settle(
    maps: &mut LeakMaps,
    cfg: LeakConfig,
    now_mono: u64,
    name: impl Fn(u32) -> Option<String>,
) -> Result<(), DatapathError> {
    // The renewed deadline first: from then on nothing more is held.
    let previous = maps.set_config(cfg)?;
    if !unrenewed_since(&previous, now_mono) {
        return Ok(());
    }
    let verdict = judge_unrenewed(&previous, &cfg);
    let Counter { packets, bytes } = maps.settle_unrenewed(verdict.is_some())?;
    if packets == 0 {
        return Ok(());
    }
    let named = |i: u32| name(i).unwrap_or_else(|| format!("ifindex {i}"));
    let what = format!(
        "{packets} packets ({bytes} bytes) left the underlays outside the tunnels while the \
         tunnel state went unrenewed (no agent running, or its sync stalled)"
    );
    match verdict {
        Some(i) => info!(
            "leak detection: {what}: counted as leaks, since {} was up before and is up now",
            named(i)
        ),
        None => {
            let before: Vec<String> = previous
                .up_ifindexes
                .iter()
                .filter(|i| **i != 0)
                .map(|i| named(*i))
                .collect();
            warn!(
                "leak detection: {what}: not counted, since no tunnel up before ({}) is up now: \
                 they may have left after it went down",
                if before.is_empty() {
                    "none named".to_string()
                } else {
                    before.join(", ")
                }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// A tunnel of ifindex 10 + its position in this list of names.
    fn view(name: &str, link_up: bool, peers: usize) -> TunnelView<'_> {
        let names = ["wg0", "wg1", "wg2", "wg0-mullvad"];
        let ifindex = 10 + names.iter().position(|n| *n == name).unwrap_or(99) as u32;
        TunnelView {
            name,
            ifindex,
            link_up,
            peers,
        }
    }

    #[test]
    fn up_while_the_interface_is_up_with_a_peer() {
        let mono = 5_000 * S;
        // No handshake is needed: an idle tunnel with a peer is up.
        assert_eq!(
            up_until_ns(&[view("wg0", true, 1)], None, mono),
            mono + 5 * S
        );
        assert_eq!(up_until_ns(&[], None, mono), 0);
        assert_eq!(up_until_ns(&[view("wg0", false, 3)], None, mono), 0);
        assert_eq!(up_until_ns(&[view("wg0", true, 0)], None, mono), 0);
        // Any one tunnel up is enough.
        let t = [
            view("wg0", false, 1),
            view("wg1", true, 0),
            view("wg2", true, 2),
        ];
        assert_eq!(up_until_ns(&t, None, mono), mono + 5 * S);
        // Near the end of the clock: saturates rather than wrapping to "down".
        assert_eq!(up_until_ns(&t, None, u64::MAX - 1), u64::MAX);
    }

    #[test]
    fn mullvad_tunnel_up_only_while_the_daemon_says_connected() {
        let mono = 7 * S;
        let mullvad = |connected| {
            Some(MullvadView {
                interface: "wg0-mullvad",
                connected,
            })
        };
        let m = [view("wg0-mullvad", true, 1)];
        assert_eq!(up_until_ns(&m, mullvad(true), mono), mono + 5 * S);
        assert_eq!(up_until_ns(&m, mullvad(false), mono), 0);
        // The daemon does not answer: the interface and its peer decide.
        assert_eq!(up_until_ns(&m, None, mono), mono + 5 * S);
        // Connected, but the interface is down or has no peer: not up.
        assert_eq!(
            up_until_ns(&[view("wg0-mullvad", false, 1)], mullvad(true), mono),
            0
        );
        assert_eq!(
            up_until_ns(&[view("wg0-mullvad", true, 0)], mullvad(true), mono),
            0
        );
        // Another tunnel beside it is not the daemon's: up on its own.
        let both = [view("wg0-mullvad", true, 1), view("wg0", true, 1)];
        assert_eq!(up_until_ns(&both, mullvad(false), mono), mono + 5 * S);
        assert!(!tunnel_up(&both[0], mullvad(false)));
        assert!(tunnel_up(&both[1], mullvad(false)));
    }

    #[test]
    fn the_config_names_the_tunnels_up() {
        let mono = 100 * S;
        let t = [
            view("wg0", true, 1),
            view("wg1", false, 1),
            view("wg2", true, 2),
        ];
        assert_eq!(
            leak_config(&t, None, mono),
            LeakConfig {
                tunnel_up_until_ns: mono + 5 * S,
                up_ifindexes: [10, 12, 0, 0, 0, 0, 0, 0],
            }
        );
        assert_eq!(leak_config(&t[1..2], None, mono), LeakConfig::default());
        // More tunnels up than slots: the first ones are named.
        let names: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        let many: Vec<TunnelView> = names
            .iter()
            .enumerate()
            .map(|(i, n)| TunnelView {
                name: n,
                ifindex: 100 + i as u32,
                link_up: true,
                peers: 1,
            })
            .collect();
        assert_eq!(
            leak_config(&many, None, mono).up_ifindexes,
            [100, 101, 102, 103, 104, 105, 106, 107]
        );
        // Mullvad connecting: its tunnel is not up, so not named.
        let m = [view("wg0-mullvad", true, 1), view("wg0", true, 1)];
        let connecting = Some(MullvadView {
            interface: "wg0-mullvad",
            connected: false,
        });
        assert_eq!(
            leak_config(&m, connecting, mono).up_ifindexes,
            [10, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn held_leaks_count_when_a_tunnel_up_before_is_up_now() {
        let cfg = |until: u64, up: &[u32]| {
            let mut c = LeakConfig {
                tunnel_up_until_ns: until,
                ..LeakConfig::default()
            };
            c.up_ifindexes[..up.len()].copy_from_slice(up);
            c
        };
        // Only a deadline that was "up" and has passed can have held anything.
        assert!(!unrenewed_since(&cfg(0, &[]), 50 * S));
        assert!(!unrenewed_since(&cfg(60 * S, &[5]), 50 * S));
        assert!(unrenewed_since(&cfg(60 * S, &[5]), 60 * S));
        assert!(unrenewed_since(&cfg(60 * S, &[5]), 90 * S));

        let before = cfg(60 * S, &[5, 7]);
        assert_eq!(judge_unrenewed(&before, &cfg(99 * S, &[7])), Some(7));
        assert_eq!(judge_unrenewed(&before, &cfg(99 * S, &[9, 5])), Some(5));
        // Re-created under another ifindex (Mullvad's reconnect), or gone: dropped.
        assert_eq!(judge_unrenewed(&before, &cfg(99 * S, &[9])), None);
        // No tunnel up now: dropped, whatever the slots say.
        assert_eq!(judge_unrenewed(&before, &cfg(0, &[5])), None);
        assert_eq!(judge_unrenewed(&before, &cfg(0, &[])), None);
        // Empty slots never match each other.
        assert_eq!(judge_unrenewed(&cfg(60 * S, &[]), &cfg(99 * S, &[])), None);
    }
}
