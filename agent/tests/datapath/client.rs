//! The multihop client the tunnel, wire, multihop and robustness tests run the programs in,
//! and what they expect of them: a Mullvad-style topology (an entry peer whose allowed IPs
//! are the exit relay's addresses, an exit peer behind 0.0.0.0/0 and ::/0), packet
//! builders on the byte fixtures of `agent_common::fixtures`, the exact COUNTERS and
//! UNKNOWN_WIRE deltas a run leaves ([`Delta`]: a message of an unknown endpoint counts in
//! both, its endpoint's entry and the total under PEER_UNKNOWN), and [`Lab`]: a fresh network namespace
//! (unshare on the test's own thread) where `lo` (ifindex 1) plays the WireGuard interface
//! (TUNNEL | L3), one end of a veth pair the underlay (UNDERLAY, Ethernet) and the other
//! end an interface the agent does not watch. Every single run checks the verdict
//! (TC_ACT_UNSPEC, -1: the programs only observe), that the packet comes back byte for
//! byte, and that MAP_ERRORS stays 0; [`Lab::model`] computes on the host what a run must
//! count.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agent_common::{
    fixtures::{self, Framing, IpHeader, Ipv4, Ipv6, udp, wg},
    maps::{
        Counter, CounterKey, IfaceConfig, PEER_UNKNOWN, kind, wire::Endpoint, wire::UnknownWireKey,
    },
    parse::{IPPROTO_UDP, parse_ip, parse_l4, segmented},
    wireguard::classify,
};
use aya::programs::{TestRun, TestRunOptions};
use common::{
    Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT, TUNNEL_L3, UNDERLAY_ETH, ifindex, local_v6,
    stranger_v6, v6,
};
use wirescope::{datapath::PeerMaps, sync::endpoint_key};

use crate::common;

// ---------------------------------------------------------------------------------------
// The topology: a Mullvad-style multihop client
// ---------------------------------------------------------------------------------------

/// Hop 1: allowed IPs are only the exit relay's addresses; endpoint ENTRY_RELAY:51820.
pub const ENTRY: u32 = 1;
/// Hop 2: allowed IPs 0.0.0.0/0 and ::/0; endpoint EXIT_RELAY:51820, reached through ENTRY.
pub const EXIT: u32 = 2;
/// A peer with an IPv6 endpoint ([ENTRY_RELAY_V6]:51820), for the wire role over IPv6.
pub const V6_RELAY: u32 = 3;
/// The exit relay's IPv6 endpoint ([EXIT_RELAY_V6]:51820), for IPv6 multihop.
pub const EXIT_V6: u32 = 4;

pub const CLIENT_V4: [u8; 4] = [10, 64, 1, 2];
pub const GATEWAY_V4: [u8; 4] = [10, 64, 0, 1];
pub const REMOTE_V4: [u8; 4] = [93, 184, 216, 34];
pub const ENTRY_RELAY_V4: [u8; 4] = common::RELAY_V4;
pub const EXIT_RELAY_V4: [u8; 4] = [198, 51, 100, 7];
pub const STRANGER_V4: [u8; 4] = [192, 0, 2, 99];

pub const STRANGER_PORT: u16 = 40000;
/// A local port that is not a listen port.
pub const OTHER_PORT: u16 = 40001;

pub fn client_v6() -> [u8; 16] {
    v6("fc00:bbbb:bbbb:bb01::1:102")
}
pub fn remote_v6() -> [u8; 16] {
    v6("2001:db8:ffff::34")
}
pub fn entry_relay_v6() -> [u8; 16] {
    common::relay_v6()
}
pub fn exit_relay_v6() -> [u8; 16] {
    v6("2001:db8:7::7")
}

/// The peer maps of the multihop client whose tunnel is `tun`.
pub fn multihop_maps(tun: u32) -> PeerMaps {
    let mut m = PeerMaps::default();
    m.allowed_v4.insert((tun, [0; 4], 0), EXIT);
    m.allowed_v6.insert((tun, [0; 16], 0), EXIT);
    m.allowed_v4.insert((tun, EXIT_RELAY_V4, 32), ENTRY);
    m.allowed_v6.insert((tun, exit_relay_v6(), 128), ENTRY);
    m.endpoints
        .insert(ep(ip4(ENTRY_RELAY_V4), RELAY_PORT), ENTRY);
    m.endpoints.insert(ep(ip4(EXIT_RELAY_V4), RELAY_PORT), EXIT);
    m.endpoints
        .insert(ep(ip6(entry_relay_v6()), RELAY_PORT), V6_RELAY);
    m.endpoints
        .insert(ep(ip6(exit_relay_v6()), RELAY_PORT), EXIT_V6);
    m.wg_ports.insert(LISTEN_PORT, 1);
    m
}

