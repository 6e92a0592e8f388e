//! The eBPF side as the agent holds it: the loaded programs, their attachments, and typed
//! handles on every map.

use std::{collections::HashMap as StdHashMap, hash::Hash};

use agent_common::maps::{
    AllowedV4, AllowedV6, Counter, CounterKey, CryptoConfig, Endpoint, HistKey, HistValue,
    IfaceConfig, IndexKey, PeerHistKey, PeerIdKey, PendingHandshake, RxSession, UnknownWireKey,
    map_error, names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{
        KProbe, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
};
use log::{debug, info, warn};

pub mod crypto;
pub mod drops;
pub mod features;
pub mod health;
pub mod pin;
pub mod transit;

/// Whether and where [`Datapath::load_with`] pins the counting maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// In /sys/fs/bpf/wirescope/<netns>/<layout id>/ (see [`pin`]).
    Auto,
    /// In `<dir>/<netns>/<layout id>/`, `dir` on a bpffs.
    Under(std::path::PathBuf),
    /// Not at all: every map starts empty and goes with the agent.
    Off,
}

impl Pinning {
    /// `WIRESCOPE_PIN=off` disables pinning; `WIRESCOPE_PIN=/some/bpffs/dir` pins under that
    /// directory; anything else (or nothing) is [`Pinning::Auto`].
    pub fn from_env() -> Self {
        match std::env::var_os("WIRESCOPE_PIN") {
            Some(v) if v == "off" || v == "0" => Pinning::Off,
            Some(v) if v.as_encoded_bytes().starts_with(b"/") => Pinning::Under(v.into()),
            _ => Pinning::Auto,
        }
    }
}

