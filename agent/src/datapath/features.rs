//! What this kernel offers, detected at start-up: optional hooks are reported in
//! `wirescope_feature_available`, never a reason to fail.

use std::{fs, path::Path};

use aya::programs::ProgramType;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub kernel: String,
    pub tcx: bool,
    pub tracepoint: bool,
    pub kprobe: bool,
    pub fentry: bool,
    pub btf: bool,
    pub bpf_stats: bool,
    /// Whether each optional program attached, by feature label (the drop tracepoints).
    pub attached: Vec<(&'static str, bool)>,
}

impl Features {
    pub fn detect() -> Self {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Self {
            tcx: aya::util::KernelVersion::current()
                .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
                .unwrap_or(false),
            tracepoint: supported(ProgramType::TracePoint),
            // The kprobe PMU exists only in kernels built with kprobes.
            kprobe: Path::new("/sys/bus/event_source/devices/kprobe").exists(),
            // Loads a tracing program against bpf_fentry_test1: refused where fentry is.
            fentry: supported(ProgramType::Tracing),
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            bpf_stats: fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .map(|s| s.trim() == "1")
                .unwrap_or(false),
            kernel,
            attached: Vec::new(),
        }
    }

    /// (feature label, available): the contract's, in its order, then what attached.
    pub fn as_pairs(&self) -> Vec<(&'static str, bool)> {
        let mut v = vec![
            ("tcx", self.tcx),
            ("tracepoint", self.tracepoint),
            ("kprobe", self.kprobe),
            ("fentry", self.fentry),
            ("btf", self.btf),
            ("bpf_stats", self.bpf_stats),
        ];
        v.extend(self.attached.iter().copied());
        v
    }
}

fn supported(t: ProgramType) -> bool {
    aya::sys::is_program_supported(t).unwrap_or(false)
}
