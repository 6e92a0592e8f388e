//! wirescope, the agent: loads the TC programs, keeps their maps in sync with the WireGuard
//! peers it finds, and serves what they count to Prometheus.

pub mod btf;
pub mod caps;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypto;
pub mod datapath;
pub mod doctor;
pub mod drops;
pub mod failover;
pub mod features;
pub mod friendly;
pub mod health;
pub mod http;
pub mod instance;
pub mod inventory;
pub mod metrics;
pub mod mullvad;
pub mod netlink;
pub mod peer_label;
pub mod pmtu;
pub mod probe;
pub mod run;
pub mod source_errors;
pub mod status;
pub mod status_doc;
pub mod status_view;
pub mod sync;
pub mod topology;
pub mod transit;
pub mod wg;

/// The compiled eBPF object (agent-ebpf, built by build.rs).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wirescope-ebpf"));