pub const PROG_INGRESS: &str = "wirescope_ingress";
pub const PROG_EGRESS: &str = "wirescope_egress";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed: {0} (is the agent running as root, with CAP_BPF and CAP_NET_ADMIN?)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {0}: the build is broken")]
    Missing(&'static str),
    #[error("loading program {name} failed: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to {iface} ({dir}) failed: {source}")]
    Attach {
        iface: String,
        dir: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinning the maps: {0}")]
    Pin(#[source] pin::PinError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

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

/// What the programs do, fixed when they are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Time packets through WireGuard (`wirescope_tunnel_transit_seconds`). Off, the
    /// verifier drops that code: about 90 ns less per packet on a busy tunnel
    /// (`cargo xtask bench`).
    pub transit_time: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { transit_time: true }
    }
}

/// The eBPF global that [`LoadOptions::transit_time`] sets (agent-ebpf/src/transit.rs).
const TRANSIT_TIME_GLOBAL: &str = "TRANSIT_TIME";

/// One interface the programs are attached to.
#[derive(Debug)]
pub struct Attachment {
    pub name: String,
    pub config: IfaceConfig,
    pub mode: AttachMode,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// What the maps should hold, computed from the inventory by the sync loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMaps {
    /// (ifindex, address, prefix length) -> peer id.
    pub allowed_v4: StdHashMap<(u32, [u8; 4], u8), u32>,
    pub allowed_v6: StdHashMap<(u32, [u8; 16], u8), u32>,
    pub endpoints: StdHashMap<Endpoint, u32>,
    /// Listen ports of the local interfaces (the value is unused by the programs).
    pub wg_ports: StdHashMap<u16, u8>,
}

/// An optional program's feature label and whether it attached.
pub type AttachOutcome = (&'static str, Result<(), DatapathError>);

pub struct Datapath {
    ebpf: Ebpf,
    ifaces: HashMap<MapData, u32, IfaceConfig>,
    allowed_v4: LpmTrie<MapData, AllowedV4, u32>,
    allowed_v6: LpmTrie<MapData, AllowedV6, u32>,
    endpoints: HashMap<MapData, Endpoint, u32>,
    wg_ports: HashMap<MapData, u16, u8>,
    counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    unknown_wire: PerCpuHashMap<MapData, UnknownWireKey, Counter>,
    map_errors: PerCpuArray<MapData, u64>,
    crypto_cfg: Array<MapData, CryptoConfig>,
    crypto_hist: PerCpuHashMap<MapData, HistKey, HistValue>,
    handshake_pending: HashMap<MapData, IndexKey, PendingHandshake>,
    handshake_rtt: PerCpuHashMap<MapData, PeerHistKey, HistValue>,
    rx_sessions: HashMap<MapData, IndexKey, RxSession>,
    rx_seq: PerCpuHashMap<MapData, CounterKey, Counter>,
    /// The peer numbering, pinned with the counters (see [`Datapath::saved_peer_ids`]).
    peer_ids: HashMap<MapData, PeerIdKey, u32>,
    /// Entries in `peer_ids`, counted as they are read and written (walking the map on
    /// every scrape would cost a syscall per peer).
    peer_ids_len: u64,
    /// Fragments and ICMP too-big ([`PathMaps`]).
    path: PathMaps,
    /// Leak detection ([`LeakMaps`]).
    pub leak: LeakMaps,
    /// Encrypt/decrypt transit time ([`crate::datapath::transit::TransitMaps`]).
    pub transit: crate::datapath::transit::TransitMaps,
    /// Kernel drops and UDP receive errors ([`crate::datapath::drops::DropsMaps`]).
    pub drops: crate::datapath::drops::DropsMaps,
    /// Handshake timeouts counted by [`Datapath::expire_wire_state`], per (ifindex, peer).
    handshake_timeouts: StdHashMap<(u32, u32), u64>,
    /// Whether the crypto kprobes are attached.
    crypto_attached: bool,
    attachments: StdHashMap<u32, Attachment>,
    /// What was last written to the peer maps, so a sync only touches what changed.
    applied: PeerMaps,
    /// Set once TCX proved unsupported, so later attaches go straight to clsact.
    tcx_unsupported: bool,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

/// The program array `array` with the (loaded) TC program `prog` at index 0, for a tail
/// call. The caller keeps the array open: the kernel empties a program array when the last
/// user-space reference to it goes.
pub(crate) fn tail_program(
    ebpf: &mut Ebpf,
    array: &'static str,
    prog: &'static str,
) -> Result<aya::maps::ProgramArray<MapData>, DatapathError> {
    let mut arr: aya::maps::ProgramArray<MapData> = take(ebpf, array)?;
    let fd = ebpf
        .program(prog)
        .ok_or(DatapathError::Missing(prog))
        .and_then(|p| {
            <&SchedClassifier>::try_from(p)
                .and_then(|p| p.fd())
                .map_err(|source| DatapathError::Program { name: prog, source })
        })?;
    arr.set(0, fd, 0)
        .map_err(|source| DatapathError::Map { map: array, source })?;
    Ok(arr)
}

pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

impl Datapath {
    /// Load the programs (verifier included) and take the maps, the counting ones pinned
    /// ([`Pinning::Auto`], see [`pin`]): a restarted agent continues their counts. Nothing is
    /// attached yet.
    pub fn load(object: &[u8]) -> Result<Self, DatapathError> {
        Self::load_with(object, Pinning::from_env())
    }

    /// [`Datapath::load`] with the pinning chosen by the caller.
    pub fn load_with(object: &[u8], pinning: Pinning) -> Result<Self, DatapathError> {
        Self::load_with_options(object, pinning, LoadOptions::default())
    }

    /// [`Datapath::load_with`] with the programs' [`LoadOptions`].
    pub fn load_with_options(
        object: &[u8],
        pinning: Pinning,
        options: LoadOptions,
    ) -> Result<Self, DatapathError> {
        let prepared = match &pinning {
            Pinning::Auto => Some(pin::prepare(object)),
            Pinning::Under(base) => Some(pin::prepare_in(base, object)),
            Pinning::Off => None,
        };
        let unpinned;
        let mut loader = EbpfLoader::new();
        let object = match prepared {
            Some(Ok(dir)) => {
                info!(
                    "BPF maps pinned in {} (layout {}): {} of {} reused from a previous run",
                    dir.path.display(),
                    dir.layout,
                    dir.reused,
                    dir.maps
                );
                loader.default_map_pin_directory(&dir.path);
                object
            }
            Some(Err(e)) => {
                warn!("BPF maps not pinned ({e}): counters restart from zero with the agent");
                unpinned = pin::unpinned(object).map_err(DatapathError::Pin)?;
                &unpinned
            }
            None => {
                unpinned = pin::unpinned(object).map_err(DatapathError::Pin)?;
                &unpinned
            }
        };
        let transit_time = u8::from(options.transit_time);
        loader.override_global(TRANSIT_TIME_GLOBAL, &transit_time, true);
        let mut ebpf = loader.load(object).map_err(DatapathError::Load)?;
        for name in [
            PROG_INGRESS,
            PROG_EGRESS,
            agent_common::maps::transit::PROG,
            agent_common::maps::leak::PROG,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            let started = std::time::Instant::now();
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
            // The verifier's work grows with every feature: logged so a slow start (a few
            // seconds on an emulated CPU) is explained, and growth is seen.
            let insns = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count());
            info!(
                "{name}: verified in {:.1} s ({} instructions processed)",
                started.elapsed().as_secs_f64(),
                insns.map_or("?".to_string(), |n| n.to_string())
            );
        }
        Ok(Self {
            ifaces: take(&mut ebpf, names::IFACES)?,
            allowed_v4: take(&mut ebpf, names::ALLOWED_V4)?,
            allowed_v6: take(&mut ebpf, names::ALLOWED_V6)?,
            endpoints: take(&mut ebpf, names::ENDPOINTS)?,
            wg_ports: take(&mut ebpf, names::WG_PORTS)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            unknown_wire: take(&mut ebpf, names::UNKNOWN_WIRE)?,
            map_errors: take(&mut ebpf, names::MAP_ERRORS)?,
            crypto_cfg: take(&mut ebpf, names::CRYPTO_CFG)?,
            crypto_hist: take(&mut ebpf, names::CRYPTO_HIST)?,
            handshake_pending: take(&mut ebpf, names::HANDSHAKE_PENDING)?,
            handshake_rtt: take(&mut ebpf, names::HANDSHAKE_RTT)?,
            rx_sessions: take(&mut ebpf, names::RX_SESSIONS)?,
            rx_seq: take(&mut ebpf, names::RX_SEQ)?,
            peer_ids: take(&mut ebpf, names::PEER_IDS)?,
            peer_ids_len: 0,
            path: PathMaps::take(&mut ebpf)?,
            leak: LeakMaps::take(&mut ebpf)?,
            transit: crate::datapath::transit::TransitMaps::take(&mut ebpf)?,
            drops: crate::datapath::drops::DropsMaps::take(&mut ebpf)?,
            handshake_timeouts: StdHashMap::new(),
            crypto_attached: false,
            ebpf,
            attachments: StdHashMap::new(),
            applied: PeerMaps::default(),
            tcx_unsupported: false,
        })
    }

    pub fn attachments(&self) -> impl Iterator<Item = (&u32, &Attachment)> {
        self.attachments.iter()
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attachments.contains_key(&ifindex)
    }

    /// The loaded TC program `name` ([`PROG_INGRESS`] or [`PROG_EGRESS`]), for tests and
    /// benchmarks that run it through `BPF_PROG_TEST_RUN` (`aya::programs::TestRun`).
    /// The agent itself never needs it.
    pub fn program_mut(&mut self, name: &str) -> Option<&mut SchedClassifier> {
        self.ebpf.program_mut(name)?.try_into().ok()
    }

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

    /// Bring the peer maps to `want`, touching only entries that changed. Stale entries go
    /// first, so a nearly full map makes room; an entry the kernel refuses (map full) is
    /// retried on the next sync and reported, and never stops the other maps' updates.
    pub fn sync_peers(&mut self, want: &PeerMaps) -> Result<(), DatapathError> {
        let (v4, v6, eps, ports) = (
            &mut self.allowed_v4,
            &mut self.allowed_v6,
            &mut self.endpoints,
            &mut self.wg_ports,
        );
        let results = [
            apply(
                &mut self.applied.allowed_v4,
                &want.allowed_v4,
                |k, v| match v {
                    Some(v) => v4.insert(&lpm_v4(k), *v, 0),
                    None => v4.remove(&lpm_v4(k)),
                },
            )
            .map_err(|e| (names::ALLOWED_V4, e)),
            apply(
                &mut self.applied.allowed_v6,
                &want.allowed_v6,
                |k, v| match v {
                    Some(v) => v6.insert(&lpm_v6(k), *v, 0),
                    None => v6.remove(&lpm_v6(k)),
                },
            )
            .map_err(|e| (names::ALLOWED_V6, e)),
            apply(
                &mut self.applied.endpoints,
                &want.endpoints,
                |k, v| match v {
                    Some(v) => eps.insert(k, v, 0),
                    None => eps.remove(k),
                },
            )
            .map_err(|e| (names::ENDPOINTS, e)),
            apply(&mut self.applied.wg_ports, &want.wg_ports, |k, v| match v {
                Some(v) => ports.insert(k, v, 0),
                None => ports.remove(k),
            })
            .map_err(|e| (names::WG_PORTS, e)),
        ];
        let addrs = self.path.sync_endpoint_addrs(&want.endpoints);
        for r in results {
            r.map_err(|(map, source)| DatapathError::Map { map, source })?;
        }
        addrs?;
        Ok(())
    }

    /// Writes the drop programs' configuration, then loads and attaches each; one failing
    /// leaves the other attached. Returns, per program, its feature label and the outcome.
    pub fn attach_drops(
        &mut self,
        cfg: agent_common::maps::drops::DropsConfig,
    ) -> Result<Vec<AttachOutcome>, DatapathError> {
        self.drops.set_config(cfg)?;
        let (prog, tp, feature) = crate::datapath::drops::KFREE_SKB;
        let kfree = self
            .ebpf
            .program_mut(prog)
            .ok_or(ProgramError::NotLoaded)
            .and_then(<&mut aya::programs::TracePoint>::try_from)
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
        let mut out = vec![(feature, kfree)];
        let (prog, tp, feature) = crate::datapath::drops::UDP_FAIL;
        let udp = self
            .ebpf
            .program_mut(prog)
            .ok_or(ProgramError::NotLoaded)
            .and_then(<&mut aya::programs::RawTracePoint>::try_from)
            .and_then(|p| {
                p.load()?;
                p.attach(tp).map(|_| ())
            })
            .map_err(|source| DatapathError::Attach {
                iface: format!("raw tracepoint {tp}"),
                dir: prog,
                source,
            });
        out.push((feature, udp));
        Ok(out)
    }

    pub fn crypto_attached(&self) -> bool {
        self.crypto_attached
    }

    /// Loads and attaches the kprobes that time kernel WireGuard's crypto, after writing
    /// the structure offsets they follow. All four or none: a half-attached pair would
    /// leave start times that never end.
    pub fn attach_crypto(&mut self, cfg: CryptoConfig) -> Result<(), DatapathError> {
        if self.crypto_attached {
            return Ok(());
        }
        self.crypto_cfg
            .set(0, cfg, 0)
            .map_err(|source| DatapathError::Map {
                map: names::CRYPTO_CFG,
                source,
            })?;
        let mut done: Vec<(&'static str, aya::programs::kprobe::KProbeLinkId)> = Vec::new();
        let mut result = Ok(());
        'probes: for (func, enter, exit) in crate::datapath::crypto::PROBES {
            for name in [enter, exit] {
                let attached = self
                    .ebpf
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
                if let Some(p) = self.ebpf.program_mut(name)
                    && let Ok(p) = <&mut KProbe>::try_from(p)
                {
                    let _ = p.detach(id);
                }
            }
            return result;
        }
        self.crypto_attached = true;
        info!("timing kernel WireGuard encryption and decryption with kprobes");
        Ok(())
    }

    /// The crypto duration histogram, summed over CPUs.
    pub fn crypto_hist(&self) -> Result<Vec<(HistKey, HistValue)>, DatapathError> {
        sum_hist(&self.crypto_hist, names::CRYPTO_HIST)
    }

    /// The handshake round-trip histogram, summed over CPUs.
    pub fn handshake_rtt(&self) -> Result<Vec<(PeerHistKey, HistValue)>, DatapathError> {
        sum_hist(&self.handshake_rtt, names::HANDSHAKE_RTT)
    }

    /// Gaps and late messages (`kind` is `seq::GAPS` / `seq::LATE`, `packets` the count).
    pub fn rx_seq(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.rx_seq, names::RX_SEQ)
    }

    /// Handshake timeouts so far, per (ifindex, peer).
    pub fn handshake_timeouts(&self) -> StdHashMap<(u32, u32), u64> {
        self.handshake_timeouts.clone()
    }

    /// The initiations waiting for a response (for tests and the status of the maps).
    pub fn pending_handshakes(&self) -> Vec<(IndexKey, PendingHandshake)> {
        self.handshake_pending.iter().flatten().collect()
    }

    /// The receiving sessions tracked.
    pub fn rx_sessions(&self) -> Vec<(IndexKey, RxSession)> {
        self.rx_sessions.iter().flatten().collect()
    }

    /// Run on every sync tick with `now_ns` = [`crate::datapath::health::monotonic_ns`]: initiations
    /// unanswered for 5 s become timeouts (counted only when this delete wins against the
    /// programs' own, see [`crate::datapath::health::expired_handshakes`]) and sessions idle for 180 s
    /// are dropped, so both maps stay bounded. Returns (timeouts counted, sessions dropped).
    pub fn expire_wire_state(&mut self, now_ns: u64) -> (u64, u64) {
        let pending = self.pending_handshakes();
        // A peer we initiate to has a timeout series from its first initiation on, at 0.
        for (k, p) in &pending {
            self.handshake_timeouts
                .entry((k.ifindex, p.peer))
                .or_default();
        }
        let expired = crate::datapath::health::expired_handshakes(pending, now_ns);
        let mut timeouts = 0;
        for (k, p) in expired {
            if self.handshake_pending.remove(&k).is_ok() {
                *self
                    .handshake_timeouts
                    .entry((k.ifindex, p.peer))
                    .or_default() += 1;
                timeouts += 1;
            }
        }
        let idle = crate::datapath::health::idle_sessions(self.rx_sessions(), now_ns);
        let mut dropped = 0;
        for k in idle {
            if self.rx_sessions.remove(&k).is_ok() {
                dropped += 1;
            }
        }
        (timeouts, dropped)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.counters, names::COUNTERS)
    }

    pub fn unknown_wire(&self) -> Result<Vec<(UnknownWireKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.unknown_wire, names::UNKNOWN_WIRE)
    }

    /// Updates the kernel refused, per map name.
    pub fn map_update_errors(&self) -> Vec<(&'static str, u64)> {
        [
            (map_error::COUNTERS, names::COUNTERS),
            (map_error::UNKNOWN_WIRE, names::UNKNOWN_WIRE),
            (map_error::CRYPTO_START, names::CRYPTO_START),
            (map_error::CRYPTO_HIST, names::CRYPTO_HIST),
            (map_error::HANDSHAKE_PENDING, names::HANDSHAKE_PENDING),
            (map_error::HANDSHAKE_RTT, names::HANDSHAKE_RTT),
            (map_error::RX_SESSIONS, names::RX_SESSIONS),
            (map_error::RX_SEQ, names::RX_SEQ),
        ]
        .into_iter()
        .map(|(idx, name)| (name, refused(&self.map_errors, idx)))
        .chain(self.path.map_update_errors())
        .chain(self.leak.update_errors())
        .chain(self.transit.update_errors())
        .chain(self.drops.update_errors())
        .collect()
    }

    /// (map name, entries, capacity) for every map.
    pub fn map_usage(&self) -> Vec<(&'static str, u64, u64)> {
        use agent_common::maps::*;
        vec![
            (
                names::IFACES,
                self.ifaces.keys().count() as u64,
                MAX_IFACES as u64,
            ),
            (
                names::ALLOWED_V4,
                self.applied.allowed_v4.len() as u64,
                MAX_ALLOWED_IPS as u64,
            ),
            (
                names::ALLOWED_V6,
                self.applied.allowed_v6.len() as u64,
                MAX_ALLOWED_IPS as u64,
            ),
            (
                names::ENDPOINTS,
                self.applied.endpoints.len() as u64,
                MAX_ENDPOINTS as u64,
            ),
            (
                names::WG_PORTS,
                self.applied.wg_ports.len() as u64,
                MAX_WG_PORTS as u64,
            ),
            (
                names::COUNTERS,
                self.counters.keys().count() as u64,
                MAX_COUNTERS as u64,
            ),
            (
                names::UNKNOWN_WIRE,
                self.unknown_wire.keys().count() as u64,
                MAX_UNKNOWN_WIRE as u64,
            ),
            (names::PEER_IDS, self.peer_ids_len, MAX_PEER_IDS as u64),
            (
                names::CRYPTO_HIST,
                self.crypto_hist.keys().count() as u64,
                MAX_CRYPTO_HIST as u64,
            ),
            (
                names::HANDSHAKE_PENDING,
                self.handshake_pending.keys().count() as u64,
                MAX_HANDSHAKE_PENDING as u64,
            ),
            (
                names::HANDSHAKE_RTT,
                self.handshake_rtt.keys().count() as u64,
                MAX_HANDSHAKE_RTT as u64,
            ),
            (
                names::RX_SESSIONS,
                self.rx_sessions.keys().count() as u64,
                MAX_RX_SESSIONS as u64,
            ),
            (
                names::RX_SEQ,
                self.rx_seq.keys().count() as u64,
                MAX_RX_SEQ as u64,
            ),
        ]
        .into_iter()
        .chain(self.path.map_usage())
        .chain(self.leak.usage())
        .chain(self.transit.usage())
        .chain(self.drops.usage())
        .collect()
    }

    /// The peer ids given by this agent or, through the pinned map, by the one before it:
    /// (interface name, public key, id). The sync hands them out again, so a restarted agent
    /// continues each peer's counters under the same id.
    pub fn saved_peer_ids(&mut self) -> Vec<(String, [u8; 32], u32)> {
        let saved: Vec<_> = self
            .peer_ids
            .iter()
            .flatten()
            .map(|(k, id)| {
                let len = k
                    .ifname
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(k.ifname.len());
                (
                    String::from_utf8_lossy(&k.ifname[..len]).into_owned(),
                    k.public_key,
                    id,
                )
            })
            .collect();
        self.peer_ids_len = saved.len() as u64;
        saved
    }

    /// Saves newly given peer ids (see [`Datapath::saved_peer_ids`]); tries every one and
    /// returns the first refusal (a full map: the id still holds for this agent's life).
    pub fn save_peer_ids(&mut self, ids: &[(String, [u8; 32], u32)]) -> Result<(), DatapathError> {
        let mut first = Ok(());
        for (iface, key, id) in ids {
            let mut ifname = [0u8; 16];
            let n = iface.len().min(ifname.len());
            ifname[..n].copy_from_slice(&iface.as_bytes()[..n]);
            let k = PeerIdKey {
                ifname,
                public_key: *key,
            };
            match self.peer_ids.insert(k, *id, 0) {
                Ok(()) => self.peer_ids_len += 1,
                Err(source) if first.is_ok() => {
                    first = Err(DatapathError::Map {
                        map: names::PEER_IDS,
                        source,
                    });
                }
                Err(_) => {}
            }
        }
        first
    }

    /// (program name, run count, run time) from the kernel's statistics; zero unless
    /// `kernel.bpf_stats_enabled` is on.
    pub fn run_stats(&self) -> Vec<(&'static str, u64, std::time::Duration)> {
        [PROG_INGRESS, PROG_EGRESS]
            .into_iter()
            .filter_map(|name| {
                let prog: &SchedClassifier = self.ebpf.program(name)?.try_into().ok()?;
                let info = prog.info().ok()?;
                Some((name, info.run_count(), info.run_time()))
            })
            .collect()
    }
}

