//! Hooking the TC programs to interfaces: TCX where the kernel has it (6.6 and later), clsact
//! below, each interface's role and framing written to `IFACES` first; and unhooking them
//! again, including the clsact filters a killed agent left behind. TCX links are pinned and
//! taken over by the next agent ([`super::hooks`]).

use agent_common::maps::{IfaceConfig, names};
use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier,
    links::{FdLink, LinkError},
    tc::{
        self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcAttachType,
        TcError,
    },
};
use log::{debug, info, warn};

use super::{Datapath, DatapathError, PROG_EGRESS, PROG_INGRESS, hooks::Hooks};

/// How a program is hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Tcx,
    Clsact,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

/// One interface the programs are attached to.
#[derive(Debug)]
pub struct Attachment {
    pub name: String,
    pub config: IfaceConfig,
    pub mode: AttachMode,
    pub(super) ingress: Hook,
    pub(super) egress: Hook,
}

impl Attachment {
    /// The names of its TCX links' pins (none under clsact or without pinning).
    pub fn link_pins(&self) -> impl Iterator<Item = &String> {
        [&self.ingress, &self.egress]
            .into_iter()
            .filter_map(|h| match h {
                Hook::Tcx { pin, .. } => pin.as_ref(),
                Hook::Clsact(_) => None,
            })
    }
}

/// One program hooked in one direction.
#[derive(Debug)]
pub(super) enum Hook {
    /// Held here rather than by the program, so that dropping the agent never detaches a
    /// pinned link; `pin`: the name of its pin in the hooks directory.
    Tcx {
        link: FdLink,
        pin: Option<String>,
    },
    Clsact(SchedClassifierLinkId),
}

impl Datapath {
    /// Attach both programs to `name`. The interface's configuration goes into `IFACES`
    /// first, so the programs never see the interface without knowing its framing.
    pub fn attach(
        &mut self,
        name: &str,
        ifindex: u32,
        config: IfaceConfig,
    ) -> Result<AttachMode, DatapathError> {
        if let Some(a) = self.attachments.get_mut(&ifindex) {
            if a.name != name || a.config != config {
                // Renamed or re-roled: refresh the config; the hooks stay.
                self.ifaces
                    .insert(ifindex, config, 0)
                    .map_err(|source| DatapathError::Map {
                        map: names::IFACES,
                        source,
                    })?;
                a.name = name.to_string();
                a.config = config;
            }
            return Ok(a.mode);
        }
        self.ifaces
            .insert(ifindex, config, 0)
            .map_err(|source| DatapathError::Map {
                map: names::IFACES,
                source,
            })?;
        let mut mode = if self.tcx_unsupported {
            AttachMode::Clsact
        } else {
            AttachMode::Tcx
        };
        let (ingress, continued) =
            match self.hook(PROG_INGRESS, name, ifindex, TcAttachType::Ingress, mode) {
                Ok(h) => h,
                Err(e) if mode == AttachMode::Tcx && tcx_unsupported(&e) => {
                    info!("TCX is not supported by this kernel ({e}); using clsact");
                    self.tcx_unsupported = true;
                    mode = AttachMode::Clsact;
                    self.hook(PROG_INGRESS, name, ifindex, TcAttachType::Ingress, mode)
                        .map_err(|source| self.attach_failed(ifindex, name, "ingress", source))?
                }
                Err(source) => return Err(self.attach_failed(ifindex, name, "ingress", source)),
            };
        let egress = match self.hook(PROG_EGRESS, name, ifindex, TcAttachType::Egress, mode) {
            Ok((h, _)) => h,
            Err(source) => {
                self.unhook(name, PROG_INGRESS, ingress, TcAttachType::Ingress);
                return Err(self.attach_failed(ifindex, name, "egress", source));
            }
        };
        info!(
            "attached to {name} (ifindex {ifindex}) with {}{}",
            mode.as_str(),
            if continued {
                ", replacing the previous agent's programs in its pinned links"
            } else {
                ""
            }
        );
        self.attachments.insert(
            ifindex,
            Attachment {
                name: name.to_string(),
                config,
                mode,
                ingress,
                egress,
            },
        );
        Ok(mode)
    }

    fn attach_failed(
        &mut self,
        ifindex: u32,
        name: &str,
        dir: &'static str,
        source: ProgramError,
    ) -> DatapathError {
        let _ = self.ifaces.remove(&ifindex);
        DatapathError::Attach {
            iface: name.to_string(),
            dir,
            source,
        }
    }

    fn program(&mut self, prog: &'static str) -> Result<&mut SchedClassifier, ProgramError> {
        self.ebpf
            .program_mut(prog)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()
    }