pub fn ip4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}
pub fn ip6(a: [u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(a))
}
pub fn ep(ip: IpAddr, port: u16) -> Endpoint {
    endpoint_key(ip, port)
}

// ---------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------

pub fn ip_header(src: IpAddr, dst: IpAddr) -> IpHeader {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s.octets(), d.octets()).into(),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s.octets(), d.octets()).into(),
        _ => panic!("mixed families"),
    }
}

/// IP header length without options: 20 or 40.
pub fn base_hdr(ip: IpAddr) -> u64 {
    if ip.is_ipv4() { 20 } else { 40 }
}

/// UDP between `local` and `remote` in direction `dir`, carrying `payload`: bare IP.
pub fn udp_flow(dir: Dir, local: (IpAddr, u16), remote: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
    let (src, dst) = dir.flow(local, remote);
    ip_header(src.0, dst.0).build(IPPROTO_UDP, &udp(src.1, dst.1, payload))
}

/// `fixtures::udp_ipv4` (`udp_ipv6`) of `len` bytes from port 1 to port 2 between `local`
/// and `remote` in direction `dir`.
pub fn udp_between(dir: Dir, local: IpAddr, remote: IpAddr, len: usize) -> Vec<u8> {
    match dir.flow(local, remote) {
        (IpAddr::V4(s), IpAddr::V4(d)) => fixtures::udp_ipv4(s.octets(), 1, d.octets(), 2, len),
        (IpAddr::V6(s), IpAddr::V6(d)) => fixtures::udp_ipv6(s.octets(), 1, d.octets(), 2, len),
        _ => panic!("mixed families"),
    }
}

/// The WireGuard messages of every kind, with the kind the programs must count them as.
pub fn messages() -> Vec<(&'static str, Vec<u8>, u8)> {
    vec![
        (
            "initiation",
            wg::initiation(0x0102_0304),
            kind::HANDSHAKE_INITIATION,
        ),
        (
            "response",
            wg::response(0x0506_0708, 0x0102_0304),
            kind::HANDSHAKE_RESPONSE,
        ),
        (
            "cookie reply",
            wg::cookie_reply(0x0102_0304),
            kind::COOKIE_REPLY,
        ),
        ("keepalive", wg::keepalive(0x1122_3344, 0), kind::KEEPALIVE),
        ("data 1", wg::data(0x1122_3344, 1, 1, 1420), kind::DATA),
        ("data 100", wg::data(0x1122_3344, 2, 100, 1420), kind::DATA),
        (
            "data 1419 capped",
            wg::data(0x1122_3344, 3, 1419, 1420),
            kind::DATA,
        ),
        (
            "data 1420 at mtu",
            wg::data(0x1122_3344, 4, 1420, 1420),
            kind::DATA,
        ),
        (
            "data 1380 mullvad",
            wg::data(0x1122_3344, 5, 1379, 1380),
            kind::DATA,
        ),
        (
            "data plaintext 68",
            wg::data_with_plaintext(0x1122_3344, 6, 68),
            kind::DATA,
        ),
    ]
}

/// Every strict prefix of `pkt` that test_run accepts (at least 14 bytes): all of them up to
/// 128 bytes (every header boundary), then a stride, and the last one.
fn truncations(pkt: &[u8]) -> Vec<&[u8]> {
    let mut cuts: Vec<usize> = (14..pkt.len().min(129)).collect();
    cuts.extend((129..pkt.len()).step_by(61));
    if pkt.len() > 129 {
        cuts.push(pkt.len() - 1);
    }
    cuts.sort();
    cuts.dedup();
    cuts.into_iter().map(|c| &pkt[..c]).collect()
}

// ---------------------------------------------------------------------------------------
// Expected map contents
// ---------------------------------------------------------------------------------------

/// What one or more runs added to COUNTERS and UNKNOWN_WIRE (entries that did not change
/// are left out), sorted so that failures print readably.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub counters: Vec<(CounterKey, Counter)>,
    pub unknown: Vec<(UnknownWireKey, Counter)>,
}

fn add_to<K: PartialEq + Copy>(v: &mut Vec<(K, Counter)>, k: K, packets: u64, bytes: u64) {
    match v.iter_mut().find(|(key, _)| *key == k) {
        Some((_, c)) => {
            c.packets += packets;
            c.bytes += bytes;
        }
        None => v.push((k, Counter { packets, bytes })),
    }
}

