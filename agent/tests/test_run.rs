//! `BPF_PROG_TEST_RUN` tests of the compiled TC programs (`wirescope_ingress` = rx,
//! `wirescope_egress` = tx) on the byte fixtures of `agent_common::fixtures`, the ones the
//! host parser tests use. Every single run checks the verdict (TC_ACT_UNSPEC, -1: the
//! programs only observe), that the packet comes back byte for byte, and that MAP_ERRORS
//! stays 0; the tests compare the exact COUNTERS and UNKNOWN_WIRE deltas (packets and bytes)
//! each run leaves.
//!
//! What the kernel's test_run does with a TC program's input (net/bpf/test_run.c, checked by
//! experiment on 6.18): the bytes are taken as an Ethernet frame (`eth_type_trans`) and the
//! MAC header is pushed back, so the program sees them from offset 0: bare IP packets (the
//! L3 fixtures) work, on an interface whose IFACES entry has the L3 flag, if they are at
//! least 14 bytes (shorter input is EINVAL). When bytes 12..14 say IPv4 (0x0800) or IPv6
//! (0x86dd), the kernel also wants a whole minimal IP header behind them (34 or 54 bytes in
//! all, else EINVAL): such truncations cannot be run, so the tests check that they are
//! refused (`kernel_refuses`); behind VLAN tags or on L3 fixtures they do run. The skb is
//! linear, at most PAGE_SIZE - 64 - 320 = 3712 bytes. In `__sk_buff` given as ctx_in the kernel takes
//! `ifindex` (a device of the caller's network namespace, else ENODEV; what the program reads
//! as the skb's ifindex), `gso_segs` and `gso_size` (copied to skb_shinfo, so the program's
//! GSO path runs), and a few fields these tests leave at zero; any other non-zero field is
//! EINVAL.
//!
//! Every test enters a fresh network namespace (unshare on its own thread), where `lo`
//! (ifindex 1) plays the WireGuard interface (TUNNEL | L3), one end of a veth pair the
//! underlay (UNDERLAY, Ethernet) and the other end an interface the agent does not watch.
//! The programs are attached there through `Datapath::attach`, as the agent does it, which is
//! what writes IFACES; the interfaces are down, so only the test runs reach the programs.
//!
//! Needs root and BPF. Without root the tests print why and pass, except with CI=true, where
//! they fail. Run: `cargo test -p wirescope --test test_run -- --test-threads=1`.

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agent_common::{
    fixtures::{self, ETH_P_ARP, Ext, Framing, IpHeader, Ipv4, Ipv6, arp_request, tcp, udp, wg},
    maps::{Counter, CounterKey, Endpoint, IfaceConfig, PEER_UNKNOWN, UnknownWireKey, kind},
    parse::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, parse_ip, parse_l4, segmented,
    },
    wireguard::{classify, data_wire_len},
};
use aya::programs::{TestRun, TestRunOptions};
use common::{
    Dir, LISTEN_PORT, LOCAL_V4, RELAY_PORT, TUNNEL_L3, UNDERLAY_ETH, ifindex, local_v6,
    stranger_v6, v6,
};
use wirescope::{
    datapath::{Datapath, PeerMaps},
    sync::endpoint_key,
};

// ---------------------------------------------------------------------------------------
// The topology: a Mullvad-style multihop client
// ---------------------------------------------------------------------------------------

/// Hop 1: allowed IPs are only the exit relay's addresses; endpoint ENTRY_RELAY:51820.
const ENTRY: u32 = 1;
/// Hop 2: allowed IPs 0.0.0.0/0 and ::/0; endpoint EXIT_RELAY:51820, reached through ENTRY.
const EXIT: u32 = 2;
/// A peer with an IPv6 endpoint ([ENTRY_RELAY_V6]:51820), for the wire role over IPv6.
const V6_RELAY: u32 = 3;
/// The exit relay's IPv6 endpoint ([EXIT_RELAY_V6]:51820), for IPv6 multihop.
const EXIT_V6: u32 = 4;

const CLIENT_V4: [u8; 4] = [10, 64, 1, 2];
const GATEWAY_V4: [u8; 4] = [10, 64, 0, 1];
const REMOTE_V4: [u8; 4] = [93, 184, 216, 34];
const ENTRY_RELAY_V4: [u8; 4] = common::RELAY_V4;
const EXIT_RELAY_V4: [u8; 4] = [198, 51, 100, 7];
const STRANGER_V4: [u8; 4] = [192, 0, 2, 99];

const STRANGER_PORT: u16 = 40000;
/// A local port that is not a listen port.
const OTHER_PORT: u16 = 40001;

fn client_v6() -> [u8; 16] {
    v6("fc00:bbbb:bbbb:bb01::1:102")
}
fn remote_v6() -> [u8; 16] {
    v6("2001:db8:ffff::34")
}
fn entry_relay_v6() -> [u8; 16] {
    common::relay_v6()
}
fn exit_relay_v6() -> [u8; 16] {
    v6("2001:db8:7::7")
}

/// The peer maps of the multihop client whose tunnel is `tun`.
fn multihop_maps(tun: u32) -> PeerMaps {
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

fn ip4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}
fn ip6(a: [u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(a))
}
fn ep(ip: IpAddr, port: u16) -> Endpoint {
    endpoint_key(ip, port)
}

// ---------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------

fn ip_header(src: IpAddr, dst: IpAddr) -> IpHeader {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s.octets(), d.octets()).into(),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s.octets(), d.octets()).into(),
        _ => panic!("mixed families"),
    }
}

/// IP header length without options: 20 or 40.
fn base_hdr(ip: IpAddr) -> u64 {
    if ip.is_ipv4() { 20 } else { 40 }
}

/// UDP between `local` and `remote` in direction `dir`, carrying `payload`: bare IP.
fn udp_flow(dir: Dir, local: (IpAddr, u16), remote: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
    let (src, dst) = dir.flow(local, remote);
    ip_header(src.0, dst.0).build(IPPROTO_UDP, &udp(src.1, dst.1, payload))
}

