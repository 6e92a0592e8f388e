//! Where the agent pins its counting maps, so a restarted agent (crashed, killed, upgraded
//! to the same layout, or stopped cleanly) continues the counts instead of starting from zero.
//!
//! The directory is `/sys/fs/bpf/wirescope/<netns>/<layout id>/`:
//!
//! - `<netns>` is `<inode>-<cookie>` of the agent's network namespace: pins are per
//!   namespace, so agents in different namespaces never share counters. The inode alone is not
//!   enough, the kernel reuses a dead namespace's inode number; the cookie (SO_NETNS_COOKIE,
//!   Linux 5.14) never repeats. Directories with our inode and another cookie belong to a
//!   namespace that no longer exists (two live namespaces never share an inode) and are removed,
//!   as are those of any namespace no thread and no /run/netns mount holds any more (checked
//!   only in the initial PID namespace, where every process is visible): most pinned maps
//!   are preallocated (the agent's maps take about 42 MiB on 2 CPUs at rest) and would
//!   otherwise outlive their namespace.
//! - `<layout id>` hashes the name, type, key size, value size, max entries and flags of every
//!   pinned map, read from the eBPF object's `maps` section before loading: a build with
//!   another layout never reuses incompatible maps. Sibling directories with another id are
//!   removed on start with one log line ("removing pinned maps of an incompatible build").
//!
//! bpffs: `/sys/fs/bpf` when it is one; otherwise the one mounted at `/sys/fs/bpf` in the
//! mount namespace of PID 1 or of our parent (`ip netns exec` runs the agent in a private
//! mount namespace with a fresh /sys, which hides the host's bpffs); otherwise the agent
//! mounts one at `/sys/fs/bpf`. A bpffs mounted inside a private mount namespace dies with it
//! (the agent warns): mount bpffs on the host to keep counters across restarts there.
//!
//! A clean stop keeps the map pins as well: the counters are the kernel's, like an
//! interface's own counters, and continue across restarts. `rm -r /sys/fs/bpf/wirescope`
//! resets them. The layout directory also holds `hooks/` ([`super::hooks`]): the pinned TCX
//! links and tail-call arrays that keep a killed agent's programs counting, which a clean
//! stop removes.

use std::{
    ffi::CString,
    fmt::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use log::{info, warn};
use sha2::{Digest as _, Sha256};

/// The directory under a bpffs that holds every agent's pins.
pub const SUBDIR: &str = "wirescope";
/// Where bpffs is conventionally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// Size of the `bpf_map_def` aya-ebpf writes into the `maps` section.
const MAP_DEF_SIZE: usize = 28;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("the eBPF object is not a 64-bit little-endian ELF with a maps section: {0}")]
    Object(&'static str),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PinError {
    let path = path.to_path_buf();
    move |source| PinError::Io { what, path, source }
}

