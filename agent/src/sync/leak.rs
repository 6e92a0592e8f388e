//! When the tunnels count as up for leak detection: the sync loop writes
//! [`tunnel_up_until_ns`] into the programs' `LEAK_CFG` on every tick, and until then every
//! packet that leaves an underlay outside the tunnel counts as a leak.

use std::time::{Duration, SystemTime};

use agent_common::maps::leak::TUNNEL_UP_NS;

use super::inventory::Tunnel;

/// Until when (CLOCK_MONOTONIC ns, `now_mono` being `now_wall`) a tunnel counts as up: the
/// latest handshake of any peer of `tunnels` plus 180 s; 0 when none had a handshake in the
/// last 180 s. A handshake time in the future (a clock step) counts as now.
pub fn tunnel_up_until_ns(tunnels: &[Tunnel], now_wall: SystemTime, now_mono: u64) -> u64 {
    let latest = tunnels
        .iter()
        .flat_map(|t| t.peers.iter())
        .filter_map(|p| p.wg.last_handshake)
        .max();
    let Some(latest) = latest else { return 0 };
    let age = now_wall.duration_since(latest).unwrap_or(Duration::ZERO);
    let up = Duration::from_nanos(TUNNEL_UP_NS);
    match up.checked_sub(age) {
        Some(left) if !left.is_zero() => now_mono.saturating_add(left.as_nanos() as u64),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::inventory::{Backend, Peer, WgPeer};

    fn tunnel(handshakes: &[Option<SystemTime>]) -> Tunnel {
        Tunnel {
            name: "wg0".into(),
            ifindex: 3,
            mtu: 1420,
            backend: Backend::Netlink,
            listen_port: 51820,
            peers: handshakes
                .iter()
                .enumerate()
                .map(|(i, h)| Peer {
                    id: i as u32 + 1,
                    public_key: String::new(),
                    wg: WgPeer {
                        public_key: [i as u8; 32],
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        last_handshake: *h,
                        rx_bytes: 0,
                        tx_bytes: 0,
                        persistent_keepalive: None,
                    },
                    friendly_name: None,
                    hop: 1,
                    via: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn up_for_180_s_after_the_latest_handshake() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = 1_000_000_000u64;
        let mono = 5_000 * s;
        assert_eq!(tunnel_up_until_ns(&[], now, mono), 0);
        assert_eq!(tunnel_up_until_ns(&[tunnel(&[None])], now, mono), 0);
        let ago = |secs| Some(now - Duration::from_secs(secs));
        // The latest of every peer of every tunnel counts.
        let t = [tunnel(&[ago(100), None]), tunnel(&[ago(30)])];
        assert_eq!(tunnel_up_until_ns(&t, now, mono), mono + 150 * s);
        // 180 s or more ago: down.
        assert_eq!(tunnel_up_until_ns(&[tunnel(&[ago(180)])], now, mono), 0);
        assert_eq!(tunnel_up_until_ns(&[tunnel(&[ago(500)])], now, mono), 0);
        // In the future (clock stepped back): up for 180 s from now.
        let future = Some(now + Duration::from_secs(60));
        assert_eq!(
            tunnel_up_until_ns(&[tunnel(&[future])], now, mono),
            mono + 180 * s
        );
    }
}
