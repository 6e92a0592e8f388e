//! `wirescope run`: load and attach, sync every second (less often with many peers), serve until SIGINT/SIGTERM, detach.
//!
//! This file only wires the layers together, in the order a start needs: the datapath
//! (loaded, drop tracepoints attached), the model (first sync before serving, so the first
//! scrape already sees the tunnels), the probes and the Mullvad poller, the collectors over
//! all of them, then the server and the background tasks until a signal.

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use log::{error, info, warn};
use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
    task::JoinHandle,
};

use crate::{
    EBPF_OBJECT,
    config::RunConfig,
    datapath::{Datapath, LoadOptions, Pinning, drops::DropReasons, features::Features},
    metrics::{
        self, Format, agent::AgentCollector, crypto::CryptoCollector, drops::DropsCollector,
        failover::FailoverCollector, health::HealthCollector, leak::LeakCollector,
        mullvad::MullvadCollector, obfuscation::ObfuscationCollector, path::PathCollector,
        peers::PeerCollector, probe::ProbeCollector, process::ProcessCollector,
        transit::TransitCollector, tunnel::TunnelCollector,
    },
    probes::{
        failover::{self, Failover, FailoverTask, Outcomes},
        icmp::{self, ExtraTargets, ProbeStats},
        pmtu::{self, PmtuState, PmtuTask},
    },
    serve::status,
    serve::{self, HttpConfig, HttpSource},
    sources::{mullvad::MullvadState, netlink::Netlink},
    sync::{SyncOptions, Syncer, inventory::Inventory, peer_label::EndpointLabeler},
};

/// How often the sync loop wakes: it expires what the programs leave in the kernel every
/// time, and syncs interfaces, peers and maps every [`Syncer::period`] (a whole number of
/// these; changes show within two periods).
const TICK: Duration = Duration::from_secs(1);

/// Everything the HTTP endpoints read.
struct Agent {
    registry: Registry,
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
    tunnel_collector: Arc<TunnelCollector>,
    drops_collector: Arc<crate::metrics::drops::DropsCollector>,
    /// What the status shows beyond the counters (issue 9).
    health: Arc<HealthCollector>,
    transit: Arc<TransitCollector>,
    leaks: Arc<crate::metrics::leak::LeakCollector>,
    obfuscation: Arc<ObfuscationCollector>,
    path: Arc<crate::metrics::path::PathCollector>,
    probe_stats: Arc<crate::probes::icmp::ProbeStats>,
    pmtu_state: Arc<crate::probes::pmtu::PmtuState>,
    failover_state: Arc<Mutex<crate::probes::failover::Failover>>,
    mullvad_state: Arc<RwLock<crate::sources::mullvad::MullvadState>>,
    labeler: EndpointLabeler,
    export_endpoints: bool,
    /// How many interfaces had programs attached when /healthz last found the datapath free.
    attached: AtomicUsize,
    /// The last sync's error and whether one completed, as /healthz last found the
    /// inventory.
    synced: Mutex<(Option<String>, bool)>,
}

impl HttpSource for Agent {
    fn metrics(&self, format: Format, out: &mut dyn std::fmt::Write) -> Result<(), String> {
        let own: [&dyn metrics::family_text::TextFamilies; 1] = [&*self.transit];
        crate::datapath::maps::scrape::one_scrape(|| {
            metrics::encode_with(&self.registry, &own, format, out)
        })
        .map_err(|e| format!("encoding metrics: {e}"))
    }

