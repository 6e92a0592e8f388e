//! Per-packet cost of the agent's TC programs, as the margin over an empty TC program
//! (`wirescope_baseline` in the eBPF object) measured the same way in the same run. Used by
//! `cargo xtask bench` (xtask/src/bench/cost.rs); prints JSON on stdout.
//!
//! Two modes:
//!
//! - `test-run --repeat N --peers 1,100,10000 [--rounds R]`: in a fresh network namespace
//!   (`lo` plays the WireGuard interface, TUNNEL|L3; one end of a veth pair the underlay,
//!   Ethernet), the datapath loaded and attached as the agent does it, the peer maps filled
//!   with P peers (distinct /32 and /128 allowed IPs, distinct endpoints), and each fixture
//!   packet run through `wirescope_ingress` / `wirescope_egress` and through the empty
//!   program with `BPF_PROG_TEST_RUN`, `repeat` N. The kernel times the whole loop and
//!   reports the mean per run; the margin is ours minus the empty program's on the same
//!   packet and context, and the median over R rounds is printed (the CPU is shared, so
//!   single rounds are noisy). Each measurement starts from empty transit queues, and a
//!   repeated packet runs in the state its own repetitions make: a data message arriving is
//!   late after its first run (same counter); a tunnel packet leaving fills its peer's
//!   transit queue, while a data message leaving finds none (no inner packet went before
//!   it), so the matching of transit pairs is measured only live.
//!
//! - `live [--iface IF ...]`, run inside the agent's network namespace (`ip netns exec`):
//!   turns the kernel's BPF run statistics on (BPF_ENABLE_STATS: reference-counted and
//!   undone when this process exits, however it exits), attaches an empty program beside
//!   the agent's on ingress and egress of every interface the agent's programs are attached
//!   to (one empty program per direction, so each of ours has its own reference), takes a
//!   snapshot of run counts and run times, prints `ready` on stderr, waits for a line on
//!   stdin (or SIGTERM/SIGINT), takes another snapshot and prints, per direction, the runs,
//!   the mean time per run of ours and of the empty program, and the margin.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::mpsc,
};

use agent_common::{
    fixtures::{Framing, Ipv4, Ipv6, udp, wg},
    maps::IfaceConfig,
    parse::IPPROTO_UDP,
};
use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::{
    ProgramInfo, SchedClassifier, TcAttachType, TestRun, TestRunOptions, loaded_programs,
};
use clap::{Parser, Subcommand};
use serde::Serialize;
use wirescope::{
    EBPF_OBJECT,
    datapath::{Datapath, LoadOptions, PROG_EGRESS, PROG_INGRESS, PeerMaps, Pinning, pin},
    sync::endpoint_key,
};

/// The empty TC program of the eBPF object.
const PROG_BASELINE: &str = "wirescope_baseline";
/// TC_ACT_UNSPEC: every program here only observes.
const TC_NEXT: i32 = -1;