/// Makes `applied` (what the kernel map holds) equal to `want` through `write`, which
/// inserts `Some(value)` or removes on `None`; returns the first refusal after trying every
/// entry.
fn apply<K: Eq + Hash + Clone, V: PartialEq + Clone>(
    applied: &mut StdHashMap<K, V>,
    want: &StdHashMap<K, V>,
    mut write: impl FnMut(&K, Option<&V>) -> Result<(), MapError>,
) -> Result<(), MapError> {
    let stale: Vec<K> = applied
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for k in stale {
        // Already gone (never inserted, or removed by someone) is what we wanted.
        let _ = write(&k, None);
        applied.remove(&k);
    }
    let mut first_err = None;
    for (k, v) in want {
        if applied.get(k) == Some(v) {
            continue;
        }
        match write(k, Some(v)) {
            Ok(()) => {
                applied.insert(k.clone(), v.clone());
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn lpm_v4(&(ifindex, addr, plen): &(u32, [u8; 4], u8)) -> Key<AllowedV4> {
    Key::new(
        32 + plen as u32,
        AllowedV4 {
            ifindex_be: ifindex.to_be(),
            addr,
        },
    )
}

fn lpm_v6(&(ifindex, addr, plen): &(u32, [u8; 16], u8)) -> Key<AllowedV6> {
    Key::new(
        32 + plen as u32,
        AllowedV6 {
            ifindex_be: ifindex.to_be(),
            addr,
        },
    )
}

/// Updates the kernel refused, as the programs count them in slot `idx` of a per-CPU
/// error array, summed over CPUs.
pub(crate) fn refused(errors: &PerCpuArray<MapData, u64>, idx: u32) -> u64 {
    errors.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// A per-CPU histogram map, summed over CPUs.
pub(crate) fn sum_hist<K: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, HistValue>,
    name: &'static str,
) -> Result<Vec<(K, HistValue)>, DatapathError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (k, per_cpu) = item.map_err(|source| DatapathError::Map { map: name, source })?;
        let mut sum = HistValue::default();
        for v in per_cpu.iter() {
            sum.count += v.count;
            sum.sum_ns += v.sum_ns;
        }
        out.push((k, sum));
    }
    Ok(out)
}

pub(crate) fn sum_per_cpu<K: aya::Pod>(
    map: &PerCpuHashMap<MapData, K, Counter>,
    name: &'static str,
) -> Result<Vec<(K, Counter)>, DatapathError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (k, per_cpu) = item.map_err(|source| DatapathError::Map { map: name, source })?;
        let mut sum = Counter::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
        }
        out.push((k, sum));
    }
    Ok(out)
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

