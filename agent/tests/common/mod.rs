//! Set-up shared by the agent's two integration test binaries, `datapath` and `lab`: each
//! includes this file with `#[path = "../common/mod.rs"] mod common;` in its `main.rs`, and
//! a module uses it as `crate::common`. Each binary uses only part of it, hence
//! `allow(dead_code)`.
//!
//! Two parts:
//! - `BPF_PROG_TEST_RUN` tests (`datapath/main.rs` explains what test_run does with the
//!   input): the root check, a fresh network namespace for the test's thread with a veth
//!   pair in it, the programs loaded and attached there (which writes IFACES) and the peer
//!   maps written, and one test run of a TC program with its verdict checked.
//! - Lab tests: the lab up (or the test skipped where it cannot run), the names tests use
//!   most, the `wirescope` binary started in the lab's client namespace and stopped, its log
//!   file, metric values and deltas between scrapes, pings and echoes through the tunnel,
//!   waiting for a TCP listener or a series, an interface that appears late, the client's
//!   tunnel brought back after it was deleted, bpffs mounted on the host for pinning.

#![allow(dead_code)]

use std::{
    marker::PhantomData,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_common::{
    fixtures::{Framing, wg_ipv4},
    maps::{DIR_RX, DIR_TX, IfaceConfig},
};
use aya::programs::{TestRun, TestRunOptions};
use wirescope::{
    EBPF_OBJECT,
    datapath::{Datapath, PROG_EGRESS, PROG_INGRESS, PeerMaps, Pinning},
    sync::endpoint_key,
};
use xtask::{
    agent::Agent,
    impair::{ImpairHandle, Impairment},
    lab::{self, GATEWAY_V4, Lab, LabConfig, Topology},
    scrape::Metrics,
    udp::{UdpEcho, recv_sizes, send_udp},
};

// ---------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------------------

/// The relay's peer id, in the tests with one relay.
pub const RELAY: u32 = 1;
/// The relay's endpoint (IPv4; IPv6 is [`relay_v6`]) and its port.
pub const RELAY_V4: [u8; 4] = [203, 0, 113, 10];
pub const RELAY_PORT: u16 = 51820;
/// This side's underlay address (IPv6: [`local_v6`]) and the local interface's listen port
/// (WG_PORTS).
pub const LOCAL_V4: [u8; 4] = [192, 0, 2, 2];
pub const LISTEN_PORT: u16 = 51821;

pub fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().expect("test address").octets()
}
pub fn relay_v6() -> [u8; 16] {
    v6("2001:db8:e::10")
}
pub fn local_v6() -> [u8; 16] {
    v6("2001:db8:c::2")
}
/// An address no peer has.
pub fn stranger_v6() -> [u8; 16] {
    v6("2001:db8:99::99")
}

pub const TUNNEL_L3: IfaceConfig = IfaceConfig {
    flags: IfaceConfig::TUNNEL | IfaceConfig::L3,
};
pub const UNDERLAY_ETH: IfaceConfig = IfaceConfig {
    flags: IfaceConfig::UNDERLAY,
};

/// True when the tests can run (as root). Without root: a failure under CI=true, else a
/// notice and false. `why` says which tests need what.
pub fn privileged(why: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}; CI=true, so this is a failure, not a skip: run the tests as root");
    }
    eprintln!("skipped: {why}; run them as root");
    false
}

/// Runs `ip args` and checks that it succeeded.
pub fn ip_cmd(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!(
            "running `ip {}`: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    });
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("interface name");
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name} in the test's network namespace");
    i
}

