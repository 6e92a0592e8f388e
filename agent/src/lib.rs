//! wirescope, the agent: loads the TC programs, keeps their maps in sync with the WireGuard
//! peers it finds, and serves what they count to Prometheus.
//!
//! The modules follow the data, each layer importing only from the ones before it:
//!
//! - [`config`]: the command line and the TOML file, checked into a [`config::RunConfig`].
//! - [`sources`]: where state comes from: WireGuard (netlink, UAPI), rtnetlink, the Mullvad
//!   CLI, the kernel's BTF, wg-quick files.
//! - [`datapath`]: the eBPF programs as the agent holds them: load, attach, pin, and one
//!   module per feature with its maps.
//! - [`sync`]: the model ([`sync::inventory`]) and the loop that keeps it and the maps in step
//!   with the sources.
//! - [`probes`]: what the agent measures actively: ICMP probes, path MTU, failover.
//! - [`metrics`]: Prometheus collectors, read-only over the datapath, the model and probes.
//! - [`serve`]: the HTTP server, TLS and auth, and the status document.
//! - [`ops`]: `wirescope status` and `wirescope doctor`, clients of a running agent.
//! - [`run`]: `wirescope run`, which wires the layers together.

pub mod caps;
pub mod config;
pub mod datapath;
pub mod hardening;
pub mod instance;
pub mod metrics;
pub mod ops;
pub mod probes;
pub mod run;
pub mod serve;
pub mod sources;
pub mod sync;

/// The compiled eBPF object (agent-ebpf, built by build.rs).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wirescope-ebpf"));
