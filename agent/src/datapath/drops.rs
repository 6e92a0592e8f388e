//! Kernel drops (`skb:kfree_skb`) and UDP receive errors (`udp:udp_fail_queue_rcv_skb`):
//! where the programs' offsets come from, the reason names of the running kernel, and the
//! maps they count into.
//!
//! The reason names are read from the running kernel's BTF (`enum skb_drop_reason`), never
//! from a table here: the values moved in 5.18 and again around 6.3/6.4, and distributions
//! backport them differently.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use agent_common::maps::{
    Counter,
    drops::{
        DROPS, DROPS_CFG, DROPS_ERRORS, DropKey, DropsConfig, MAX_DROPS, MAX_UDP_ERRORS,
        NO_REASON_FIELD, UDP_ERRORS, error,
    },
};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuHashMap},
    programs::{ProgramError, RawTracePoint, TracePoint},
};
use btf_rs::Btf;

use super::{
    AttachOutcome, DatapathError,
    maps::{Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, sum_per_cpu, take},
};
use crate::sources::btf::{BtfError, member_offset};

/// The programs: (program, what it attaches to, feature label).
pub const KFREE_SKB: (&str, &str, &str) = (
    "wirescope_kfree_skb",
    "skb:kfree_skb",
    "tracepoint_kfree_skb",
);
pub const UDP_FAIL: (&str, &str, &str) = (
    "wirescope_udp_fail",
    "udp_fail_queue_rcv_skb",
    "raw_tracepoint_udp_fail_queue_rcv_skb",
);

const REASON_PREFIX: &str = "SKB_DROP_REASON_";

#[derive(Debug, thiserror::Error)]
pub enum DropsError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "no tracefs: none at /sys/kernel/tracing or /sys/kernel/debug/tracing, and mounting one at /sys/kernel/tracing failed: {0} (mount it: `mount -t tracefs nodev /sys/kernel/tracing`)"
    )]
    NoTracefs(String),
    #[error("reading the tracepoint format {path}: {reason}")]
    Format { path: String, reason: String },
}

/// The names of `enum skb_drop_reason` in the running kernel, by value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropReasons {
    names: BTreeMap<u32, String>,
    /// SKB_NOT_DROPPED_YET and SKB_CONSUMED: not drops.
    pub not_dropped: u32,
    pub consumed: u32,
}

impl DropReasons {
    /// From the enum's values, as [`crate::sources::btf::enum_values`] reads them.
    pub fn from_values(values: BTreeMap<u32, String>) -> Self {
        let find = |name: &str| {
            values
                .iter()
                .find(|(_, n)| n.as_str() == name)
                .map(|(v, _)| *v)
                // A value no kernel uses: nothing is skipped for a name it lacks.
                .unwrap_or(u32::MAX)
        };
        let not_dropped = find("SKB_NOT_DROPPED_YET");
        let consumed = find("SKB_CONSUMED");
        let names = values
            .into_iter()
            .filter_map(|(v, n)| Some((v, n.strip_prefix(REASON_PREFIX)?.to_string())))
            .collect();
        Self {
            names,
            not_dropped,
            consumed,
        }
    }

    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        Ok(Self::from_values(crate::sources::btf::enum_values(
            btf,
            "skb_drop_reason",
        )?))
    }

    /// The kernel's name without its `SKB_DROP_REASON_` prefix, or `unknown_N`.
    pub fn name(&self, value: u32) -> String {
        self.names
            .get(&value)
            .cloned()
            .unwrap_or_else(|| format!("unknown_{value}"))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.values().map(String::as_str)
    }
}

/// Offset of `field` in a tracepoint format file's record (`field:TYPE NAME; offset:N;`).
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        // The name is the declaration's last word, without an array suffix.
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        l.split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?
            .trim()
            .parse()
            .ok()
    })
}

