//! Mullvad multihop on one interface: the exit layer's WireGuard messages travel inside the
//! entry peer's tunnel, so on the tunnel interface each counts as the entry peer's tunnel
//! traffic and as the exit peer's wire traffic, and the contract's overhead formula holds
//! per layer for one inner packet through both.

use agent_common::{
    fixtures::{self, Framing},
    maps::kind,
    wireguard::data_wire_len,
};

use crate::client::{
    CLIENT_V4, Delta, ENTRY, ENTRY_RELAY_V4, EXIT, EXIT_RELAY_V4, EXIT_V6, Lab, REMOTE_V4,
    client_v6, exit_relay_v6, ip4, ip6, messages, udp_flow,
};
use crate::common::{Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT};

/// Mullvad multihop on one interface: exit-layer WireGuard messages travel inside the entry
/// peer's tunnel, so on the tunnel interface each counts as the entry peer's tunnel traffic
/// AND as the exit peer's wire traffic; on the underlay the entry layer counts as wire only.
#[test]
fn exit_layer_inside_the_tunnel() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, under) = (lab.tun, lab.under);
    let v4 = (ip4(CLIENT_V4), (ip4(EXIT_RELAY_V4), RELAY_PORT), EXIT);
    let v6 = (
        ip6(client_v6()),
        (ip6(exit_relay_v6()), RELAY_PORT),
        EXIT_V6,
    );
    for (client, exit, exit_peer) in [v4, v6] {
        for (name, msg, k) in messages() {
            for dir in Dir::BOTH {
                let l3 = udp_flow(dir, (client, LISTEN_PORT), exit, &msg);
                let len = l3.len() as u64;
                let want = Delta::none()
                    .tunnel(tun, ENTRY, dir, 1, len)
                    .counter(tun, exit_peer, k, dir, 1, len);
                let what = format!("exit layer {name} {client}");
                lab.expect(&what, dir, tun, &l3, want);
                lab.expect_truncations_count_nothing(&what, dir, tun, &l3);
            }
        }
    }

    // One inner packet through both layers, and the contract's overhead formula per layer:
    // wire_bytes{data} - tunnel_bytes = 20 + 8 + 16 + 16 + pad16(L, MTU) - L.
    let (exit_mtu, entry_mtu) = (1340u32, 1420u32);
    for inner_len in [100u32, 1000, 1339, 1340] {
        for dir in Dir::BOTH {
            let before = lab.snapshot();
            // The inner packet on the tunnel: exit peer's tunnel traffic.
            let (s, d) = dir.flow(CLIENT_V4, REMOTE_V4);
            let inner = fixtures::udp_ipv4(s, 40000, d, 443, inner_len as usize);
            lab.run_once("inner", dir, tun, (0, 0), &inner);
            // Its exit-layer message on the tunnel.
            let (s, d) = dir.flow((CLIENT_V4, LISTEN_PORT), (EXIT_RELAY_V4, RELAY_PORT));
            let exit_msg = fixtures::wg_data_ipv4(s.0, s.1, d.0, d.1, inner_len, exit_mtu);
            lab.run_once("exit layer", dir, tun, (0, 0), &exit_msg);
            // Its entry-layer message on the underlay.
            let (s, d) = dir.flow((LOCAL_V4, LISTEN_PORT), (ENTRY_RELAY_V4, RELAY_PORT));
            let entry_msg =
                fixtures::wg_data_ipv4(s.0, s.1, d.0, d.1, exit_msg.len() as u32, entry_mtu);
            lab.run_once(
                "entry layer",
                dir,
                under,
                (0, 0),
                &Framing::Ethernet.frame(&entry_msg),
            );
            let got = Lab::delta(&before, &lab.snapshot());

            let exit_wire = data_wire_len(inner_len, exit_mtu, 20) as u64;
            let entry_wire = data_wire_len(exit_wire as u32, entry_mtu, 20) as u64;
            let want = Delta::none()
                .tunnel(tun, EXIT, dir, 1, inner_len as u64)
                .tunnel(tun, ENTRY, dir, 1, exit_wire)
                .counter(tun, EXIT, kind::DATA, dir, 1, exit_wire)
                .counter(under, ENTRY, kind::DATA, dir, 1, entry_wire);
            assert_eq!(got, want, "inner {inner_len} {dir:?}");
            let pad16 = |l: u64, mtu: u64| l.div_ceil(16).saturating_mul(16).min(mtu.max(l));
            assert_eq!(
                exit_wire - inner_len as u64,
                20 + 8 + 16 + 16 + pad16(inner_len as u64, exit_mtu as u64) - inner_len as u64
            );
            assert_eq!(
                entry_wire - exit_wire,
                20 + 8 + 16 + 16 + pad16(exit_wire, entry_mtu as u64) - exit_wire
            );
        }
    }
}