#[derive(Parser)]
#[command(about = "Per-packet cost of wirescope's TC programs over an empty TC program")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// BPF_PROG_TEST_RUN on fixture packets in a fresh network namespace.
    TestRun {
        /// Runs per measurement (the kernel reports the mean).
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Peer counts in the maps, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
        peers: Vec<u32>,
        /// Measurements per (packet, program, peers); the median margin is printed.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Another build of the eBPF object to measure instead of the one built in (to
        /// compare two builds; its maps must be laid out as this agent expects).
        #[arg(long, value_name = "PATH")]
        object: Option<std::path::PathBuf>,
        /// Load the programs as `wirescope run --transit-time off` does.
        #[arg(long = "transit-time-off")]
        transit_time_off: bool,
    },
    /// Run statistics of the agent's attached programs against an empty program beside them.
    Live {
        /// Interfaces to measure on; by default every interface of this network namespace
        /// the agent's programs are attached to (named ones must be among them).
        #[arg(long = "iface")]
        ifaces: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = match cli.mode {
        Mode::TestRun {
            repeat,
            peers,
            rounds,
            object,
            transit_time_off,
        } => {
            let object = match object {
                Some(p) => std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                None => EBPF_OBJECT.to_vec(),
            };
            let options = LoadOptions {
                transit_time: !transit_time_off,
            };
            serde_json::to_string_pretty(&test_run(
                &object,
                options,
                repeat,
                &peers,
                rounds.max(1),
            )?)?
        }
        Mode::Live { ifaces } => serde_json::to_string_pretty(&live(&ifaces)?)?,
    };
    println!("{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// test-run
// ---------------------------------------------------------------------------------------

/// The local interface's WireGuard listen port (WG_PORTS) and every peer's endpoint port.
const LISTEN_PORT: u16 = 51821;
const PEER_PORT: u16 = 51820;
/// This side's underlay address.
const LOCAL_UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// This side's tunnel addresses (no peer's allowed IP).
const LOCAL_TUNNEL_V4: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 2);
const LOCAL_TUNNEL_V6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xbbbb, 0, 0, 0, 0, 1, 2);
/// Ports of the inner traffic and of the non-WireGuard packet (not listen ports).
const APP_PORT: u16 = 40001;
const SERVICE_PORT: u16 = 443;
/// Where the non-WireGuard packet goes: no peer's endpoint.
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// A tunnel address no peer has: the step fixture whose peer lookup misses.
const NO_PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// Peer `i`'s (1-based) allowed IPs and endpoint: all distinct.
fn peer_v4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)
}
fn peer_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0xaaaa, 0, 0, 0, 0, 0, 0)) + u128::from(i))
}
fn peer_endpoint(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i)
}

/// The peer maps with peers 1..=n on the tunnel `tun`.
fn peer_maps(tun: u32, n: u32) -> PeerMaps {
    let mut m = PeerMaps::default();
    for i in 1..=n {
        m.allowed_v4.insert((tun, peer_v4(i).octets(), 32), i);
        m.allowed_v6.insert((tun, peer_v6(i).octets(), 128), i);
        m.endpoints
            .insert(endpoint_key(IpAddr::V4(peer_endpoint(i)), PEER_PORT), i);
    }
    m.wg_ports.insert(LISTEN_PORT, 1);
    m
}

/// Where a fixture is seen.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Iface {
    /// `lo`, the WireGuard interface: bare IP.
    Tunnel,
    /// The veth end, the underlay: Ethernet.
    Underlay,
}