/// `__sk_buff` as ctx_in: the fields test_run takes (offsets of the UAPI struct, 192 bytes),
/// the rest zero.
pub fn sk_buff_ctx(ifindex: u32, gso_segs: u32, gso_size: u32) -> [u8; 192] {
    const IFINDEX: usize = 40;
    const GSO_SEGS: usize = 164;
    const GSO_SIZE: usize = 176;
    let mut ctx = [0u8; 192];
    ctx[IFINDEX..IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[GSO_SEGS..GSO_SEGS + 4].copy_from_slice(&gso_segs.to_ne_bytes());
    ctx[GSO_SIZE..GSO_SIZE + 4].copy_from_slice(&gso_size.to_ne_bytes());
    ctx
}

/// Moves this thread (only it: the test's) into a fresh network namespace, which the
/// commands it spawns inherit, and adds the veth pair `name`/`peer` there, down. Returns
/// their ifindexes.
pub fn netns_with_veth(name: &str, peer: &str) -> (u32, u32) {
    // SAFETY: plain syscall; it moves only the calling thread into a new network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "unshare(CLONE_NEWNET) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    ip_cmd(&[
        "link", "add", "name", name, "type", "veth", "peer", "name", peer,
    ]);
    (ifindex(name), ifindex(peer))
}

/// The programs of the last test that gave them back, reset: loading verifies some 300k
/// instructions (under the VMs' emulation, about 6 s of each test's 7), so a test binary
/// loads them once and lends them to one test after the other ([`Lent`]). Not pinned:
/// nothing of them outlives the binary.
static LOADED: Mutex<Option<Datapath>> = Mutex::new(None);

/// The programs lent to one test, in the state of a fresh load; given back when dropped,
/// reset there ([`Datapath::reset`]: detached in the test's namespace, which still exists
/// then, every map emptied).
pub struct Lent(Option<Datapath>);

impl Lent {
    /// Runs `f` with the programs shared as the agent's collectors take them, and lends
    /// them on afterwards (`f` must not keep a clone).
    pub fn shared<R>(mut self, f: impl FnOnce(Arc<Mutex<Datapath>>) -> R) -> (R, Lent) {
        let dp = Arc::new(Mutex::new(self.0.take().expect("lent programs")));
        let r = f(Arc::clone(&dp));
        let dp = Arc::try_unwrap(dp)
            .unwrap_or_else(|_| panic!("the programs are still shared"))
            .into_inner()
            .expect("not poisoned");
        (r, Lent(Some(dp)))
    }
}

impl std::ops::Deref for Lent {
    type Target = Datapath;
    fn deref(&self) -> &Datapath {
        self.0.as_ref().expect("lent programs")
    }
}

impl std::ops::DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut Datapath {
        self.0.as_mut().expect("lent programs")
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let Some(mut dp) = self.0.take() else { return };
        // Programs that cannot be reset are dropped: the next test loads anew.
        if let Err(e) = dp.reset() {
            eprintln!("resetting the programs for the next test failed ({e}): reloading");
            return;
        }
        if let Ok(mut slot) = LOADED.lock() {
            *slot = Some(dp);
        }
    }
}

/// The eBPF programs, as a fresh load (lent: [`Lent`]), attached to each `(name, ifindex,
/// config)`, in order, as the agent does it (which writes IFACES).
pub fn load_attached(ifaces: &[(&str, u32, IfaceConfig)]) -> Lent {
    let kept = LOADED.lock().ok().and_then(|mut slot| slot.take());
    let mut dp = kept.unwrap_or_else(|| {
        Datapath::load_with(EBPF_OBJECT, Pinning::Off)
            .unwrap_or_else(|e| panic!("loading the eBPF programs: {e}"))
    });
    for &(name, ifindex, cfg) in ifaces {
        dp.attach(name, ifindex, cfg)
            .unwrap_or_else(|e| panic!("attaching to {name}: {e}"));
    }
    Lent(Some(dp))
}

