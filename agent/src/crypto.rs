//! Timing kernel WireGuard's encryption and decryption with kprobes: where the structure
//! offsets the probes follow come from (the running kernel's BTF), and when to attach.
//!
//! fentry would be cheaper, but wireguard.ko is a module in distribution kernels and aya
//! 0.14's `FEntry::load` can only target vmlinux functions (it cannot pass the module's BTF
//! object), so kprobes it is; `wirescope_feature_available{feature="fentry"}` still reports
//! whether the kernel allows fentry at all.

use std::path::Path;

use agent_common::maps::CryptoConfig;
use btf_rs::{Btf, Type};

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

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "reading BTF {path}: {reason} (is the wireguard module loaded, and the kernel built with CONFIG_DEBUG_INFO_BTF_MODULES?)"
    )]
    Btf { path: String, reason: String },
    #[error("BTF has no {what}: this kernel's WireGuard differs from what the probes expect")]
    Missing { what: String },
}

fn btf_err(path: &Path, e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Btf {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Byte offset of `member` in the struct named `name`.
fn member_offset(btf: &Btf, name: &str, member: &str) -> Result<u32, CryptoError> {
    let missing = || CryptoError::Missing {
        what: format!("struct {name}.{member}"),
    };
    let types = btf.resolve_types_by_name(name).map_err(|_| missing())?;
    for t in types {
        if let Type::Struct(s) = t {
            for m in &s.members {
                if btf.resolve_name(m).ok().as_deref() == Some(member) {
                    return Ok(m.bit_offset() / 8);
                }
            }
        }
    }
    Err(missing())
}

/// Reads the offsets from `vmlinux` and the wireguard module's split BTF.
pub fn offsets_from(vmlinux: &Path, module: &Path) -> Result<CryptoConfig, CryptoError> {
    let base = Btf::from_file(vmlinux).map_err(|e| btf_err(vmlinux, e))?;
    let wg = Btf::from_split_file(module, &base).map_err(|e| btf_err(module, e))?;
    // keypair->entry.peer: `entry` is a struct index_hashtable_entry embedded in the keypair.
    let keypair_peer = member_offset(&wg, "noise_keypair", "entry")?
        + member_offset(&wg, "index_hashtable_entry", "peer")?;
    use std::os::unix::fs::MetadataExt as _;
    let own_ns = std::fs::metadata("/proc/self/ns/net").map_err(|e| CryptoError::Btf {
        path: "/proc/self/ns/net".into(),
        reason: e.to_string(),
    })?;
    Ok(CryptoConfig {
        enabled: 1,
        keypair_peer,
        peer_device: member_offset(&wg, "wg_peer", "device")?,
        device_dev: member_offset(&wg, "wg_device", "dev")?,
        netdev_ifindex: member_offset(&base, "net_device", "ifindex")?,
        netdev_net: member_offset(&base, "net_device", "nd_net")?,
        net_inum: member_offset(&base, "net", "ns")? + member_offset(&base, "ns_common", "inum")?,
        // Namespace inode numbers are 32-bit in the kernel (ns_common.inum is unsigned int).
        netns_inum: own_ns.ino() as u32,
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
        let btf = Btf::from_file(vmlinux).unwrap();
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
