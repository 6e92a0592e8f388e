//! Timing kernel WireGuard's encryption and decryption with kprobes: where the structure
//! offsets the probes follow come from (the running kernel's BTF), and when to attach.
//!
//! fentry would be cheaper, but wireguard.ko is a module in distribution kernels and aya
//! 0.14's `FEntry::load` can only target vmlinux functions (it cannot pass the module's BTF
//! object), so kprobes it is; `wirescope_feature_available{feature="fentry"}` still reports
//! whether the kernel allows fentry at all.

use std::{path::Path, sync::Arc};

use agent_common::maps::{
    HistValue, crypto::CryptoConfig, crypto::HistKey, crypto::MAX_CRYPTO_HIST, map_error, names,
};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuHashMap},
    programs::{KProbe, ProgramError, kprobe::KProbeLinkId},
};
use log::info;

use super::{
    DatapathError,
    maps::{Clear, Entries, ErrorSlots, FeatureMaps, MapUsage, sum_hist, take},
};

/// The kernel functions probed: (function, entry program, return program, direction label).
pub const PROBES: [(&str, &str, &str); 2] = [
    (
        "encrypt_packet",
        "wirescope_encrypt_enter",
        "wirescope_encrypt_exit",
    ),
    (
        "decrypt_packet",
        "wirescope_decrypt_enter",
        "wirescope_decrypt_exit",
    ),
];

pub use crate::sources::btf::BtfError as CryptoError;
use crate::sources::btf::member_offset;

/// Reads the offsets from `vmlinux` and the wireguard module's split BTF.
pub fn offsets_from(vmlinux: &Path, module: &Path) -> Result<CryptoConfig, CryptoError> {
    let base = crate::sources::btf::read(vmlinux)?;
    let wg = crate::sources::btf::read_split(module, &base).map_err(|e| match e {
        CryptoError::Read { path, reason } => CryptoError::Read {
            path,
            reason: format!("{reason} (is the wireguard module loaded?)"),
        },
        other => other,
    })?;
    // keypair->entry.peer: `entry` is a struct index_hashtable_entry embedded in the keypair.
    let keypair_peer = member_offset(&wg, "noise_keypair", "entry")?
        + member_offset(&wg, "index_hashtable_entry", "peer")?;
    Ok(CryptoConfig {
        enabled: 1,
        keypair_peer,
        peer_device: member_offset(&wg, "wg_peer", "device")?,
        device_dev: member_offset(&wg, "wg_device", "dev")?,
        netdev_ifindex: member_offset(&base, "net_device", "ifindex")?,
        netdev_net: member_offset(&base, "net_device", "nd_net")?,
        net_inum: member_offset(&base, "net", "ns")? + member_offset(&base, "ns_common", "inum")?,
        netns_inum: crate::sources::btf::own_netns_inum()?,
    })
}

/// The offsets on this machine.
pub fn offsets() -> Result<CryptoConfig, CryptoError> {
    offsets_from(
        Path::new("/sys/kernel/btf/vmlinux"),
        Path::new("/sys/kernel/btf/wireguard"),
    )
}

/// The kprobes' configuration (the offsets above) and their duration histogram.
pub struct CryptoMaps {
    cfg: Array<MapData, CryptoConfig>,
    hist: PerCpuHashMap<MapData, HistKey, HistValue>,
    /// Whether the kprobes are attached.
    attached: bool,
    errors: Arc<ErrorSlots>,
}

impl CryptoMaps {
    pub(crate) fn take(ebpf: &mut Ebpf, errors: Arc<ErrorSlots>) -> Result<Self, DatapathError> {
        Ok(Self {
            cfg: take(ebpf, names::CRYPTO_CFG)?,
            hist: take(ebpf, names::CRYPTO_HIST)?,
            attached: false,
            errors,
        })
    }

    pub fn attached(&self) -> bool {
        self.attached
    }

