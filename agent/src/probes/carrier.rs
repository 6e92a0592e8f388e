//! Path MTU measured through the tunnel, for hosts whose firewall lets nothing but the
//! tunnel's own WireGuard datagrams reach the relay (the Mullvad app's nftables table: the
//! relay gets UDP to its WireGuard port with the tunnel's fwmark and nothing else), so the
//! don't-fragment echo search to the hop-1 endpoint ([`crate::probes::pmtu`]) never gets a
//! reply.
//!
//! The search: don't-fragment ICMP echoes of each size to a target behind the tunnel (a probe
//! target bound to the tunnel interface; on Mullvad the in-tunnel gateway 10.64.0.1@wg0-mullvad
//! the poller adds), the same bisection as the underlay search ([`Search`]), but a size passes
//! only when its reply came back and the datapath counted, meanwhile, no fragment of a
//! WireGuard datagram (layer `outer`) and no ICMP too-big on the hop-1 underlays. The inner
//! echo's own don't-fragment bit does not reach the WireGuard datagram that carries it:
//! kernel WireGuard sends its datagrams without DF, so a router fragments a too-big one and
//! the echo still gets through. The fragments (of the relay's equally big reply, arriving
//! here) or the router's too-big (when the implementation sets DF; the firewall drops it
//! before any socket, but the TC programs see it first) are what tell that the carrier did
//! not fit.
//!
//! From the largest clean inner size `S` and the smallest failed one `F`, the carrier sizes
//! follow ([`outer_len`]: per layer, the plaintext padded to a multiple of 16 but not past
//! the tunnel MTU, plus 32 + 8 + the outer IP header). The underlay path MTU is then at least
//! `S`'s carrier and below `outer_len(F)`: a 16-byte bracket, because WireGuard's padding
//! makes every inner size in a block of 16 the same carrier size. So with a padding
//! implementation `S` ends a block (a multiple of 16, or the MTU); an `S` inside a block shows
//! one that does not pad (boringtun 0.6.0), whose carriers are [`min_outer_len`]: there the
//! bracket is that formula's (one byte wide), as the padded one would overstate the floor by
//! up to 15 bytes and recommend an MTU whose carriers do not fit. (An unpadded `S` that
//! happens to end a block reads as padded: the same carrier over one layer; in multihop the
//! floor can then be up to 15 bytes high.) Method
//! [`Method::TunnelEcho`] takes the bracket's floor (proven to pass). When an ICMP too-big
//! seen on those underlays during the search reported an MTU inside the bracket, that MTU is
//! the path MTU ([`Method::TunnelEchoIcmp`]): the router said so, and it agrees with what
//! passed and what did not. Example, one IPv4 layer, tunnel MTU 1420, a 1400-byte link on the
//! way: 1328 is clean (carrier 1388), 1329 is not (padded to 1344: carrier 1404), so the path
//! is 1388..=1403; alone that recommends 1328, with a too-big reporting 1400 it recommends 1340.
//!
//! Fragments on the tunnel itself (layer `inner`) do not count: in Mullvad multihop the exit
//! layer's datagrams re-enter the same interface and are fragmented there at any MTU, so they
//! say nothing about the path; [`outer_len`] follows their largest piece instead. Other
//! outer fragments during a step make that size fail: the result can only come out lower,
//! never above what passed. Searches run one tunnel at a time, after the other searches of
//! the round, so that their probes do not count as each other's signals.

use std::{sync::Mutex, time::Duration};

use agent_common::maps::path::layer;
use log::{debug, info, warn};
use tokio::time::Instant;

use crate::{
    datapath::Datapath,
    probes::{
        icmp::IcmpSocket,
        pmtu::{FLOOR, PmtuTarget, Search, TRIES, await_reply, ceiling, recommended_mtu},
    },
    sources::netlink::Netlink,
};

/// How a recommended MTU was measured (`wirescope_recommended_mtu_info{method}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    /// Don't-fragment ICMP echo search to the hop-1 endpoint through the underlay.
    UnderlayEcho,
    /// In-tunnel echo search, the carrier unfragmented: the floor of the 16-byte bracket.
    TunnelEcho,
    /// In-tunnel echo search, the bracket narrowed to the MTU an ICMP too-big reported.
    TunnelEchoIcmp,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::UnderlayEcho => "underlay_echo",
            Method::TunnelEcho => "tunnel_echo",
            Method::TunnelEchoIcmp => "tunnel_echo_icmp",
        }
    }
}

