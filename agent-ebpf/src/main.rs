//! wirescope's TC programs. One pair (ingress, egress) serves every watched interface: the
//! agent tells each interface's role and framing through the `IFACES` map.
//!
//! The programs only observe: they always return TC_ACT_UNSPEC (TCX_NEXT), which under TCX
//! and clsact alike leaves the packet's fate to whatever runs next.
#![no_std]
// Atomic fetch-and-add in inline assembly (transit.rs): core's atomics are not offered on BPF.
#![feature(asm_experimental_arch)]
#![no_main]

mod count;
mod crypto;
mod drops;
mod health;
mod leak;
mod maps;
mod obfuscation;
mod path;
mod skb;
mod transit;
mod tunnel;
mod wire;

use agent_common::{
    maps::{DIR_RX, DIR_TX, IfaceConfig},
    parse::{L4, Packet as _, gso_segments, parse_ip, parse_l4},
};
use aya_ebpf::{
    macros::{classifier, kprobe, kretprobe, raw_tracepoint, tracepoint},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TcContext, TracePointContext},
};

/// TC_ACT_UNSPEC, which is also TCX_NEXT.
const TC_NEXT: i32 = -1;

#[classifier]
pub fn wirescope_ingress(ctx: TcContext) -> i32 {
    transit::begin();
    let _ = observe(&ctx, DIR_RX);
    transit::finish(&ctx);
    TC_NEXT
}

#[classifier]
pub fn wirescope_egress(ctx: TcContext) -> i32 {
    transit::begin();
    let leak_candidate = observe(&ctx, DIR_TX);
    // A packet that left transit work is WireGuard, hence no leak: the tail call to
    // wirescope_transit does not come back.
    transit::finish(&ctx);
    if leak_candidate {
        leak::check(&ctx);
    }
    TC_NEXT
}

/// Reached by tail call from wirescope_egress for what leaves an underlay while a tunnel is
/// up: the leak check in its own program, so the verifier walks it once, not once per path
/// through the egress program (where it cost ~200k instructions on 6.18, ~800k on 6.1).
#[classifier]
pub fn wirescope_leak(ctx: TcContext) -> i32 {
    let pkt = skb::Skb::new(&ctx);
    let ifindex = pkt.ifindex();
    let Some(cfg) = maps::iface(ifindex) else {
        return TC_NEXT;
    };
    let Ok(ip) = parse_ip(&pkt, cfg.flags & IfaceConfig::L3 != 0) else {
        return TC_NEXT;
    };
    let (has_l4, l4_value) = match parse_l4(&pkt, &ip) {
        Ok(Some(l4)) => (true, l4),
        _ => (false, L4::default()),
    };
    let l4 = if has_l4 { Some(&l4_value) } else { None };
    leak::observe(&pkt, ifindex, &ip, l4, pkt.gso_segs());
    TC_NEXT
}

/// Reached by tail call from the two above, with the transit-time queue work they left
/// (`agent_common::maps::transit::PROG`).
#[classifier]
pub fn wirescope_transit(_ctx: TcContext) -> i32 {
    transit::run_ops();
    TC_NEXT
}

/// The empty TC program: the reference `cargo xtask bench` measures ours against (the
/// `bench_packet_cost` example of the agent). A TC program's cost as the kernel reports it
/// (BPF_PROG_TEST_RUN's duration, or run_time/run_count with `kernel.bpf_stats_enabled`)
/// includes the hook's and the clock reads' own overhead, tens of ns that no program can
/// avoid; only the margin over this program, measured the same way on the same packet, is
/// what our code costs. The agent never loads it.
#[classifier]
pub fn wirescope_baseline(_ctx: TcContext) -> i32 {
    TC_NEXT
}

#[kprobe]
pub fn wirescope_encrypt_enter(ctx: ProbeContext) -> u32 {
    crypto::enter(&ctx);
    0
}

