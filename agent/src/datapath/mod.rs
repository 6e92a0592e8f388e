//! The eBPF side as the agent holds it: the loaded programs, their attachments, and one
//! module per feature with typed handles on its maps, named as in agent-ebpf and
//! agent-common: [`tunnel`], [`wire`], [`health`], [`transit`], [`path`], [`leak`],
//! [`obfuscation`], [`drops`], [`crypto`]. Each feature's maps implement [`FeatureMaps`], through which the
//! agent reports every map's usage and refused updates; [`maps`] holds what they share (the
//! per-CPU folds, map diffing). [`attach`] hooks the TC programs, [`pin`] keeps the counting
//! maps across restarts, [`hooks`] keeps the programs hooked while no agent runs,
//! [`features`] tells which optional hooks this kernel offers.

use std::{collections::HashMap as StdHashMap, sync::Arc};

use agent_common::maps::{
    IfaceConfig, MAX_IFACES,
    crypto::CryptoConfig,
    names,
    obfuscation::{ObfsEndpoint, ObfsTarget},
    wire::Endpoint,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::SchedClassifier,
};
use log::{info, warn};

pub mod attach;
#[doc(hidden)] // pub for the datapath tier's comparison with aya's iterators
pub mod batch;
pub mod crypto;
pub mod drops;
mod error;
pub mod features;
pub mod health;
pub mod hooks;
pub mod leak;
pub mod maps;
pub mod obfuscation;
pub mod path;
pub mod pin;
pub mod transit;
pub mod tunnel;
pub mod wire;

pub use attach::{AttachMode, Attachment};
pub use error::DatapathError;
pub use maps::{FeatureMaps, MapUsage};

use maps::{Entries, ErrorSlots, take};

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

/// What the maps should hold, computed from the inventory by the sync loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMaps {
    /// (ifindex, address, prefix length) -> peer id.
    pub allowed_v4: StdHashMap<(u32, [u8; 4], u8), u32>,
    pub allowed_v6: StdHashMap<(u32, [u8; 16], u8), u32>,
    pub endpoints: StdHashMap<Endpoint, u32>,
    /// Listen ports of the local interfaces (the value is unused by the programs).
    pub wg_ports: StdHashMap<u16, u8>,
    /// Remote obfuscation endpoints -> the peer whose WireGuard each carries.
    pub obfuscation: StdHashMap<ObfsEndpoint, ObfsTarget>,
}

