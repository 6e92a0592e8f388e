//! `wirescope run`: load and attach, sync every second, serve until SIGINT/SIGTERM, detach.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use log::{error, info, warn};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    EBPF_OBJECT,
    config::RunConfig,
    datapath::drops::DropReasons,
    datapath::features::Features,
    datapath::{Datapath, LoadOptions, Pinning},
    metrics::{
        self, Format, agent::AgentCollector, datapath::DatapathCollector, peers::PeerCollector,
    },
    serve::{self, HttpConfig, HttpSource},
    sources::netlink::Netlink,
    status,
    sync::inventory::Inventory,
    sync::peer_label::EndpointLabeler,
    sync::{SyncOptions, Syncer},
};

/// How often interfaces, peers and maps are re-synced: changes show within two periods.
const SYNC_PERIOD: Duration = Duration::from_secs(1);

/// Everything the HTTP endpoints read.
struct Agent {
    registry: Registry,
    datapath: Arc<Mutex<Datapath>>,
    inventory: Arc<RwLock<Inventory>>,
    datapath_collector: Arc<DatapathCollector>,
    drops_collector: Arc<crate::metrics::drops::DropsCollector>,
    /// What the status shows beyond the counters (issue 9).
    wire_health: Arc<crate::metrics::health::WireHealthCollector>,
    leaks: Arc<crate::metrics::leak::LeakCollector>,
    path: Arc<crate::metrics::path::PathCollector>,
    probe_stats: Arc<crate::probes::icmp::ProbeStats>,
    pmtu_state: Arc<crate::probes::pmtu::PmtuState>,
    failover_state: Arc<Mutex<crate::probes::failover::Failover>>,
    mullvad_state: Arc<RwLock<crate::sources::mullvad::MullvadState>>,
    labeler: EndpointLabeler,
    export_endpoints: bool,
}

impl HttpSource for Agent {
    fn metrics(&self, format: Format) -> Result<String, String> {
        metrics::encode(&self.registry, format).map_err(|e| format!("encoding metrics: {e}"))
    }