/// The maps of the path-MTU signals (agent-ebpf frag.rs and icmp.rs): fragments per layer,
/// ICMP too-big messages and the MTUs they reported, and the endpoint addresses (any port)
/// that make a fragment `outer`.
pub struct PathMaps {
    fragments: PerCpuHashMap<MapData, CounterKey, Counter>,
    icmp_too_big: PerCpuHashMap<MapData, CounterKey, Counter>,
    icmp_mtu: HashMap<MapData, agent_common::maps::path::MtuKey, u64>,
    endpoint_addrs: HashMap<MapData, Endpoint, u8>,
    errors: PerCpuArray<MapData, u64>,
    applied_addrs: StdHashMap<Endpoint, u8>,
}

impl PathMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        use agent_common::maps::path;
        Ok(Self {
            fragments: take(ebpf, path::FRAGMENTS)?,
            icmp_too_big: take(ebpf, path::ICMP_TOO_BIG)?,
            icmp_mtu: take(ebpf, path::ICMP_MTU)?,
            endpoint_addrs: take(ebpf, path::ENDPOINT_ADDRS)?,
            errors: take(ebpf, path::PATH_ERRORS)?,
            applied_addrs: StdHashMap::new(),
        })
    }

    /// The endpoints' addresses with port 0: a fragment to or from one is `outer`.
    fn sync_endpoint_addrs(
        &mut self,
        endpoints: &StdHashMap<Endpoint, u32>,
    ) -> Result<(), DatapathError> {
        let want: StdHashMap<Endpoint, u8> = endpoints
            .keys()
            .map(|e| (Endpoint { port: 0, ..*e }, 1))
            .collect();
        let map = &mut self.endpoint_addrs;
        apply(&mut self.applied_addrs, &want, |k, v| match v {
            Some(v) => map.insert(k, v, 0),
            None => map.remove(k),
        })
        .map_err(|source| DatapathError::Map {
            map: agent_common::maps::path::ENDPOINT_ADDRS,
            source,
        })
    }

    /// Fragments per (ifindex, 0, layer, direction), summed over CPUs.
    pub fn fragments(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.fragments, agent_common::maps::path::FRAGMENTS)
    }

    /// ICMP too-big messages per (ifindex, 0, family, rx), summed over CPUs.
    pub fn icmp_too_big(&self) -> Result<Vec<(CounterKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.icmp_too_big, agent_common::maps::path::ICMP_TOO_BIG)
    }

    /// (ifindex, MTU) -> monotonic time (ns) of the latest report of that MTU.
    pub fn icmp_mtus(&self) -> Vec<(agent_common::maps::path::MtuKey, u64)> {
        self.icmp_mtu.iter().flatten().collect()
    }

    /// Lowest MTU per ifindex among those reported at or after `now_ns - MTU_WINDOW_NS`.
    pub fn lowest_mtus(&self, now_ns: u64) -> StdHashMap<u32, u32> {
        lowest_mtus(self.icmp_mtus(), now_ns)
    }

    /// Removes the MTUs not reported within the window; run on every sync tick, so the map
    /// stays bounded. Returns how many went. (A report of the same MTU racing this delete
    /// can be lost; the next report brings it back.)
    pub fn expire(&mut self, now_ns: u64) -> u64 {
        let cutoff = now_ns.saturating_sub(agent_common::maps::path::MTU_WINDOW_NS);
        let old: Vec<_> = self
            .icmp_mtus()
            .into_iter()
            .filter(|(_, t)| *t < cutoff)
            .map(|(k, _)| k)
            .collect();
        old.into_iter()
            .filter(|k| self.icmp_mtu.remove(k).is_ok())
            .count() as u64
    }

    fn map_update_errors(&self) -> Vec<(&'static str, u64)> {
        use agent_common::maps::path::{self, error};
        [
            (error::FRAGMENTS, path::FRAGMENTS),
            (error::ICMP_TOO_BIG, path::ICMP_TOO_BIG),
            (error::ICMP_MTU, path::ICMP_MTU),
        ]
        .into_iter()
        .map(|(idx, name)| (name, refused(&self.errors, idx)))
        .collect()
    }

    fn map_usage(&self) -> Vec<(&'static str, u64, u64)> {
        use agent_common::maps::path::*;
        vec![
            (
                FRAGMENTS,
                self.fragments.keys().count() as u64,
                MAX_FRAGMENTS as u64,
            ),
            (
                ICMP_TOO_BIG,
                self.icmp_too_big.keys().count() as u64,
                MAX_ICMP_TOO_BIG as u64,
            ),
            (
                ICMP_MTU,
                self.icmp_mtu.keys().count() as u64,
                MAX_ICMP_MTU as u64,
            ),
            (
                ENDPOINT_ADDRS,
                self.applied_addrs.len() as u64,
                MAX_ENDPOINT_ADDRS as u64,
            ),
        ]
    }
}