impl Delta {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn tunnel(self, ifindex: u32, peer: u32, dir: Dir, packets: u64, bytes: u64) -> Self {
        self.counter(ifindex, peer, kind::TUNNEL, dir, packets, bytes)
    }

    pub fn counter(
        mut self,
        ifindex: u32,
        peer: u32,
        kind: u8,
        dir: Dir,
        packets: u64,
        bytes: u64,
    ) -> Self {
        let key = CounterKey {
            ifindex,
            peer,
            kind,
            dir: dir.code(),
            _pad: [0; 2],
        };
        add_to(&mut self.counters, key, packets, bytes);
        self.sorted()
    }

    pub fn unknown(
        mut self,
        ifindex: u32,
        endpoint: Endpoint,
        kind: u8,
        dir: Dir,
        packets: u64,
        bytes: u64,
    ) -> Self {
        let key = UnknownWireKey {
            ifindex,
            endpoint,
            kind,
            dir: dir.code(),
            _pad: [0; 2],
        };
        add_to(&mut self.unknown, key, packets, bytes);
        // And to the unknown endpoints' total, which LRU evictions of UNKNOWN_WIRE leave.
        self.counter(ifindex, PEER_UNKNOWN, kind, dir, packets, bytes)
    }

    fn sorted(mut self) -> Self {
        self.counters
            .sort_by_key(|(k, _)| (k.ifindex, k.peer, k.kind, k.dir));
        self.unknown
            .sort_by_key(|(k, _)| (k.ifindex, k.endpoint, k.kind, k.dir));
        self
    }

    /// Counted as a WireGuard message, anywhere.
    pub fn has_wire(&self) -> bool {
        !self.unknown.is_empty() || self.counters.iter().any(|(k, _)| k.kind != kind::TUNNEL)
    }
}

// ---------------------------------------------------------------------------------------
// The lab: a network namespace, the loaded programs, test_run
// ---------------------------------------------------------------------------------------

/// Input BPF_PROG_TEST_RUN refuses with EINVAL before the program runs: under 14 bytes, and
/// (6.18) a frame whose Ethernet type is IPv4 or IPv6 with less than a minimal IP header
/// behind it. The kernel looks at bytes 12..14 whatever the interface's framing.
fn kernel_refuses(data: &[u8]) -> bool {
    let min = match data.get(12..14) {
        None => return true,
        Some([0x08, 0x00]) => 14 + 20,
        Some([0x86, 0xdd]) => 14 + 40,
        Some(_) => 14,
    };
    data.len() < min
}

const UNDERLAY_L3: IfaceConfig = IfaceConfig {
    flags: IfaceConfig::UNDERLAY | IfaceConfig::L3,
};

pub struct Lab {
    pub dp: common::Lent,
    /// lo: the WireGuard interface (TUNNEL | L3).
    pub tun: u32,
    /// ws-under: the underlay (UNDERLAY, Ethernet).
    pub under: u32,
    /// ws-unwatched: in the namespace, not in IFACES.
    pub unwatched: u32,
    /// What IFACES says, per ifindex (for the model).
    pub ifaces: HashMap<u32, IfaceConfig>,
    /// What the peer maps hold (for the model).
    pub maps: PeerMaps,
}

impl Lab {
    /// A fresh network namespace for this thread, the programs loaded and attached, the
    /// multihop peer maps written. `None` when not root and not in CI.
    pub fn new() -> Option<Lab> {
        if !common::privileged(
            "the test_run tests need root (BPF program loading, BPF_PROG_TEST_RUN, network \
             namespaces)",
        ) {
            return None;
        }
        let (under, unwatched) = common::netns_with_veth("ws-under", "ws-unwatched");
        let tun = ifindex("lo");
        assert_eq!(tun, 1);
        let dp = common::load_attached(&[]);
        let mut lab = Lab {
            dp,
            tun,
            under,
            unwatched,
            ifaces: HashMap::new(),
            maps: PeerMaps::default(),
        };
        lab.set_iface("lo", tun, Some(TUNNEL_L3));
        lab.set_iface("ws-under", under, Some(UNDERLAY_ETH));
        lab.set_maps(multihop_maps(tun));
        Some(lab)
    }

    /// Attach (or re-role) `name` with `cfg`, or detach it (`None`): this writes IFACES.
    pub fn set_iface(&mut self, name: &str, ifindex: u32, cfg: Option<IfaceConfig>) {
        match cfg {
            Some(cfg) => {
                self.dp
                    .attach(name, ifindex, cfg)
                    .unwrap_or_else(|e| panic!("attaching to {name}: {e}"));
                self.ifaces.insert(ifindex, cfg);
            }
            None => {
                self.dp.detach(ifindex);
                self.ifaces.remove(&ifindex);
            }
        }
    }

