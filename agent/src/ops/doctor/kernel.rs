//! Kernel and permissions: the BPF hooks and features this kernel offers, and whether this
//! process holds the capabilities the agent needs (the fix installs the systemd unit that
//! grants exactly those).

use std::path::Path;

use super::{Finding, Severity, keys::shell_quote};
use crate::datapath::features::Features;

/// Capability numbers (linux/capability.h).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;
/// What the agent needs, with names.
pub const NEEDED_CAPS: [(u32, &str); 4] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_NET_RAW, "CAP_NET_RAW"),
];

/// The `CapEff:` mask of a /proc/PID/status text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The needed capabilities missing from `mask`, by name.
pub fn missing_caps(mask: u64) -> Vec<&'static str> {
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| mask & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

pub(super) fn check_kernel(f: &mut Vec<Finding>, caps: Option<u64>) {
    let feat = Features::detect();
    let privileged = caps.is_some_and(|c| missing_caps(c).is_empty());
    f.push(Finding::info(
        "kernel",
        format!(
            "kernel {}: TC hook {}, BTF {}, tracepoints {}, kprobes {}, fentry {}, BPF run stats {}",
            if feat.kernel.is_empty() {
                "?"
            } else {
                &feat.kernel
            },
            if feat.tcx { "TCX" } else { "clsact" },
            yes(feat.btf),
            if privileged {
                yes(feat.tracepoint)
            } else {
                "unknown (needs CAP_BPF)"
            },
            yes(feat.kprobe),
            if privileged {
                yes(feat.fentry)
            } else {
                "unknown (needs CAP_BPF)"
            },
            yes(feat.bpf_stats),
        ),
    ));
    if privileged {
        let tc = aya::sys::is_program_supported(aya::programs::ProgramType::SchedClassifier)
            .unwrap_or(false);
        if !tc {
            f.push(Finding::problem(
                "kernel",
                "the kernel refuses BPF TC (sched_cls) programs, which the agent needs",
                "boot a kernel built with CONFIG_BPF_SYSCALL=y and CONFIG_NET_CLS_BPF (any \
                 distribution kernel has both)",
            ));
        }
        if !feat.tracepoint {
            f.push(Finding::info(
                "kernel",
                "no BPF tracepoints: wirescope_drops_total and UDP receive errors stay empty",
            ));
        }
    }
    if !feat.btf {
        f.push(Finding::info(
            "kernel",
            "no /sys/kernel/btf/vmlinux: drop reasons cannot be named (CONFIG_DEBUG_INFO_BTF)",
        ));
    }
    if !feat.bpf_stats {
        f.push(Finding::new(
            "kernel",
            Severity::Info,
            "BPF run statistics are off: wirescope_bpf_run_seconds_total stays 0",
            Some("sysctl -w kernel.bpf_stats_enabled=1".into()),
        ));
    }
}

/// The commands that install the agent as the systemd unit of deploy/ (which runs
/// /usr/local/bin/wirescope with exactly the capabilities it needs).
fn service_install_command() -> String {
    const BIN: &str = "/usr/local/bin/wirescope";
    let unit = "sudo install -m 644 deploy/wirescope.service /etc/systemd/system/ && sudo \
                systemctl daemon-reload && sudo systemctl enable --now wirescope";
    match std::env::current_exe() {
        Ok(exe) if exe != Path::new(BIN) => format!(
            "sudo install -m 755 {} {BIN} && {unit}",
            shell_quote(&exe.display().to_string())
        ),
        _ => unit.to_string(),
    }
}

pub(super) fn check_permissions(f: &mut Vec<Finding>, caps: Option<u64>) {
    let Some(mask) = caps else {
        f.push(Finding::info(
            "permissions",
            "could not read CapEff from /proc/self/status",
        ));
        return;
    };
    let missing = missing_caps(mask);
    if missing.is_empty() {
        f.push(Finding::ok(
            "permissions",
            "CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_NET_RAW are effective",
        ));
    } else {
        f.push(Finding::problem(
            "permissions",
            format!(
                "missing {}: the agent cannot load its programs as this user, and doctor \
                 sees less (run both as root: sudo wirescope doctor), or the agent as the \
                 systemd unit in deploy/, which grants exactly these",
                missing.join(", ")
            ),
            service_install_command(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n";
        let m = parse_cap_eff(s).unwrap();
        assert!(missing_caps(m).is_empty());
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff(""), None);
        // NET_ADMIN and NET_RAW only (what a container often gets).
        let m = parse_cap_eff("CapEff:\t0000000000003000\n").unwrap();
        assert_eq!(missing_caps(m), vec!["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(0).len(), 4);
    }
}