/// One fixture kind: its name and the packet in each direction (ingress, egress) between
/// this side and peer `peer`.
struct Fixture {
    kind: &'static str,
    /// A step fixture (see [`fixtures`]): measured at the largest peer count only.
    step: bool,
    iface: Iface,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

/// Inner UDP payload bytes of the tunnel fixtures and of the non-WireGuard packet.
const PAYLOAD: usize = 100;

fn fixtures(peer: u32) -> Vec<Fixture> {
    let payload = vec![0x5a; PAYLOAD];
    let v4 = |src: Ipv4Addr, sport, dst: Ipv4Addr, dport, p: &[u8]| {
        Ipv4::new(src.octets(), dst.octets()).build(IPPROTO_UDP, &udp(sport, dport, p))
    };
    let v6 = |src: Ipv6Addr, sport, dst: Ipv6Addr, dport, p: &[u8]| {
        Ipv6::new(src.octets(), dst.octets()).build(IPPROTO_UDP, &udp(sport, dport, p))
    };
    let (local, remote) = (LOCAL_TUNNEL_V4, peer_v4(peer));
    let (local6, remote6) = (LOCAL_TUNNEL_V6, peer_v6(peer));
    // WireGuard messages between this side's listen port and the peer's endpoint, behind
    // Ethernet; `rx` and `tx` are the messages arriving and leaving.
    let ep = peer_endpoint(peer);
    let wire = |kind, rx: Vec<u8>, tx: Vec<u8>| Fixture {
        kind,
        step: kind.contains("unknown endpoint"),
        iface: Iface::Underlay,
        rx: Framing::Ethernet.frame(&v4(ep, PEER_PORT, LOCAL_UNDERLAY, LISTEN_PORT, &rx)),
        tx: Framing::Ethernet.frame(&v4(LOCAL_UNDERLAY, LISTEN_PORT, ep, PEER_PORT, &tx)),
    };
    // A data message carrying a 128-byte inner packet (tunnel MTU 1420).
    let data = wg::data(0x1122_3344, 7, 128, 1420);
    vec![
        Fixture {
            kind: "IPv4",
            step: false,
            iface: Iface::Tunnel,
            rx: v4(remote, SERVICE_PORT, local, APP_PORT, &payload),
            tx: v4(local, APP_PORT, remote, SERVICE_PORT, &payload),
        },
        Fixture {
            kind: "IPv6",
            step: false,
            iface: Iface::Tunnel,
            rx: v6(remote6, SERVICE_PORT, local6, APP_PORT, &payload),
            tx: v6(local6, APP_PORT, remote6, SERVICE_PORT, &payload),
        },
        wire("WireGuard data", data.clone(), data.clone()),
        // Step fixtures: each stops one step earlier on the same path, so the differences
        // of their margins say where a data packet's nanoseconds go (xtask's cost.rs).
        Fixture {
            kind: "not IP",
            step: true,
            iface: Iface::Tunnel,
            rx: vec![0; 40],
            tx: vec![0; 40],
        },
        Fixture {
            kind: "IPv4, no peer",
            step: true,
            iface: Iface::Tunnel,
            rx: v4(NO_PEER_V4, SERVICE_PORT, local, APP_PORT, &payload),
            tx: v4(local, APP_PORT, NO_PEER_V4, SERVICE_PORT, &payload),
        },
        Fixture {
            kind: "ARP",
            step: true,
            iface: Iface::Underlay,
            rx: arp(),
            tx: arp(),
        },
        Fixture {
            kind: "WireGuard data, unknown endpoint",
            step: true,
            iface: Iface::Underlay,
            rx: Framing::Ethernet.frame(&v4(
                STRANGER,
                PEER_PORT,
                LOCAL_UNDERLAY,
                LISTEN_PORT,
                &data,
            )),
            tx: Framing::Ethernet.frame(&v4(
                LOCAL_UNDERLAY,
                LISTEN_PORT,
                STRANGER,
                PEER_PORT,
                &data,
            )),
        },
        wire(
            "keepalive",
            wg::keepalive(0x1122_3344, 7),
            wg::keepalive(0x5566_7788, 7),
        ),
        wire(
            "handshake initiation",
            wg::initiation(0x0102_0304),
            wg::initiation(0x0506_0708),
        ),
        wire(
            "handshake response",
            wg::response(0x0a0b_0c0d, 0x0506_0708),
            wg::response(0x0a0b_0c0d, 0x0102_0304),
        ),
        Fixture {
            kind: "non-WireGuard UDP",
            step: false,
            iface: Iface::Underlay,
            rx: Framing::Ethernet.frame(&v4(
                STRANGER,
                SERVICE_PORT,
                LOCAL_UNDERLAY,
                APP_PORT,
                &payload,
            )),
            tx: Framing::Ethernet.frame(&v4(
                LOCAL_UNDERLAY,
                APP_PORT,
                STRANGER,
                SERVICE_PORT,
                &payload,
            )),
        },
    ]
}

/// `__sk_buff` as ctx_in: the ifindex the program reads (a device of this namespace), the
/// rest zero (no GSO).
fn sk_buff_ctx(ifindex: u32) -> [u8; 192] {
    const IFINDEX: usize = 40;
    let mut ctx = [0u8; 192];
    ctx[IFINDEX..IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

#[derive(Serialize)]
struct TestRunReport {
    repeat: u32,
    rounds: u32,
    /// What the verifier processed for each program at load (a measure of its paths).
    verified_instructions: BTreeMap<String, Option<u32>>,
    /// The JIT-compiled size of each program in bytes.
    jited_bytes: BTreeMap<String, u32>,
    results: Vec<Measurement>,
}

#[derive(Serialize)]
struct Measurement {
    peers: u32,
    kind: &'static str,
    /// "tunnel" or "wire": the role of the interface the packet is seen on.
    role: &'static str,
    /// wirescope_ingress or wirescope_egress.
    program: &'static str,
    /// Median over the rounds, ns per run: ours, the empty program's, and the margin (the
    /// median of the per-round differences).
    ns: f64,
    baseline_ns: f64,
    margin_ns: f64,
    /// Every round's margin.
    margins: Vec<f64>,
}

/// An Ethernet frame that is not IP (ARP): the wire role's first step only.
fn arp() -> Vec<u8> {
    let mut f = vec![0u8; 14 + 28];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f
}

fn test_run(
    object: &[u8],
    options: LoadOptions,
    repeat: u32,
    peers: &[u32],
    rounds: u32,
) -> Result<TestRunReport> {
    if peers.is_empty() {
        bail!("--peers: at least one peer count");
    }
    // SAFETY: a plain syscall, made before this process starts any thread: the whole
    // process (and the `ip` commands it runs) moves into a network namespace of its own,
    // which goes when it exits, attachments and all.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (needs root)");
    }
    let status = Command::new("ip")
        .args([
            "link", "add", "bcu0", "type", "veth", "peer", "name", "bcu1",
        ])
        .status()
        .context("running `ip link add` (is iproute2 installed?)")?;
    if !status.success() {
        bail!("`ip link add bcu0 type veth peer name bcu1` failed ({status})");
    }
    let tun = ifindex("lo")?;
    let under = ifindex("bcu0")?;
    let mut dp = Datapath::load_with_options(object, Pinning::Off, options)
        .context("loading the eBPF programs")?;
    // As the agent does it: IFACES written, programs attached (the interfaces are down, so
    // only the test runs reach them).
    let tunnel_cfg = IfaceConfig {
        flags: IfaceConfig::TUNNEL | IfaceConfig::L3,
    };
    let underlay_cfg = IfaceConfig {
        flags: IfaceConfig::UNDERLAY,
    };
    dp.attach("lo", tun, tunnel_cfg)
        .context("attaching to lo")?;
    dp.attach("bcu0", under, underlay_cfg)
        .context("attaching to bcu0")?;
    // A tunnel is up, as on a machine with a live tunnel: what leaves the underlay and is
    // not WireGuard goes through the leak check, as it would there.
    dp.leak
        .set_tunnel_up_until(u64::MAX)
        .context("writing LEAK_CFG")?;
    dp.program_mut(PROG_BASELINE)
        .ok_or_else(|| anyhow!("the eBPF object has no {PROG_BASELINE}"))?
        .load()
        .with_context(|| format!("loading {PROG_BASELINE}"))?;

    let mut verified_instructions = BTreeMap::new();
    let mut jited_bytes = BTreeMap::new();
    for name in [
        PROG_INGRESS,
        PROG_EGRESS,
        agent_common::maps::transit::PROG,
        agent_common::maps::leak::PROG,
        PROG_BASELINE,
    ] {
        let info = dp
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no {name}"))?
            .info()
            .with_context(|| format!("reading {name}'s info"))?;
        verified_instructions.insert(name.to_string(), info.verified_instruction_count());
        jited_bytes.insert(name.to_string(), info.size_jitted());
    }

    let mut peer_counts = peers.to_vec();
    peer_counts.sort_unstable();
    peer_counts.dedup();
    let mut results = Vec::new();
    for &n in &peer_counts {
        if n == 0 {
            bail!("--peers: a peer count of 0 leaves no known peer to send to");
        }
        dp.sync_peers(&peer_maps(tun, n))
            .with_context(|| format!("writing {n} peers into the maps"))?;
        // The known peer is the last one written.
        let largest = Some(&n) == peer_counts.last();
        for f in fixtures(n).into_iter().filter(|f| largest || !f.step) {
            let (ifindex, role) = match f.iface {
                Iface::Tunnel => (tun, "tunnel"),
                Iface::Underlay => (under, "wire"),
            };
            let ctx = sk_buff_ctx(ifindex);
            for (program, data) in [(PROG_INGRESS, &f.rx), (PROG_EGRESS, &f.tx)] {
                let mut ours = Vec::new();
                let mut base = Vec::new();
                let mut margins = Vec::new();
                for _ in 0..rounds {
                    // Every measurement from empty transit queues: what a kind measured
                    // before left (slots of the same peer) would otherwise be matched here
                    // or found stale, making the figure depend on the order and pace of
                    // the run. (Two sweeps: slots, then the queues found empty twice.)
                    dp.transit.expire(u64::MAX);
                    dp.transit.expire(u64::MAX);
                    // Ours and the empty program back to back, so both see the same load.
                    let a = time(&mut dp, program, data, &ctx, repeat)?;
                    let b = time(&mut dp, PROG_BASELINE, data, &ctx, repeat)?;
                    ours.push(a);
                    base.push(b);
                    margins.push(a - b);
                }
                results.push(Measurement {
                    peers: n,
                    kind: f.kind,
                    role,
                    program,
                    ns: median(&ours),
                    baseline_ns: median(&base),
                    margin_ns: median(&margins),
                    margins,
                });
            }
        }
    }
    Ok(TestRunReport {
        repeat,
        rounds,
        verified_instructions,
        jited_bytes,
        results,
    })
}

/// One BPF_PROG_TEST_RUN of `prog` on `data`, `repeat` times: the kernel's mean ns per run.
/// The verdict must be TC_NEXT (the programs only observe).
fn time(dp: &mut Datapath, prog: &str, data: &[u8], ctx: &[u8], repeat: u32) -> Result<f64> {
    let res = dp
        .program_mut(prog)
        .ok_or_else(|| anyhow!("no program {prog}"))?
        .test_run(TestRunOptions {
            data_in: Some(data),
            ctx_in: Some(ctx),
            repeat,
            ..TestRunOptions::new()
        })
        .map_err(|e| anyhow!("test_run of {prog} ({} bytes): {e:?}", data.len()))?;
    let verdict = res.return_value as i32;
    if verdict != TC_NEXT {
        bail!("{prog} returned {verdict}: an observer must return TC_ACT_UNSPEC (-1)");
    }
    // The kernel reports whole nanoseconds per run (the loop's time over `repeat`).
    Ok(res.duration.as_nanos() as f64)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} in this network namespace");
    }
    Ok(i)
}