    fn health(&self) -> Result<(), String> {
        let attached = self
            .datapath
            .lock()
            .map_err(|_| "datapath lock poisoned".to_string())?
            .attachments()
            .count();
        let inv = self
            .inventory
            .read()
            .map_err(|_| "inventory lock poisoned".to_string())?;
        if let Some(e) = &inv.last_error {
            return Err(format!("last collection failed: {e}"));
        }
        if inv.synced_at.is_none() {
            return Err("no collection yet".into());
        }
        if attached == 0 {
            return Err("no interface is attached: no WireGuard interface found yet".into());
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let snapshot = self.datapath_collector.snapshot();
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
            wire: self.wire_health.snapshot(),
            probes,
            pmtu: self.pmtu_state.snapshot(),
            leaks: self.leaks.snapshot(),
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
    crate::instance::claim(cfg.listen_address)?;
    let features = Features::detect();
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
    let crypto_kprobes = features.kprobe;
    // Kernel drops and UDP receive errors: optional, reported, never fatal.
    let mut features = features;
    let reasons = attach_drops(&mut datapath, &mut features);
    let datapath = Arc::new(Mutex::new(datapath));
    let inventory = Arc::new(RwLock::new(Inventory::default()));
    let endpoints = EndpointLabeler::load(&cfg.state_dir, cfg.export_endpoints)
        .context("preparing the endpoint-label salt")?;

    let netlink = Netlink::new().context("opening rtnetlink")?;
    let mut syncer = Syncer::new(
        netlink,
        SyncOptions {
            tunnels: cfg.tunnels.clone(),
            underlays: cfg.underlays.clone(),
            friendly_names: cfg.friendly_names.clone(),
            crypto_kprobes,
        },
    );
    // Peers keep the ids their pinned counters are keyed by (see sync::PeerIds).
    let saved_ids = datapath
        .lock()
        .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?
        .tunnel
        .saved_peer_ids();
    if !saved_ids.is_empty() {
        info!(
            "{} peer ids continued from the pinned maps",
            saved_ids.len()
        );
    }
    syncer.seed_peer_ids(saved_ids);
    // The first round runs before serving, so the first scrape already sees the tunnels.
    syncer
        .tick(&datapath, &inventory)
        .await
        .context("first sync of interfaces and peers")?;
    // Loading parsed the kernel's BTF and the eBPF object (tens of MB, freed by now): hand
    // that memory back to the system instead of keeping it in the allocator's free lists.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }

    // Mullvad daemon state (issue 6): written by crate::sources::mullvad::spawn below, read by its
    // collector and, through probe_target(), by the prober.
    let mullvad_state = Arc::new(RwLock::new(crate::sources::mullvad::MullvadState::default()));

    // Active probes and path MTU (issue 6): stats shared with the collector and failover.
    let probe_stats = Arc::new(crate::probes::icmp::ProbeStats::new());
    let pmtu_state = Arc::new(crate::probes::pmtu::PmtuState::new());
    // Fire (notify_one) on an ICMP too-big seen by the datapath: a path-MTU run soon.
    let pmtu_trigger = Arc::new(tokio::sync::Notify::new());
    // Dynamic probe targets: the Mullvad poller's 10.64.0.1@wg0-mullvad while connected.
    let probe_extra: crate::probes::icmp::ExtraTargets = {
        let mullvad = mullvad_state.clone();
        Arc::new(move || {
            mullvad
                .read()
                .ok()
                .and_then(|m| m.probe_target())
                .into_iter()
                .collect()
        })
    };
    let probe_labeler = endpoints.clone();
    let status_labeler = endpoints.clone();
    let failover_state = Arc::new(Mutex::new(crate::probes::failover::Failover::default()));
    let failover_outcomes = crate::probes::failover::Outcomes::default();
    // Both results of the configured action from the start, at 0: rates are 0, not absent.
    if cfg.failover.command.is_some() {
        let action = if cfg.failover.dry_run {
            "dry_run"
        } else {
            "command"
        };
        if let Ok(mut o) = failover_outcomes.lock() {
            for result in ["ok", "failed"] {
                o.insert((action, result), 0);
            }
        }
    }
    let datapath_collector = Arc::new(DatapathCollector::new(
        datapath.clone(),
        inventory.clone(),
        endpoints,
    ));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PeerCollector::new(
        inventory.clone(),
        cfg.export_endpoints,
    )));
    registry.register_collector(Box::new(datapath_collector.clone()));
    registry.register_collector(Box::new(crate::metrics::crypto::CryptoCollector::new(
        datapath.clone(),
        inventory.clone(),
    )));
    let wire_health = Arc::new(crate::metrics::health::WireHealthCollector::new(
        datapath.clone(),
        inventory.clone(),
    ));
    registry.register_collector(Box::new(wire_health.clone()));
    let path = Arc::new(crate::metrics::path::PathCollector::new(
        datapath.clone(),
        inventory.clone(),
    ));
    registry.register_collector(Box::new(path.clone()));
    let leaks = Arc::new(crate::metrics::leak::LeakCollector::new(
        datapath.clone(),
        inventory.clone(),
    ));
    registry.register_collector(Box::new(leaks.clone()));
    let drops_collector = Arc::new(crate::metrics::drops::DropsCollector::new(
        datapath.clone(),
        reasons,
    ));
    registry.register_collector(Box::new(drops_collector.clone()));
    registry.register_collector(Box::new(crate::metrics::mullvad::MullvadCollector::new(
        mullvad_state.clone(),
        inventory.clone(),
    )));
    registry.register_collector(Box::new(crate::metrics::failover::FailoverCollector::new(
        failover_state.clone(),
        failover_outcomes.clone(),
    )));
    registry.register_collector(Box::new(crate::metrics::probe::ProbeCollector::new(
        probe_stats.clone(),
        pmtu_state.clone(),
    )));
    registry.register_collector(Box::new(AgentCollector::new(
        datapath.clone(),
        inventory.clone(),
        Arc::new(RwLock::new(features)),
    )));
    let agent = Arc::new(Agent {
        registry,
        datapath: datapath.clone(),
        inventory: inventory.clone(),
        datapath_collector,
        drops_collector,
        wire_health,
        leaks,
        path,
        probe_stats: probe_stats.clone(),
        pmtu_state: pmtu_state.clone(),
        failover_state: failover_state.clone(),
        mullvad_state: mullvad_state.clone(),
        labeler: status_labeler,
        export_endpoints: cfg.export_endpoints,
    });