/// The lowest MTU per ifindex reported at or after `now_ns - MTU_WINDOW_NS`.
pub fn lowest_mtus(
    reports: impl IntoIterator<Item = (agent_common::maps::path::MtuKey, u64)>,
    now_ns: u64,
) -> StdHashMap<u32, u32> {
    let cutoff = now_ns.saturating_sub(agent_common::maps::path::MTU_WINDOW_NS);
    let mut out: StdHashMap<u32, u32> = StdHashMap::new();
    for (k, t) in reports {
        if t < cutoff {
            continue;
        }
        let m = out.entry(k.ifindex).or_insert(k.mtu);
        *m = (*m).min(k.mtu);
    }
    out
}

impl Datapath {
    /// Fragments and ICMP too-big.
    pub fn path(&self) -> &PathMaps {
        &self.path
    }

    /// Run on every sync tick: drops reported MTUs older than the 10-minute window.
    pub fn expire_path_state(&mut self, now_ns: u64) -> u64 {
        self.path.expire(now_ns)
    }
}

/// The leak-detection maps (`agent_common::maps::leak`): the "tunnel up" time, the
/// `--leak-allow` CIDRs, and the counts.
pub struct LeakMaps {
    cfg: Array<MapData, agent_common::maps::leak::LeakConfig>,
    allow_v4: LpmTrie<MapData, agent_common::maps::leak::AllowV4, u8>,
    allow_v6: LpmTrie<MapData, agent_common::maps::leak::AllowV6, u8>,
    leaks: PerCpuHashMap<MapData, agent_common::maps::leak::LeakKey, Counter>,
    errors: PerCpuArray<MapData, u64>,
    /// Holds `wirescope_leak` for wirescope_egress's tail call (kept open: the kernel
    /// empties a program array when the last user-space reference to it goes).
    _prog: aya::maps::ProgramArray<MapData>,
    /// Allowed CIDRs written, per family.
    allowed: (usize, usize),
}

