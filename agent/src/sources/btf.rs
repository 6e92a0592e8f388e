//! Structure offsets and enum values from the running kernel's BTF (Rust eBPF has no
//! CO-RE: the programs follow pointers at offsets the agent reads here at start-up).

use std::{collections::BTreeMap, path::Path};

use btf_rs::{Btf, Type};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF {path}: {reason} (is the kernel built with CONFIG_DEBUG_INFO_BTF?)")]
    Read { path: String, reason: String },
    #[error("the kernel's BTF has no {what}: this kernel differs from what the programs expect")]
    Missing { what: String },
}

// Both read the file into memory first: btf-rs's own file reader asks the kernel for its
// position once per type (about 125k lseek calls for a distribution kernel's vmlinux, 5x the
// parse itself on the host, seconds under the VMs' emulation); parsing the bytes is the same.

pub fn read(path: &Path) -> Result<Btf, BtfError> {
    let err = |reason: String| BtfError::Read {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    Btf::from_bytes(&bytes).map_err(|e| err(e.to_string()))
}

pub fn read_split(path: &Path, base: &Btf) -> Result<Btf, BtfError> {
    let err = |reason: String| BtfError::Read {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    Btf::from_split_bytes(&bytes, base).map_err(|e| err(e.to_string()))
}

/// Byte offset of `member` in the struct named `name`, looking inside anonymous structs and
/// unions too (`sk_buff.dev` lives in one).
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> Result<u32, BtfError> {
    let missing = || BtfError::Missing {
        what: format!("struct {name}.{member}"),
    };
    let types = btf.resolve_types_by_name(name).map_err(|_| missing())?;
    for t in types {
        if let Type::Struct(s) = t
            && let Some(bits) = find(btf, &s, member, 0)
        {
            return Ok(bits / 8);
        }
    }
    Err(missing())
}

/// Depth-first search for `member` in `s` and its anonymous members, in bits from `base`.
fn find(btf: &Btf, s: &btf_rs::Struct, member: &str, base: u32) -> Option<u32> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            return Some(base + m.bit_offset());
        }
        if name.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(bits) = find(btf, &inner, member, base + m.bit_offset())
        {
            return Some(bits);
        }
    }
    None
}

/// The values and names of the enum named `name`.
pub fn enum_values(btf: &Btf, name: &str) -> Result<BTreeMap<u32, String>, BtfError> {
    let missing = || BtfError::Missing {
        what: format!("enum {name}"),
    };
    let types = btf.resolve_types_by_name(name).map_err(|_| missing())?;
    for t in types {
        if let Type::Enum(e) = t {
            return Ok(e
                .members
                .iter()
                .filter_map(|m| Some((m.val(), btf.resolve_name(m).ok()?)))
                .collect());
        }
    }
    Err(missing())
}

/// The inode number of this process's network namespace, as `net.ns.inum` holds it.
pub fn own_netns_inum() -> Result<u32, BtfError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata("/proc/self/ns/net").map_err(|e| BtfError::Read {
        path: "/proc/self/ns/net".into(),
        reason: e.to_string(),
    })?;
    // Namespace inode numbers are 32-bit in the kernel (ns_common.inum is unsigned int).
    Ok(meta.ino() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Option<Btf> {
        let p = Path::new(VMLINUX);
        if !p.exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but no {VMLINUX}"
            );
            return None;
        }
        Some(read(p).unwrap())
    }

    #[test]
    fn offsets_inside_anonymous_members() {
        let Some(btf) = host() else { return };
        // sk_buff.dev is in a union inside a struct inside a union: 16 on x86_64 since 4.x.
        assert_eq!(member_offset(&btf, "sk_buff", "dev").unwrap(), 16);
        let sk = member_offset(&btf, "sk_buff", "sk").unwrap();
        assert!((16..256).contains(&sk), "sk_buff.sk at {sk}");
        // sock_common.skc_num sits in an anonymous struct in an anonymous union.
        let num = member_offset(&btf, "sock_common", "skc_num").unwrap();
        assert!((8..64).contains(&num), "skc_num at {num}");
        assert!(matches!(
            member_offset(&btf, "sk_buff", "no_such_member"),
            Err(BtfError::Missing { .. })
        ));
    }

    #[test]
    fn drop_reasons_of_the_host() {
        let Some(btf) = host() else { return };
        let v = enum_values(&btf, "skb_drop_reason").unwrap();
        assert_eq!(
            v.get(&2).map(String::as_str),
            Some("SKB_DROP_REASON_NOT_SPECIFIED")
        );
        assert!(v.values().any(|n| n == "SKB_DROP_REASON_NETFILTER_DROP"));
    }
}