/// `fixtures::udp_ipv4` (`udp_ipv6`) of `len` bytes from port 1 to port 2 between `local`
/// and `remote` in direction `dir`.
fn udp_between(dir: Dir, local: IpAddr, remote: IpAddr, len: usize) -> Vec<u8> {
    match dir.flow(local, remote) {
        (IpAddr::V4(s), IpAddr::V4(d)) => fixtures::udp_ipv4(s.octets(), 1, d.octets(), 2, len),
        (IpAddr::V6(s), IpAddr::V6(d)) => fixtures::udp_ipv6(s.octets(), 1, d.octets(), 2, len),
        _ => panic!("mixed families"),
    }
}

/// The WireGuard messages of every kind, with the kind the programs must count them as.
fn messages() -> Vec<(&'static str, Vec<u8>, u8)> {
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

/// UDP payloads sent to a WireGuard endpoint that are not WireGuard messages.
fn not_wireguard() -> Vec<(String, Vec<u8>)> {
    let resized = |mut m: Vec<u8>, len: usize| {
        m.resize(len, 0x55);
        m
    };
    let with = |mut m: Vec<u8>, at: usize, v: u8| {
        m[at] = v;
        m
    };
    let mut out: Vec<(String, Vec<u8>)> = [
        ("empty", vec![]),
        ("15 bytes", resized(wg::keepalive(1, 0), 15)),
        ("16-byte data header only", resized(wg::keepalive(1, 0), 16)),
        ("data of 31", resized(wg::keepalive(1, 0), 31)),
        ("data plaintext 1", wg::data_with_plaintext(1, 0, 1)),
        ("data plaintext 8", wg::data_with_plaintext(1, 0, 8)),
        ("data plaintext 17", wg::data_with_plaintext(1, 0, 17)),
        ("data plaintext 67", wg::data_with_plaintext(1, 0, 67)),
        ("initiation of 147", resized(wg::initiation(1), 147)),
        ("initiation of 149", resized(wg::initiation(1), 149)),
        ("response of 91", resized(wg::response(1, 2), 91)),
        ("response of 93", resized(wg::response(1, 2), 93)),
        ("cookie of 63", resized(wg::cookie_reply(1), 63)),
        ("cookie of 65", resized(wg::cookie_reply(1), 65)),
        ("type 0", with(wg::initiation(1), 0, 0)),
        ("type 5", with(wg::initiation(1), 0, 5)),
        ("type 255 at data size", with(wg::keepalive(1, 0), 0, 0xff)),
        ("type 2 at initiation size", with(wg::initiation(1), 0, 2)),
        ("type 1 at cookie size", with(wg::cookie_reply(1), 0, 1)),
        ("DNS-looking", fixtures::payload(40)),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_string(), p))
    .collect();
    for (name, msg) in [
        ("initiation", wg::initiation(1)),
        ("response", wg::response(1, 2)),
        ("cookie", wg::cookie_reply(1)),
        ("data", wg::data(1, 2, 100, 1420)),
        ("keepalive", wg::keepalive(1, 2)),
    ] {
        for at in 1..4 {
            out.push((
                format!("{name} reserved byte {at}"),
                with(msg.clone(), at, 1),
            ));
        }
    }
    out
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
struct Delta {
    counters: Vec<(CounterKey, Counter)>,
    unknown: Vec<(UnknownWireKey, Counter)>,
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
    fn none() -> Self {
        Self::default()
    }

    fn tunnel(self, ifindex: u32, peer: u32, dir: Dir, packets: u64, bytes: u64) -> Self {
        self.counter(ifindex, peer, kind::TUNNEL, dir, packets, bytes)
    }

    fn counter(
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

    fn unknown(
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
        self.sorted()
    }

    fn sorted(mut self) -> Self {
        self.counters
            .sort_by_key(|(k, _)| (k.ifindex, k.peer, k.kind, k.dir));
        self.unknown
            .sort_by_key(|(k, _)| (k.ifindex, k.endpoint, k.kind, k.dir));
        self
    }

    /// Counted as a WireGuard message, anywhere.
    fn has_wire(&self) -> bool {
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

struct Lab {
    dp: Datapath,
    /// lo: the WireGuard interface (TUNNEL | L3).
    tun: u32,
    /// ws-under: the underlay (UNDERLAY, Ethernet).
    under: u32,
    /// ws-unwatched: in the namespace, not in IFACES.
    unwatched: u32,
    /// What IFACES says, per ifindex (for the model).
    ifaces: HashMap<u32, IfaceConfig>,
    /// What the peer maps hold (for the model).
    maps: PeerMaps,
}

impl Lab {
    /// A fresh network namespace for this thread, the programs loaded and attached, the
    /// multihop peer maps written. `None` when not root and not in CI.
    fn new() -> Option<Lab> {
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
    fn set_iface(&mut self, name: &str, ifindex: u32, cfg: Option<IfaceConfig>) {
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

    fn set_maps(&mut self, maps: PeerMaps) {
        self.dp.sync_peers(&maps).expect("writing the peer maps");
        self.maps = maps;
    }

    fn snapshot(
        &self,
    ) -> (
        HashMap<CounterKey, Counter>,
        HashMap<UnknownWireKey, Counter>,
    ) {
        let c = self.dp.counters().expect("reading COUNTERS");
        let u = self.dp.unknown_wire().expect("reading UNKNOWN_WIRE");
        (c.into_iter().collect(), u.into_iter().collect())
    }

    fn delta(
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
    fn run_once(&mut self, what: &str, dir: Dir, ifindex: u32, gso: (u32, u32), data: &[u8]) {
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
    fn run(&mut self, what: &str, dir: Dir, ifindex: u32, gso: (u32, u32), data: &[u8]) -> Delta {
        let before = self.snapshot();
        self.run_once(what, dir, ifindex, gso, data);
        Self::delta(&before, &self.snapshot())
    }

    /// Run without GSO and compare with `want`.
    #[track_caller]
    fn expect(&mut self, what: &str, dir: Dir, ifindex: u32, data: &[u8], want: Delta) {
        self.expect_gso(what, dir, ifindex, (0, 0), data, want);
    }

    #[track_caller]
    fn expect_gso(
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
    fn expect_truncations_count_nothing(&mut self, what: &str, dir: Dir, ifindex: u32, pkt: &[u8]) {
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
    fn model(&self, dir: Dir, ifindex: u32, gso_segs: u32, pkt: &[u8]) -> Delta {
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

// ---------------------------------------------------------------------------------------
// Tunnel role
// ---------------------------------------------------------------------------------------

/// Inner packets on the tunnel, per peer by longest prefix of the destination (tx) or the
/// source (rx): the exit relay's /32 (/128) beats the exit peer's 0.0.0.0/0 (::/0).
#[test]
fn tunnel_longest_prefix_match_v4_v6() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    let neighbour_v6 = v6("2001:db8:7::8");
    // (what, local, remote, peer the remote address belongs to, packet builder)
    type Build = Box<dyn Fn(IpAddr, IpAddr) -> Vec<u8>>;
    let udp_of = |len: usize| -> Build {
        Box::new(move |s: IpAddr, d: IpAddr| {
            let hdr = ip_header(s, d);
            let l4 = udp(40000, 53, &fixtures::payload(len - hdr.header_len() - 8));
            hdr.build(IPPROTO_UDP, &l4)
        })
    };
    let tcp_of = |opts: usize, len: usize| -> Build {
        Box::new(move |s: IpAddr, d: IpAddr| {
            let hdr = ip_header(s, d);
            let payload = fixtures::payload(len - hdr.header_len() - 20 - opts);
            hdr.build(IPPROTO_TCP, &tcp(40000, 443, opts, &payload))
        })
    };
    let icmp_of = |len: usize| -> Build {
        Box::new(move |s: IpAddr, d: IpAddr| {
            let hdr = ip_header(s, d);
            let proto = if s.is_ipv4() {
                IPPROTO_ICMP
            } else {
                IPPROTO_ICMPV6
            };
            let mut echo = vec![if s.is_ipv4() { 8 } else { 128 }, 0, 0, 0, 0, 1, 0, 1];
            echo.extend(fixtures::payload(len - hdr.header_len() - 8));
            hdr.build(proto, &echo)
        })
    };
    let v4_options: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s.octets(), d.octets())
            .options(40)
            .build(IPPROTO_UDP, &udp(1, 2, &fixtures::payload(100))),
        _ => unreachable!(),
    });
    let v6_ext: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s.octets(), d.octets())
            .ext(Ext::HopByHop(8))
            .ext(Ext::DestOpts(24))
            .ext(Ext::Fragment {
                offset: 0,
                more: false,
                id: 9,
            })
            .build(IPPROTO_UDP, &udp(1, 2, &fixtures::payload(100))),
        _ => unreachable!(),
    });
    let v6_later_fragment: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6::new(s.octets(), d.octets())
            .ext(Ext::Fragment {
                offset: 100,
                more: false,
                id: 9,
            })
            .build(IPPROTO_UDP, &fixtures::payload(200)),
        _ => unreachable!(),
    });
    let v4_later_fragment: Build = Box::new(|s: IpAddr, d: IpAddr| match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4::new(s.octets(), d.octets())
            .mf(true)
            .frag_offset(100)
            .build(IPPROTO_UDP, &fixtures::payload(200)),
        _ => unreachable!(),
    });
    let cases: Vec<(&str, IpAddr, IpAddr, u32, Build)> = vec![
        (
            "v4 udp to the internet",
            ip4(CLIENT_V4),
            ip4(REMOTE_V4),
            EXIT,
            udp_of(100),
        ),
        (
            "v4 udp, Mullvad MTU",
            ip4(CLIENT_V4),
            ip4(REMOTE_V4),
            EXIT,
            udp_of(1380),
        ),
        (
            "v4 ping to the gateway",
            ip4(CLIENT_V4),
            ip4(GATEWAY_V4),
            EXIT,
            icmp_of(84),
        ),
        (
            "v4 tcp to the exit relay",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            tcp_of(12, 200),
        ),
        (
            "v4 ping to the exit relay",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            icmp_of(84),
        ),
        (
            "v4 next to the exit relay (.6)",
            ip4(CLIENT_V4),
            ip4([198, 51, 100, 6]),
            EXIT,
            udp_of(60),
        ),
        (
            "v4 next to the exit relay (.8)",
            ip4(CLIENT_V4),
            ip4([198, 51, 100, 8]),
            EXIT,
            udp_of(60),
        ),
        (
            "v4 options",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            v4_options,
        ),
        (
            "v4 later fragment",
            ip4(CLIENT_V4),
            ip4(EXIT_RELAY_V4),
            ENTRY,
            v4_later_fragment,
        ),
        (
            "v6 udp to the internet",
            ip6(client_v6()),
            ip6(remote_v6()),
            EXIT,
            udp_of(100),
        ),
        (
            "v6 udp, Mullvad MTU",
            ip6(client_v6()),
            ip6(remote_v6()),
            EXIT,
            udp_of(1380),
        ),
        (
            "v6 tcp to the exit relay",
            ip6(client_v6()),
            ip6(exit_relay_v6()),
            ENTRY,
            tcp_of(0, 1000),
        ),
        (
            "v6 ping to the exit relay",
            ip6(client_v6()),
            ip6(exit_relay_v6()),
            ENTRY,
            icmp_of(104),
        ),
        (
            "v6 next to the exit relay",
            ip6(client_v6()),
            ip6(neighbour_v6),
            EXIT,
            udp_of(60),
        ),
        (
            "v6 extension headers",
            ip6(client_v6()),
            ip6(exit_relay_v6()),
            ENTRY,
            v6_ext,
        ),
        (
            "v6 later fragment",
            ip6(client_v6()),
            ip6(remote_v6()),
            EXIT,
            v6_later_fragment,
        ),
    ];
    for (what, local, remote, peer, build) in &cases {
        for dir in Dir::BOTH {
            let (src, dst) = dir.flow(*local, *remote);
            let pkt = build(src, dst);
            let want = Delta::none().tunnel(tun, *peer, dir, 1, pkt.len() as u64);
            lab.expect(what, dir, tun, &pkt, want);
            lab.expect_truncations_count_nothing(what, dir, tun, &pkt);
        }
    }
    // The direction picks the address: tx looks at the destination only, rx at the source.
    // From the exit relay's address to the internet (tx) / the reverse (rx): EXIT.
    for dir in Dir::BOTH {
        for (what, local, remote) in [
            ("v4 direction", ip4(EXIT_RELAY_V4), ip4(REMOTE_V4)),
            ("v6 direction", ip6(exit_relay_v6()), ip6(remote_v6())),
        ] {
            let pkt = udp_between(dir, local, remote, 64);
            let want = Delta::none().tunnel(tun, EXIT, dir, 1, 64);
            lab.expect(what, dir, tun, &pkt, want);
        }
    }
    // Counts accumulate in one entry per (interface, peer, kind, direction).
    let pkt = fixtures::udp_ipv4(CLIENT_V4, 1, REMOTE_V4, 2, 500);
    let before = lab.snapshot();
    for _ in 0..10 {
        lab.run_once("repeat", Dir::Tx, tun, (0, 0), &pkt);
    }
    let got = Lab::delta(&before, &lab.snapshot());
    assert_eq!(got, Delta::none().tunnel(tun, EXIT, Dir::Tx, 10, 5000));
}

/// Traffic no allowed IP covers is peer 0 ("unknown"); the tries are per interface; an
/// interface that is not in IFACES counts nothing at all.
#[test]
fn tunnel_unmatched_foreign_and_unwatched_interfaces() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, other) = (lab.tun, lab.unwatched);
    // Only the in-tunnel networks, as a non-default-route client would have them (the sync
    // also removes the 0.0.0.0/0, ::/0 and /32 entries written before).
    let mut partial = multihop_maps(tun);
    partial.allowed_v4.clear();
    partial.allowed_v6.clear();
    partial.allowed_v4.insert((tun, [10, 64, 0, 0], 16), EXIT);
    partial
        .allowed_v6
        .insert((tun, v6("fc00:bbbb::"), 32), EXIT);
    lab.set_maps(partial);
    // (what, local, remote: the addresses of a UDP packet, the peer it counts for)
    let (client4, client6) = (ip4(CLIENT_V4), ip6(client_v6()));
    for dir in Dir::BOTH {
        for (what, local, remote, peer) in [
            ("v4 unmatched", client4, ip4(REMOTE_V4), PEER_UNKNOWN),
            (
                "v4 exit relay, /32 gone",
                client4,
                ip4(EXIT_RELAY_V4),
                PEER_UNKNOWN,
            ),
            ("v4 in-tunnel", client4, ip4(GATEWAY_V4), EXIT),
            ("v6 unmatched", client6, ip6(remote_v6()), PEER_UNKNOWN),
            (
                "v6 in-tunnel",
                client6,
                ip6(v6("fc00:bbbb:bbbb:bb01::1")),
                EXIT,
            ),
        ] {
            let pkt = udp_between(dir, local, remote, 120);
            let want = Delta::none().tunnel(tun, peer, dir, 1, 120);
            lab.expect(what, dir, tun, &pkt, want);
        }
    }
    lab.set_maps(multihop_maps(tun));

    // Everything that counts on the watched interfaces, offered to the unwatched one.
    let mut everything: Vec<(String, Vec<u8>)> = Vec::new();
    for dir in Dir::BOTH {
        everything.push((
            format!("{dir:?} tunnel v4"),
            udp_between(dir, client4, ip4(REMOTE_V4), 100),
        ));
        let (s, d) = dir.flow(client_v6(), remote_v6());
        everything.push((
            format!("{dir:?} tunnel v6"),
            fixtures::tcp_ipv6(s, 1, d, 2, 0, 100),
        ));
        for (name, msg, _) in messages() {
            let local = (ip4(LOCAL_V4), LISTEN_PORT);
            let known = (ip4(ENTRY_RELAY_V4), RELAY_PORT);
            let l3 = udp_flow(dir, local, known, &msg);
            everything.push((format!("{dir:?} {name} bare"), l3.clone()));
            everything.push((
                format!("{dir:?} {name} ethernet"),
                Framing::Ethernet.frame(&l3),
            ));
            let stranger = (ip4(STRANGER_V4), STRANGER_PORT);
            let l3 = udp_flow(dir, local, stranger, &msg);
            everything.push((
                format!("{dir:?} {name} listen port"),
                Framing::Ethernet.frame(&l3),
            ));
        }
    }
    for (what, pkt) in &everything {
        for dir in Dir::BOTH {
            lab.expect(what, dir, other, pkt, Delta::none());
        }
    }

    // A second tunnel: the first one's allowed IPs (0.0.0.0/0 included) do not apply to it.
    lab.set_iface("ws-unwatched", other, Some(TUNNEL_L3));
    for dir in Dir::BOTH {
        for (what, local, remote) in [
            ("second tunnel v4", client4, ip4(EXIT_RELAY_V4)),
            ("second tunnel v6", client6, ip6(remote_v6())),
        ] {
            let pkt = udp_between(dir, local, remote, 100);
            let want = Delta::none().tunnel(other, PEER_UNKNOWN, dir, 1, 100);
            lab.expect(what, dir, other, &pkt, want);
        }
    }
    // Detached again: IFACES forgets it, nothing counts.
    lab.set_iface("ws-unwatched", other, None);
    for (what, pkt) in &everything {
        for dir in Dir::BOTH {
            lab.expect(what, dir, other, pkt, Delta::none());
        }
    }
}