    let server = serve::bind(
        HttpConfig::new(cfg.listen_address, cfg.telemetry_path.clone())
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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sync_task = {
        let datapath = datapath.clone();
        let inventory = inventory.clone();
        let mut stop = stop_rx.clone();
        let pmtu_trigger = pmtu_trigger.clone();
        tokio::spawn(async move {
            let mut too_big_seen = 0u64;
            let mut tick = tokio::time::interval(SYNC_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                // Unanswered initiations become timeouts, idle sessions go: both maps
                // stay bounded, and a timeout shows within a second of its 5 s.
                if let Ok(mut dp) = datapath.lock() {
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
                // (The round logs what changed since the previous one.)
                match syncer.tick(&datapath, &inventory).await {
                    Ok(()) => {}
                    Err(e) => {
                        warn!("sync failed: {e:#}");
                        if let Ok(mut inv) = inventory.write() {
                            inv.last_error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
        })
    };

    let probe_task = crate::probes::icmp::spawn(
        cfg.probes.clone(),
        probe_extra.clone(),
        probe_stats.clone(),
        stop_rx.clone(),
    );
    let pmtu_task = crate::probes::pmtu::spawn(
        crate::probes::pmtu::PmtuTask {
            cfg: cfg.probes.clone(),
            extra: probe_extra.clone(),
            inventory: inventory.clone(),
            labeler: probe_labeler,
            state: pmtu_state.clone(),
            trigger: pmtu_trigger.clone(),
        },
        stop_rx.clone(),
    );

    // Failover: paths judged every second against the thresholds, the action when one
    // turns unhealthy.
    let failover_task = crate::probes::failover::spawn(
        crate::probes::failover::FailoverTask {
            cfg: cfg.failover.clone(),
            probes: cfg.probes.clone(),
            extra: probe_extra.clone(),
            stats: probe_stats.clone(),
            inventory: inventory.clone(),
            state: failover_state.clone(),
            outcomes: failover_outcomes.clone(),
        },
        stop_rx.clone(),
    );

    // The Mullvad poller: `<cli> status --json` every --mullvad-interval.
    let mullvad_task =
        crate::sources::mullvad::spawn(cfg.mullvad.clone(), mullvad_state.clone(), stop_rx.clone());

    let mut stop_http = stop_rx.clone();
    let serve = server.serve(agent, async move {
        let _ = stop_http.changed().await;
    });
    let signals = async {
        let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        anyhow::Ok(())
    };
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => {
            // The server only returns on its own when it failed.
            r.context("HTTP server")?;
        }
        r = signals => {
            r?;
            let _ = stop_tx.send(true);
            if let Err(e) = serve.await {
                error!("HTTP server at shutdown: {e:#}");
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = sync_task.await;
    let _ = mullvad_task.await;
    let _ = probe_task.await;
    let _ = pmtu_task.await;
    let _ = failover_task.await;
    // Dropping the datapath detaches every program (TCX links are fd-based; clsact filters
    // are removed explicitly by detach()).
    let mut dp = datapath
        .lock()
        .map_err(|_| anyhow::anyhow!("datapath lock poisoned"))?;
    let attached: Vec<u32> = dp.attachments().map(|(i, _)| *i).collect();
    for i in attached {
        dp.detach(i);
    }
    info!("detached; bye");
    Ok(())
}
