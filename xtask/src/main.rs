//! `cargo xtask COMMAND`: see `cargo xtask --help`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::lab::{self, Lab, LabConfig, Topology, WgImpl};
use xtask::{build, demo, setup, testsuite, vm};

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
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker (idempotent).
    Setup,
    /// Build the release agent (with its eBPF object).
    Build,
    /// Run setup, then every test (needs root for the lab tests).
    Test,
    /// Run setup, then the multihop demo.
    Demo(demo::DemoArgs),
    /// Run the privileged test suites in QEMU VMs on Debian's 6.1 and/or 6.12 kernels
    /// (installs qemu, the kernels and virtme-ng when missing; needs root).
    VmTest(vm::VmArgs),
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
        /// Put a forwarding hop namespace between the client and the first relay.
        #[arg(long)]
        hop: bool,
        /// With --hop: the MTU of the hop's link towards the relay (less than --veth-mtu); the
        /// hop routes, so DF packets bigger than this get ICMP fragmentation-needed back.
        #[arg(long, requires = "hop")]
        path_mtu: Option<u32>,
        /// WireGuard implementation [default: kernel where `modprobe wireguard` works, else
        /// userspace wireguard-go; WIRESCOPE_LAB_WG=kernel|userspace overrides the default]
        #[arg(long, value_enum)]
        wireguard: Option<WgImpl>,
    },
    /// Remove everything a lab with this prefix made, also after a crash.
    Down {
        #[arg(long, default_value = lab::plan::DEFAULT_PREFIX)]
        prefix: String,
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
            LabCmd::Show { prefix } => {
                let lab = Lab::load(&prefix)?;
                println!("{}", serde_json::to_string_pretty(&lab)?);
                Ok(())
            }
        },
    }
}
