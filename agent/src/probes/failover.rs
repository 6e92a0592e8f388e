//! Failover: judges each path (a tunnel peer) against the thresholds, with hysteresis, and
//! runs the configured action when one turns unhealthy, never two at once and never within
//! the cool-down of the last.
//!
//! The judging is a pure state machine over [`PathInput`]s, fed once per tick by the agent
//! from the probes and the peers' handshake times; the action runs in its own task.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{info, warn};
use tokio::process::Command;

use crate::config::FailoverConfig;

/// A path turns healthy again only below these fractions of the RTT and loss limits, so a
/// value hovering at the limit does not flap.
const RECOVER_RTT: f64 = 0.8;
const RECOVER_LOSS: f64 = 0.5;

/// What is known of one path at a tick. `None`: not measured (no probe through it, no
/// handshake seen): a missing measure never makes a path unhealthy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathInput {
    pub interface: String,
    pub peer: String,
    /// Mean probe RTT over the window.
    pub rtt: Option<Duration>,
    /// Probe loss over the window, in percent.
    pub loss_percent: Option<f64>,
    /// Age of the peer's latest handshake.
    pub handshake_age: Option<Duration>,
}

/// Why a path is unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Rtt,
    Loss,
    Handshake,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rtt => "rtt",
            Reason::Loss => "loss",
            Reason::Handshake => "handshake",
        }
    }
}

/// The first threshold `p` exceeds, judged with hysteresis from `was_healthy`.
pub fn judge(cfg: &FailoverConfig, p: &PathInput, was_healthy: bool) -> Option<Reason> {
    let (rtt_limit, loss_limit) = if was_healthy {
        (cfg.max_rtt.as_secs_f64(), cfg.max_loss_percent)
    } else {
        (
            cfg.max_rtt.as_secs_f64() * RECOVER_RTT,
            cfg.max_loss_percent * RECOVER_LOSS,
        )
    };
    if p.handshake_age.is_some_and(|a| a > cfg.max_handshake_age) {
        return Some(Reason::Handshake);
    }
    if p.loss_percent.is_some_and(|l| l > loss_limit) {
        return Some(Reason::Loss);
    }
    if p.rtt.is_some_and(|r| r.as_secs_f64() > rtt_limit) {
        return Some(Reason::Rtt);
    }
    None
}

/// An action to run for a path that turned unhealthy.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub path: PathInput,
    pub reason: Reason,
}

#[derive(Debug, Default)]
pub struct Failover {
    /// By interface, then peer: healthy or not, and the round that last judged it. Nested
    /// and updated in place so that a round allocates nothing for known paths (a relay
    /// judges every one of its thousands of peers every second).
    healthy: BTreeMap<String, BTreeMap<String, (bool, u64)>>,
    round: u64,
    last_action: Option<Instant>,
}

impl Failover {
    /// Judges every path at `now`; returns the event to act on, if a path turned
    /// unhealthy, no action is running (`busy`) and the cool-down since the last is over.
    /// Paths no longer given are forgotten.
    pub fn tick(
        &mut self,
        cfg: &FailoverConfig,
        paths: &[PathInput],
        now: Instant,
        busy: bool,
    ) -> Option<Event> {
        let mut event = None;
        self.round += 1;
        let round = self.round;
        for p in paths {
            let was = self
                .healthy
                .get(&p.interface)
                .and_then(|m| m.get(&p.peer))
                .is_none_or(|(h, _)| *h);
            let reason = judge(cfg, p, was);
            let is = reason.is_none();
            if was && !is {
                warn!(
                    "path {} peer {} turned unhealthy: {} (rtt {:?}, loss {:?} %, handshake age {:?})",
                    p.interface,
                    p.peer,
                    reason.map_or("", Reason::as_str),
                    p.rtt,
                    p.loss_percent,
                    p.handshake_age
                );
                if event.is_none()
                    && let Some(reason) = reason
                {
                    event = Some(Event {
                        path: p.clone(),
                        reason,
                    });
                }
            } else if !was && is {
                info!("path {} peer {} is healthy again", p.interface, p.peer);
            }
            let by_peer = match self.healthy.get_mut(&p.interface) {
                Some(m) => m,
                None => self.healthy.entry(p.interface.clone()).or_default(),
            };
            match by_peer.get_mut(&p.peer) {
                Some(state) => *state = (is, round),
                None => {
                    by_peer.insert(p.peer.clone(), (is, round));
                }
            }
        }
        // Paths no longer given are forgotten.
        for by_peer in self.healthy.values_mut() {
            by_peer.retain(|_, (_, r)| *r == round);
        }
        self.healthy.retain(|_, by_peer| !by_peer.is_empty());
        let cooled = self
            .last_action
            .is_none_or(|t| now.duration_since(t) >= cfg.cooldown);
        match event {
            Some(e) if !busy && cooled && (cfg.command.is_some()) => {
                self.last_action = Some(now);
                Some(e)
            }
            Some(e) => {
                info!(
                    "no failover action for {} peer {}: {}",
                    e.path.interface,
                    e.path.peer,
                    if cfg.command.is_none() {
                        "no --failover-command"
                    } else if busy {
                        "an action is still running"
                    } else {
                        "within the cool-down of the last action"
                    }
                );
                None
            }
            None => None,
        }
    }

