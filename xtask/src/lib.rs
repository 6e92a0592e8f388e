//! Developer tasks for wirescope (`cargo xtask ...`), and the WireGuard lab that the demo, the
//! integration tests and the benchmarks run in.
//!
//! - [`setup`]: installs what a fresh Debian machine lacks.
//! - [`lab`]: network namespaces with wireguard-go standing for a Mullvad client and relays.
//! - [`impair`]: the lab's deterministic impairing UDP relay (drop, swap, delay, drop
//!   handshake responses) in the hop or between the multihop relays.
//! - [`netns`], [`wg`], [`udp`], [`capture`]: helpers tests use inside the lab.
//! - [`sysroot`], [`nspawn`]: a Debian root with systemd, booted in a container to run the
//!   shipped systemd unit under a real systemd.
//! - [`vm`]: the test suites in QEMU VMs on Debian's 6.1 and 6.12 kernels (`vm-test`).
//! - [`fuzz`]: the cargo-fuzz targets in fuzz/ (`cargo xtask fuzz`, and a step of `test`).
//! - [`bench`]: what the agent costs (`cargo xtask bench`).
//! - [`package`]: the Debian package (`cargo xtask package`, built by the packaging crate).
//! - [`testsuite`], [`build`], [`demo`]: the other subcommands.

pub mod agent;
pub mod bench;
pub mod build;
pub mod capture;
pub mod cmd;
pub mod demo;
pub mod fuzz;
pub mod impair;
pub mod lab;
pub mod netns;
pub mod nspawn;
pub mod package;
pub mod procs;
pub mod prometheus;
pub mod scrape;
pub mod setup;
pub mod sysroot;
pub mod testsuite;
pub mod udp;
pub mod vm;
pub mod wg;
pub mod wgload;

pub use lab::{Lab, LabConfig, Role, Topology, WgImpl};