/// One map definition of the object's `maps` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub pinned: bool,
    /// Offset of the definition in the object file.
    offset: usize,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)).ok()
}
fn cstr_at(b: &[u8], o: usize) -> Option<&str> {
    let rest = b.get(o..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

struct Section {
    name: u32,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
}

/// The map definitions of an aya-ebpf object (legacy `maps` section, one symbol per map).
pub fn map_defs(obj: &[u8]) -> Result<Vec<MapDef>, PinError> {
    let bad = PinError::Object;
    if obj.get(..4) != Some(b"\x7fELF") || obj.get(4) != Some(&2) || obj.get(5) != Some(&1) {
        return Err(bad("not ELF64 little-endian"));
    }
    let shoff = u64_at(obj, 0x28).ok_or(bad("header"))?;
    let shentsize = usize::from(u16_at(obj, 0x3a).ok_or(bad("header"))?);
    let shnum = usize::from(u16_at(obj, 0x3c).ok_or(bad("header"))?);
    let shstrndx = usize::from(u16_at(obj, 0x3e).ok_or(bad("header"))?);
    let mut sections = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let h = shoff + i * shentsize;
        sections.push(Section {
            name: u32_at(obj, h).ok_or(bad("section header"))?,
            kind: u32_at(obj, h + 4).ok_or(bad("section header"))?,
            offset: u64_at(obj, h + 24).ok_or(bad("section header"))?,
            size: u64_at(obj, h + 32).ok_or(bad("section header"))?,
            link: u32_at(obj, h + 40).ok_or(bad("section header"))?,
        });
    }
    let shstr = sections.get(shstrndx).ok_or(bad("section names"))?;
    let maps_idx = sections
        .iter()
        .position(|s| cstr_at(obj, shstr.offset + s.name as usize) == Some("maps"))
        .ok_or(bad("no maps section"))?;
    let maps = &sections[maps_idx];
    let symtab = sections
        .iter()
        .find(|s| s.kind == 2)
        .ok_or(bad("no symbol table"))?;
    let strtab = sections
        .get(symtab.link as usize)
        .ok_or(bad("symbol names"))?;
    let mut defs = Vec::new();
    for i in 0..symtab.size / 24 {
        let e = symtab.offset + i * 24;
        let shndx = usize::from(u16_at(obj, e + 6).ok_or(bad("symbol"))?);
        if shndx != maps_idx {
            continue;
        }
        let name = cstr_at(
            obj,
            strtab.offset + u32_at(obj, e).ok_or(bad("symbol"))? as usize,
        )
        .ok_or(bad("symbol name"))?;
        let value = u64_at(obj, e + 8).ok_or(bad("symbol"))?;
        if name.is_empty() || value + MAP_DEF_SIZE > maps.size {
            continue;
        }
        let d = maps.offset + value;
        let f = |k: usize| u32_at(obj, d + 4 * k).ok_or(bad("map definition"));
        defs.push(MapDef {
            name: name.to_string(),
            map_type: f(0)?,
            key_size: f(1)?,
            value_size: f(2)?,
            max_entries: f(3)?,
            flags: f(4)?,
            pinned: f(6)? == 1,
            offset: d,
        });
    }
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(defs)
}

/// The layout id: a hash of every pinned map's name, type, key and value size, max entries
/// and flags (16 hex digits).
pub fn layout_id(defs: &[MapDef]) -> String {
    let mut h = Sha256::new();
    for d in defs.iter().filter(|d| d.pinned) {
        h.update(format!(
            "{} {} {} {} {} {}\n",
            d.name, d.map_type, d.key_size, d.value_size, d.max_entries, d.flags
        ));
    }
    let mut s = String::new();
    for b in &h.finalize()[..8] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A copy of the object with every map unpinned (`pinning` = none), for a load without
/// pinning.
pub fn unpinned(obj: &[u8]) -> Result<Vec<u8>, PinError> {
    let mut out = obj.to_vec();
    for d in map_defs(obj)? {
        out[d.offset + 24..d.offset + 28].copy_from_slice(&0u32.to_le_bytes());
    }
    Ok(out)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs buffer of the right type.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// The bpffs to pin in (see the module documentation), mounting one when there is none.
pub fn bpffs() -> Result<PathBuf, PinError> {
    let own = PathBuf::from(BPFFS);
    if is_bpffs(&own) {
        return Ok(own);
    }
    let ppid = std::os::unix::process::parent_id();
    for pid in [1, ppid] {
        let p = PathBuf::from(format!("/proc/{pid}/root{BPFFS}"));
        if pid > 0 && is_bpffs(&p) {
            info!(
                "pinning BPF maps in the bpffs of process {pid}'s mount namespace ({}): this \
                 namespace has none at {BPFFS}",
                p.display()
            );
            return Ok(p);
        }
    }
    std::fs::create_dir_all(&own).map_err(io("creating", &own))?;
    nix::mount::mount(
        Some("bpf"),
        &own,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| io("mounting bpffs at", &own)(e.into()))?;
    let private = std::fs::read_link("/proc/self/ns/mnt").ok()
        != std::fs::read_link(format!("/proc/{ppid}/ns/mnt")).ok();
    if private {
        warn!(
            "mounted bpffs at {BPFFS} in this agent's own mount namespace: the pinned maps live \
             only as long as it; mount bpffs at {BPFFS} on the host to keep counters across \
             restarts"
        );
    } else {
        info!("mounted bpffs at {BPFFS}");
    }
    Ok(own)
}

/// (inode, cookie) of the calling thread's network namespace; the cookie is 0 where the
/// kernel has none (before 5.14).
pub fn netns_id() -> Result<(u64, u64), PinError> {
    let p = Path::new("/proc/thread-self/ns/net");
    let ino = std::fs::metadata(p).map_err(io("reading", p))?.ino();
    // SAFETY: plain syscalls on a socket this function owns and closes.
    let cookie = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        let mut cookie = 0u64;
        if fd >= 0 {
            let mut len = size_of::<u64>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            ) != 0
            {
                cookie = 0;
            }
            libc::close(fd);
        }
        cookie
    };
    Ok((ino, cookie))
}

/// `/proc/self/ns/pid`'s inode in the initial PID namespace (PROC_PID_INIT_INO).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// The inodes of every live network namespace: those of every thread's and of the named
/// ones (/run/netns). `None` outside the initial PID namespace, where other namespaces'
/// processes are not visible (a container sharing the host's bpffs), so nothing is judged dead.
fn live_netns_inodes() -> Option<std::collections::HashSet<u64>> {
    let pidns = std::fs::metadata("/proc/self/ns/pid").ok()?.ino();
    if pidns != INIT_PID_NS_INO {
        return None;
    }
    let mut live = std::collections::HashSet::new();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        if !p
            .file_name()
            .as_encoded_bytes()
            .iter()
            .all(u8::is_ascii_digit)
        {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(m) = std::fs::metadata(t.path().join("ns/net")) {
                live.insert(m.ino());
            }
        }
    }
    for dir in ["/run/netns", "/var/run/netns"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                live.insert(m.ino());
            }
        }
    }
    Some(live)
}