    pub fn set_maps(&mut self, maps: PeerMaps) {
        self.dp.sync_peers(&maps).expect("writing the peer maps");
        self.maps = maps;
    }

    pub fn snapshot(
        &self,
    ) -> (
        HashMap<CounterKey, Counter>,
        HashMap<UnknownWireKey, Counter>,
    ) {
        let c = self.dp.tunnel.counters().expect("reading COUNTERS");
        let u = self.dp.wire.unknown_wire().expect("reading UNKNOWN_WIRE");
        (c.into_iter().collect(), u.into_iter().collect())
    }

    pub fn delta(
        before: &(
            HashMap<CounterKey, Counter>,
            HashMap<UnknownWireKey, Counter>,
        ),
        after: &(
            HashMap<CounterKey, Counter>,
            HashMap<UnknownWireKey, Counter>,
        ),
    ) -> Delta {
        fn diff<K: Copy + Eq + std::hash::Hash>(
            b: &HashMap<K, Counter>,
            a: &HashMap<K, Counter>,
        ) -> Vec<(K, Counter)> {
            a.iter()
                .filter_map(|(k, now)| {
                    let was = b.get(k).copied().unwrap_or_default();
                    assert!(
                        now.packets >= was.packets && now.bytes >= was.bytes,
                        "a counter went down"
                    );
                    let d = Counter {
                        packets: now.packets - was.packets,
                        bytes: now.bytes - was.bytes,
                    };
                    (d != Counter::default()).then_some((*k, d))
                })
                .collect()
        }
        Delta {
            counters: diff(&before.0, &after.0),
            unknown: diff(&before.1, &after.1),
        }
        .sorted()
    }