/// GSO super-packets (tx) and GRO packets (rx) count once per segment, with the headers every
/// segment will carry.
#[test]
fn tunnel_gso_counts_segments() {
    let Some(mut lab) = Lab::new() else { return };
    let tun = lab.tun;
    // (what, family v6?, TCP options, payload, gso_size, gso_segs)
    let cases = [
        ("v4 3 x 1000", false, 12usize, 3000usize, 1000u32, 3u32),
        ("v4 1400 + 1400 + 200", false, 0, 3000, 1400, 3),
        ("v4 2 x 1448", false, 12, 2896, 1448, 2),
        ("v6 3 x 1000", true, 0, 3000, 1000, 3),
        ("v6 2 x 1428 + 10", true, 12, 2866, 1428, 3),
    ];
    for (what, is_v6, opts, payload, size, segs) in cases {
        for dir in Dir::BOTH {
            let pkt = if is_v6 {
                let (s, d) = dir.flow(client_v6(), remote_v6());
                fixtures::tcp_ipv6(s, 40000, d, 443, opts, payload)
            } else {
                let (s, d) = dir.flow(CLIENT_V4, REMOTE_V4);
                fixtures::tcp_ipv4(s, 40000, d, 443, opts, payload)
            };
            // The segments as they will be on the wire: full ones of `size`, the rest last.
            let hdr = if is_v6 { 40 } else { 20 } + 20 + opts as u64;
            let mut left = payload as u64;
            let mut bytes = 0;
            for _ in 0..segs {
                let seg = left.min(size as u64);
                bytes += hdr + seg;
                left -= seg;
            }
            assert_eq!(left, 0, "{what}: fixture and segments disagree");
            let want = Delta::none().tunnel(tun, EXIT, dir, segs as u64, bytes);
            lab.expect_gso(what, dir, tun, (segs, size), &pkt, want);
            // Without GSO it is one packet of its own length.
            let want = Delta::none().tunnel(tun, EXIT, dir, 1, pkt.len() as u64);
            lab.expect(what, dir, tun, &pkt, want);
            // gso_segs 1 is not segmented either.
            lab.expect_gso(what, dir, tun, (1, size), &pkt, want_one(tun, dir, &pkt));
        }
    }

    // UDP GSO of WireGuard data messages on the underlay (wireguard-go sends batches so): two
    // data messages of 1040 bytes in one skb are two messages of 20 + 8 + 1040 bytes each.
    let under = lab.under;
    for dir in Dir::BOTH {
        let msg = wg::data(0x1122_3344, 9, 1000, 1420);
        assert_eq!(msg.len(), 1040);
        let mut batch = msg.clone();
        batch.extend_from_slice(&msg);
        let (s, d) = dir.flow((LOCAL_V4, LISTEN_PORT), (ENTRY_RELAY_V4, RELAY_PORT));
        let l3 = Ipv4::new(s.0, d.0).build(IPPROTO_UDP, &udp(s.1, d.1, &batch));
        let frame = Framing::Ethernet.frame(&l3);
        let want = Delta::none().counter(under, ENTRY, kind::DATA, dir, 2, 2 * (20 + 8 + 1040));
        lab.expect_gso(
            "udp gso of 2 data messages",
            dir,
            under,
            (2, 1048),
            &frame,
            want,
        );
    }
}