/// The prepared pin directory of this agent.
#[derive(Debug, Clone)]
pub struct PinDir {
    pub path: PathBuf,
    pub layout: String,
    /// Pinned maps of the object.
    pub maps: usize,
    /// Of those, how many were already pinned (reused).
    pub reused: usize,
}

/// Prepares `/sys/fs/bpf/wirescope/<netns>/<layout id>/` for `obj` (see the module
/// documentation), removing the pins of dead namespaces with our inode and of incompatible
/// builds.
pub fn prepare(obj: &[u8]) -> Result<PinDir, PinError> {
    prepare_in(&bpffs()?.join(SUBDIR), obj)
}

/// [`prepare`] under `base` instead of `/sys/fs/bpf/wirescope` (which must be on a bpffs).
pub fn prepare_in(base: &Path, obj: &[u8]) -> Result<PinDir, PinError> {
    let defs = map_defs(obj)?;
    let layout = layout_id(&defs);
    let (ino, cookie) = netns_id()?;
    let ns_name = format!("{ino}-{cookie}");
    std::fs::create_dir_all(base).map_err(io("creating", base))?;
    let ns_prefix = format!("{ino}-");
    let live = live_netns_inodes();
    for entry in std::fs::read_dir(base).map_err(io("listing", base))? {
        let entry = entry.map_err(io("listing", base))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == ns_name {
            continue;
        }
        let their_ino = name.split('-').next().and_then(|i| i.parse::<u64>().ok());
        let dead = name.starts_with(&ns_prefix)
            || live
                .as_ref()
                .is_some_and(|l| their_ino.is_some_and(|i| !l.contains(&i)));
        if dead {
            info!(
                "removing pinned maps of a network namespace that no longer exists: {}",
                entry.path().display()
            );
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                warn!("removing {}: {e}", entry.path().display());
            }
        }
    }
    let ns_dir = base.join(&ns_name);
    std::fs::create_dir_all(&ns_dir).map_err(io("creating", &ns_dir))?;
    for entry in std::fs::read_dir(&ns_dir).map_err(io("listing", &ns_dir))? {
        let entry = entry.map_err(io("listing", &ns_dir))?;
        if entry.file_name().to_string_lossy() != layout {
            warn!(
                "removing pinned maps of an incompatible build: {} (layout {}, this build's is \
                 {layout}); its counters start from zero",
                entry.path().display(),
                entry.file_name().to_string_lossy()
            );
            std::fs::remove_dir_all(entry.path()).map_err(io("removing", &entry.path()))?;
        }
    }
    let path = ns_dir.join(&layout);
    std::fs::create_dir_all(&path).map_err(io("creating", &path))?;
    let pinned: Vec<&MapDef> = defs.iter().filter(|d| d.pinned).collect();
    let reused = pinned
        .iter()
        .filter(|d| path.join(&d.name).exists())
        .count();
    Ok(PinDir {
        path,
        layout,
        maps: pinned.len(),
        reused,
    })
}