/// The programs in a network namespace of their own: a test module's `Lab` (with its own
/// methods added there). `Tests` is a marker type of that module (`struct Health;`, `type
/// Lab = NetnsLab<Health>;`): several modules share one test binary, and each adds methods
/// of the same names (`new`, `run`) to its own `NetnsLab<...>` without clashing.
pub struct NetnsLab<Tests> {
    pub dp: Lent,
    /// lo: the WireGuard interface (TUNNEL | L3) when there is one.
    pub tun: u32,
    /// One end of a veth pair: the underlay (UNDERLAY, Ethernet).
    pub under: u32,
    pub tests: PhantomData<Tests>,
}

impl<Tests> NetnsLab<Tests> {
    /// A fresh network namespace for this thread (see [`netns_with_veth`]) where `veth.0`,
    /// one end of a veth pair, is the underlay and, with `tunnel`, `lo` the WireGuard
    /// interface; the programs attached to them, the peer maps holding each `(address,
    /// peer)` of `endpoints` at RELAY_PORT, and LISTEN_PORT as the local listen port. `None`
    /// when not root and not in CI (`why`: see [`privileged`]).
    pub fn enter(
        why: &str,
        veth: (&str, &str),
        tunnel: bool,
        endpoints: &[(IpAddr, u32)],
    ) -> Option<Self> {
        if !privileged(why) {
            return None;
        }
        let (under, _) = netns_with_veth(veth.0, veth.1);
        let tun = ifindex("lo");
        let mut ifaces = Vec::new();
        if tunnel {
            ifaces.push(("lo", tun, TUNNEL_L3));
        }
        ifaces.push((veth.0, under, UNDERLAY_ETH));
        let mut dp = load_attached(&ifaces);
        let mut maps = PeerMaps::default();
        for &(ip, peer) in endpoints {
            maps.endpoints.insert(endpoint_key(ip, RELAY_PORT), peer);
        }
        maps.wg_ports.insert(LISTEN_PORT, 1);
        dp.sync_peers(&maps).expect("peer maps");
        Some(NetnsLab {
            dp,
            tun,
            under,
            tests: PhantomData,
        })
    }

    /// [`NetnsLab::enter`] without a tunnel: only the underlay, the relay (RELAY_V4) its one
    /// endpoint, as peer RELAY.
    pub fn underlay_to_relay(why: &str, veth: (&str, &str)) -> Option<Self> {
        Self::enter(why, veth, false, &[(RELAY_V4.into(), RELAY)])
    }

    /// The WireGuard message `msg` between this side (LOCAL_V4:LISTEN_PORT) and the relay
    /// (RELAY_V4:RELAY_PORT), run through the program of `dir` on the underlay as an skb of
    /// `gso` (segments, size); see [`run_tc`].
    pub fn run_relay(&mut self, what: &str, dir: Dir, gso: (u32, u32), msg: &[u8]) {
        let (src, dst) = dir.flow((LOCAL_V4, LISTEN_PORT), (RELAY_V4, RELAY_PORT));
        let frame = Framing::Ethernet.frame(&wg_ipv4(src.0, src.1, dst.0, dst.1, msg));
        run_tc(&mut self.dp, what, dir.prog(), self.under, gso, &frame);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Rx,
    Tx,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::Rx, Dir::Tx];

    /// The program that sees this direction.
    pub fn prog(self) -> &'static str {
        match self {
            Dir::Rx => PROG_INGRESS,
            Dir::Tx => PROG_EGRESS,
        }
    }
    pub fn code(self) -> u8 {
        match self {
            Dir::Rx => DIR_RX,
            Dir::Tx => DIR_TX,
        }
    }
    /// (source, destination) of a packet between `local` and `remote` in this direction.
    pub fn flow<T>(self, local: T, remote: T) -> (T, T) {
        match self {
            Dir::Tx => (local, remote),
            Dir::Rx => (remote, local),
        }
    }
}

