//! What keeps the TC programs at work while no agent runs, so that packets sent while an agent
//! is killed (SIGKILL, a crash, the OOM killer) are counted, and a restarted agent takes over
//! without losing or double-counting one. Everything is pinned in `<pin dir>/hooks/`, beside
//! the counting maps ([`super::pin`]):
//!
//! - `tcx-<ifindex>-ingress`, `tcx-<ifindex>-egress`: the TCX links. A TCX link is fd-based:
//!   unpinned it would be detached with the process that made it. Pinned, it keeps running
//!   the killed agent's program, which keeps counting into the pinned maps. A restarted agent
//!   (same map layout) opens the link of each interface it attaches to and replaces the
//!   program in it with BPF_LINK_UPDATE, after writing the new program's peer maps: the
//!   kernel swaps the program of the link in place, so every packet runs exactly one of the
//!   two. A pin whose link is defunct (its interface was deleted: the kernel then reports
//!   ifindex 0) or is not that interface's link of that direction is removed; links of
//!   interfaces the new agent does not watch are removed after its first sync, which detaches
//!   them.
//! - `<ARRAY>-<map id>`: the program arrays of the tail calls (transit timing, the leak check).
//!   The kernel empties a program array when its last user-space reference goes, which would
//!   leave a killed agent's programs counting packets but no longer leaks or transit times.
//!   Pinned, hooks that outlive the agent (the TCX links above, clsact filters) keep doing
//!   their whole work. An earlier agent's array pins are removed after the first sync, when
//!   none of its programs runs any more.
//!
//! clsact filters need no pin (they outlive the process anyway): [`super::attach`] keeps
//! removing a killed agent's filters before attaching its own, as before.
//!
//! A clean stop (SIGINT/SIGTERM) removes every pin here after detaching: nothing of the agent
//! runs once it has stopped, which is what stopping it is for (ruling it out, removing it).
//! The counting maps stay pinned, so the next start continues them; under TCX the packets
//! between a clean stop and the next start are not counted. To replace the binary without
//! that gap, end the old agent with SIGKILL instead (under the shipped systemd unit,
//! `systemctl kill -s SIGKILL wirescope`: Restart=on-failure starts the new one).

use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::Map,
    programs::{
        links::{FdLink, PinnedLink},
        tc::TcAttachType,
    },
};
use log::{debug, info, warn};

use super::pin::PinError;

/// The subdirectory of the pin directory.
pub const SUBDIR: &str = "hooks";
const TCX_PREFIX: &str = "tcx-";

/// The agent's pins in `<pin dir>/hooks/`, by name.
///
/// Every access after opening goes through `/proc/self/fd/<dir fd>/<name>`: under `ip netns
/// exec` the directory is reached through another process's `/proc/PID/root`, which the agent
/// may no longer enter once it has dropped its capabilities (ptrace access mode), and it must
/// still pin the links of interfaces that appear later and remove every pin at a clean stop.
#[derive(Debug)]
pub struct Hooks {
    /// The directory as found, for log lines.
    shown: PathBuf,
    /// Kept open for `via`.
    _dir: std::fs::File,
    /// `/proc/self/fd/<dir fd>`.
    via: PathBuf,
    /// This agent's program-array pins.
    tails: Vec<String>,
}