    /// (interface, peer, healthy) for `wirescope_path_healthy`.
    pub fn states(&self) -> Vec<(String, String, bool)> {
        self.healthy
            .iter()
            .flat_map(|(i, by_peer)| {
                by_peer
                    .iter()
                    .map(move |(p, (h, _))| (i.clone(), p.clone(), *h))
            })
            .collect()
    }
}

/// `wirescope_failover_total` by (action, result).
pub type Outcomes = Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>;

/// Runs the action for `event` (`/bin/sh -c COMMAND`, the event in `WIRESCOPE_*`
/// variables; logged only with `--dry-run`), killing it after the timeout, and counts the
/// outcome.
pub async fn act(cfg: &FailoverConfig, event: &Event, outcomes: &Outcomes) {
    let Some(command) = &cfg.command else {
        return;
    };
    let (action, result) = if cfg.dry_run {
        info!(
            "failover (dry run): would run `{command}` for {} peer {} ({})",
            event.path.interface,
            event.path.peer,
            event.reason.as_str()
        );
        ("dry_run", "ok")
    } else {
        ("command", run(command, cfg.timeout, event).await)
    };
    if let Ok(mut o) = outcomes.lock() {
        *o.entry((action, result)).or_default() += 1;
    }
}

async fn run(command: &str, timeout: Duration, event: &Event) -> &'static str {
    let p = &event.path;
    let secs = |d: Option<Duration>| d.map_or(String::new(), |d| format!("{:.6}", d.as_secs_f64()));
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("WIRESCOPE_EVENT", "unhealthy")
        .env("WIRESCOPE_REASON", event.reason.as_str())
        .env("WIRESCOPE_INTERFACE", &p.interface)
        .env("WIRESCOPE_PEER", &p.peer)
        .env("WIRESCOPE_RTT_SECONDS", secs(p.rtt))
        .env(
            "WIRESCOPE_LOSS_PERCENT",
            p.loss_percent.map_or(String::new(), |l| format!("{l:.3}")),
        )
        .env("WIRESCOPE_HANDSHAKE_AGE_SECONDS", secs(p.handshake_age))
        .stdin(std::process::Stdio::null())
        // Its own process group: /bin/sh forks the command's programs, and a timeout must
        // kill them too, not only the shell.
        .process_group(0)
        .kill_on_drop(true);
    info!(
        "failover: running `{command}` for {} peer {}",
        p.interface, p.peer
    );
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!("failover command `{command}` could not start: {e}");
            return "failed";
        }
    };
    // The shell leads the group (process_group(0)): its pid is the group's id.
    let group = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            info!("failover command finished: {}", out.status);
            "ok"
        }
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            warn!(
                "failover command failed ({}): {}",
                out.status,
                err.lines().next().unwrap_or("")
            );
            "failed"
        }
        Ok(Err(e)) => {
            warn!("failover command: {e}");
            "failed"
        }
        Err(_) => {
            // The whole group: the shell and whatever it started. Dropping the future then
            // drops the child, which kill_on_drop kills (and the runtime reaps).
            if let Some(pgid) = group {
                // SAFETY: a plain syscall; the group is the command's own.
                unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
            }
            warn!(
                "failover command `{command}` still running after {timeout:?}: killed (raise --failover-timeout if it needs longer)"
            );
            "failed"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn cfg() -> FailoverConfig {
        FailoverConfig {
            command: Some("true".into()),
            max_rtt: Duration::from_millis(200),
            max_loss_percent: 2.0,
            max_handshake_age: Duration::from_secs(180),
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
            dry_run: false,
            peers: Vec::new(),
        }
    }

    fn path(rtt_ms: u64, loss: f64, age_s: u64) -> PathInput {
        PathInput {
            interface: "wg0".into(),
            peer: "K".into(),
            rtt: Some(Duration::from_millis(rtt_ms)),
            loss_percent: Some(loss),
            handshake_age: Some(Duration::from_secs(age_s)),
        }
    }

    #[test]
    fn thresholds_with_hysteresis() {
        let c = cfg();
        assert_eq!(judge(&c, &path(199, 1.9, 179), true), None);
        assert_eq!(judge(&c, &path(201, 0.0, 0), true), Some(Reason::Rtt));
        assert_eq!(judge(&c, &path(10, 2.1, 0), true), Some(Reason::Loss));
        assert_eq!(
            judge(&c, &path(10, 0.0, 181), true),
            Some(Reason::Handshake)
        );
        // Unhealthy stays so until clearly below the limits.
        assert_eq!(judge(&c, &path(170, 0.0, 0), false), Some(Reason::Rtt));
        assert_eq!(judge(&c, &path(159, 0.0, 0), false), None);
        assert_eq!(judge(&c, &path(10, 1.5, 0), false), Some(Reason::Loss));
        // Nothing measured is not unhealthy.
        assert_eq!(judge(&c, &PathInput::default(), true), None);
    }

    #[test]
    fn one_action_per_turn_then_cool_down() {
        let c = cfg();
        let mut f = Failover::default();
        let t0 = Instant::now();
        assert!(f.tick(&c, &[path(10, 0.0, 0)], t0, false).is_none());
        let e = f
            .tick(&c, &[path(300, 0.0, 0)], t0, false)
            .expect("turned unhealthy");
        assert_eq!(e.reason, Reason::Rtt);
        // Still unhealthy: no new event.
        assert!(f.tick(&c, &[path(300, 0.0, 0)], t0, false).is_none());
        assert_eq!(f.states(), [("wg0".into(), "K".into(), false)]);
        // Healthy, then unhealthy again within the cool-down: no action.
        assert!(f.tick(&c, &[path(10, 0.0, 0)], t0, false).is_none());
        let t1 = t0 + Duration::from_secs(10);
        assert!(f.tick(&c, &[path(300, 0.0, 0)], t1, false).is_none());
        // After the cool-down, a new turn acts; a busy runner does not.
        f.tick(&c, &[path(10, 0.0, 0)], t1, false);
        let t2 = t0 + Duration::from_secs(301);
        assert!(f.tick(&c, &[path(300, 0.0, 0)], t2, true).is_none());
        f.tick(&c, &[path(10, 0.0, 0)], t2, false);
        assert!(f.tick(&c, &[path(300, 0.0, 0)], t2, false).is_some());
    }

    #[tokio::test]
    async fn the_command_gets_the_event_and_is_killed_after_the_timeout() {
        let dir = std::env::temp_dir().join(format!("wirescope-failover-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let out = dir.join("event");
        let mut c = cfg();
        c.command = Some(format!(
            "echo \"$WIRESCOPE_REASON $WIRESCOPE_INTERFACE $WIRESCOPE_PEER $WIRESCOPE_RTT_SECONDS\" > {}",
            out.display()
        ));
        let o: Outcomes = Arc::default();
        let e = Event {
            path: path(300, 0.0, 0),
            reason: Reason::Rtt,
        };
        act(&c, &e, &o).await;
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "rtt wg0 K 0.300000"
        );
        c.command = Some("exit 3".into());
        act(&c, &e, &o).await;
        c.command = Some("sleep 30".into());
        c.timeout = Duration::from_millis(200);
        let t = Instant::now();
        act(&c, &e, &o).await;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "killed, not waited for"
        );
        c.dry_run = true;
        act(&c, &e, &o).await;
        let o = o.lock().unwrap().clone();
        assert_eq!(o.get(&("command", "ok")), Some(&1));
        assert_eq!(o.get(&("command", "failed")), Some(&2));
        assert_eq!(o.get(&("dry_run", "ok")), Some(&1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A probe target's (sent, lost, round trips) over the window, as
/// [`crate::probes::icmp::ProbeStats::window`] gives it.
pub type ProbeWindow = (u64, u64, Vec<Duration>);

/// The paths to judge: the peers that probes go through and the ones the operator marked
/// (`marked`: public keys or friendly names), with the age of their latest handshake (at
/// `now`) and the RTT and loss of the probes that go through them. A probe goes through the
/// peer whose allowed IPs hold its target most specifically, on the probe's interface (any
/// tunnel when it has none). Other peers are not judged: a gateway's idle clients have old
/// handshakes and nothing wrong.
pub fn paths(
    inv: &crate::sync::inventory::Inventory,
    probes: &[(crate::config::ProbeTarget, ProbeWindow)],
    marked: &[String],
    now: std::time::SystemTime,
) -> Vec<PathInput> {
    let mut out: Vec<PathInput> = Vec::new();
    for t in &inv.tunnels {
        for p in &t.peers {
            out.push(PathInput {
                interface: t.name.clone(),
                peer: p.public_key.clone(),
                rtt: None,
                loss_percent: None,
                handshake_age: p
                    .wg
                    .last_handshake
                    .map(|h| now.duration_since(h).unwrap_or_default()),
            });
        }
    }
    // Sums per path over its probes: (sent, lost, rtt sum, replies).
    let mut sums: BTreeMap<(String, String), (u64, u64, Duration, u64)> = BTreeMap::new();
    for (target, (sent, lost, rtts)) in probes {
        let best = inv
            .tunnels
            .iter()
            .filter(|t| target.iface.as_ref().is_none_or(|i| *i == t.name))
            .flat_map(|t| {
                t.peers.iter().filter_map(move |p| {
                    p.wg.allowed_ips
                        .iter()
                        .filter(|n| n.contains(&target.target))
                        .map(|n| n.prefix_len())
                        .max()
                        .map(|len| (len, t.name.clone(), p.public_key.clone()))
                })
            })
            .max_by_key(|(len, _, _)| *len);
        let Some((_, iface, peer)) = best else {
            continue;
        };
        let s = sums.entry((iface, peer)).or_default();
        s.0 += sent;
        s.1 += lost;
        s.2 += rtts.iter().sum::<Duration>();
        s.3 += rtts.len() as u64;
    }
    for p in &mut out {
        if let Some((sent, lost, sum, replies)) = sums.get(&(p.interface.clone(), p.peer.clone())) {
            if *sent > 0 {
                p.loss_percent = Some(*lost as f64 * 100.0 / *sent as f64);
            }
            if *replies > 0 {
                p.rtt = Some(*sum / *replies as u32);
            }
        }
    }
    let is_marked = |iface: &str, key: &str| {
        marked.iter().any(|m| m == key)
            || inv
                .tunnels
                .iter()
                .filter(|t| t.name == iface)
                .flat_map(|t| &t.peers)
                .any(|p| {
                    p.public_key == key
                        && p.friendly_name.as_ref().is_some_and(|f| marked.contains(f))
                })
    };
    out.retain(|p| {
        sums.contains_key(&(p.interface.clone(), p.peer.clone()))
            || is_marked(&p.interface, &p.peer)
    });
    out
}

/// Everything the failover task reads and writes.
pub struct FailoverTask {
    pub cfg: FailoverConfig,
    pub probes: crate::config::ProbeConfig,
    pub extra: crate::probes::icmp::ExtraTargets,
    pub stats: Arc<crate::probes::icmp::ProbeStats>,
    pub inventory: Arc<std::sync::RwLock<crate::sync::inventory::Inventory>>,
    pub state: Arc<Mutex<Failover>>,
    pub outcomes: Outcomes,
}

/// Judges the paths every second and runs the action (in its own task, one at a time).
pub fn spawn(
    task: FailoverTask,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let targets = crate::probes::icmp::target_set(&task.probes, task.extra.as_ref());
            let probes: Vec<_> = targets
                .into_iter()
                .map(|t| {
                    let w = task.stats.window(&t, task.cfg.window);
                    (t, w)
                })
                .collect();
            let inputs = match task.inventory.read() {
                Ok(inv) => paths(&inv, &probes, &task.cfg.peers, std::time::SystemTime::now()),
                Err(_) => continue,
            };
            let running = busy.load(std::sync::atomic::Ordering::SeqCst);
            let event = match task.state.lock() {
                Ok(mut f) => f.tick(&task.cfg, &inputs, Instant::now(), running),
                Err(_) => continue,
            };
            if let Some(event) = event {
                busy.store(true, std::sync::atomic::Ordering::SeqCst);
                let (cfg, outcomes, busy) = (task.cfg.clone(), task.outcomes.clone(), busy.clone());
                tokio::spawn(async move {
                    act(&cfg, &event, &outcomes).await;
                    busy.store(false, std::sync::atomic::Ordering::SeqCst);
                });
            }
        }
    })
}

#[cfg(test)]
mod path_tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        config::ProbeTarget,
        sync::inventory::{Backend, Inventory, Peer, Tunnel, WgPeer},
    };

    fn peer(key: &str, allowed: &[&str], handshake: Option<SystemTime>) -> Peer {
        let wg = WgPeer {
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            last_handshake: handshake,
            ..WgPeer::new([0; 32])
        };
        Peer::new(1, key.into(), wg)
    }

    #[test]
    fn probes_go_to_the_most_specific_peer() {
        let now = SystemTime::now();
        let inv = Inventory {
            tunnels: vec![Tunnel {
                name: "wg0-mullvad".into(),
                ifindex: 3,
                mtu: 1380,
                backend: Backend::Uapi,
                listen_port: 0,
                peers: vec![
                    peer(
                        "ENTRY",
                        &["185.0.0.2/32"],
                        Some(now - Duration::from_secs(10)),
                    ),
                    peer("EXIT", &["0.0.0.0/0", "::/0"], None),
                ],
            }],
            ..Inventory::default()
        };
        let ms = Duration::from_millis;
        let probes = vec![(
            ProbeTarget {
                target: "10.64.0.1".parse().unwrap(),
                iface: Some("wg0-mullvad".into()),
            },
            (4, 1, vec![ms(10), ms(20), ms(30)]),
        )];
        // Only the probed peer is judged ...
        let p = paths(&inv, &probes, &[], now);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].peer, "EXIT");
        assert_eq!(p[0].rtt, Some(ms(20)));
        assert_eq!(p[0].loss_percent, Some(25.0));
        assert_eq!(p[0].handshake_age, None);
        // ... and the marked one, by key, on its handshake alone.
        let p = paths(&inv, &probes, &["ENTRY".to_string()], now);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].peer, "ENTRY");
        assert_eq!(p[0].rtt, None);
        assert_eq!(p[0].handshake_age, Some(Duration::from_secs(10)));
        assert_eq!(p[1].peer, "EXIT");
    }

    /// A gateway: many idle clients with handshakes hours old and no probes are not judged,
    /// so they never trigger the action; one marked by its friendly name is.
    #[test]
    fn idle_gateway_peers_are_not_judged() {
        let now = SystemTime::now();
        let old = Some(now - Duration::from_secs(4 * 3600));
        let mut peers: Vec<Peer> = (0..50)
            .map(|i| {
                peer(
                    &format!("CLIENT{i}"),
                    &[&format!("10.8.0.{}/32", i + 2)],
                    old,
                )
            })
            .collect();
        peers[7].friendly_name = Some("office-router".into());
        let inv = Inventory {
            tunnels: vec![Tunnel {
                name: "wg0".into(),
                ifindex: 3,
                mtu: 1420,
                backend: Backend::Uapi,
                listen_port: 51820,
                peers,
            }],
            ..Inventory::default()
        };
        assert!(paths(&inv, &[], &[], now).is_empty());
        let p = paths(&inv, &[], &["office-router".to_string()], now);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].peer, "CLIENT7");
        let cfg = super::tests::cfg();
        assert_eq!(judge(&cfg, &p[0], true), Some(Reason::Handshake));
    }
}
