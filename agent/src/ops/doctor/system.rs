//! Socket buffers and clock: `net.core.{r,w}mem_max` against what WireGuard's bursts (and
//! the UDP receive errors the agent counted) need, and whether the clock is synchronised.

use std::{collections::BTreeSet, path::Path};

use super::{Finding, Host, Severity};

/// Socket buffer maximum below which UDP bursts are dropped on a busy tunnel (2.5 MiB, what
/// QUIC and WireGuard userspace implementations ask for).
pub const RMEM_BASELINE: u64 = 2_621_440;

fn read_sysctl(name: &str) -> Option<u64> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `rmem_max` wanted once UDP receive errors were counted on a WireGuard port: 8 MiB, above
/// the 7 MiB wireguard-go asks for.
pub const RMEM_UNDER_ERRORS: u64 = 8_388_608;

/// What `rmem_max` should be at least: the baseline, or [`RMEM_UNDER_ERRORS`] when UDP
/// receive errors were counted on a WireGuard port.
pub fn rmem_target(receive_errors: f64) -> u64 {
    if receive_errors > 0.0 {
        RMEM_UNDER_ERRORS
    } else {
        RMEM_BASELINE
    }
}

pub(super) fn check_socket_buffers(f: &mut Vec<Finding>, host: &Host) {
    let ports: BTreeSet<u16> = host
        .devices
        .iter()
        .map(|(d, _)| d.listen_port)
        .filter(|p| *p != 0)
        .collect();
    let errors = host.metrics.as_ref().map(|m| {
        ports
            .iter()
            .map(|p| {
                m.sum(
                    "wirescope_udp_receive_errors_total",
                    &[("port", &p.to_string())],
                )
            })
            .sum::<f64>()
    });
    let plist = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    for (name, is_rmem) in [("net.core.rmem_max", true), ("net.core.wmem_max", false)] {
        let Some(cur) = read_sysctl(name) else {
            f.push(Finding::info(
                "socket_buffers",
                format!("{name} not readable"),
            ));
            continue;
        };
        let errs = if is_rmem { errors.unwrap_or(0.0) } else { 0.0 };
        if errs > 0.0 && cur < rmem_target(errs) {
            let want = rmem_target(errs);
            f.push(Finding::problem(
                "socket_buffers",
                format!(
                    "{name} = {cur}: the agent counted {errs} UDP datagrams dropped on full \
                     receive buffers of WireGuard ports {plist}; allow {want}"
                ),
                format!("sysctl -w {name}={want}"),
            ));
        } else if errs > 0.0 {
            f.push(Finding::info(
                "socket_buffers",
                format!(
                    "the agent counted {errs} UDP datagrams dropped on full receive buffers of \
                     WireGuard ports {plist} although {name} = {cur}: if they keep rising, \
                     the receiver is short of CPU or its socket asks for a small buffer"
                ),
            ));
        } else if cur < RMEM_BASELINE {
            let msg = format!(
                "{name} = {cur} is below {RMEM_BASELINE} (2.5 MiB): bursts overflow the \
                 WireGuard socket's buffer and are dropped"
            );
            // With an agent that saw no errors it is only advice.
            if errors.is_some() && is_rmem {
                f.push(Finding::new(
                    "socket_buffers",
                    Severity::Info,
                    format!("{msg} (none counted so far)"),
                    Some(format!("sysctl -w {name}={RMEM_BASELINE}")),
                ));
            } else {
                f.push(Finding::problem(
                    "socket_buffers",
                    msg,
                    format!("sysctl -w {name}={RMEM_BASELINE}"),
                ));
            }
        } else {
            f.push(Finding::ok("socket_buffers", format!("{name} = {cur}")));
        }
    }
}

/// adjtimex's `STA_UNSYNC` status bit and its `TIME_ERROR` return.
pub const STA_UNSYNC: i32 = 0x0040;
pub const TIME_ERROR: i32 = 5;

/// Whether adjtimex's answer (return value, `status`) says the clock is synchronised.
pub fn clock_synced(ret: i32, status: i32) -> bool {
    ret != TIME_ERROR && ret >= 0 && status & STA_UNSYNC == 0
}

pub(super) fn check_clock(f: &mut Vec<Finding>) {
    // SAFETY: a zeroed timex with modes 0 only reads the kernel's clock state.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let ret = unsafe { libc::adjtimex(&mut tx) };
    if ret < 0 {
        f.push(Finding::info(
            "clock",
            format!("adjtimex failed: {}", std::io::Error::last_os_error()),
        ));
    } else if clock_synced(ret, tx.status) {
        f.push(Finding::ok(
            "clock",
            format!("synchronised (estimated error {} us)", tx.esterror),
        ));
    } else {
        f.push(Finding::problem(
            "clock",
            "the clock is not synchronised (adjtimex: STA_UNSYNC): a clock far off breaks \
             handshakes, whose TAI64N timestamps peers reject when they go backwards",
            "timedatectl set-ntp true",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjtimex_bits() {
        assert!(clock_synced(0, 0x2001));
        assert!(!clock_synced(0, STA_UNSYNC));
        assert!(!clock_synced(TIME_ERROR, 0));
        assert!(!clock_synced(-1, 0));
        assert!(clock_synced(1, 0x0001));
    }

    #[test]
    fn rmem() {
        assert_eq!(rmem_target(0.0), RMEM_BASELINE);
        assert_eq!(rmem_target(3.0), 8_388_608);
    }
}