    fn health(&self) -> Result<(), String> {
        // A probe must not wait behind a scrape's or a sync's map reads: when the datapath
        // is busy, the count it had the last time it was free answers.
        let attached = match self.datapath.try_lock() {
            Ok(dp) => {
                let n = dp.attachments().count();
                self.attached.store(n, Ordering::Relaxed);
                n
            }
            Err(std::sync::TryLockError::WouldBlock) => self.attached.load(Ordering::Relaxed),
            Err(std::sync::TryLockError::Poisoned(_)) => {
                return Err("datapath lock poisoned".into());
            }
        };
        // Likewise the inventory: a sync waiting to write it queues new readers behind the
        // scrape that is reading it.
        let (last_error, synced) = match self.inventory.try_read() {
            Ok(inv) => {
                let seen = (inv.last_error.clone(), inv.synced_at.is_some());
                if let Ok(mut s) = self.synced.lock() {
                    *s = seen.clone();
                }
                seen
            }
            Err(std::sync::TryLockError::WouldBlock) => self
                .synced
                .lock()
                .map(|s| s.clone())
                .map_err(|_| "health lock poisoned".to_string())?,
            Err(std::sync::TryLockError::Poisoned(_)) => {
                return Err("inventory lock poisoned".into());
            }
        };
        if let Some(e) = last_error {
            return Err(format!("last collection failed: {e}"));
        }
        if !synced {
            return Err("no collection yet".into());
        }
        if attached == 0 {
            return Err("no interface is attached: no WireGuard interface found yet".into());
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let snapshot = self.tunnel_collector.snapshot();
        let drops = self.drops_collector.snapshot();
        let health = self.health();
        let probes = self
            .probe_stats
            .snapshot()
            .into_iter()
            .map(|((target, iface), stats)| {
                let t = crate::config::ProbeTarget {
                    target,
                    iface: (!iface.is_empty()).then(|| iface.clone()),
                };
                status::ProbeEntry {
                    target: Some(target),
                    iface,
                    stats,
                    recent: self.probe_stats.window(&t, status::PROBE_WINDOW),
                }
            })
            .collect();
        let extra = status::Extra {
            health: self.health.snapshot(),
            transit: self.transit.snapshot(),
            probes,
            pmtu: self.pmtu_state.snapshot(),
            leaks: self.leaks.snapshot(),
            obfuscation: self.obfuscation.snapshot(),
            path: self.path.snapshot(),
            path_healthy: self
                .failover_state
                .lock()
                .map(|f| f.states())
                .unwrap_or_default(),
            mullvad: self.mullvad_state.read().ok().map(|m| m.clone()),
            labeler: Some(self.labeler.clone()),
            export_endpoints: self.export_endpoints,
        };
        match self.inventory.read() {
            Ok(inv) => status::build_with(&inv, &snapshot, &drops, health, &extra),
            Err(_) => serde_json::json!({"error": "inventory lock poisoned"}),
        }
    }
}

/// Attaches the drop tracepoints where the kernel allows, recording each outcome in
/// `features`; returns the kernel's drop reason names (empty when unreadable).
fn attach_drops(datapath: &mut Datapath, features: &mut Features) -> Arc<DropReasons> {
    let (cfg, reasons) = match crate::datapath::drops::prepare() {
        Ok(v) => v,
        Err(e) => {
            warn!("kernel drops are not counted: {e}");
            features.attached = vec![
                (crate::datapath::drops::KFREE_SKB.2, false),
                (crate::datapath::drops::UDP_FAIL.2, false),
            ];
            return Arc::new(DropReasons::default());
        }
    };
    match datapath.attach_drops(cfg) {
        Ok(outcomes) => {
            for (feature, r) in outcomes {
                if let Err(e) = &r {
                    warn!("{feature} is not available: {e}");
                } else {
                    info!("attached {feature}");
                }
                features.attached.push((feature, r.is_ok()));
            }
        }
        Err(e) => warn!("kernel drops are not counted: {e}"),
    }
    Arc::new(reasons)
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    // One agent per network namespace: a second one says which agent is already there.
    crate::instance::claim(&cfg.state_dir, cfg.listen_address)?;
    crate::hardening::raise_nofile();
    let mut features = Features::detect();
    log_features(&features);
    let (datapath, reasons) = load_datapath(&cfg, &mut features)?;
    let inventory = Arc::new(RwLock::new(Inventory::default()));
    let endpoints = EndpointLabeler::load(&cfg.state_dir, cfg.export_endpoints)
        .context("preparing the endpoint-label salt")?;
    // Before the first sync: the sync loop reads what the Mullvad poller says.
    let probing = Probing::new(&cfg);
    let mut syncer = first_sync(&cfg, &features, &datapath, &inventory, &probing).await?;
    // Loading parsed the kernel's BTF and the eBPF object (tens of MB, freed by now): hand
    // that memory back to the system instead of keeping it in the allocator's free lists.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    let agent = collectors(
        &cfg,
        features,
        reasons,
        &datapath,
        &inventory,
        &probing,
        endpoints.clone(),
    );