/// The tracefs mount, mounting one at /sys/kernel/tracing when there is none (`ip netns
/// exec` remounts /sys without it). aya finds it there too when it attaches.
pub fn tracefs() -> Result<PathBuf, DropsError> {
    const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    let target = Path::new(CANDIDATES[0]);
    let res = nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    match res {
        Ok(()) if target.join("events").is_dir() => Ok(target.to_path_buf()),
        Ok(()) => Err(DropsError::NoTracefs(
            "mounted, but it has no events".into(),
        )),
        Err(e) => Err(DropsError::NoTracefs(e.to_string())),
    }
}

/// The programs' configuration on this kernel: the `kfree_skb` record's offsets from
/// `format` (its format file), the structure offsets and reasons from `btf`.
pub fn config(btf: &Btf, format: &str, reasons: &DropReasons) -> Result<DropsConfig, DropsError> {
    let bad = |what: &str| DropsError::Format {
        path: "skb/kfree_skb/format".into(),
        reason: format!("no field `{what}`"),
    };
    let skbaddr_off = field_offset(format, "skbaddr").ok_or_else(|| bad("skbaddr"))?;
    Ok(DropsConfig {
        enabled: 1,
        skbaddr_off,
        // Before 5.17 there is no reason: such drops count as NOT_SPECIFIED.
        reason_off: field_offset(format, "reason").unwrap_or(NO_REASON_FIELD),
        not_dropped: reasons.not_dropped,
        consumed: reasons.consumed,
        skb_dev: member_offset(btf, "sk_buff", "dev")?,
        skb_sk: member_offset(btf, "sk_buff", "sk")?,
        netdev_ifindex: member_offset(btf, "net_device", "ifindex")?,
        // possible_net_t holds the `struct net *` as its only member.
        netdev_net: member_offset(btf, "net_device", "nd_net")?,
        sk_net: member_offset(btf, "sock", "__sk_common")?
            + member_offset(btf, "sock_common", "skc_net")?,
        sk_num: member_offset(btf, "sock", "__sk_common")?
            + member_offset(btf, "sock_common", "skc_num")?,
        net_inum: member_offset(btf, "net", "ns")? + member_offset(btf, "ns_common", "inum")?,
        netns_inum: crate::sources::btf::own_netns_inum()?,
        _pad: 0,
    })
}

/// Reads everything [`config`] needs from this machine.
pub fn prepare() -> Result<(DropsConfig, DropReasons), DropsError> {
    let btf = crate::sources::btf::read(Path::new(crate::sources::btf::VMLINUX))?;
    let reasons = DropReasons::from_btf(&btf)?;
    let path = tracefs()?.join("events/skb/kfree_skb/format");
    let format = std::fs::read_to_string(&path).map_err(|e| DropsError::Format {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((config(&btf, &format, &reasons)?, reasons))
}

pub struct DropsMaps {
    cfg: Array<MapData, DropsConfig>,
    drops: PerCpuHashMap<MapData, DropKey, Counter>,
    udp: PerCpuHashMap<MapData, u32, Counter>,
    errors: ErrorSlots,
}

impl DropsMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            cfg: take(ebpf, DROPS_CFG)?,
            drops: take(ebpf, DROPS)?,
            udp: take(ebpf, UDP_ERRORS)?,
            errors: ErrorSlots(take(ebpf, DROPS_ERRORS)?),
        })
    }

    pub fn set_config(&mut self, cfg: DropsConfig) -> Result<(), DatapathError> {
        self.cfg
            .set(0, cfg, 0)
            .map_err(|source| DatapathError::Map {
                map: DROPS_CFG,
                source,
            })
    }

    /// Drops per (ifindex, reason value), summed over CPUs (`packets` is the count).
    pub fn drops(&self) -> Result<Vec<(DropKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.drops, DROPS)
    }

    /// Failed UDP receives per local port.
    pub fn udp_errors(&self) -> Result<Vec<(u32, Counter)>, DatapathError> {
        sum_per_cpu(&self.udp, UDP_ERRORS)
    }

    /// Writes the drop programs' configuration, then loads and attaches each; one failing
    /// leaves the other attached. Returns, per program, its feature label and the outcome.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        cfg: DropsConfig,
    ) -> Result<Vec<AttachOutcome>, DatapathError> {
        self.set_config(cfg)?;
        let (prog, tp, feature) = KFREE_SKB;
        let kfree = ebpf
            .program_mut(prog)
            .ok_or(ProgramError::NotLoaded)
            .and_then(<&mut TracePoint>::try_from)
            .and_then(|p| {
                p.load()?;
                let (category, name) = tp.split_once(':').unwrap_or(("skb", tp));
                p.attach(category, name).map(|_| ())
            })
            .map_err(|source| DatapathError::Attach {
                iface: format!("tracepoint {tp}"),
                dir: prog,
                source,
            });
        let (prog, tp, udp_feature) = UDP_FAIL;
        let udp = ebpf
            .program_mut(prog)
            .ok_or(ProgramError::NotLoaded)
            .and_then(<&mut RawTracePoint>::try_from)
            .and_then(|p| {
                p.load()?;
                p.attach(tp).map(|_| ())
            })
            .map_err(|source| DatapathError::Attach {
                iface: format!("raw tracepoint {tp}"),
                dir: prog,
                source,
            });
        Ok(vec![(feature, kfree), (udp_feature, udp)])
    }
}