/// The warning logged when pinning failed: the error, what it costs, and for a read-only
/// bpffs where that comes from. systemd's `ProtectKernelTunables=yes` remounts /sys/fs/bpf
/// read-only inside the service, and `ReadWritePaths=` cannot undo it, which is not obvious
/// from "Read-only file system" alone.
pub fn not_pinned_warning(e: &PinError) -> String {
    let read_only = matches!(e, PinError::Io { source, .. }
        if source.raw_os_error() == Some(libc::EROFS));
    let hint = if read_only {
        ". The bpffs is read-only for this process: under systemd, ProtectKernelTunables=yes \
         does that (deploy/wirescope.service lists what it protects instead and keeps \
         /sys/fs/bpf writable; remove ProtectKernelTunables=yes from the unit and its drop-ins)"
    } else {
        ""
    };
    format!("BPF maps not pinned ({e}): counters restart from zero with the agent{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_bpffs_names_protect_kernel_tunables() {
        let err = |errno| PinError::Io {
            what: "creating",
            path: PathBuf::from("/sys/fs/bpf/wirescope/1-2"),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let ro = not_pinned_warning(&err(libc::EROFS));
        assert!(
            ro.starts_with(
                "BPF maps not pinned (creating /sys/fs/bpf/wirescope/1-2: Read-only file system"
            ),
            "{ro}"
        );
        assert!(ro.contains("ProtectKernelTunables=yes"), "{ro}");
        assert!(ro.contains("keeps /sys/fs/bpf writable"), "{ro}");
        let denied = not_pinned_warning(&err(libc::EACCES));
        assert!(!denied.contains("ProtectKernelTunables"), "{denied}");
        assert!(
            denied.ends_with("counters restart from zero with the agent"),
            "{denied}"
        );
    }

    #[test]
    fn layout_of_the_object() {
        let defs = map_defs(crate::EBPF_OBJECT).expect("map definitions");
        let pinned: Vec<&str> = defs
            .iter()
            .filter(|d| d.pinned)
            .map(|d| d.name.as_str())
            .collect();
        for name in [
            "COUNTERS",
            "UNKNOWN_WIRE",
            "MAP_ERRORS",
            "RX_SEQ",
            "LEAKS",
            "DROPS",
            "PEER_IDS",
            "IFACE_NAMES",
            "OBFS_COUNTERS",
            "OBFS_ERRORS",
        ] {
            assert!(pinned.contains(&name), "{name} not pinned: {pinned:?}");
        }
        for name in [
            "IFACES",
            "ENDPOINTS",
            "LEAK_PROG",
            "TRANSIT_PROG",
            "HANDSHAKE_PENDING",
            "OBFS_ENDPOINTS",
            "OBFS_CFG",
        ] {
            assert!(defs.iter().any(|d| d.name == name), "{name} missing");
            assert!(!pinned.contains(&name), "{name} pinned");
        }
        let counters = defs.iter().find(|d| d.name == "COUNTERS").unwrap();
        assert_eq!(
            counters.key_size as usize,
            size_of::<agent_common::maps::CounterKey>()
        );
        assert_eq!(layout_id(&defs).len(), 16);
        let mut other = defs.clone();
        other
            .iter_mut()
            .find(|d| d.name == "COUNTERS")
            .unwrap()
            .max_entries += 1;
        assert_ne!(layout_id(&defs), layout_id(&other));
        let un = unpinned(crate::EBPF_OBJECT).unwrap();
        assert!(map_defs(&un).unwrap().iter().all(|d| !d.pinned));

        // UNKNOWN_WIRE is an LRU per-CPU hash since issue 15, a plain one before: the layout
        // with only that changed is another id, so a pinned map of the old type is never
        // loaded as the new one (see `the_previous_layout_is_replaced`).
        let unknown = defs.iter().find(|d| d.name == "UNKNOWN_WIRE").unwrap();
        assert_eq!(unknown.map_type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
        assert_ne!(layout_id(&defs), layout_id(&before_issue_15(&defs)));
    }

    const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
    const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;

    /// The map definitions of the build before UNKNOWN_WIRE became an LRU map.
    fn before_issue_15(defs: &[MapDef]) -> Vec<MapDef> {
        let mut before = defs.to_vec();
        for d in before.iter_mut().filter(|d| d.name == "UNKNOWN_WIRE") {
            d.map_type = BPF_MAP_TYPE_PERCPU_HASH;
        }
        before
    }

    /// Pins left by the build before (UNKNOWN_WIRE a plain per-CPU hash) are removed and a
    /// directory for this layout made, not an error: the agent starts, its counters from 0.
    #[test]
    fn the_previous_layout_is_replaced() {
        let defs = map_defs(crate::EBPF_OBJECT).expect("map definitions");
        let base = std::env::temp_dir().join(format!("wirescope-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (ino, cookie) = netns_id().expect("netns id");
        let ns_dir = base.join(format!("{ino}-{cookie}"));
        let old = ns_dir.join(layout_id(&before_issue_15(&defs)));
        std::fs::create_dir_all(&old).expect("old layout directory");
        for name in ["UNKNOWN_WIRE", "COUNTERS"] {
            std::fs::write(old.join(name), b"").expect("old pin");
        }
        let dir = prepare_in(&base, crate::EBPF_OBJECT);
        let entries: Vec<String> = std::fs::read_dir(&ns_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(&base);
        let dir = dir.expect("prepared");
        assert_eq!(dir.layout, layout_id(&defs));
        assert_eq!(dir.path, ns_dir.join(&dir.layout));
        assert_eq!((dir.reused, dir.maps > 0), (0, true));
        assert_eq!(
            entries,
            vec![dir.layout.clone()],
            "only this layout's directory"
        );
    }
}