    let server = serve::bind(
        HttpConfig {
            allowed_hosts: cfg.allowed_hosts.clone(),
            ..HttpConfig::new(cfg.listen_address, cfg.telemetry_path.clone())
        }
        .with_web_config(cfg.web_config.as_ref())?,
    )
    .await
    .context("starting the HTTP server")?;
    info!(
        "serving metrics on {}://{}{}",
        server.scheme(),
        server.local_addr(),
        cfg.telemetry_path
    );
    // Attached, synced and bound: from here on only what re-attachment needs.
    let _ = crate::caps::drop_unneeded();
    crate::hardening::forbid_core_dumps();

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = vec![tokio::spawn({
        let (datapath, inventory) = (datapath.clone(), inventory.clone());
        let (trigger, stop) = (probing.pmtu_trigger.clone(), stop_rx.clone());
        async move { sync_loop(&mut syncer, &datapath, &inventory, &trigger, stop).await }
    })];
    tasks.extend(probing.spawn(&cfg, &inventory, &datapath, endpoints, &stop_rx));

    let mut stop_http = stop_rx.clone();
    let serve = server.serve(agent, async move {
        let _ = stop_http.changed().await;
    });
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => {
            // The server only returns on its own when it failed.
            r.context("HTTP server")?;
        }
        r = signals() => {
            r?;
            let _ = stop_tx.send(true);
            if let Err(e) = serve.await {
                error!("HTTP server at shutdown: {e:#}");
            }
        }
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    detach_all(&datapath)
}

fn log_features(features: &Features) {
    info!(
        "wirescope {} on Linux {}: tcx={} tracepoint={} kprobe={} fentry={} btf={} bpf_stats={}",
        env!("CARGO_PKG_VERSION"),
        features.kernel,
        features.tcx,
        features.tracepoint,
        features.kprobe,
        features.fentry,
        features.btf,
        features.bpf_stats
    );
}

/// Loads the programs (pinning the counting maps), writes the `--leak-allow` CIDRs and
/// attaches the optional drop tracepoints, recording their outcome in `features`.
fn load_datapath(
    cfg: &RunConfig,
    features: &mut Features,
) -> anyhow::Result<(Arc<Mutex<Datapath>>, Arc<DropReasons>)> {
    let options = LoadOptions {
        transit_time: cfg.transit_time,
    };
    if !options.transit_time {
        info!(
            "transit time off (--transit-time off): wirescope_tunnel_transit_seconds stays empty"
        );
    }
    let mut datapath = Datapath::load_with_options(EBPF_OBJECT, Pinning::from_env(), options)
        .context("loading the eBPF programs")?;
    datapath
        .leak
        .set_allowed(&cfg.leak_allow)
        .context("writing the --leak-allow CIDRs into the eBPF map")?;
    // Kernel drops and UDP receive errors: optional, reported, never fatal.
    let reasons = attach_drops(&mut datapath, features);
    Ok((Arc::new(Mutex::new(datapath)), reasons))
}

/// The sync loop's first round, run before serving. Peers keep the ids their pinned
/// counters are keyed by (see sync::PeerIds).
async fn first_sync(
    cfg: &RunConfig,
    features: &Features,
    datapath: &Arc<Mutex<Datapath>>,
    inventory: &Arc<RwLock<Inventory>>,
    probing: &Probing,
) -> anyhow::Result<Syncer> {
    let netlink = Netlink::new().context("opening rtnetlink")?;
    let mut syncer = Syncer::new(
        netlink,
        SyncOptions {
            tunnels: cfg.tunnels.clone(),
            underlays: cfg.underlays.clone(),
            friendly_names: cfg.friendly_names.clone(),
            crypto_kprobes: features.kprobe,
            mullvad: Some(probing.mullvad.clone()),
            obfuscation: cfg.obfuscation.clone(),
            peer_grace: cfg.peer_grace,
        },
    );
    let (saved_ids, saved_names) = {
        let mut dp = datapath
            .lock()
            .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?;
        (dp.tunnel.saved_peer_ids(), dp.tunnel.saved_iface_names())
    };
    if !saved_ids.is_empty() {
        info!(
            "{} peer ids continued from the pinned maps",
            saved_ids.len()
        );
    }
    if !saved_names.is_empty() {
        info!(
            "{} interface names continued from the pinned maps",
            saved_names.len()
        );
    }
    inventory
        .write()
        .map_err(|_| anyhow::anyhow!("inventory lock poisoned"))?
        .seed_labels(saved_names, &saved_ids);
    syncer.seed_peer_ids(saved_ids);
    syncer
        .tick(datapath, inventory)
        .await
        .context("first sync of interfaces and peers")?;
    // Every watched interface has taken over its pinned links by now: the rest are stale.
    datapath
        .lock()
        .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?
        .sweep_stale_hooks();
    Ok(syncer)
}