/// What the datapath counted that says a WireGuard datagram did not fit.
pub trait CarrierSignals: Send + Sync {
    /// Fragments of WireGuard datagrams (layer `outer`, both directions) plus ICMP too-big
    /// messages counted so far on `ifindexes`; None when the maps cannot be read.
    fn count(&self, ifindexes: &[u32]) -> Option<u64>;
    /// The MTUs ICMP too-big messages reported on `ifindexes` at or after `since_ns`
    /// (CLOCK_MONOTONIC).
    fn reported_since(&self, ifindexes: &[u32], since_ns: u64) -> Vec<u32>;
    /// CLOCK_MONOTONIC now, the clock of [`CarrierSignals::reported_since`].
    fn now_ns(&self) -> u64 {
        crate::datapath::monotonic_ns()
    }
}

impl CarrierSignals for Mutex<Datapath> {
    fn count(&self, ifindexes: &[u32]) -> Option<u64> {
        let dp = self.lock().ok()?;
        let frags = dp.path.fragments().ok()?;
        let too_big = dp.path.icmp_too_big().ok()?;
        let frags: u64 = frags
            .iter()
            .filter(|(k, _)| ifindexes.contains(&k.ifindex))
            .filter(|(k, _)| k.kind == layer::OUTER)
            .map(|(_, c)| c.packets)
            .sum();
        let too_big: u64 = too_big
            .iter()
            .filter(|(k, _)| ifindexes.contains(&k.ifindex))
            .map(|(_, c)| c.packets)
            .sum();
        Some(frags + too_big)
    }

    fn reported_since(&self, ifindexes: &[u32], since_ns: u64) -> Vec<u32> {
        let Ok(dp) = self.lock() else {
            return Vec::new();
        };
        dp.path
            .icmp_mtus()
            .into_iter()
            .filter(|(k, t)| ifindexes.contains(&k.ifindex) && *t >= since_ns)
            .map(|(k, _)| k.mtu)
            .collect()
    }
}

/// The largest carrier on the underlay of an inner IP packet of `inner` bytes (at most the
/// tunnel MTU: the probe has don't-fragment set) sent through a tunnel of MTU `mtu` with the
/// WireGuard layers `layers_v6` (hop 1 first; true: that layer's endpoint is IPv6). Per
/// layer, innermost first: the plaintext padded to a multiple of 16 but not past the MTU,
/// plus the 32-byte WireGuard header and tag, UDP and the layer's outer IP header. In
/// multihop the exit layer's datagram re-enters the same interface: above the MTU the kernel
/// fragments it first, and the largest piece, the first fragment (header plus the payload
/// that fits, in multiples of 8; IPv6 adds its 8-byte fragment header), is what the next
/// layer carries. None above the MTU.
pub fn outer_len(inner: u32, mtu: u32, layers_v6: &[bool]) -> Option<u32> {
    carrier_len(inner, mtu, layers_v6, true)
}

/// [`outer_len`] with no padding: the smallest carrier any implementation sends for an inner
/// packet of `inner` bytes (boringtun 0.6.0 sends exactly this).
pub fn min_outer_len(inner: u32, mtu: u32, layers_v6: &[bool]) -> Option<u32> {
    carrier_len(inner, mtu, layers_v6, false)
}

fn carrier_len(inner: u32, mtu: u32, layers_v6: &[bool], pad: bool) -> Option<u32> {
    if inner > mtu {
        return None;
    }
    let mut len = inner;
    // The family of the packet `len` measures once it is a WireGuard datagram.
    let mut family_v6: Option<bool> = None;
    for v6 in layers_v6.iter().rev() {
        if len > mtu {
            let head = if family_v6 == Some(true) { 40 + 8 } else { 20 };
            len = head + (mtu.saturating_sub(head) / 8) * 8;
        }
        let padded = if pad {
            len.div_ceil(16).saturating_mul(16).min(mtu)
        } else {
            len
        };
        len = padded + crate::probes::pmtu::WG_UDP_OVERHEAD + if *v6 { 40 } else { 20 };
        family_v6 = Some(*v6);
    }
    Some(len)
}

/// What an in-tunnel search found for one tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CarrierResult {
    /// The underlay path MTU it shows: at least this much passes.
    pub path: u32,
    pub method: Method,
    /// The tunnel MTU that follows: [`recommended_mtu`] of `path`, or the tunnel's own MTU
    /// when every size passed.
    pub recommended: u32,
}

