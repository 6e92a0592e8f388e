//! `wirescope_source_errors_total{source}`: every failed read of a state source (a
//! WireGuard control socket or netlink family, rtnetlink, the Mullvad CLI) counts once here,
//! next to the warning the reader logs, while everything else keeps being served.
//!
//! One process-wide table: the readers live in different tasks and modules, and the agent
//! runs once per process.

use std::sync::Mutex;

/// A userspace WireGuard's UAPI socket: I/O error, timeout, answer too large, truncated,
/// malformed or an errno.
pub const WIREGUARD_UAPI: &str = "wireguard_uapi";
/// The kernel's WireGuard generic netlink family, for a kernel WireGuard interface.
pub const WIREGUARD_NETLINK: &str = "wireguard_netlink";
/// rtnetlink: the link dump or a route lookup.
pub const RTNETLINK: &str = "rtnetlink";
/// `mullvad status --json`: failed, hung, or unreadable (not: the CLI is not installed).
pub const MULLVAD: &str = "mullvad";

/// Every source, exported from the start at 0.
pub const SOURCES: [&str; 4] = [WIREGUARD_UAPI, WIREGUARD_NETLINK, RTNETLINK, MULLVAD];

static COUNTS: Mutex<[u64; SOURCES.len()]> = Mutex::new([0; SOURCES.len()]);

/// Counts one failed read of `source` (one of [`SOURCES`]; anything else is ignored).
pub fn record(source: &str) {
    let Some(i) = SOURCES.iter().position(|s| *s == source) else {
        return;
    };
    let mut c = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    c[i] = c[i].saturating_add(1);
}

/// `(source, failed reads so far)` for every source, in [`SOURCES`] order.
pub fn snapshot() -> Vec<(&'static str, u64)> {
    let c = *COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    SOURCES.iter().copied().zip(c).collect()
}

/// The failed reads of one source so far.
pub fn get(source: &str) -> u64 {
    snapshot()
        .into_iter()
        .find(|(s, _)| *s == source)
        .map_or(0, |(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_source_and_ignores_unknown_ones() {
        let before = snapshot();
        assert_eq!(before.len(), SOURCES.len());
        record(MULLVAD);
        record(MULLVAD);
        record(RTNETLINK);
        record("no_such_source");
        // Other tests of this binary may count too: at least what this one added.
        assert!(get(MULLVAD) >= get_in(&before, MULLVAD) + 2);
        assert!(get(RTNETLINK) > get_in(&before, RTNETLINK));
        assert_eq!(get("no_such_source"), 0);
        let names: Vec<&str> = snapshot().into_iter().map(|(s, _)| s).collect();
        assert_eq!(names, SOURCES);
    }

    fn get_in(v: &[(&str, u64)], source: &str) -> u64 {
        v.iter().find(|(s, _)| *s == source).map_or(0, |(_, n)| *n)
    }
}
