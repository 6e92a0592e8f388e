//! Hooking the TC programs to interfaces: TCX where the kernel has it (6.6 and later), clsact
//! below, each interface's role and framing written to `IFACES` first; and unhooking them
//! again, including the clsact filters a killed agent left behind.

use agent_common::maps::{IfaceConfig, names};
use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier,
    tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcAttachType, TcError},
};
use log::{debug, info};

use super::{Datapath, DatapathError, PROG_EGRESS, PROG_INGRESS};

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
    pub(super) ingress: SchedClassifierLinkId,
    pub(super) egress: SchedClassifierLinkId,
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
        let ingress = match self.attach_one(PROG_INGRESS, name, TcAttachType::Ingress, mode) {
            Ok(id) => id,
            Err(e) if mode == AttachMode::Tcx && tcx_unsupported(&e) => {
                info!("TCX is not supported by this kernel ({e}); using clsact");
                self.tcx_unsupported = true;
                mode = AttachMode::Clsact;
                self.attach_one(PROG_INGRESS, name, TcAttachType::Ingress, mode)
                    .map_err(|source| self.attach_failed(ifindex, name, "ingress", source))?
            }
            Err(source) => return Err(self.attach_failed(ifindex, name, "ingress", source)),
        };
        let egress = match self.attach_one(PROG_EGRESS, name, TcAttachType::Egress, mode) {
            Ok(id) => id,
            Err(source) => {
                let _ = self.program(PROG_INGRESS).map(|p| p.detach(ingress));
                return Err(self.attach_failed(ifindex, name, "egress", source));
            }
        };
        info!(
            "attached to {name} (ifindex {ifindex}) with {}",
            mode.as_str()
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

    fn attach_one(
        &mut self,
        prog: &'static str,
        iface: &str,
        attach_type: TcAttachType,
        mode: AttachMode,
    ) -> Result<SchedClassifierLinkId, ProgramError> {
        if mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(TcError::AlreadyAttached) => {}
                Err(e) => return Err(ProgramError::from(e)),
            }
            sweep_clsact_leftovers(iface, attach_type, prog);
        }
        let options = match mode {
            // Appended last: the agent observes and must not run before programs that decide.
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::last()),
            AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
        };
        self.program(prog)?
            .attach_with_options(iface, attach_type, options)
    }

    /// Detach from an interface that went away or is no longer watched. When the interface
    /// itself was deleted the kernel already dropped the hooks; that is not an error.
    pub fn detach(&mut self, ifindex: u32) {
        let Some(a) = self.attachments.remove(&ifindex) else {
            return;
        };
        for (prog, id, attach_type) in [
            (PROG_INGRESS, a.ingress, TcAttachType::Ingress),
            (PROG_EGRESS, a.egress, TcAttachType::Egress),
        ] {
            if let Err(e) = self.program(prog).and_then(|p| p.detach(id)) {
                debug!("detaching {prog} from {}: {e}", a.name);
            }
            if a.mode == AttachMode::Clsact {
                sweep_clsact_leftovers(&a.name, attach_type, prog);
            }
        }
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
