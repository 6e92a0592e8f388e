//! Timing kernel WireGuard's encryption and decryption with kprobes: where the structure
//! offsets the probes follow come from (the running kernel's BTF), and when to attach.
//!
//! fentry would be cheaper, but wireguard.ko is a module in distribution kernels and aya
//! 0.14's `FEntry::load` can only target vmlinux functions (it cannot pass the module's BTF
//! object), so kprobes it is; `wirescope_feature_available{feature="fentry"}` still reports
//! whether the kernel allows fentry at all.

use std::path::Path;

use agent_common::maps::CryptoConfig;

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
