//! `--transit-time off` (`LoadOptions::transit_time`): the programs loaded with the
//! TRANSIT_TIME global at 0 still count every packet but leave no transit work: no queue,
//! no slot, no histogram entry, where the same packets loaded with the default (on) give one
//! transit observation per direction. The global lives in read-only data, which the
//! verifier reads as a constant, so this also checks that every kernel the suite runs on
//! (6.18 on the host, 6.1 in the VM) accepts the programs both ways.
//!
//! Needs root and BPF; without root it prints why and passes, except with CI=true.
//! Run: `cargo test -p wirescope --test datapath -- --test-threads=1 transit_off::`.

use crate::common;

use std::net::{IpAddr, Ipv4Addr};

use agent_common::{
    fixtures::{Framing, udp, wg, wg_ipv4},
    maps::{CounterKey, kind},
};
use common::{Dir, TUNNEL_L3, UNDERLAY_ETH, ifindex, netns_with_veth, run_tc};
use wirescope::{
    EBPF_OBJECT,
    datapath::{Datapath, LoadOptions, PeerMaps, Pinning},
    sync::endpoint_key,
};

const PEER: u32 = 1;
const PEER_HOST: [u8; 4] = [10, 1, 0, 5];
const CLIENT_V4: [u8; 4] = [10, 64, 1, 2];
const ENDPOINT: [u8; 4] = [203, 0, 113, 10];
const LOCAL_V4: [u8; 4] = [192, 0, 2, 2];
const RELAY_PORT: u16 = 51820;
const LISTEN_PORT: u16 = 51821;
/// Inner packets of this size; WireGuard pads their plaintext to 112 (tunnel MTU 1420).
const INNER: usize = 100;

/// A fresh namespace with a tunnel (veth, TUNNEL | L3) and an underlay (veth, Ethernet),
/// the programs loaded with `options` and attached, PEER behind 10.1.0.0/16 at ENDPOINT.
fn lab(options: LoadOptions) -> Option<(Datapath, u32, u32)> {
    if !common::privileged("the transit_off tests need root (BPF, BPF_PROG_TEST_RUN, namespaces)") {
        return None;
    }
    let (tun, _) = netns_with_veth("tro-tun", "tro-tun-o");
    common::ip_cmd(&[
        "link",
        "add",
        "name",
        "tro-under",
        "type",
        "veth",
        "peer",
        "name",
        "tro-under-o",
    ]);
    let under = ifindex("tro-under");
    let mut dp = Datapath::load_with_options(EBPF_OBJECT, Pinning::Off, options)
        .unwrap_or_else(|e| panic!("loading with {options:?}: {e}"));
    dp.attach("tro-tun", tun, TUNNEL_L3).expect("attach tunnel");
    dp.attach("tro-under", under, UNDERLAY_ETH)
        .expect("attach underlay");
    let mut maps = PeerMaps::default();
    maps.allowed_v4.insert((tun, [10, 1, 0, 0], 16), PEER);
    maps.endpoints.insert(
        endpoint_key(IpAddr::V4(Ipv4Addr::from(ENDPOINT)), RELAY_PORT),
        PEER,
    );
    maps.wg_ports.insert(LISTEN_PORT, 1);
    dp.sync_peers(&maps).expect("peer maps");
    Some((dp, tun, under))
}

/// One inner packet each way on the tunnel and its data message on the underlay, in the
/// order WireGuard makes them: tx inner then message, rx message then inner.
fn traffic(dp: &mut Datapath, tun: u32, under: u32) {
    let padded = wg::padded_len(INNER as u32, 1420);
    for (n, dir) in Dir::BOTH.into_iter().enumerate() {
        let (src, dst) = dir.flow((CLIENT_V4, 40000), (PEER_HOST, 443));
        let inner = agent_common::fixtures::Ipv4::new(src.0, dst.0)
            .build(17, &udp(src.1, dst.1, &[0; INNER - 28]));
        assert_eq!(inner.len(), INNER);
        let msg = wg::data_with_plaintext(0x5151_0000, n as u64 + 1, padded);
        let (s, d) = dir.flow((LOCAL_V4, LISTEN_PORT), (ENDPOINT, RELAY_PORT));
        let frame = Framing::Ethernet.frame(&wg_ipv4(s.0, s.1, d.0, d.1, &msg));
        let order: [(u32, &[u8]); 2] = match dir {
            Dir::Tx => [(tun, &inner), (under, &frame)],
            Dir::Rx => [(under, &frame), (tun, &inner)],
        };
        for (ifindex, data) in order {
            run_tc(dp, "transit_off", dir.prog(), ifindex, (0, 0), data);
        }
    }
    common::assert_no_refused_updates(dp, "transit_off");
}

/// (tunnel packets counted, transit observations, queues, slots).
fn state(dp: &Datapath, tun: u32) -> (u64, u64, usize, usize) {
    let tunnel_packets = dp
        .tunnel
        .counters()
        .expect("COUNTERS")
        .into_iter()
        .filter(|(k, _): &(CounterKey, _)| {
            k.ifindex == tun && k.peer == PEER && k.kind == kind::TUNNEL
        })
        .map(|(_, c)| c.packets)
        .sum();
    let observations = dp
        .transit
        .hist()
        .expect("TRANSIT_HIST")
        .into_iter()
        .map(|(_, v)| v.count)
        .sum();
    (
        tunnel_packets,
        observations,
        dp.transit.queues().len(),
        dp.transit.slots().len(),
    )
}

#[test]
fn off_counts_the_packets_and_times_none() {
    let Some((mut dp, tun, under)) = lab(LoadOptions {
        transit_time: false,
    }) else {
        return;
    };
    traffic(&mut dp, tun, under);
    assert_eq!(state(&dp, tun), (2, 0, 0, 0));
}

#[test]
fn on_times_one_packet_each_way() {
    let Some((mut dp, tun, under)) = lab(LoadOptions::default()) else {
        return;
    };
    traffic(&mut dp, tun, under);
    // Both pairs matched: one observation each way, their slots gone; the two queues stay
    // until the agent's sweep finds them idle.
    assert_eq!(state(&dp, tun), (2, 2, 2, 0));
}
