//! The lab tier: the `wirescope` binary end to end in the network-namespace lab
//! (`xtask::lab`: WireGuard tunnels between namespaces, kernel WireGuard where the module
//! loads, wireguard-go otherwise; a hop namespace and the impairing relay where a test asks
//! for them), one module per feature. Every module has its own lab prefix (`wsa`, `wsh`,
//! ...), so that no two modules' namespaces and interfaces share names; the tests of one
//! module share its prefix, and some change host-wide state (a sysctl, bpffs), so they run
//! one at a time (`--test-threads=1`, as `cargo xtask test` runs them).
//!
//! The modules in [`kernel`] check what depends on the kernel and its WireGuard (counting,
//! handshakes, leaks, path MTU, drops, pinned maps over a restart): `cargo xtask vm-test`
//! runs them again on Debian's kernels, with the libtest filter `kernel::`. The others
//! (commands, the endpoint, faults, idle sync rounds, failing state sources, failover, probes, Mullvad, the
//! shipped systemd unit under a real systemd in a container) run on the host only, which
//! keeps the VM's time down.
//!
//! Needs root and the lab tools (`cargo xtask setup`); without them the tests print why and
//! pass, except with CI=true, where they fail. Run:
//! `cargo test -p wirescope --test lab -- --test-threads=1` (one module: add its path as a
//! filter, e.g. `kernel::health::` or `doctor::`).

#[path = "../common/mod.rs"]
mod common;

mod kernel;

mod doctor;
mod endpoint;
mod failover;
mod faults;
mod idle;
mod mullvad;
mod obfuscation;
mod probe;
mod prune;
mod sources;
mod status;
mod systemd;