/// The path MTU from an in-tunnel search (see the module doc): `passed` the largest clean
/// inner size, `failed` the smallest failed one (None when the ceiling passed), `reported`
/// the MTUs ICMP too-big messages reported during the search. None when `passed` is above
/// the MTU (no such probe is sent).
///
/// When every size passed, the path carries everything the tunnel sends at its MTU, and the
/// recommendation is that MTU: a larger one is not shown to fit, and a smaller one is not
/// needed (in multihop the formula alone would ask for less, because the exit layer's
/// datagrams are fragmented on the tunnel at any MTU and never reach the underlay whole).
pub fn carrier_path(
    passed: u32,
    failed: Option<u32>,
    mtu: u32,
    layers_v6: &[bool],
    reported: &[u32],
) -> Option<CarrierResult> {
    // See the module doc: a clean size inside a block of 16 is an implementation that does
    // not pad.
    let padded = passed.is_multiple_of(16) || passed == mtu;
    let carrier = |inner| carrier_len(inner, mtu, layers_v6, padded);
    let lo = carrier(passed)?;
    let Some(failed) = failed else {
        return Some(CarrierResult {
            path: lo,
            method: Method::TunnelEcho,
            recommended: recommended_mtu(lo, layers_v6).max(mtu),
        });
    };
    let hi = carrier(failed)
        .map(|o| o.saturating_sub(1))
        .filter(|hi| *hi >= lo);
    let narrowed = hi.and_then(|hi| {
        reported
            .iter()
            .copied()
            .filter(|m| (lo..=hi).contains(m))
            .min()
    });
    let (path, method) = match narrowed {
        Some(m) => (m, Method::TunnelEchoIcmp),
        None => (lo, Method::TunnelEcho),
    };
    Some(CarrierResult {
        path,
        method,
        recommended: recommended_mtu(path, layers_v6),
    })
}

/// One tunnel's in-tunnel search, as [`crate::probes::pmtu`] plans it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarrierPlan {
    pub tunnel: String,
    /// The target behind the tunnel, bound to it.
    pub target: PmtuTarget,
    /// Underlays whose outer fragments and too-bigs count against a size: those of the
    /// tunnel's hop-1 peers.
    pub watch: Vec<u32>,
    pub mtu: u32,
    pub layers_v6: Vec<bool>,
}

/// Does an echo of `size` bytes come back with a clean carrier? Up to [`TRIES`] echoes; a
/// signal ends the step at once (sending the same size again would only fragment again).
async fn clean_echo(
    sock: &IcmpSocket,
    seq: &mut u16,
    size: u32,
    timeout: Duration,
    plan: &CarrierPlan,
    signals: &dyn CarrierSignals,
) -> bool {
    for _ in 0..TRIES {
        let Some(before) = signals.count(&plan.watch) else {
            debug!("in-tunnel path MTU: the datapath's counters cannot be read");
            return false;
        };
        *seq = seq.wrapping_add(1);
        let want = *seq;
        if let Err(e) = sock.send_sized(want, size as usize) {
            debug!("in-tunnel path MTU probe of {size} bytes: send: {e}");
            continue;
        }
        let replied = await_reply(sock, want, Instant::now() + timeout, size).await;
        // The reply is read after its carrier's fragments were counted (TC ingress comes
        // before reassembly), so one read here sees them.
        match signals.count(&plan.watch) {
            Some(after) if after == before => {
                if replied {
                    return true;
                }
            }
            _ => return false,
        }
    }
    false
}