    /// Hooks `prog` to `iface` in one direction; true when it took over a pinned TCX link.
    fn hook(
        &mut self,
        prog: &'static str,
        iface: &str,
        ifindex: u32,
        attach_type: TcAttachType,
        mode: AttachMode,
    ) -> Result<(Hook, bool), ProgramError> {
        if mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(TcError::AlreadyAttached) => {}
                Err(e) => return Err(ProgramError::from(e)),
            }
            sweep_clsact_leftovers(iface, attach_type, prog);
            let id = self.program(prog)?.attach_with_options(
                iface,
                attach_type,
                TcAttachOptions::Netlink(NlOptions::default()),
            )?;
            return Ok((Hook::Clsact(id), false));
        }
        let pin = Hooks::link_name(ifindex, attach_type);
        let old = self
            .hooks
            .as_ref()
            .and_then(|h| h.take_pinned(ifindex, attach_type));
        if let Some(old) = old {
            match self.replace_program(prog, old) {
                Ok(link) => {
                    return Ok((
                        Hook::Tcx {
                            link,
                            pin: Some(pin),
                        },
                        true,
                    ));
                }
                Err(e) => {
                    // Removing the pin detaches the old program: never two on one hook.
                    warn!(
                        "replacing the program in the pinned link {pin} failed ({e}): attaching anew"
                    );
                    self.remove_pin(&pin);
                }
            }
        }
        let link = self.tcx_link(prog, iface, attach_type)?;
        let Some(h) = &self.hooks else {
            return Ok((Hook::Tcx { link, pin: None }, false));
        };
        h.remove(&pin);
        match link.pin(h.path(&pin)) {
            Ok(pinned) => Ok((
                Hook::Tcx {
                    link: FdLink::from(pinned),
                    pin: Some(pin),
                },
                false,
            )),
            Err(e) => {
                // The failed pin consumed (detached) the link: attach again, unpinned.
                warn!(
                    "pinning the TCX link at {}: {e}; a killed agent's programs stop counting \
                     on {iface} until it is back",
                    h.shown(&pin).display()
                );
                let link = self.tcx_link(prog, iface, attach_type)?;
                Ok((Hook::Tcx { link, pin: None }, false))
            }
        }
    }

    fn remove_pin(&self, name: &str) {
        if let Some(h) = &self.hooks {
            h.remove(name);
        }
    }

    /// A new TCX link of `prog`, appended last: the agent observes and must not run before
    /// programs that decide.
    fn tcx_link(
        &mut self,
        prog: &'static str,
        iface: &str,
        attach_type: TcAttachType,
    ) -> Result<FdLink, ProgramError> {
        let p = self.program(prog)?;
        let id = p.attach_with_options(
            iface,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::last()),
        )?;
        FdLink::try_from(p.take_link(id)?).map_err(link_error)
    }

    /// Puts `prog` into the existing TCX link `old` in place of its program (BPF_LINK_UPDATE:
    /// each packet runs either program, never both, never neither).
    fn replace_program(&mut self, prog: &'static str, old: FdLink) -> Result<FdLink, ProgramError> {
        let link = SchedClassifierLink::try_from(old).map_err(link_error)?;
        let p = self.program(prog)?;
        let id = p.attach_to_link(link)?;
        FdLink::try_from(p.take_link(id)?).map_err(link_error)
    }

    /// Unhooks one direction: a TCX link's pin goes first, so dropping the link detaches it.
    fn unhook(&mut self, iface: &str, prog: &'static str, hook: Hook, attach_type: TcAttachType) {
        match hook {
            Hook::Tcx { link, pin } => {
                if let Some(p) = pin {
                    self.remove_pin(&p);
                }
                drop(link);
            }
            Hook::Clsact(id) => {
                if let Err(e) = self.program(prog).and_then(|p| p.detach(id)) {
                    debug!("detaching {prog} from {iface}: {e}");
                }
                sweep_clsact_leftovers(iface, attach_type, prog);
            }
        }
    }

    /// Detach from an interface that went away or is no longer watched. When the interface
    /// itself was deleted the kernel already dropped the hooks; that is not an error.
    pub fn detach(&mut self, ifindex: u32) {
        let Some(a) = self.attachments.remove(&ifindex) else {
            return;
        };
        self.unhook(&a.name, PROG_INGRESS, a.ingress, TcAttachType::Ingress);
        self.unhook(&a.name, PROG_EGRESS, a.egress, TcAttachType::Egress);
        let _ = self.ifaces.remove(&ifindex);
        info!("detached from {} (ifindex {ifindex})", a.name);
    }
}

/// clsact filters, unlike TCX links, outlive the process that attached them: an agent killed
/// with SIGKILL leaves its filters counting into maps nobody reads. When no other wirescope
/// runs in this network namespace, every filter of our programs' names on `iface` is such a
/// leftover and is removed.
fn sweep_clsact_leftovers(iface: &str, attach_type: TcAttachType, prog: &str) {
    if other_agents_here() {
        return;
    }
    match tc::qdisc_detach_program(iface, attach_type, prog) {
        Ok(()) => {
            info!("removed {prog} filters left on {iface} by an agent that did not stop cleanly")
        }
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => debug!("looking for leftover {prog} filters on {iface}: {e}"),
    }
}

/// aya 0.14 has no conversion of a link error into a program error.
fn link_error(e: LinkError) -> ProgramError {
    match e {
        LinkError::SyscallError(s) => ProgramError::SyscallError(s),
        other => ProgramError::IOError(std::io::Error::other(other.to_string())),
    }
}

/// Whether another `wirescope` process shares this network namespace.
fn other_agents_here() -> bool {
    let Ok(own_ns) = std::fs::read_link("/proc/self/ns/net") else {
        return false;
    };
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|e| {
        let pid = e.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        if pid == me {
            return false;
        }
        let dir = e.path();
        // A wirescope whose namespace cannot be read (after our capability drop, one still
        // holding more) may be here: its filters are left alone.
        std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "wirescope")
            && std::fs::read_link(dir.join("ns/net")).map_or(true, |ns| ns == own_ns)
    })
}

/// TCX link creation fails this way on kernels without TCX (< 6.6); anything else (EPERM,
/// ENODEV, ...) is a real failure that a fallback would only hide.
fn tcx_unsupported(e: &ProgramError) -> bool {
    match e {
        ProgramError::SyscallError(s) => matches!(
            s.io_error.raw_os_error(),
            Some(code) if code == libc::EINVAL || code == libc::EOPNOTSUPP || code == 524 /* ENOTSUPP */
        ),
        _ => false,
    }
}