    /// Loads and attaches the kprobes that time kernel WireGuard's crypto, after writing
    /// the structure offsets they follow. All four or none: a half-attached pair would
    /// leave start times that never end.
    pub fn attach(&mut self, ebpf: &mut Ebpf, cfg: CryptoConfig) -> Result<(), DatapathError> {
        if self.attached {
            return Ok(());
        }
        self.cfg
            .set(0, cfg, 0)
            .map_err(DatapathError::map(names::CRYPTO_CFG))?;
        let mut done: Vec<(&'static str, KProbeLinkId)> = Vec::new();
        let mut result = Ok(());
        'probes: for (func, enter, exit) in PROBES {
            for name in [enter, exit] {
                let attached = ebpf
                    .program_mut(name)
                    .ok_or(ProgramError::NotLoaded)
                    .and_then(<&mut KProbe>::try_from)
                    .and_then(|p| {
                        if p.fd().is_err() {
                            p.load()?;
                        }
                        p.attach(func, 0)
                    });
                match attached {
                    Ok(id) => done.push((name, id)),
                    Err(source) => {
                        result = Err(DatapathError::Attach {
                            iface: format!("kprobe {func}"),
                            dir: name,
                            source,
                        });
                        break 'probes;
                    }
                }
            }
        }
        if result.is_err() {
            for (name, id) in done {
                if let Some(p) = ebpf.program_mut(name)
                    && let Ok(p) = <&mut KProbe>::try_from(p)
                {
                    let _ = p.detach(id);
                }
            }
            return result;
        }
        self.attached = true;
        info!("timing kernel WireGuard encryption and decryption with kprobes");
        Ok(())
    }

    /// The crypto duration histogram, summed over CPUs.
    pub fn hist(&self) -> Result<Vec<(HistKey, HistValue)>, DatapathError> {
        sum_hist(&self.hist, names::CRYPTO_HIST)
    }
}

impl FeatureMaps for CryptoMaps {
    /// Nothing here is kept per peer.
    fn forget_peers(
        &mut self,
        _ids: &std::collections::HashSet<u32>,
    ) -> Result<u64, DatapathError> {
        Ok(0)
    }

    /// The histogram only: attached kprobes keep their configuration.
    fn clear(&mut self) -> Result<(), DatapathError> {
        self.hist.clear(names::CRYPTO_HIST)
    }

    fn usage(&self) -> Vec<MapUsage> {
        vec![(
            names::CRYPTO_HIST,
            self.hist.entries(),
            MAX_CRYPTO_HIST as u64,
        )]
    }

    fn update_errors(&self) -> Vec<(&'static str, u64)> {
        self.errors.list(&[
            (map_error::CRYPTO_START, names::CRYPTO_START),
            (map_error::CRYPTO_HIST, names::CRYPTO_HIST),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's own BTF has net_device.ifindex; the module part needs kernel WireGuard,
    /// which this test checks only where it is loaded.
    #[test]
    fn net_device_ifindex_offset_from_host_btf() {
        let vmlinux = Path::new("/sys/kernel/btf/vmlinux");
        if !vmlinux.exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but no /sys/kernel/btf/vmlinux"
            );
            return;
        }
        let btf = crate::sources::btf::read(vmlinux).unwrap();
        let off = member_offset(&btf, "net_device", "ifindex").unwrap();
        member_offset(&btf, "net_device", "nd_net").unwrap();
        member_offset(&btf, "ns_common", "inum").unwrap();
        member_offset(&btf, "net", "ns").unwrap();
        // Somewhere inside the first few hundred bytes on every kernel since 4.x.
        assert!((8..1024).contains(&off), "net_device.ifindex at {off}");
        assert!(matches!(
            member_offset(&btf, "net_device", "no_such_member"),
            Err(CryptoError::Missing { .. })
        ));
        if Path::new("/sys/kernel/btf/wireguard").exists() {
            let cfg = offsets().unwrap();
            assert_eq!(cfg.enabled, 1);
            assert_eq!(cfg.netdev_ifindex, off);
        }
    }
}