/// Runs the in-tunnel search of `plan`; None when it could not run or not even the floor
/// came back clean.
pub async fn measure(
    netlink: &Netlink,
    plan: &CarrierPlan,
    signals: &dyn CarrierSignals,
    timeout: Duration,
) -> Option<CarrierResult> {
    let t = &plan.target;
    let links = match netlink.links().await {
        Ok(l) => l,
        Err(e) => {
            warn!("in-tunnel path MTU of {} via {}: {e}", plan.tunnel, t.label);
            return None;
        }
    };
    let ceil = match ceiling(netlink, &links, t).await {
        Ok(c) => c,
        Err(e) => {
            warn!("in-tunnel path MTU of {} via {}: {e}", plan.tunnel, t.label);
            return None;
        }
    };
    let sock = match IcmpSocket::open(t.addr, t.iface.as_deref(), true) {
        Ok(s) => s,
        Err(e) => {
            warn!("in-tunnel path MTU of {} via {}: {e}", plan.tunnel, t.label);
            return None;
        }
    };
    let since = signals.now_ns();
    let mut search = Search::new(FLOOR, ceil);
    let mut seq = 0u16;
    while let Some(size) = search.next() {
        let ok = clean_echo(&sock, &mut seq, size, timeout, plan, signals).await;
        search.record(size, ok);
    }
    let Some(passed) = search.result() else {
        warn!(
            "in-tunnel path MTU of {} via {}: no echo of {} bytes came back with an unfragmented carrier",
            plan.tunnel,
            t.label,
            FLOOR.min(ceil)
        );
        return None;
    };
    let reported = signals.reported_since(&plan.watch, since);
    let r = carrier_path(
        passed,
        search.smallest_failed(),
        plan.mtu,
        &plan.layers_v6,
        &reported,
    )?;
    info!(
        "path MTU of {} measured through the tunnel to {}: largest clean echo {passed}, \
         smallest failed {:?}, too-big MTUs {reported:?}: path {} ({}), recommended MTU {}",
        plan.tunnel,
        t.label,
        search.smallest_failed(),
        r.path,
        r.method.as_str(),
        r.recommended
    );
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carrier_sizes_per_layer() {
        // One IPv4 layer at MTU 1420: padded to 16, never past the MTU.
        assert_eq!(outer_len(1328, 1420, &[false]), Some(1388));
        assert_eq!(outer_len(1329, 1420, &[false]), Some(1404));
        assert_eq!(outer_len(1344, 1420, &[false]), Some(1404));
        assert_eq!(outer_len(1420, 1420, &[false]), Some(1480));
        assert_eq!(outer_len(1410, 1420, &[false]), Some(1480));
        assert_eq!(outer_len(1280, 1420, &[true]), Some(1280 + 80));
        // Don't-fragment probes above the MTU are never sent.
        assert_eq!(outer_len(1421, 1420, &[false]), None);
        // Two IPv4 layers on one interface (Mullvad multihop, MTU 1380):
        // 1280 -> 1340 -> padded 1344 -> 1404.
        assert_eq!(outer_len(1280, 1380, &[false, false]), Some(1404));
        // 1312 -> 1372, within the MTU -> padded 1376 -> 1436.
        assert_eq!(outer_len(1312, 1380, &[false, false]), Some(1436));
        // 1313 pads to 1328: 1388 > 1380 is fragmented on the tunnel; its first fragment,
        // 20 + 1360, is the largest piece the entry layer carries: 1440.
        assert_eq!(outer_len(1313, 1380, &[false, false]), Some(1440));
        assert_eq!(outer_len(1380, 1380, &[false, false]), Some(1440));
        // An IPv6 exit layer fragments with 48 bytes of headers: 48 + 1328 = 1376 -> 1436.
        assert_eq!(outer_len(1380, 1380, &[false, true]), Some(1436));
        // An IPv6 entry, IPv4 exit: 1280 -> 1340 -> padded 1344 + 80.
        assert_eq!(outer_len(1280, 1380, &[true, false]), Some(1424));
        // Larger sizes never make smaller carriers at the MTUs of the lab and of Mullvad
        // (MTU - 20 a multiple of 8), so the bisection holds.
        for (mtu, layers) in [
            (1420, vec![false]),
            (1380, vec![false]),
            (1380, vec![false, false]),
            (1420, vec![false, false]),
            (1380, vec![true, false]),
        ] {
            let sizes: Vec<u32> = (1280..=mtu)
                .map(|s| outer_len(s, mtu, &layers).unwrap())
                .collect();
            assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{mtu} {layers:?}");
        }
    }

    /// boringtun 0.6.0 does not pad: behind a 1400-byte link inner 1340 passes (carrier 1400)
    /// and 1341 fails (1401). The floor is 1340's carrier, not the padded 1404 that would
    /// recommend 1344 (whose carriers do not fit); an ICMP report of 1400 agrees.
    #[test]
    fn an_implementation_that_does_not_pad() {
        assert_eq!(min_outer_len(1340, 1420, &[false]), Some(1400));
        assert_eq!(
            min_outer_len(1328, 1420, &[false]),
            outer_len(1328, 1420, &[false])
        );
        assert_eq!(min_outer_len(1280, 1380, &[false, false]), Some(1400));
        let r = carrier_path(1340, Some(1341), 1420, &[false], &[]).unwrap();
        assert_eq!(
            (r.path, r.method, r.recommended),
            (1400, Method::TunnelEcho, 1340)
        );
        let r = carrier_path(1340, Some(1341), 1420, &[false], &[1400]).unwrap();
        assert_eq!(
            (r.path, r.method, r.recommended),
            (1400, Method::TunnelEchoIcmp, 1340)
        );
        // Against such a path the search finds path - 60 for every path (one byte apart,
        // where padding gives one answer per 16), and the recommendation's carriers fit.
        for path in 1390..=1410 {
            let (p, f) = simulate_unpadded(path, 1420, &[false]);
            assert_eq!((p, f), (path - 60, Some(path - 59)), "path {path}");
            let r = carrier_path(p, f, 1420, &[false], &[]).unwrap();
            assert!(
                r.path <= path && min_outer_len(r.recommended, 1420, &[false]) <= Some(path),
                "path {path}: {r:?}"
            );
        }
    }

    #[test]
    fn the_bracket_and_its_narrowing() {
        // The lab: a 1400-byte link, MTU 1420. 1328 clean, 1329 not: path 1388..=1403.
        let alone = carrier_path(1328, Some(1329), 1420, &[false], &[]).unwrap();
        assert_eq!(
            alone,
            CarrierResult {
                path: 1388,
                method: Method::TunnelEcho,
                recommended: 1328
            }
        );
        let icmp = carrier_path(1328, Some(1329), 1420, &[false], &[1400]).unwrap();
        assert_eq!(
            icmp,
            CarrierResult {
                path: 1400,
                method: Method::TunnelEchoIcmp,
                recommended: 1340
            }
        );
        // Reports outside the bracket contradict what passed or failed: ignored.
        for r in [1387, 1404, 1280, 1500] {
            assert_eq!(
                carrier_path(1328, Some(1329), 1420, &[false], &[r]),
                Some(alone),
                "{r}"
            );
        }
        // Both ends of the bracket are possible; of two inside, the lower.
        let path = |reported: &[u32]| {
            carrier_path(1328, Some(1329), 1420, &[false], reported)
                .unwrap()
                .path
        };
        assert_eq!(path(&[1403, 1388]), 1388);
        assert_eq!(path(&[1403]), 1403);
        // The ceiling passed: the tunnel's MTU stands, and nothing narrows (a report above
        // would promise more than any echo showed).
        let top = carrier_path(1420, None, 1420, &[false], &[1490]).unwrap();
        assert_eq!(
            (top.path, top.method, top.recommended),
            (1480, Method::TunnelEcho, 1420)
        );
        // Multihop at 1380 on a clean path: everything passes, the largest carrier is 1440,
        // and 1380 stands (the formula alone would say 1440 - 120 = 1320).
        let mh = carrier_path(1380, None, 1380, &[false, false], &[]).unwrap();
        assert_eq!((mh.path, mh.recommended), (1440, 1380));
        assert_eq!(carrier_path(1381, None, 1380, &[false], &[]), None);
        assert_eq!(Method::TunnelEchoIcmp.as_str(), "tunnel_echo_icmp");
    }

    /// The search against a model path: a size is clean when its carrier fits `path`.
    fn simulate(path: u32, mtu: u32, layers: &[bool]) -> (u32, Option<u32>) {
        let mut s = Search::new(FLOOR, mtu);
        while let Some(size) = s.next() {
            let clean = outer_len(size, mtu, layers).is_some_and(|o| o <= path);
            s.record(size, clean);
        }
        (s.result().unwrap(), s.smallest_failed())
    }

    /// [`simulate`] for an implementation that does not pad.
    fn simulate_unpadded(path: u32, mtu: u32, layers: &[bool]) -> (u32, Option<u32>) {
        let mut s = Search::new(FLOOR, mtu);
        while let Some(size) = s.next() {
            let clean = min_outer_len(size, mtu, layers).is_some_and(|o| o <= path);
            s.record(size, clean);
        }
        (s.result().unwrap(), s.smallest_failed())
    }

    #[test]
    fn a_search_against_a_model_path() {
        assert_eq!(simulate(1400, 1420, &[false]), (1328, Some(1329)));
        // Every path MTU from 1388 to 1403 gives the same echoes; the report picks it.
        for path in 1388..=1403 {
            let (p, f) = simulate(path, 1420, &[false]);
            assert_eq!((p, f), (1328, Some(1329)), "path {path}");
            let r = carrier_path(p, f, 1420, &[false], &[path]).unwrap();
            assert_eq!((r.path, r.recommended), (path, path - 60));
        }
        // A clean path: the ceiling passes, the tunnel MTU stands.
        assert_eq!(simulate(1500, 1420, &[false]), (1420, None));
        // Multihop at 1380 on a 1420 path: 1296 -> 1356 -> 1360 -> 1420 fits; 1297 pads
        // to 1312 -> 1372 -> 1376 -> 1436 does not. The path is 1420..=1435 and the
        // recommendation the same as the underlay search's for 1420: 1420 - 120.
        let (p, f) = simulate(1420, 1380, &[false, false]);
        assert_eq!((p, f), (1296, Some(1297)));
        let r = carrier_path(p, f, 1380, &[false, false], &[]).unwrap();
        assert_eq!((r.path, r.recommended), (1420, 1300));
        assert_eq!(
            carrier_path(p, f, 1380, &[false, false], &[1430])
                .unwrap()
                .recommended,
            1310
        );
    }
}
