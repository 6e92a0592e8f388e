//! Shared between the eBPF programs (`agent-ebpf`, `no_std`, bpf target) and the agent.
//!
//! Everything here must compile for `bpfel-unknown-none`: no allocation, no panics reachable
//! from packet input, plain `#[repr(C)]` data with explicit padding.
#![no_std]

pub mod maps;
pub mod parse;
pub mod wireguard;

// Packet builders for tests (host only; allocates).
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;

#[cfg(test)]
extern crate std;