    /// One BPF_PROG_TEST_RUN of the `dir` program on `data` as seen on `ifindex`. Checks the
    /// verdict, that the packet is unchanged and that no map update failed.
    pub fn run_once(&mut self, what: &str, dir: Dir, ifindex: u32, gso: (u32, u32), data: &[u8]) {
        if kernel_refuses(data) {
            let ctx = common::sk_buff_ctx(ifindex, gso.0, gso.1);
            // Never reaches the program: check that the kernel still says so.
            let res = self
                .dp
                .program_mut(dir.prog())
                .expect("program")
                .test_run(TestRunOptions {
                    data_in: Some(data),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::new()
                });
            match res {
                Err(aya::programs::ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
                other => panic!(
                    "{what}: test_run accepted {} bytes it was expected to refuse: {other:?}",
                    data.len()
                ),
            }
            return;
        }
        let out = common::run_tc(&mut self.dp, what, dir.prog(), ifindex, gso, data);
        common::assert_unchanged(what, dir.prog(), data, &out);
        common::assert_no_refused_updates(&self.dp, what);
    }

    /// Run and return what the run added to the counters.
    pub fn run(
        &mut self,
        what: &str,
        dir: Dir,
        ifindex: u32,
        gso: (u32, u32),
        data: &[u8],
    ) -> Delta {
        let before = self.snapshot();
        self.run_once(what, dir, ifindex, gso, data);
        Self::delta(&before, &self.snapshot())
    }

    /// Run without GSO and compare with `want`.
    #[track_caller]
    pub fn expect(&mut self, what: &str, dir: Dir, ifindex: u32, data: &[u8], want: Delta) {
        self.expect_gso(what, dir, ifindex, (0, 0), data, want);
    }

    #[track_caller]
    pub fn expect_gso(
        &mut self,
        what: &str,
        dir: Dir,
        ifindex: u32,
        gso: (u32, u32),
        data: &[u8],
        want: Delta,
    ) {
        let got = self.run(what, dir, ifindex, gso, data);
        assert_eq!(
            got,
            want,
            "{what}: {dir:?} on ifindex {ifindex}, {} bytes, gso {gso:?}",
            data.len()
        );
    }

    /// Every truncation of `pkt` counts nothing (the IP length says more than is there).
    /// Runs them in one batch; on a failure, finds the first culprit.
    #[track_caller]
    pub fn expect_truncations_count_nothing(
        &mut self,
        what: &str,
        dir: Dir,
        ifindex: u32,
        pkt: &[u8],
    ) {
        let cuts = truncations(pkt);
        let before = self.snapshot();
        for cut in &cuts {
            self.run_once(what, dir, ifindex, (0, 0), cut);
        }
        if Self::delta(&before, &self.snapshot()) == Delta::none() {
            return;
        }
        for cut in &cuts {
            let got = self.run(what, dir, ifindex, (0, 0), cut);
            assert_eq!(
                got,
                Delta::none(),
                "{what}: {dir:?} on ifindex {ifindex}: truncated to {} of {} bytes",
                cut.len(),
                pkt.len()
            );
        }
    }

    /// The programs' semantics computed on the host from the shared parser (the same
    /// `parse_ip` -> `parse_l4` -> `classify` -> `segmented` chain as agent-ebpf's
    /// `observe`), IFACES and the peer maps as this lab wrote them, and a longest-prefix
    /// match written here. The eBPF programs must agree with it exactly.
    pub fn model(&self, dir: Dir, ifindex: u32, gso_segs: u32, pkt: &[u8]) -> Delta {
        let mut want = Delta::none();
        let Some(cfg) = self.ifaces.get(&ifindex) else {
            return want;
        };
        let Ok(ip) = parse_ip(&pkt, cfg.flags & IfaceConfig::L3 != 0) else {
            return want;
        };
        let l4 = parse_l4(&pkt, &ip).ok().flatten();
        if cfg.flags & IfaceConfig::TUNNEL != 0 {
            let addr = if dir == Dir::Tx { ip.dst } else { ip.src };
            let peer = self.lpm(ifindex, ip.family, addr);
            let (p, b) = segmented(&ip, l4.map_or(0, |l| l.hdr_len), pkt.len() as u32, gso_segs);
            want = want.tunnel(ifindex, peer, dir, p, b);
        }
        let Some(l4) = l4 else { return want };
        if ip.proto != IPPROTO_UDP {
            return want;
        }
        let (remote, rport, lport) = match dir {
            Dir::Tx => (ip.dst, l4.dport, l4.sport),
            Dir::Rx => (ip.src, l4.sport, l4.dport),
        };
        let endpoint = Endpoint {
            addr: remote,
            port: rport,
            family: ip.family,
            _pad: 0,
        };
        let peer = self.maps.endpoints.get(&endpoint).copied();
        if peer.is_none() && !self.maps.wg_ports.contains_key(&lport) {
            return want;
        }
        let Some(msg) = classify(&pkt, ip.l4_off + 8, l4.udp_payload_len) else {
            return want;
        };
        let (p, b) = segmented(&ip, 8, pkt.len() as u32, gso_segs);
        match peer {
            Some(peer) => want.counter(ifindex, peer, msg.kind, dir, p, b),
            None => want.unknown(ifindex, endpoint, msg.kind, dir, p, b),
        }
    }

    fn lpm(&self, ifindex: u32, family: u8, addr: [u8; 16]) -> u32 {
        fn matches(a: &[u8], net: &[u8], plen: u8) -> bool {
            let full = (plen / 8) as usize;
            if a[..full] != net[..full] {
                return false;
            }
            let rest = plen % 8;
            rest == 0 || (a[full] ^ net[full]) & (0xffu8 << (8 - rest)) == 0
        }
        let best = if family == 4 {
            self.maps
                .allowed_v4
                .iter()
                .filter(|((i, net, plen), _)| *i == ifindex && matches(&addr[..4], net, *plen))
                .max_by_key(|((_, _, plen), _)| *plen)
                .map(|(_, peer)| *peer)
        } else {
            self.maps
                .allowed_v6
                .iter()
                .filter(|((i, net, plen), _)| *i == ifindex && matches(&addr, net, *plen))
                .max_by_key(|((_, _, plen), _)| *plen)
                .map(|(_, peer)| *peer)
        };
        best.unwrap_or(PEER_UNKNOWN)
    }
}

/// (family, local address, known endpoint, its peer, an endpoint nobody knows)
pub type Family = (&'static str, IpAddr, (IpAddr, u16), u32, (IpAddr, u16));

pub fn families() -> [Family; 2] {
    [
        (
            "v4",
            ip4(LOCAL_V4),
            (ip4(ENTRY_RELAY_V4), RELAY_PORT),
            ENTRY,
            (ip4(STRANGER_V4), STRANGER_PORT),
        ),
        (
            "v6",
            ip6(local_v6()),
            (ip6(entry_relay_v6()), RELAY_PORT),
            V6_RELAY,
            (ip6(stranger_v6()), STRANGER_PORT),
        ),
    ]
}

/// Re-role the underlay for a framing: bare IP needs the L3 flag.
pub fn underlay_for(lab: &mut Lab, framing: Framing) {
    let cfg = if framing.is_l3() {
        UNDERLAY_L3
    } else {
        UNDERLAY_ETH
    };
    if lab.ifaces.get(&lab.under) != Some(&cfg) {
        let under = lab.under;
        lab.set_iface("ws-under", under, Some(cfg));
    }
}