/// An optional program's feature label and whether it attached.
pub type AttachOutcome = (&'static str, Result<(), DatapathError>);

pub struct Datapath {
    ebpf: Ebpf,
    /// Each watched interface's role and framing, read by the programs first.
    ifaces: HashMap<MapData, u32, IfaceConfig>,
    pub tunnel: tunnel::TunnelMaps,
    pub wire: wire::WireMaps,
    pub health: health::HealthMaps,
    pub crypto: crypto::CryptoMaps,
    pub path: path::PathMaps,
    pub leak: leak::LeakMaps,
    pub obfuscation: obfuscation::ObfuscationMaps,
    pub transit: transit::TransitMaps,
    pub drops: drops::DropsMaps,
    attachments: StdHashMap<u32, Attachment>,
    /// Set once TCX proved unsupported, so later attaches go straight to clsact.
    tcx_unsupported: bool,
    /// Where the TCX links and tail-call arrays are pinned; None without pinning.
    hooks: Option<hooks::Hooks>,
    /// `MAP_ERRORS`, shared by several features' maps; held here to be zeroed by
    /// [`Datapath::reset`].
    map_errors: Arc<ErrorSlots>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
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
        let mut pin_dir = None;
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
                pin_dir = Some(dir.path);
                object
            }
            Some(Err(e)) => {
                warn!("{}", pin::not_pinned_warning(&e));
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
        let hooks = pin_dir.and_then(|d| pin_hooks(&ebpf, &d));
        // One error array for the maps of several features (agent_common::maps::map_error).
        let errors = ErrorSlots::take(&mut ebpf, names::MAP_ERRORS)?;
        Ok(Self {
            ifaces: take(&mut ebpf, names::IFACES)?,
            tunnel: tunnel::TunnelMaps::take(&mut ebpf, Arc::clone(&errors))?,
            wire: wire::WireMaps::take(&mut ebpf, Arc::clone(&errors))?,
            health: health::HealthMaps::take(&mut ebpf, Arc::clone(&errors))?,
            crypto: crypto::CryptoMaps::take(&mut ebpf, Arc::clone(&errors))?,
            path: path::PathMaps::take(&mut ebpf)?,
            leak: leak::LeakMaps::take(&mut ebpf)?,
            obfuscation: obfuscation::ObfuscationMaps::take(&mut ebpf)?,
            transit: transit::TransitMaps::take(&mut ebpf)?,
            drops: drops::DropsMaps::take(&mut ebpf)?,
            ebpf,
            attachments: StdHashMap::new(),
            tcx_unsupported: false,
            hooks,
            map_errors: errors,
        })
    }

    /// Back to the state of a fresh load, the verified programs kept: every interface
    /// detached as at a clean stop ([`Datapath::detach_all`]), every map emptied or zeroed
    /// and what the agent keeps about the maps forgotten; the tail-call arrays stay, and so
    /// do attached tracepoints and kprobes with their configuration. For harnesses that run
    /// many tests against one load (loading verifies some 300k instructions, seconds under
    /// emulation); the agent itself never resets.
    pub fn reset(&mut self) -> Result<(), DatapathError> {
        self.detach_all();
        maps::Clear::clear(&mut self.ifaces, names::IFACES)?;
        self.map_errors.clear(names::MAP_ERRORS)?;
        let features = self.features_mut();
        for f in features {
            f.clear()?;
        }
        Ok(())
    }

    /// Removes what earlier agents left in the hooks directory and this one did not take
    /// over ([`hooks::Hooks::sweep`]); call after the first sync has attached everything.
    pub fn sweep_stale_hooks(&self) {
        if let Some(h) = &self.hooks {
            let keep = self
                .attachments
                .values()
                .flat_map(|a| a.link_pins().cloned())
                .collect();
            h.sweep(&keep);
        }
    }

    /// A clean stop: detaches every interface (removing the link pins) and removes the
    /// tail-call arrays' pins, so nothing of the agent keeps running; the counting maps stay
    /// pinned.
    pub fn detach_all(&mut self) {
        let attached: Vec<u32> = self.attachments.keys().copied().collect();
        for i in attached {
            self.detach(i);
        }
        if let Some(h) = &mut self.hooks {
            h.unpin_tails();
        }
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

    /// Bring the peer maps to `want`, touching only entries that changed. Stale entries go
    /// first, so a nearly full map makes room; an entry the kernel refuses (map full) is
    /// retried on the next sync and reported, and never stops the other maps' updates.
    pub fn sync_peers(&mut self, want: &PeerMaps) -> Result<(), DatapathError> {
        let tunnel = self.tunnel.sync(want);
        let wire = self.wire.sync(want);
        // An obfuscation flow's relay is a WireGuard relay too: fragments of the flow are
        // `outer`, and ICMP to it no leak, as for an endpoint's address.
        let relays: Vec<Endpoint> = want
            .obfuscation
            .keys()
            .map(|o| Endpoint {
                addr: o.addr,
                port: 0,
                family: o.family,
                _pad: 0,
            })
            .collect();
        let addrs = self
            .path
            .sync_endpoint_addrs(want.endpoints.keys().chain(&relays));
        let obfuscation = self.obfuscation.sync(&want.obfuscation);
        tunnel
            .into_iter()
            .chain(wire)
            .chain([addrs, obfuscation])
            .collect()
    }

    /// Removes every map entry of the peers `peers` (interface, public key, id; `ids` their
    /// ids), for the sync loop forgetting peers gone for longer than `--peer-grace`: each
    /// feature's ([`FeatureMaps::forget_peers`]), then their pinned ids, last, so that an
    /// interrupted removal leaves them known to a restarted agent and is done again then.
    /// `PEER_UNKNOWN` is never forgotten. Returns how many entries went.
    pub fn forget_peers(
        &mut self,
        ids: &std::collections::HashSet<u32>,
        peers: &[(String, [u8; 32], u32)],
    ) -> Result<u64, DatapathError> {
        let mut ids = ids.clone();
        ids.remove(&agent_common::maps::PEER_UNKNOWN);
        let peers: Vec<_> = peers
            .iter()
            .filter(|p| p.2 != agent_common::maps::PEER_UNKNOWN)
            .cloned()
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let features = self.features_mut();
        let mut n = 0;
        for f in features {
            n += f.forget_peers(&ids)?;
        }
        Ok(n + self.tunnel.forget_peer_ids(&peers)?)
    }

    /// Attaches the drop programs ([`drops::DropsMaps::attach`]).
    pub fn attach_drops(
        &mut self,
        cfg: agent_common::maps::drops::DropsConfig,
    ) -> Result<Vec<AttachOutcome>, DatapathError> {
        self.drops.attach(&mut self.ebpf, cfg)
    }

    /// Attaches the crypto kprobes ([`crypto::CryptoMaps::attach`]).
    pub fn attach_crypto(&mut self, cfg: CryptoConfig) -> Result<(), DatapathError> {
        self.crypto.attach(&mut self.ebpf, cfg)
    }

    /// Every feature's maps, for the lists below.
    fn features(&self) -> [&dyn FeatureMaps; 9] {
        [
            &self.tunnel,
            &self.wire,
            &self.health,
            &self.crypto,
            &self.path,
            &self.leak,
            &self.obfuscation,
            &self.transit,
            &self.drops,
        ]
    }

    /// [`Datapath::features`], to clear or prune them.
    fn features_mut(&mut self) -> [&mut dyn FeatureMaps; 9] {
        [
            &mut self.tunnel,
            &mut self.wire,
            &mut self.health,
            &mut self.crypto,
            &mut self.path,
            &mut self.leak,
            &mut self.obfuscation,
            &mut self.transit,
            &mut self.drops,
        ]
    }

    /// Updates the kernel refused, per map name.
    pub fn map_update_errors(&self) -> Vec<(&'static str, u64)> {
        self.features()
            .iter()
            .flat_map(|f| f.update_errors())
            .collect()
    }

    /// (map name, entries, capacity) for every map.
    pub fn map_usage(&self) -> Vec<MapUsage> {
        let ifaces = (names::IFACES, self.ifaces.entries(), MAX_IFACES as u64);
        std::iter::once(ifaces)
            .chain(self.features().iter().flat_map(|f| f.usage()))
            .collect()
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

/// Opens the hooks directory in `pin_dir` and pins the tail-call arrays there; None (with a
/// warning) when that fails: the agent then works as without pinned hooks.
fn pin_hooks(ebpf: &Ebpf, pin_dir: &std::path::Path) -> Option<hooks::Hooks> {
    let mut h = match hooks::Hooks::open(pin_dir) {
        Ok(h) => h,
        Err(e) => {
            warn!(
                "TC hooks not pinned ({e}): a killed agent's programs stop counting until it is back"
            );
            return None;
        }
    };
    for array in [
        agent_common::maps::transit::TRANSIT_PROG,
        agent_common::maps::leak::LEAK_PROG,
    ] {
        if let Err(e) = h.pin_tail_array(ebpf, array) {
            warn!(
                "{e}: while no agent runs, the programs left counting skip {}",
                if array == agent_common::maps::leak::LEAK_PROG {
                    "leaks"
                } else {
                    "transit times"
                }
            );
        }
    }
    info!("TC hooks pinned in {}", h.dir().display());
    Some(h)
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