fn want_one(tun: u32, dir: Dir, pkt: &[u8]) -> Delta {
    Delta::none().tunnel(tun, EXIT, dir, 1, pkt.len() as u64)
}

// ---------------------------------------------------------------------------------------
// Wire role
// ---------------------------------------------------------------------------------------

/// (family, local address, known endpoint, its peer, an endpoint nobody knows)
type Family = (&'static str, IpAddr, (IpAddr, u16), u32, (IpAddr, u16));

fn families() -> [Family; 2] {
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
fn underlay_for(lab: &mut Lab, framing: Framing) {
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

/// Every message type to and from a known endpoint: that peer, that kind, bytes = the outer
/// L3 length; over Ethernet, one and two VLAN tags, and bare IP; from the listen port or
/// any other local port.
#[test]
fn wire_messages_of_known_endpoints() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    for framing in Framing::ALL {
        underlay_for(&mut lab, framing);
        for (fam, local, known, peer, _) in families() {
            for lport in [LISTEN_PORT, OTHER_PORT] {
                for (name, msg, k) in messages() {
                    let what = format!("{fam} {name} {framing:?} from port {lport}");
                    for dir in Dir::BOTH {
                        let l3 = udp_flow(dir, (local, lport), known, &msg);
                        let l3_len = base_hdr(local) + 8 + msg.len() as u64;
                        assert_eq!(l3.len() as u64, l3_len);
                        let frame = framing.frame(&l3);
                        let want = Delta::none().counter(under, peer, k, dir, 1, l3_len);
                        lab.expect(&what, dir, under, &frame, want);
                        lab.expect_truncations_count_nothing(&what, dir, under, &frame);
                    }
                }
            }
        }
    }
    // Ethernet padding after a short packet (a keepalive over IPv4 is 60 bytes, the
    // minimum frame; a cookie reply plus 30 bytes of padding) does not count.
    underlay_for(&mut lab, Framing::Ethernet);
    for dir in Dir::BOTH {
        let l3 = udp_flow(
            dir,
            (ip4(LOCAL_V4), LISTEN_PORT),
            (ip4(ENTRY_RELAY_V4), RELAY_PORT),
            &wg::cookie_reply(5),
        );
        let mut frame = Framing::Ethernet.frame(&l3);
        frame.extend_from_slice(&[0u8; 30]);
        let want = Delta::none().counter(under, ENTRY, kind::COOKIE_REPLY, dir, 1, 20 + 8 + 64);
        lab.expect("padded frame", dir, under, &frame, want);
    }
}

/// Not a known endpoint, but the local side is a listen port: UNKNOWN_WIRE, keyed by the
/// remote endpoint. Neither: nothing. The direction decides which side is local.
#[test]
fn wire_unknown_endpoints_and_listen_ports() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    for framing in [Framing::Ethernet, Framing::Vlan(7), Framing::L3] {
        underlay_for(&mut lab, framing);
        for (fam, local, known, _, stranger) in families() {
            for (name, msg, k) in messages() {
                let what = format!("{fam} {name} {framing:?}");
                for dir in Dir::BOTH {
                    let l3_len = base_hdr(local) + 8 + msg.len() as u64;
                    // From/to the listen port: counted for the endpoint.
                    let l3 = udp_flow(dir, (local, LISTEN_PORT), stranger, &msg);
                    let frame = framing.frame(&l3);
                    let endpoint = ep(stranger.0, stranger.1);
                    let want = Delta::none().unknown(under, endpoint, k, dir, 1, l3_len);
                    lab.expect(&format!("{what} listen port"), dir, under, &frame, want);
                    lab.expect_truncations_count_nothing(&what, dir, under, &frame);
                    // Neither side known.
                    let l3 = udp_flow(dir, (local, OTHER_PORT), stranger, &msg);
                    lab.expect(
                        &format!("{what} neither"),
                        dir,
                        under,
                        &framing.frame(&l3),
                        Delta::none(),
                    );
                    // The listen port on the remote side is not ours.
                    let l3 = udp_flow(dir, (local, OTHER_PORT), (stranger.0, LISTEN_PORT), &msg);
                    lab.expect(
                        &format!("{what} remote listen port"),
                        dir,
                        under,
                        &framing.frame(&l3),
                        Delta::none(),
                    );
                    // A known endpoint on the local side is not the remote one.
                    let l3 = udp_flow(dir, known, (local, OTHER_PORT), &msg);
                    lab.expect(
                        &format!("{what} endpoint on the wrong side"),
                        dir,
                        under,
                        &framing.frame(&l3),
                        Delta::none(),
                    );
                }
            }
        }
    }
}

/// UDP to a known endpoint that is not WireGuard (sizes, reserved bytes, types), TCP, later
/// fragments, ARP and other non-IP frames: nothing.
#[test]
fn wire_rejects_what_is_not_wireguard() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    underlay_for(&mut lab, Framing::Ethernet);
    for (fam, local, known, _, _) in families() {
        for (name, payload) in not_wireguard() {
            for dir in Dir::BOTH {
                for framing in [Framing::Ethernet, Framing::QinQ(1, 2)] {
                    let what = format!("{fam} {name} {framing:?}");
                    let frame =
                        framing.frame(&udp_flow(dir, (local, LISTEN_PORT), known, &payload));
                    lab.expect(&what, dir, under, &frame, Delta::none());
                }
            }
        }
        for (name, msg, _) in messages() {
            for dir in Dir::BOTH {
                let ((src, sport), (dst, dport)) = dir.flow((local, LISTEN_PORT), known);
                // The same bytes over TCP.
                let hdr = ip_header(src, dst);
                let seg = hdr.build(IPPROTO_TCP, &tcp(sport, dport, 0, &msg));
                let what = format!("{fam} {name} over tcp");
                lab.expect(
                    &what,
                    dir,
                    under,
                    &Framing::Ethernet.frame(&seg),
                    Delta::none(),
                );
                // A later fragment whose payload starts like a UDP datagram with a valid
                // message: its bytes are the middle of some other datagram.
                let dgram = udp(sport, dport, &msg);
                let later: Vec<Vec<u8>> = match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => vec![
                        Ipv4::new(s.octets(), d.octets())
                            .frag_offset(185)
                            .build(IPPROTO_UDP, &dgram),
                        Ipv4::new(s.octets(), d.octets())
                            .mf(true)
                            .frag_offset(1)
                            .build(IPPROTO_UDP, &dgram),
                    ],
                    (IpAddr::V6(s), IpAddr::V6(d)) => vec![
                        Ipv6::new(s.octets(), d.octets())
                            .ext(Ext::Fragment {
                                offset: 185,
                                more: false,
                                id: 3,
                            })
                            .build(IPPROTO_UDP, &dgram),
                        Ipv6::new(s.octets(), d.octets())
                            .ext(Ext::Fragment {
                                offset: 1,
                                more: true,
                                id: 3,
                            })
                            .build(IPPROTO_UDP, &dgram),
                    ],
                    _ => unreachable!(),
                };
                for (i, l3) in later.iter().enumerate() {
                    let what = format!("{fam} {name} as later fragment {i}");
                    lab.expect(
                        &what,
                        dir,
                        under,
                        &Framing::Ethernet.frame(l3),
                        Delta::none(),
                    );
                }
            }
        }
    }
    // Not IP at all.
    let arp = Framing::Ethernet.frame_ethertype(ETH_P_ARP, &arp_request(LOCAL_V4, ENTRY_RELAY_V4));
    let arp_vlan =
        Framing::Vlan(5).frame_ethertype(ETH_P_ARP, &arp_request(LOCAL_V4, ENTRY_RELAY_V4));
    // A valid WireGuard packet behind LLDP's ethertype, and behind three VLAN tags.
    let wg_l3 = udp_flow(
        Dir::Tx,
        (ip4(LOCAL_V4), LISTEN_PORT),
        (ip4(ENTRY_RELAY_V4), RELAY_PORT),
        &wg::initiation(1),
    );
    let lldp = Framing::Ethernet.frame_ethertype(0x88cc, &wg_l3);
    let mut three_tags = Framing::QinQ(1, 2).frame(&wg_l3);
    three_tags.splice(20..20, [0x81, 0x00, 0x00, 0x03]);
    for (what, frame) in [
        ("arp", arp),
        ("arp vlan", arp_vlan),
        ("lldp", lldp),
        ("three vlan tags", three_tags),
    ] {
        for dir in Dir::BOTH {
            lab.expect(what, dir, under, &frame, Delta::none());
        }
    }
    // The same on the tunnel interface (bare IP): ARP bytes are no IP packet.
    let arp = arp_request(LOCAL_V4, ENTRY_RELAY_V4);
    let tun = lab.tun;
    for dir in Dir::BOTH {
        lab.expect("arp bytes on the tunnel", dir, tun, &arp, Delta::none());
    }
}

