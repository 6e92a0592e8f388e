//! The packet as the shared parser reads it: `bpf_skb_load_bytes` under `TcContext::load`,
//! which needs no pointer proofs and works on non-linear skbs.

use agent_common::parse::Packet;
use aya_ebpf::programs::TcContext;

pub struct Skb<'a> {
    ctx: &'a TcContext,
}

impl<'a> Skb<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        Self { ctx }
    }

    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }

    /// Segments of a GSO skb, 0 or 1 otherwise.
    #[inline(always)]
    pub fn gso_segs(&self) -> u32 {
        unsafe { (*self.ctx.skb.skb).gso_segs }
    }

    /// Payload bytes per segment of a GSO skb.
    #[inline(always)]
    pub fn gso_size(&self) -> u32 {
        unsafe { (*self.ctx.skb.skb).gso_size }
    }
}

impl Packet for Skb<'_> {
    #[inline(always)]
    fn len(&self) -> u32 {
        self.ctx.len()
    }

    #[inline(always)]
    fn load<const N: usize>(&self, off: u32) -> Option<[u8; N]> {
        self.ctx.load::<[u8; N]>(off as usize).ok()
    }
}