/// One BPF_PROG_TEST_RUN of the TC program `prog` on `data` as seen on `ifindex`, with `gso`
/// (segments, size) in the skb; `what` names the run in failures. Checks that the kernel ran
/// it and that the verdict is TC_ACT_UNSPEC (-1: the programs only observe). Returns the
/// packet as the program left it.
pub fn run_tc(
    dp: &mut Datapath,
    what: &str,
    prog: &str,
    ifindex: u32,
    gso: (u32, u32),
    data: &[u8],
) -> Vec<u8> {
    let ctx = sk_buff_ctx(ifindex, gso.0, gso.1);
    let mut out = vec![0u8; data.len() + 64];
    let res = dp
        .program_mut(prog)
        .unwrap_or_else(|| panic!("no program {prog}"))
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| {
            panic!(
                "{what}: test_run of {prog} on ifindex {ifindex} ({} bytes): {e:?}",
                data.len()
            )
        });
    assert_eq!(
        res.return_value as i32, -1,
        "{what}: {prog} returned {} on ifindex {ifindex}: an observer must return TC_ACT_UNSPEC",
        res.return_value as i32
    );
    out.truncate(res.data_size_out as usize);
    out
}

/// `out`, what [`run_tc`] returned, is `data` byte for byte.
pub fn assert_unchanged(what: &str, prog: &str, data: &[u8], out: &[u8]) {
    assert_eq!(
        out.len(),
        data.len(),
        "{what}: {prog} changed the packet length"
    );
    assert!(out == data, "{what}: {prog} changed the packet bytes");
}

/// No map update of the programs was refused (MAP_ERRORS is all 0).
pub fn assert_no_refused_updates(dp: &Datapath, what: &str) {
    for (map, n) in dp.map_update_errors() {
        assert_eq!(n, 0, "{what}: {n} refused updates of {map}");
    }
}

// ---------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------

/// The lab of `cfg` up, after `xtask::lab::can_run(test)`: `None` (the test returns at
/// once) where the lab cannot run here and CI is not set.
pub fn lab_up(test: &str, cfg: LabConfig) -> Option<Lab> {
    if !lab::can_run(test) {
        return None;
    }
    Some(Lab::up(cfg).expect("lab up"))
}

/// A single-hop lab whose hop (a kernel router) forwards onward over a link of MTU
/// `path_mtu`, its WireGuard interfaces at `wg_mtu`.
pub fn small_mtu_hop(prefix: &str, path_mtu: u32, wg_mtu: u32) -> LabConfig {
    LabConfig {
        hop: true,
        path_mtu: Some(path_mtu),
        wg_mtu,
        ..LabConfig::new(Topology::Single, prefix)
    }
}

/// The single-relay lab with a hop, the impairing relay there (its rules `rules`) carrying
/// the client's WireGuard. It starts before any packet, so that the client's endpoint of the
/// relay is the hop's relay from the start and the relay never has to learn a new client
/// address.
pub fn impaired_single(prefix: &str, rules: Impairment) -> (Lab, ImpairHandle) {
    let mut cfg = LabConfig::new(Topology::Single, prefix);
    cfg.hop = true;
    let lab = Lab::up(cfg).expect("lab up");
    let imp = lab.start_impairment(rules).expect("impairing relay");
    (lab, imp)
}

/// The names lab tests use most, cloned out of the lab.
pub struct Names {
    /// The client's network namespace.
    pub cns: String,
    /// The client's WireGuard interface.
    pub tun: String,
    /// The client's underlay veth.
    pub veth: String,
    /// The exit relay's public key (in single hop the relay).
    pub relay: String,
}

impl Names {
    pub fn of(lab: &Lab) -> Names {
        Names {
            cns: lab.client().netns.clone(),
            tun: lab.client().wg().iface.clone(),
            veth: lab.client().underlay().name.clone(),
            relay: lab.exit().wg().public_key.clone(),
        }
    }
}

/// Stops the agent (SIGINT); it must exit cleanly (status 0).
pub fn stop(agent: Agent) {
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "clean exit after SIGINT: {status}");
}