/// A first fragment of a WireGuard datagram carries the message's type, reserved bytes and
/// the UDP length of the whole datagram: it counts as that message, once, with the size of the
/// whole datagram (the later fragments carry no ports and are not attributed).
#[test]
fn wire_first_fragment_counts_the_message_once() {
    let Some(mut lab) = Lab::new() else { return };
    let under = lab.under;
    for dir in Dir::BOTH {
        let msg = wg::data(0x1122_3344, 1, 1400, 1420);
        let ((s, sp), (d, dp)) = dir.flow((LOCAL_V4, LISTEN_PORT), (ENTRY_RELAY_V4, RELAY_PORT));
        let dgram = udp(sp, dp, &msg);
        let first = Ipv4::new(s, d).mf(true).build(IPPROTO_UDP, &dgram[..1000]);
        let rest = Ipv4::new(s, d)
            .frag_offset(125)
            .build(IPPROTO_UDP, &dgram[1000..]);
        // The whole datagram once: one outer IP header + UDP header + message.
        let whole = (20 + dgram.len()) as u64;
        let want = Delta::none().counter(under, ENTRY, kind::DATA, dir, 1, whole);
        lab.expect(
            "first fragment",
            dir,
            under,
            &Framing::Ethernet.frame(&first),
            want,
        );
        lab.expect(
            "last fragment",
            dir,
            under,
            &Framing::Ethernet.frame(&rest),
            Delta::none(),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Multihop
// ---------------------------------------------------------------------------------------

/// Mullvad multihop on one interface: exit-layer WireGuard messages travel inside the entry
/// peer's tunnel, so on the tunnel interface each counts as the entry peer's tunnel traffic
/// AND as the exit peer's wire traffic; on the underlay the entry layer counts as wire only.
#[test]
fn multihop_exit_layer_inside_the_tunnel() {
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

// ---------------------------------------------------------------------------------------
// Robustness: random and adversarial input
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// WireGuard's message format, written here independently of `wireguard::classify`: the
/// kind of a UDP payload whose first bytes are `head` and whose UDP length says `len`.
fn wireguard_kind(head: &[u8], len: usize) -> Option<u8> {
    if head.len() < 16 || head[1..4] != [0, 0, 0] {
        return None;
    }
    match (head[0], len) {
        (1, 148) => Some(kind::HANDSHAKE_INITIATION),
        (2, 92) => Some(kind::HANDSHAKE_RESPONSE),
        (3, 64) => Some(kind::COOKIE_REPLY),
        (4, 32) => Some(kind::KEEPALIVE),
        // Padded to 16, or cut at a tunnel MTU (at least 68).
        (4, n) if n > 32 && ((n - 32) % 16 == 0 || n - 32 >= 68) => Some(kind::DATA),
        _ => None,
    }
}

/// Valid packets that count, to mutate: WireGuard to known endpoints and from the listen
/// port, inner packets, in every framing the interface takes.
fn seeds() -> Vec<(Framing, Dir, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in Dir::BOTH {
        for (_, local, known, _, stranger) in families() {
            for (_, msg, _) in messages() {
                let framing =
                    [Framing::Ethernet, Framing::Vlan(3), Framing::QinQ(4, 5)][msg.len() % 3];
                out.push((
                    framing,
                    dir,
                    framing.frame(&udp_flow(dir, (local, LISTEN_PORT), known, &msg)),
                ));
                out.push((
                    Framing::Ethernet,
                    dir,
                    Framing::Ethernet.frame(&udp_flow(dir, (local, LISTEN_PORT), stranger, &msg)),
                ));
            }
        }
        let (s, d) = dir.flow(CLIENT_V4, EXIT_RELAY_V4);
        out.push((
            Framing::L3,
            dir,
            fixtures::wg_ipv4(s, LISTEN_PORT, d, RELAY_PORT, &wg::keepalive(1, 2)),
        ));
        out.push((Framing::L3, dir, fixtures::tcp_ipv4(s, 1, d, 2, 8, 64)));
        let (s, d) = dir.flow(client_v6(), exit_relay_v6());
        out.push((
            Framing::L3,
            dir,
            fixtures::wg_ipv6(s, LISTEN_PORT, d, RELAY_PORT, &wg::initiation(7)),
        ));
        let ext = Ipv6::new(s, d).ext(Ext::HopByHop(8)).ext(Ext::Routing(16));
        out.push((
            Framing::L3,
            dir,
            ext.build(
                IPPROTO_UDP,
                &udp(LISTEN_PORT, RELAY_PORT, &wg::response(1, 2)),
            ),
        ));
    }
    out
}

/// Random bytes, random headers, and mutations of valid packets (header bytes, WireGuard
/// type and reserved bytes, UDP and IP lengths, truncation, padding), on the tunnel and the
/// underlay, through both programs. Every run: verdict -1, bytes unchanged, exactly what the
/// host model says, and nothing counted as WireGuard that is not a WireGuard message.
#[test]
fn random_and_adversarial_input() {
    let Some(mut lab) = Lab::new() else { return };
    let (tun, under) = (lab.tun, lab.under);
    let seeds = seeds();
    let mut rng = Rng(0x7e57_5eed_0bad_cafe);
    let (mut counted, mut counted_wire) = (0, 0);
    for i in 0..600 {
        let (framing, pkt) = match i % 4 {
            // Garbage.
            0 => {
                let len = 14 + rng.below(300);
                let framing = if rng.below(2) == 0 {
                    Framing::L3
                } else {
                    Framing::Ethernet
                };
                (framing, (0..len).map(|_| rng.byte()).collect::<Vec<u8>>())
            }
            // Garbage behind a plausible IP header start.
            1 => {
                let len = 34 + rng.below(300);
                let mut p: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
                let v6 = rng.below(2) == 0;
                let framing = if rng.below(2) == 0 {
                    Framing::L3
                } else {
                    Framing::Ethernet
                };
                let off = framing.l3_offset() as usize;
                if off == 14 {
                    p[12..14].copy_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
                }
                let avail = (len - off) as u16;
                if v6 {
                    p[off] = 0x60;
                    if len >= off + 40 {
                        p[off + 4..off + 6]
                            .copy_from_slice(&avail.saturating_sub(40).to_be_bytes());
                        p[off + 6] = [17, 6, 0, 44][rng.below(4)];
                    }
                } else {
                    p[off] = 0x45;
                    p[off + 2..off + 4].copy_from_slice(&avail.to_be_bytes());
                    p[off + 6] = 0;
                    p[off + 9] = [17, 6, 1][rng.below(3)];
                }
                (framing, p)
            }
            // Mutations of valid packets.
            _ => {
                let (framing, _, seed) = &seeds[rng.below(seeds.len())];
                let mut p = seed.clone();
                let off = framing.l3_offset() as usize;
                let ip = parse_ip(&p.as_slice(), framing.is_l3()).expect("seed parses");
                let wg_off = ip.l4_off as usize + 8;
                for _ in 0..1 + rng.below(3) {
                    match rng.below(6) {
                        // A header byte.
                        0 => {
                            let at = rng.below(p.len().min(wg_off + 16));
                            p[at] = rng.byte();
                        }
                        // A bit anywhere in the first 100 bytes.
                        1 => {
                            let at = rng.below(p.len().min(100));
                            p[at] ^= 1 << rng.below(8);
                        }
                        // The WireGuard type or reserved bytes.
                        2 if p.len() > wg_off + 4 => {
                            p[wg_off + rng.below(4)] = [0, 1, 2, 3, 4, 5, 0x80, 0xff][rng.below(8)];
                        }
                        // Resize the UDP payload, keeping the lengths consistent.
                        3 if ip.proto == IPPROTO_UDP => {
                            let new_len = (wg_off
                                + [0, 1, 15, 16, 31, 33, 48, 63, 65, 91, 93, 99, 100, 147, 149]
                                    [rng.below(15)])
                            .min(p.len() + 200);
                            p.resize(new_len, 0x5a);
                            let l3_len = (p.len() - off) as u16;
                            let udp_len = (p.len() - ip.l4_off as usize) as u16;
                            if ip.family == 4 {
                                p[off + 2..off + 4].copy_from_slice(&l3_len.to_be_bytes());
                            } else {
                                p[off + 4..off + 6].copy_from_slice(&(l3_len - 40).to_be_bytes());
                            }
                            let u = ip.l4_off as usize;
                            p[u + 4..u + 6].copy_from_slice(&udp_len.to_be_bytes());
                        }
                        // Truncate.
                        4 if p.len() > 15 => {
                            let cut = 14 + rng.below(p.len() - 14);
                            p.truncate(cut);
                        }
                        // Pad.
                        _ => {
                            let extra = rng.below(40);
                            p.extend((0..extra).map(|_| rng.byte()));
                        }
                    }
                }
                (*framing, p)
            }
        };
        let ifindex = if framing.is_l3() {
            // Bare IP: alternately the tunnel and the underlay with the L3 flag.
            if i % 8 < 4 {
                tun
            } else {
                underlay_for(&mut lab, Framing::L3);
                under
            }
        } else {
            underlay_for(&mut lab, Framing::Ethernet);
            under
        };
        for dir in Dir::BOTH {
            let what = format!(
                "random input {i} ({} bytes: {:02x?})",
                pkt.len(),
                &pkt[..pkt.len().min(64)]
            );
            let got = lab.run(&what, dir, ifindex, (0, 0), &pkt);
            let want = lab.model(dir, ifindex, 0, &pkt);
            assert_eq!(got, want, "{what}: {dir:?} on ifindex {ifindex}");
            if got != Delta::none() {
                counted += 1;
            }
            if got.has_wire() {
                counted_wire += 1;
                // Independently: it is a UDP datagram whose payload is a WireGuard message
                // of the kind counted.
                let ip = parse_ip(&pkt.as_slice(), framing.is_l3()).expect("counted, so IP");
                let l4 = parse_l4(&pkt.as_slice(), &ip)
                    .expect("counted")
                    .expect("has ports");
                assert_eq!(ip.proto, IPPROTO_UDP, "{what}");
                let at = ip.l4_off as usize + 8;
                let head = &pkt[at..pkt.len().min(at + 16)];
                let k = wireguard_kind(head, l4.udp_payload_len as usize);
                let counted_kind = got
                    .counters
                    .iter()
                    .map(|(k, _)| k.kind)
                    .chain(got.unknown.iter().map(|(k, _)| k.kind))
                    .find(|k| *k != kind::TUNNEL);
                assert_eq!(
                    k, counted_kind,
                    "{what}: counted as WireGuard kind {counted_kind:?}"
                );
            }
        }
    }
    eprintln!("random input: {counted} runs counted something, {counted_wire} as WireGuard");
    // The generator reaches the counting paths.
    assert!(counted > 100, "only {counted} random runs counted anything");
    assert!(
        counted_wire > 50,
        "only {counted_wire} random runs counted WireGuard"
    );

    // Every valid seed and every truncation of it, on the interface it belongs to.
    for (framing, dir, pkt) in &seeds {
        let ifindex = if framing.is_l3() { tun } else { under };
        if !framing.is_l3() {
            underlay_for(&mut lab, *framing);
        }
        let want = lab.model(*dir, ifindex, 0, pkt);
        assert_ne!(want, Delta::none(), "seed {pkt:02x?} counts");
        lab.expect("seed", *dir, ifindex, pkt, want);
        lab.expect_truncations_count_nothing("seed", *dir, ifindex, pkt);
    }
}
