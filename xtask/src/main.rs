//! `cargo xtask COMMAND`: see `cargo xtask --help`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::impair::{DirRules, Impairment, Place};
use xtask::lab::{self, Lab, LabConfig, Topology, WgImpl};
use xtask::{bench, build, demo, fuzz, package, setup, testsuite, vm};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for wirescope"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker, cargo-fuzz
    /// (idempotent).
    Setup,
    /// Build the release agent (with its eBPF object).
    Build,
    /// Build the release agent and its Debian package,
    /// target/debian/wirescope_VERSION_ARCH.deb (needs dpkg-dev: `cargo xtask setup`).
    Package,
    /// Run setup, then every test (needs root for the lab tests).
    Test,
    /// Run setup, then the multihop demo.
    Demo(demo::DemoArgs),
    /// Run the privileged test suites in QEMU VMs on Debian's 6.1 and/or 6.12 kernels
    /// (installs qemu, the kernels and virtme-ng when missing; needs root).
    VmTest(vm::VmArgs),
    /// Measure what the agent costs (per packet, throughput, 10k-peer scale, at rest) side by
    /// side with the baselines; writes bench/REPORT.md and bench/report.json (needs root).
    Bench(bench::BenchArgs),
    /// Build the cargo-fuzz targets in fuzz/ and run each for --seconds, two at a time.
    Fuzz(fuzz::FuzzArgs),
    /// The WireGuard network-namespace lab.
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build a lab (first removing any earlier one with the same prefix) and leave it running.
    Up {
        #[arg(long, value_enum, default_value_t = Topology::Single)]
        topology: Topology,
        /// Namespaces are PREFIX-cli, ...; interfaces PREFIXc0, ...
        #[arg(long, default_value = lab::plan::DEFAULT_PREFIX)]
        prefix: String,
        /// MTU of the client's and the exit relay's wg interfaces (the entry's is 80 more).
        #[arg(long, default_value_t = lab::plan::DEFAULT_WG_MTU)]
        wg_mtu: u32,
        /// MTU of every veth.
        #[arg(long, default_value_t = lab::plan::DEFAULT_VETH_MTU)]
        veth_mtu: u32,
        /// Put a forwarding hop namespace between the client and the first relay (a router;
        /// `cargo xtask lab impair` relays the client's WireGuard through it with drops,
        /// swaps and delays).
        #[arg(long)]
        hop: bool,
        /// With --hop: the MTU of the hop's link towards the relay (less than --veth-mtu); the
        /// hop routes, so DF packets bigger than this get ICMP fragmentation-needed back.
        #[arg(long, requires = "hop")]
        path_mtu: Option<u32>,
        /// WireGuard implementation [default: kernel where `modprobe wireguard` works, else
        /// userspace wireguard-go; WIRESCOPE_LAB_WG=kernel|userspace|wireguard-go-current|boringtun
        /// overrides the default]
        #[arg(long, value_enum)]
        wireguard: Option<WgImpl>,
    },
    /// Remove everything a lab with this prefix made, also after a crash.
    Down {
        #[arg(long, default_value = lab::plan::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Relay the client's WireGuard through the impairing relay until Ctrl-C or --duration,
    /// printing its counters every 5 s (the lab needs --hop, or multihop for --place relays).
    /// RULES are comma-separated: drop-every=K, reorder-every=M, delay=MS,
    /// drop-handshake-responses, count=data|all (what drop-every and reorder-every count:
    /// WireGuard data messages, the default, or every datagram).
    Impair {
        #[arg(long, default_value = lab::plan::DEFAULT_PREFIX)]
        prefix: String,
        /// hop: between the client and the first relay, in the hop namespace; relays:
        /// between the multihop entry and exit relays, in the entry namespace.
        #[arg(long, value_enum, default_value_t = Place::Hop)]
        place: Place,
        /// Rules for datagrams towards the client, e.g. `drop-every=10,delay=40`.
        #[arg(long, value_name = "RULES", default_value = "")]
        to_client: DirRules,
        /// Rules for datagrams towards the relay.
        #[arg(long, value_name = "RULES", default_value = "")]
        to_relay: DirRules,
        /// Stop after this many seconds (default: at Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Print the state file of a running lab (JSON).
    Show {
        #[arg(long, default_value = lab::plan::DEFAULT_PREFIX)]
        prefix: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build::run(),
        Cmd::Package => package::run().map(|_| ()),
        Cmd::Test => {
            setup::run()?;
            testsuite::run()
        }
        Cmd::Demo(args) => {
            setup::run()?;
            demo::run(&args)
        }
        Cmd::VmTest(args) => {
            setup::run()?;
            vm::run(&args)
        }
        Cmd::Fuzz(args) => fuzz::run(&args),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Lab { command } => match command {
            LabCmd::Up {
                topology,
                prefix,
                wg_mtu,
                veth_mtu,
                hop,
                path_mtu,
                wireguard,
            } => {
                let wireguard = match wireguard {
                    Some(w) => w,
                    None => WgImpl::auto()?,
                };
                let mut lab = Lab::up(LabConfig {
                    topology,
                    prefix,
                    wg_mtu,
                    veth_mtu,
                    hop,
                    path_mtu,
                    wireguard,
                })?;
                lab.detach();
                print!("{}", lab.summary());
                println!(
                    "remove it with `cargo xtask lab down --prefix {}`",
                    lab.prefix
                );
                Ok(())
            }
            LabCmd::Down { prefix } => {
                let removed = lab::down(&prefix)?;
                if removed.is_empty() {
                    println!("lab `{prefix}`: nothing to remove");
                }
                for r in removed {
                    println!("removed {r}");
                }
                Ok(())
            }
            LabCmd::Impair {
                prefix,
                place,
                to_client,
                to_relay,
                duration,
            } => impair(
                &prefix,
                place,
                Impairment {
                    to_client,
                    to_relay,
                },
                duration,
            ),
            LabCmd::Show { prefix } => {
                let lab = Lab::load(&prefix)?;
                println!("{}", serde_json::to_string_pretty(&lab)?);
                Ok(())
            }
        },
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: nix::libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `cargo xtask lab impair`: runs the relay in the foreground; the client's configuration is
/// put back when it stops (Ctrl-C, SIGTERM or the duration).
fn impair(prefix: &str, place: Place, rules: Impairment, duration: Option<u64>) -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    let lab = Lab::load(prefix)?;
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }?;
    }
    let handle = lab.start_impairment_at(place, rules)?;
    lab.mark_impairment(Some(place), Some(&rules))?;
    println!(
        "lab `{prefix}`: impairing relay at {} -> {} ({})",
        handle.listen_addr(),
        handle.upstream(),
        rules.describe()
    );
    println!("stop with Ctrl-C; the client's endpoints are put back then");
    let end = duration.map(|d| Instant::now() + Duration::from_secs(d));
    let mut next = Instant::now() + Duration::from_secs(5);
    while !STOP.load(Ordering::Relaxed) && end.is_none_or(|e| Instant::now() < e) {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next {
            next += Duration::from_secs(5);
            print_impair_stats(&handle.stats());
        }
    }
    let stats = handle.stop();
    let unmarked = lab.mark_impairment(None, None);
    let stats = stats?;
    print_impair_stats(&stats);
    unmarked
}

fn print_impair_stats(s: &xtask::impair::ImpairStats) {
    for (dir, d) in [("to relay", &s.to_relay), ("to client", &s.to_client)] {
        println!(
            "  {dir:<9} received {} (init {}, resp {}, cookie {}, data {}, other {}) forwarded {} \
             dropped {} handshake-responses-dropped {} swapped-pairs {} delayed {}",
            d.received,
            d.messages[1],
            d.messages[2],
            d.messages[3],
            d.messages[4],
            d.messages[0],
            d.forwarded,
            d.dropped,
            d.dropped_handshake_responses,
            d.reordered_pairs,
            d.delayed
        );
    }
}