#[kretprobe]
pub fn wirescope_encrypt_exit(_ctx: RetProbeContext) -> u32 {
    crypto::exit(DIR_TX);
    0
}

#[kprobe]
pub fn wirescope_decrypt_enter(ctx: ProbeContext) -> u32 {
    crypto::enter(&ctx);
    0
}

#[kretprobe]
pub fn wirescope_decrypt_exit(_ctx: RetProbeContext) -> u32 {
    crypto::exit(DIR_RX);
    0
}

#[tracepoint]
pub fn wirescope_kfree_skb(ctx: TracePointContext) -> u32 {
    drops::kfree_skb(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "udp_fail_queue_rcv_skb")]
pub fn wirescope_udp_fail(ctx: RawTracePointContext) -> i32 {
    drops::udp_fail(&ctx);
    0
}

/// Counts one packet; returns whether it is for the leak check (it left an underlay while a
/// tunnel is up).
#[inline(always)]
fn observe(ctx: &TcContext, dir: u8) -> bool {
    let pkt = skb::Skb::new(ctx);
    let ifindex = pkt.ifindex();
    let Some(cfg) = maps::iface(ifindex) else {
        return false;
    };
    let Ok(ip) = parse_ip(&pkt, cfg.flags & IfaceConfig::L3 != 0) else {
        return false;
    };
    // A malformed transport header still leaves a countable IP packet. Held as a value
    // that is always initialised, and lent as `Option<&L4>` (a pointer): LLVM may move an
    // `Option<L4>`'s uninitialised payload through registers, which the verifier refuses.
    let (has_l4, l4_value) = match parse_l4(&pkt, &ip) {
        Ok(Some(l4)) => (true, l4),
        _ => (false, L4::default()),
    };
    let l4 = if has_l4 { Some(&l4_value) } else { None };
    let l4_hdr = match l4 {
        Some(l4) => l4.hdr_len,
        None => 0,
    };
    let gso_segs = gso_segments(&ip, l4_hdr, pkt.len(), pkt.gso_segs(), pkt.gso_size());
    if cfg.flags & IfaceConfig::TUNNEL != 0 {
        tunnel::count(&pkt, ifindex, dir, &ip, l4, gso_segs);
    }
    // Path-MTU signals: IP fragments per layer, ICMP too-big messages arriving.
    path::count_fragment(ifindex, dir, cfg.flags, &ip, l4);
    if dir == DIR_RX {
        path::observe_too_big(&pkt, ifindex, &ip);
    }
    // WireGuard messages are looked for on tunnel interfaces too: in multihop the exit
    // layer's messages travel inside the entry layer's tunnel.
    let wireguard = match l4 {
        Some(l4) => wire::count(&pkt, ifindex, dir, &ip, l4, gso_segs),
        None => false,
    };
    let underlay =
        cfg.flags & (IfaceConfig::UNDERLAY | IfaceConfig::TUNNEL) == IfaceConfig::UNDERLAY;
    // An obfuscation proxy's flow to the relay carries a peer's WireGuard where the wire
    // role cannot see it (WireGuard talks to the proxy on loopback): counted for that peer.
    let obfuscated = !wireguard
        && underlay
        && match l4 {
            Some(l4) => obfuscation::count(&ip, l4, dir, pkt.len(), gso_segs),
            None => false,
        };
    // Leaks: what leaves an underlay (not a tunnel) outside every tunnel while one is up.
    // A message just counted as WireGuard is none: on egress the wire role's recognition
    // (known endpoint or local listen port, and the message's shape) is exactly the leak
    // check's, so the tail call and its second parse (~110 ns) are skipped for it. Nor is
    // an obfuscation carrier: it is the tunnel's own traffic in another protocol.
    !wireguard && !obfuscated && dir == DIR_TX && underlay && leak::watching()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic is reachable (no indexing, no unwrap); the verifier would reject one anyway.
    loop {}
}

/// The kernel grants the helpers a tracer needs only to GPL-compatible programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
