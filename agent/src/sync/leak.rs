//! When the tunnels count as up for leak detection: the sync loop writes
//! [`up_until_ns`] into the programs' `LEAK_CFG` on every tick, and until then every
//! packet that leaves an underlay outside the tunnel counts as a leak.
//!
//! A tunnel counts as up while its interface is up (administratively, with a carrier) with at
//! least one peer configured, and, for Mullvad's tunnel while its daemon answers, while the
//! daemon says connected. Traffic through it is not required: a tunnel that carries nothing,
//! because everything bypasses it, is exactly when leaks matter. A tunnel whose peers cannot be
//! read is never up: without its endpoints, its own WireGuard traffic would count as a leak.

use agent_common::maps::leak::TUNNEL_UP_HOLD_NS;

/// What the rule needs of one watched tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelView<'a> {
    pub name: &'a str,
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

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn view(name: &str, link_up: bool, peers: usize) -> TunnelView<'_> {
        TunnelView {
            name,
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
}