impl Hooks {
    /// Opens (creating) `<pin_dir>/hooks/`.
    pub fn open(pin_dir: &Path) -> Result<Hooks, PinError> {
        let shown = pin_dir.join(SUBDIR);
        let err = |what| {
            let path = shown.clone();
            move |source| PinError::Io { what, path, source }
        };
        std::fs::create_dir_all(&shown).map_err(err("creating"))?;
        let dir = std::fs::File::open(&shown).map_err(err("opening"))?;
        let via = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dir)
        ));
        Ok(Hooks {
            shown,
            _dir: dir,
            via,
            tails: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shown
    }

    /// The path the agent uses for the pin `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.via.join(name)
    }

    /// The pin `name` as the operator finds it, for log lines.
    pub fn shown(&self, name: &str) -> PathBuf {
        self.shown.join(name)
    }

    /// The name of the pin of the TCX link of `ifindex` in direction `attach_type`.
    pub fn link_name(ifindex: u32, attach_type: TcAttachType) -> String {
        format!("{TCX_PREFIX}{ifindex}-{}", direction(attach_type))
    }

    /// Pins the program array `name` of `ebpf` as `<name>-<map id>`.
    pub fn pin_tail_array(&mut self, ebpf: &Ebpf, name: &'static str) -> Result<(), String> {
        let Some(map @ Map::ProgramArray(data)) = ebpf.map(name) else {
            return Err(format!("{name} is not a program array"));
        };
        let id = data.info().map_err(|e| format!("{name}: {e}"))?.id();
        let pin = format!("{name}-{id}");
        map.pin(self.path(&pin))
            .map_err(|e| format!("pinning {name} at {}: {e}", self.shown(&pin).display()))?;
        self.tails.push(pin);
        Ok(())
    }

    /// The link pinned for (`ifindex`, `attach_type`), when it is a live TCX link of that
    /// interface and direction; a pin that is not is removed (a defunct link then goes).
    pub fn take_pinned(&self, ifindex: u32, attach_type: TcAttachType) -> Option<FdLink> {
        let name = Self::link_name(ifindex, attach_type);
        let path = self.path(&name);
        if !path.exists() {
            return None;
        }
        let want = Some(TcxLink {
            ifindex,
            ingress: attach_type == TcAttachType::Ingress,
        });
        match tcx_link_info(&path) {
            Ok(found) if found == want => {}
            Ok(found) => {
                info!(
                    "removing {}: {}",
                    self.shown(&name).display(),
                    match found {
                        Some(TcxLink { ifindex: 0, .. }) => "its interface was deleted".into(),
                        Some(l) => format!("it is the link of ifindex {}", l.ifindex),
                        None => "not a TCX link".to_string(),
                    }
                );
                self.remove(&name);
                return None;
            }
            Err(e) => {
                warn!(
                    "removing {}: cannot read it ({e})",
                    self.shown(&name).display()
                );
                self.remove(&name);
                return None;
            }
        }
        match PinnedLink::from_pin(&path) {
            Ok(p) => Some(FdLink::from(p)),
            Err(e) => {
                warn!(
                    "removing {}: cannot open it ({e})",
                    self.shown(&name).display()
                );
                self.remove(&name);
                None
            }
        }
    }

    /// Removes the link pins not in `keep` and the program-array pins of earlier agents:
    /// called after the first sync, when every watched interface's link was taken over.
    pub fn sweep(&self, keep: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.via) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = if name.starts_with(TCX_PREFIX) {
                !keep.contains(&name)
            } else {
                !self.tails.contains(&name)
            };
            if stale {
                info!(
                    "removing {}: left by an earlier agent, no longer needed",
                    self.shown(&name).display()
                );
                self.remove(&name);
            }
        }
    }

    /// Removes this agent's program-array pins (a clean stop, once everything is detached).
    pub fn unpin_tails(&mut self) {
        for name in std::mem::take(&mut self.tails) {
            self.remove(&name);
        }
    }

    /// Removes the pin `name`; one already gone is no error.
    pub fn remove(&self, name: &str) {
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("removing {}: {e}", self.shown(name).display()),
        }
    }
}

fn direction(attach_type: TcAttachType) -> &'static str {
    match attach_type {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    }
}

/// A TCX link as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcxLink {
    /// 0 once the interface is gone (the link is then defunct).
    pub ifindex: u32,
    pub ingress: bool,
}

// bpf(2) commands and constants (include/uapi/linux/bpf.h); aya 0.14 does not expose a TCX
// link's interface.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_TCX: u32 = 11;
const BPF_TCX_INGRESS: u32 = 46;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to its union (8-byte aligned, at 16), whose `tcx` member is
/// `{ ifindex, attach_type }`; the rest of the union is room the kernel may fill.
#[repr(C)]
#[derive(Default)]
struct LinkInfoRaw {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    tcx_ifindex: u32,
    tcx_attach_type: u32,
    _rest: [u64; 8],
}

fn bpf(cmd: libc::c_long, attr: *const libc::c_void, size: usize) -> std::io::Result<i64> {
    // SAFETY: `attr` points to a live bpf_attr prefix of `size` bytes; the kernel reads at
    // most `size` bytes of it and writes only through pointers inside it, which the callers
    // make valid.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// (id, program id, TCX interface and direction or None for another link type) of the link
/// pinned at `path`.
pub fn link_info(path: &Path) -> std::io::Result<(u32, u32, Option<TcxLink>)> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(
        BPF_OBJ_GET,
        (&raw const get).cast(),
        size_of::<ObjGetAttr>(),
    )?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = LinkInfoRaw::default();
    let attr = InfoByFdAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: size_of::<LinkInfoRaw>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw const attr).cast(),
        size_of::<InfoByFdAttr>(),
    )?;
    let tcx = (info.link_type == BPF_LINK_TYPE_TCX).then_some(TcxLink {
        ifindex: info.tcx_ifindex,
        ingress: info.tcx_attach_type == BPF_TCX_INGRESS,
    });
    debug!(
        "{}: link {} program {} {tcx:?}",
        path.display(),
        info.id,
        info.prog_id
    );
    Ok((info.id, info.prog_id, tcx))
}

fn tcx_link_info(path: &Path) -> std::io::Result<Option<TcxLink>> {
    link_info(path).map(|(_, _, tcx)| tcx)
}