impl FeatureMaps for DropsMaps {
    /// Nothing here is kept per peer.
    fn forget_peers(
        &mut self,
        _ids: &std::collections::HashSet<u32>,
    ) -> Result<u64, DatapathError> {
        Ok(0)
    }

    /// The counts only: attached tracepoints keep their configuration.
    fn clear(&mut self) -> Result<(), DatapathError> {
        self.drops.clear(DROPS)?;
        self.udp.clear(UDP_ERRORS)?;
        self.errors.clear(DROPS_ERRORS)
    }

    fn usage(&self) -> Vec<MapUsage> {
        vec![
            (DROPS, self.drops.entries(), MAX_DROPS as u64),
            (UDP_ERRORS, self.udp.entries(), MAX_UDP_ERRORS as u64),
        ]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors
            .list(&[(error::DROPS, DROPS), (error::UDP_ERRORS, UDP_ERRORS)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file of skb:kfree_skb on 6.18 (abridged), and on 5.10 (no reason).
    const FORMAT_6_18: &str = "name: kfree_skb
ID: 2310
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;
";
    const FORMAT_5_10: &str = "format:
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;
";

    #[test]
    fn record_offsets_from_the_format_file() {
        assert_eq!(field_offset(FORMAT_6_18, "skbaddr"), Some(8));
        assert_eq!(field_offset(FORMAT_6_18, "reason"), Some(36));
        assert_eq!(field_offset(FORMAT_6_18, "common_pid"), Some(4));
        assert_eq!(field_offset(FORMAT_5_10, "reason"), None);
        assert_eq!(field_offset(FORMAT_5_10, "protocol"), Some(24));
        assert_eq!(field_offset("garbage\nfield:\n", "skbaddr"), None);
        let udp = "\tfield:__u8 saddr[28];\toffset:18;\tsize:28;\tsigned:0;";
        assert_eq!(field_offset(udp, "saddr"), Some(18));
    }

    #[test]
    fn names_follow_the_values_given() {
        let v: BTreeMap<u32, String> = [
            (0, "SKB_NOT_DROPPED_YET"),
            (1, "SKB_CONSUMED"),
            (2, "SKB_DROP_REASON_NOT_SPECIFIED"),
            (7, "SKB_DROP_REASON_NETFILTER_DROP"),
            (9, "SKB_DROP_REASON_MAX"),
        ]
        .into_iter()
        .map(|(v, n)| (v, n.to_string()))
        .collect();
        let r = DropReasons::from_values(v);
        assert_eq!(r.name(7), "NETFILTER_DROP");
        assert_eq!(r.name(2), "NOT_SPECIFIED");
        assert_eq!(r.name(8), "unknown_8");
        assert_eq!((r.not_dropped, r.consumed), (0, 1));
        assert!(!r.names().any(|n| n.starts_with("SKB_")));
    }
}