/// Every second until `stop`: expire what the programs leave in the kernel and nudge the
/// path-MTU search on a new ICMP too-big; every [`Syncer::period`], sync (the round logs what
/// changed).
async fn sync_loop(
    syncer: &mut Syncer,
    datapath: &Arc<Mutex<Datapath>>,
    inventory: &Arc<RwLock<Inventory>>,
    pmtu_trigger: &Notify,
    mut stop: watch::Receiver<bool>,
) {
    let mut too_big_seen = 0u64;
    let mut tick = tokio::time::interval(TICK);
    // Ticks since the last sync (the first sync ran before this loop).
    let mut since_sync = 0u32;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Ok(mut dp) = datapath.lock() {
            // Unanswered initiations become timeouts, idle sessions go: both maps stay
            // bounded, and a timeout shows within a second of its 5 s.
            dp.health.expire(crate::datapath::monotonic_ns());
            // Reported MTUs older than the 10-minute window go.
            dp.path.expire(crate::datapath::monotonic_ns());
            // Transit slots of packets never matched, queues of quiet peers.
            dp.transit.expire(crate::datapath::monotonic_ns());
            // A new ICMP too-big: the path MTU may have changed, measure it soon.
            let too_big: u64 = dp
                .path
                .icmp_too_big()
                .map(|v| v.iter().map(|(_, c)| c.packets).sum())
                .unwrap_or(0);
            if too_big > too_big_seen {
                pmtu_trigger.notify_one();
            }
            too_big_seen = too_big;
        }
        since_sync += 1;
        if TICK * since_sync < syncer.period() {
            continue;
        }
        since_sync = 0;
        if let Err(e) = syncer.tick(datapath, inventory).await {
            warn!("sync failed: {e:#}");
            if let Ok(mut inv) = inventory.write() {
                inv.last_error = Some(format!("{e:#}"));
            }
        }
    }
}

/// What the active side shares with the collectors: the Mullvad daemon's state, probe
/// statistics, path MTUs and failover state.
struct Probing {
    /// Written by the Mullvad poller; read by its collector and, through probe_target(),
    /// by the prober.
    mullvad: Arc<RwLock<MullvadState>>,
    stats: Arc<ProbeStats>,
    pmtu: Arc<PmtuState>,
    /// Fired (notify_one) on an ICMP too-big seen by the datapath: a path-MTU run soon.
    pmtu_trigger: Arc<Notify>,
    /// Dynamic probe targets: the Mullvad poller's 10.64.0.1@wg0-mullvad while connected.
    extra: ExtraTargets,
    failover: Arc<Mutex<Failover>>,
    outcomes: Outcomes,
}

impl Probing {
    fn new(cfg: &RunConfig) -> Self {
        let mullvad = Arc::new(RwLock::new(MullvadState::default()));
        let extra: ExtraTargets = if !cfg.collectors.probes {
            // --no-collector.probes: not even Mullvad's gateway.
            Arc::new(Vec::new)
        } else {
            let mullvad = mullvad.clone();
            Arc::new(move || {
                mullvad
                    .read()
                    .ok()
                    .and_then(|m| m.probe_target())
                    .into_iter()
                    .collect()
            })
        };
        let outcomes = Outcomes::default();
        // Both results of the configured action from the start, at 0: rates are 0, not
        // absent.
        if cfg.failover.command.is_some() {
            let action = if cfg.failover.dry_run {
                "dry_run"
            } else {
                "command"
            };
            if let Ok(mut o) = outcomes.lock() {
                for result in ["ok", "failed"] {
                    o.insert((action, result), 0);
                }
            }
        }
        Probing {
            mullvad,
            stats: Arc::new(ProbeStats::new()),
            pmtu: Arc::new(PmtuState::new()),
            pmtu_trigger: Arc::new(Notify::new()),
            extra,
            failover: Arc::new(Mutex::new(Failover::default())),
            outcomes,
        }
    }

    /// The probes, the path-MTU search, failover (paths judged every second, the action
    /// when one turns unhealthy) and the Mullvad poller (`<cli> status --json` every
    /// --mullvad-interval), each until `stop`.
    fn spawn(
        &self,
        cfg: &RunConfig,
        inventory: &Arc<RwLock<Inventory>>,
        datapath: &Arc<Mutex<Datapath>>,
        labeler: EndpointLabeler,
        stop: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let probe = icmp::spawn(
            cfg.probes.clone(),
            self.extra.clone(),
            self.stats.clone(),
            stop.clone(),
        );
        let pmtu = pmtu::spawn(
            PmtuTask {
                cfg: cfg.probes.clone(),
                extra: self.extra.clone(),
                inventory: inventory.clone(),
                labeler,
                state: self.pmtu.clone(),
                trigger: self.pmtu_trigger.clone(),
                carrier: Some(datapath.clone()),
            },
            stop.clone(),
        );
        let failover = failover::spawn(
            FailoverTask {
                cfg: cfg.failover.clone(),
                probes: cfg.probes.clone(),
                extra: self.extra.clone(),
                stats: self.stats.clone(),
                inventory: inventory.clone(),
                state: self.failover.clone(),
                outcomes: self.outcomes.clone(),
            },
            stop.clone(),
        );
        let mut tasks = vec![probe, pmtu, failover];
        if cfg.collectors.mullvad {
            tasks.push(crate::sources::mullvad::spawn(
                cfg.mullvad.clone(),
                self.mullvad.clone(),
                stop.clone(),
            ));
        }
        tasks
    }
}