/// Starts wireguard-go for a new interface `{prefix}late0` in `ns`, waits up to 4 s for the
/// agent to show it attached (`wirescope_attach_info`, tx), then stops it and removes its
/// socket. Returns the interface's name and whether it was attached in time.
pub fn late_interface_attached(agent: &Agent, ns: &str, prefix: &str) -> (String, bool) {
    let late = format!("{prefix}late0");
    let mut late_go = xtask::netns::command(ns, "wireguard-go");
    late_go
        .arg("-f")
        .arg(&late)
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut late_go = late_go.spawn().expect("wireguard-go for a late interface");
    let mut attached = false;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let m = agent.scrape().expect("scrape");
        if val(
            &m,
            "wirescope_attach_info",
            &[("interface", &late), ("direction", "tx")],
        ) == 1
        {
            attached = true;
            break;
        }
    }
    let _ = late_go.kill();
    let _ = late_go.wait();
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{late}.sock"));
    (late, attached)
}

/// Brings the client's tunnel `iface` back after it was deleted: a new device (the lab's
/// implementation), the saved configuration `conf` (`wg showconf`; the lab's private key
/// added where it lacks one, as boringtun's does), addresses, MTU and routes as the lab set
/// them.
pub fn bring_back(lab: &Lab, iface: &str, conf: &str) {
    let c = lab.client();
    let ns = &c.netns;
    let w = c.wg();
    lab.wireguard
        .create(ns, iface, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{} again: {e:#}", lab.wireguard));
    xtask::wg::setconf(ns, iface, &w.with_private_key(conf)).expect("setconf");
    let ip = |args: &[&str]| {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        xtask::netns::exec(ns, &all).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    };
    ip(&["link", "set", iface, "addrgenmode", "none"]);
    ip(&["link", "set", iface, "mtu", &w.mtu.to_string()]);
    for a in &w.addresses {
        if a.contains(':') {
            ip(&["-6", "addr", "add", a, "dev", iface, "nodad"]);
        } else {
            ip(&["addr", "add", a, "dev", iface]);
        }
    }
    ip(&["link", "set", iface, "up"]);
    xtask::wg::wait_listening(ns, w.listen_port, Duration::from_secs(5)).expect("listening again");
    for r in c.routes.iter().filter(|r| r.contains(iface)) {
        let mut all = vec!["ip"];
        all.extend(r.split_whitespace());
        xtask::netns::exec(ns, &all).unwrap_or_else(|e| panic!("{r}: {e:#}"));
    }
}

/// Mounts bpffs at /sys/fs/bpf on the host when none is there, so that pinned maps outlive
/// an agent (run under `ip netns exec`, it finds this bpffs through its parent's mount
/// namespace; in a container, it is bound in).
pub fn ensure_host_bpffs() {
    let is_bpffs = || {
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a statfs buffer.
        let ok = unsafe { libc::statfs(c"/sys/fs/bpf".as_ptr(), &mut st) } == 0;
        ok && st.f_type as i64 == 0xcafe_4a11
    };
    if !is_bpffs() {
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("mount");
        assert!(st.success() && is_bpffs(), "mounting bpffs at /sys/fs/bpf");
    }
}

/// The datapath counter families, whose series must never go backwards.
pub const COUNTER_FAMILIES: [&str; 4] = [
    "wirescope_tunnel_packets_total",
    "wirescope_tunnel_bytes_total",
    "wirescope_wire_packets_total",
    "wirescope_wire_bytes_total",
];

/// The agent binary under test: the one cargo built with the tests, or a copy named by
/// [`xtask::agent::AGENT_BIN_ENV`] (the VMs run a copy, which a rebuild on the host cannot
/// change under them).
pub fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os(xtask::agent::AGENT_BIN_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wirescope")))
    })
}

/// The agent's log file `wirescope-{log}.log` in the temp dir.
pub fn log_path(log: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wirescope-{log}.log"))
}

