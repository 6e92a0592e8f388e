//! The datapath tier: `BPF_PROG_TEST_RUN` tests of the compiled TC programs
//! (`wirescope_ingress` = rx, `wirescope_egress` = tx) on the byte fixtures of
//! `agent_common::fixtures`, the ones the host parser tests use, one module per feature. No
//! network-namespace lab: every test enters a fresh network namespace of its own (unshare on
//! its own thread) with veth pairs in it, and attaches the programs there through
//! `Datapath::attach`, as the agent does it, which is what writes IFACES; the interfaces are
//! down, so only the test runs reach the programs. The programs are loaded once per run of
//! this binary (the verifier's work, about 6 s of a test's 7 under the VMs' emulation) and
//! lent to one test after the other, reset in between to a fresh load's state
//! (`common::Lent`, `Datapath::reset`, checked by `reset::`). What they check depends on the
//! kernel (its verifier, its test_run), so `cargo xtask vm-test` runs this whole tier again on
//! Debian's kernels.
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
//! Needs root and BPF. Without root the tests print why and pass, except with CI=true, where
//! they fail. Run: `cargo test -p wirescope --test datapath -- --test-threads=1` (one
//! feature: add its module as a filter, e.g. `transit::`).

#[path = "../common/mod.rs"]
mod common;

mod batch;
mod bounded;
mod client;
mod health;
mod leak;
mod multihop;
mod obfuscation;
mod path;
mod reset;
mod robustness;
mod transit;
mod transit_off;
mod tunnel;
mod wire;