/// Registers every collector and returns what the HTTP endpoints read.
fn collectors(
    cfg: &RunConfig,
    features: Features,
    reasons: Arc<DropReasons>,
    datapath: &Arc<Mutex<Datapath>>,
    inventory: &Arc<RwLock<Inventory>>,
    probing: &Probing,
    endpoints: EndpointLabeler,
) -> Arc<Agent> {
    let (dp, inv) = (datapath, inventory);
    let tunnel_collector = Arc::new(TunnelCollector::new(
        dp.clone(),
        inv.clone(),
        endpoints.clone(),
    ));
    let health = Arc::new(HealthCollector::new(
        dp.clone(),
        inv.clone(),
        cfg.peer_histograms,
    ));
    let transit = Arc::new(TransitCollector::new(
        dp.clone(),
        inv.clone(),
        cfg.peer_histograms,
    ));
    let path = Arc::new(PathCollector::new(dp.clone(), inv.clone()));
    let leaks = Arc::new(LeakCollector::new(dp.clone(), inv.clone()));
    let drops_collector = Arc::new(DropsCollector::new(dp.clone(), reasons, inv.clone()));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PeerCollector::new(
        inv.clone(),
        cfg.export_endpoints,
    )));
    registry.register_collector(Box::new(tunnel_collector.clone()));
    // transit: written before the registry's families, as text (`Agent::metrics`).
    registry.register_collector(Box::new(CryptoCollector::new(dp.clone(), inv.clone())));
    registry.register_collector(Box::new(health.clone()));
    registry.register_collector(Box::new(path.clone()));
    registry.register_collector(Box::new(leaks.clone()));
    let obfuscation = Arc::new(ObfuscationCollector::new(dp.clone(), inv.clone()));
    registry.register_collector(Box::new(obfuscation.clone()));
    registry.register_collector(Box::new(drops_collector.clone()));
    if cfg.collectors.mullvad {
        registry.register_collector(Box::new(MullvadCollector::new(
            probing.mullvad.clone(),
            inv.clone(),
        )));
    }
    registry.register_collector(Box::new(FailoverCollector::new(
        probing.failover.clone(),
        probing.outcomes.clone(),
    )));
    registry.register_collector(Box::new(ProbeCollector::new(
        probing.stats.clone(),
        probing.pmtu.clone(),
    )));
    registry.register_collector(Box::new(ProcessCollector));
    registry.register_collector(Box::new(AgentCollector::new(
        dp.clone(),
        inv.clone(),
        Arc::new(RwLock::new(features)),
    )));
    Arc::new(Agent {
        registry,
        datapath: dp.clone(),
        inventory: inv.clone(),
        tunnel_collector,
        drops_collector,
        health,
        transit,
        leaks,
        obfuscation,
        path,
        probe_stats: probing.stats.clone(),
        pmtu_state: probing.pmtu.clone(),
        failover_state: probing.failover.clone(),
        mullvad_state: probing.mullvad.clone(),
        labeler: endpoints,
        export_endpoints: cfg.export_endpoints,
        attached: AtomicUsize::new(dp.lock().map(|d| d.attachments().count()).unwrap_or(0)),
        synced: Mutex::new(
            inv.read()
                .map(|i| (i.last_error.clone(), i.synced_at.is_some()))
                .unwrap_or_default(),
        ),
    })
}

async fn signals() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    Ok(())
}

/// A clean stop detaches explicitly: dropping the datapath leaves pinned TCX links and
/// clsact filters counting, as a crash does (see datapath::hooks).
fn detach_all(datapath: &Mutex<Datapath>) -> anyhow::Result<()> {
    let mut dp = datapath
        .lock()
        .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?;
    dp.detach_all();
    info!("detached; bye");
    Ok(())
}