/// Starts the agent in the client namespace, logging to [`log_path`]`(log)`; it has
/// answered /healthz when this returns.
pub fn start(lab: &Lab, log: &str) -> Agent {
    Agent::start(bin(), &lab.client().netns, &[], &log_path(log)).expect("agent starts")
}

/// The value of the series `labels` select: exactly one series, or none (0).
pub fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.get(name, labels).expect("one series")
}

/// A counter's value, the selector matching exactly one series or none (0).
pub fn val(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    value(m, name, labels) as u64
}

/// What a counter gained between two scrapes.
pub fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    val(after, name, labels) - val(before, name, labels)
}

/// `count` pings from the client to the in-tunnel gateway, 20 ms apart (`ping -q -i 0.02`,
/// then the options `extra`). Returns ping's output; its exit status is the caller's to
/// judge.
pub fn ping_gateway(lab: &Lab, count: u32, extra: &[&str]) -> Output {
    xtask::netns::command(&lab.client().netns, "ping")
        .args(["-q", "-i", "0.02"])
        .args(extra)
        .args(["-c", &count.to_string(), &GATEWAY_V4.to_string()])
        .output()
        .expect("running ping")
}

/// [`ping_gateway`], checked: every reply came back or, with `losses_ok` (under
/// impairment), ping ran to the end (exit status 0 or 1).
pub fn ping(lab: &Lab, count: u32, extra: &[&str], losses_ok: bool) {
    let out = ping_gateway(lab, count, extra);
    let ok = if losses_ok {
        matches!(out.status.code(), Some(0 | 1))
    } else {
        out.status.success()
    };
    assert!(
        ok,
        "ping in {}: {}{}",
        lab.client().netns,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Datagrams of `payloads` bytes from the client through the tunnel to an echo on `dst` in
/// the exit relay's namespace, and back; `before` runs once the echo listens, before the
/// first datagram leaves, and what it returns is returned. Every datagram must come back (in
/// any order: kernel WireGuard decrypts on several CPUs).
pub fn echo_via_tunnel<T>(
    lab: &Lab,
    dst: SocketAddr,
    payloads: &[usize],
    before: impl FnOnce() -> T,
) -> T {
    let n = payloads.len();
    let echo = UdpEcho::start(&lab.exit().netns, dst, n, Duration::from_secs(20))
        .expect("echo on the gateway");
    let t = before();
    let sock = send_udp(&lab.client().netns, None, dst, payloads).expect("send");
    let mut got = recv_sizes(&sock, n, Duration::from_secs(15)).expect("echoes");
    let mut sent = payloads.to_vec();
    got.sort_unstable();
    sent.sort_unstable();
    assert_eq!(got, sent, "every datagram came back");
    assert_eq!(echo.join().expect("echo"), n);
    t
}

/// Waits (up to 5 s) until a TCP socket listens on `port` in `ns`, from /proc's socket table.
pub fn wait_tcp_listening(ns: &str, port: u16) {
    let want = format!(":{port:04X} ");
    for _ in 0..250 {
        let w = want.clone();
        let listening = xtask::netns::run_in(ns, move || {
            ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
                .iter()
                .filter_map(|f| std::fs::read_to_string(f).ok())
                .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
                // Column 2 is the local address, column 4 the state (0A: LISTEN).
                .any(|l| {
                    let c: Vec<&str> = l.split_whitespace().collect();
                    c.len() > 3
                        && format!("{} ", &c[1][c[1].len().saturating_sub(5)..]) == w
                        && c[3] == "0A"
                })
        })
        .expect("reading the socket table");
        if listening {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on TCP port {port} in {ns}");
}

/// Scrapes the agent until a series `name{labels}` exists (returning that scrape), failing
/// with the agent's log after `timeout`.
pub fn wait_series(
    agent: &Agent,
    name: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
) -> Metrics {
    let deadline = Instant::now() + timeout;
    loop {
        let m = agent.scrape().expect("scrape");
        if m.select(name, labels).next().is_some() {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "no {name}{labels:?} within {timeout:?}; agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