// ---------------------------------------------------------------------------------------
// live
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct LiveReport {
    /// Interfaces the empty programs were attached to (those the agent's programs are on).
    ifaces: Vec<String>,
    /// Seconds between the snapshots.
    seconds: f64,
    programs: Vec<LiveProgram>,
}

#[derive(Serialize)]
struct LiveProgram {
    /// wirescope_ingress or wirescope_egress.
    program: &'static str,
    /// The agent's program id(s) in this direction.
    ids: Vec<u32>,
    runs: u64,
    mean_ns: f64,
    baseline_runs: u64,
    baseline_mean_ns: f64,
    margin_ns: f64,
}

/// The kernel's program names are cut at 15 bytes (BPF_OBJ_NAME_LEN).
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

fn live(wanted: &[String]) -> Result<LiveReport> {
    // SIGTERM and SIGINT are taken by a waiting thread (sigwait) instead of killing the
    // process: blocked here, before any thread starts, so every thread inherits the mask.
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; the calls only touch this process's mask.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    // Where the agent's programs are attached in this namespace (TCX), by program id.
    let mut agent: BTreeMap<&'static str, BTreeSet<u32>> = BTreeMap::new();
    let mut on: BTreeSet<String> = BTreeSet::new();
    for iface in interfaces()? {
        for (attach, prog) in [
            (TcAttachType::Ingress, PROG_INGRESS),
            (TcAttachType::Egress, PROG_EGRESS),
        ] {
            let Ok((_, progs)) = SchedClassifier::query_tcx(&iface, attach) else {
                continue;
            };
            for p in progs {
                if p.name_as_str() == Some(kernel_name(prog)) {
                    agent.entry(prog).or_default().insert(p.id());
                    on.insert(iface.clone());
                }
            }
        }
    }
    if on.is_empty() {
        bail!(
            "no interface of this network namespace has {PROG_INGRESS} or {PROG_EGRESS} \
             attached with TCX: is the agent running here (ip netns exec)?"
        );
    }
    for w in wanted {
        if !on.contains(w) {
            bail!(
                "--iface {w}: the agent's programs are not attached there (they are on {})",
                on.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    if !wanted.is_empty() && wanted.len() < on.len() {
        // The agent's run statistics cover every interface it is attached to; an empty
        // program on fewer would compare a different mix of packets.
        eprintln!(
            "note: the agent's programs are also on interfaces not named; the empty programs \
             go on all of them ({})",
            on.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }

    // One empty program per direction, each from its own copy of the object (a program
    // can be attached only once per hook), with its maps unpinned so nothing the agent
    // pinned is touched.
    let object = pin::unpinned(EBPF_OBJECT).map_err(|e| anyhow!("{e}"))?;
    let mut baselines = Vec::new();
    for (attach, prog) in [
        (TcAttachType::Ingress, PROG_INGRESS),
        (TcAttachType::Egress, PROG_EGRESS),
    ] {
        let mut ebpf = aya::EbpfLoader::new()
            .load(&object)
            .context("loading the eBPF object")?;
        let p: &mut SchedClassifier = ebpf
            .program_mut(PROG_BASELINE)
            .ok_or_else(|| anyhow!("the eBPF object has no {PROG_BASELINE}"))?
            .try_into()
            .context(PROG_BASELINE)?;
        p.load()
            .with_context(|| format!("loading {PROG_BASELINE}"))?;
        for iface in &on {
            // TCX here (the agent's programs were found through TCX); the link lives as
            // long as `ebpf`, which goes when this process exits.
            p.attach(iface, attach)
                .with_context(|| format!("attaching {PROG_BASELINE} to {iface}"))?;
        }
        let id = p.info().context("baseline info")?.id();
        baselines.push((prog, id, ebpf));
    }

    // Reference-counted: undone when the fd closes, never turning off statistics someone
    // else turned on.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("enabling BPF run statistics: {e}"))?;
    let before = snapshot()?;
    let started = std::time::Instant::now();
    eprintln!("ready");

    let (tx, rx) = mpsc::channel::<()>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        // A line or end of input: either way the measurement ends.
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is an initialised signal set; blocked in every thread.
        unsafe { libc::sigwait(&set, &mut sig) };
        let _ = tx2.send(());
    });
    // Either sender ends it; both gone (impossible while the threads wait) ends it too.
    let _ = rx.recv();
    let after = snapshot()?;
    let seconds = started.elapsed().as_secs_f64();
    drop(stats);

    let delta = |ids: &[u32]| -> (u64, u64) {
        ids.iter().fold((0, 0), |(n, t), id| {
            let (n0, t0) = before.get(id).copied().unwrap_or((0, 0));
            let (n1, t1) = after.get(id).copied().unwrap_or((0, 0));
            (n + n1.saturating_sub(n0), t + t1.saturating_sub(t0))
        })
    };
    let mean = |(n, t): (u64, u64)| {
        if n == 0 {
            f64::NAN
        } else {
            t as f64 / n as f64
        }
    };
    let mut programs = Vec::new();
    for (prog, base_id, _) in &baselines {
        let ids: Vec<u32> = agent
            .get(prog)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let ours = delta(&ids);
        let base = delta(&[*base_id]);
        programs.push(LiveProgram {
            program: prog,
            ids,
            runs: ours.0,
            mean_ns: mean(ours),
            baseline_runs: base.0,
            baseline_mean_ns: mean(base),
            margin_ns: mean(ours) - mean(base),
        });
    }
    drop(baselines);
    Ok(LiveReport {
        ifaces: on.into_iter().collect(),
        seconds,
        programs,
    })
}

/// Every interface of this network namespace, by name.
fn interfaces() -> Result<Vec<String>> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error()).context("if_nameindex");
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 {
            if !(*p).if_name.is_null() {
                out.push(
                    std::ffi::CStr::from_ptr((*p).if_name)
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// Run count and run time (ns) of every loaded program, by id.
fn snapshot() -> Result<BTreeMap<u32, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        // A program unloaded while the list is read is simply gone.
        let Ok(info): Result<ProgramInfo, _> = info else {
            continue;
        };
        out.insert(
            info.id(),
            (info.run_count(), info.run_time().as_nanos() as u64),
        );
    }
    if out.is_empty() {
        bail!("no loaded BPF program could be read");
    }
    Ok(out)
}