impl LeakMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        use agent_common::maps::leak as l;
        let prog = tail_program(ebpf, l::LEAK_PROG, l::PROG)?;
        Ok(Self {
            _prog: prog,
            cfg: take(ebpf, l::LEAK_CFG)?,
            allow_v4: take(ebpf, l::LEAK_ALLOW_V4)?,
            allow_v6: take(ebpf, l::LEAK_ALLOW_V6)?,
            leaks: take(ebpf, l::LEAKS)?,
            errors: take(ebpf, l::LEAK_ERRORS)?,
            allowed: (0, 0),
        })
    }

    /// Packets leaving an underlay count as leaks until `until_ns` (bpf_ktime_get_ns, i.e.
    /// CLOCK_MONOTONIC); 0 turns leak detection off.
    pub fn set_tunnel_up_until(&mut self, until_ns: u64) -> Result<(), DatapathError> {
        let v = agent_common::maps::leak::LeakConfig {
            tunnel_up_until_ns: until_ns,
        };
        self.cfg.set(0, v, 0).map_err(|source| DatapathError::Map {
            map: agent_common::maps::leak::LEAK_CFG,
            source,
        })
    }

    /// Writes the `--leak-allow` CIDRs (once, at start).
    pub fn set_allowed(&mut self, nets: &[ipnet::IpNet]) -> Result<(), DatapathError> {
        use agent_common::maps::leak::{AllowV4, AllowV6, LEAK_ALLOW_V4, LEAK_ALLOW_V6};
        for net in nets {
            match net.trunc() {
                ipnet::IpNet::V4(n) => {
                    let key = Key::new(
                        n.prefix_len() as u32,
                        AllowV4 {
                            addr: n.addr().octets(),
                        },
                    );
                    self.allow_v4
                        .insert(&key, 1, 0)
                        .map_err(|source| DatapathError::Map {
                            map: LEAK_ALLOW_V4,
                            source,
                        })?;
                    self.allowed.0 += 1;
                }
                ipnet::IpNet::V6(n) => {
                    let key = Key::new(
                        n.prefix_len() as u32,
                        AllowV6 {
                            addr: n.addr().octets(),
                        },
                    );
                    self.allow_v6
                        .insert(&key, 1, 0)
                        .map_err(|source| DatapathError::Map {
                            map: LEAK_ALLOW_V6,
                            source,
                        })?;
                    self.allowed.1 += 1;
                }
            }
        }
        Ok(())
    }

    /// Leaks per (ifindex, kind), summed over CPUs.
    pub fn leaks(
        &self,
    ) -> Result<Vec<(agent_common::maps::leak::LeakKey, Counter)>, DatapathError> {
        sum_per_cpu(&self.leaks, agent_common::maps::leak::LEAKS)
    }

    /// (map name, entries, capacity).
    pub fn usage(&self) -> Vec<(&'static str, u64, u64)> {
        use agent_common::maps::leak::*;
        vec![
            (LEAK_ALLOW_V4, self.allowed.0 as u64, MAX_LEAK_ALLOW as u64),
            (LEAK_ALLOW_V6, self.allowed.1 as u64, MAX_LEAK_ALLOW as u64),
            (LEAKS, self.leaks.keys().count() as u64, MAX_LEAKS as u64),
        ]
    }

    /// Updates the kernel refused, per map name.
    pub fn update_errors(&self) -> Vec<(&'static str, u64)> {
        use agent_common::maps::leak::{LEAKS, error};
        vec![(LEAKS, refused(&self.errors, error::LEAKS))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake kernel map that refuses inserts past `cap` entries, like a full BPF map.
    fn run(
        kernel: &mut StdHashMap<u32, u32>,
        cap: usize,
        applied: &mut StdHashMap<u32, u32>,
        want: &StdHashMap<u32, u32>,
    ) -> bool {
        apply(applied, want, |k, v| match v {
            Some(v) if kernel.len() >= cap && !kernel.contains_key(k) => {
                let _ = v;
                Err(MapError::OutOfBounds {
                    index: *k,
                    max_entries: cap as u32,
                })
            }
            Some(v) => {
                kernel.insert(*k, *v);
                Ok(())
            }
            None => {
                kernel.remove(k);
                Ok(())
            }
        })
        .is_ok()
    }

    #[test]
    fn stale_entries_go_first_and_refusals_are_retried() {
        let mut kernel = StdHashMap::new();
        let mut applied = StdHashMap::new();
        let first: StdHashMap<u32, u32> = [(1, 10), (2, 20)].into();
        assert!(run(&mut kernel, 2, &mut applied, &first));
        assert_eq!(kernel, first);
        // Replacing both entries fits only because the stale ones are removed first.
        let second: StdHashMap<u32, u32> = [(3, 30), (4, 40)].into();
        assert!(run(&mut kernel, 2, &mut applied, &second));
        assert_eq!(kernel, second);
        // One more than fits: an error, what fitted is in, and `applied` says exactly that.
        let third: StdHashMap<u32, u32> = [(3, 31), (4, 40), (5, 50)].into();
        assert!(!run(&mut kernel, 2, &mut applied, &third));
        assert_eq!(
            kernel.get(&3),
            Some(&31),
            "a changed value is still written"
        );
        assert_eq!(
            applied, kernel,
            "only what the kernel holds counts as applied"
        );
        // Room again: the refused entry goes in on the next sync.
        assert!(run(&mut kernel, 3, &mut applied, &third));
        assert_eq!(kernel, third);
    }
}
