//! Failover, end to end: the `wirescope` binary in the client namespace of a single-relay
//! lab whose hop runs the impairing relay (`xtask::impair`), probing the in-tunnel gateway
//! (10.64.0.1) through the client's WireGuard interface every 200 ms and judging the relay
//! peer over a 2 s window against a 100 ms RTT limit. A fixed 100 ms delay each way on the
//! hop puts every probe at 200 ms and more, so the path turns unhealthy (reason `rtt`)
//! within a few seconds; without the delay the probes take about a millisecond, so it
//! recovers (below 0.8 x 100 ms) as soon as the delayed probes leave the window.
//!
//! Exact checks everywhere: the number of lines the hook wrote, and every
//! `wirescope_failover_total{action,result}` series. The cool-down is an hour, so each
//! agent runs at most one action.
//!
//! Needs root, the lab tools (`cargo xtask setup`) and wireguard-go or kernel WireGuard;
//! with CI=true a missing prerequisite fails the test. The tests share one lab prefix: run
//! them with `--test-threads=1` (`cargo test -p wirescope --test lab -- --test-threads=1
//! failover::`).

use crate::common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xtask::{
    agent::Agent,
    impair::{ImpairHandle, Impairment},
    lab::{self, GATEWAY_V4, Lab},
    scrape::Metrics,
};

use common::{bin, impaired_single, log_path, stop, val};

const PREFIX: &str = "wsf";
/// One way, on the hop: round trips of 200 ms and more against a 100 ms limit.
const DELAY: Duration = Duration::from_millis(100);
const HEALTHY: &str = "wirescope_path_healthy";
const FAILOVER: &str = "wirescope_failover_total";

/// The failover options every agent here gets: probes every 200 ms, a 2 s window, a
/// 100 ms RTT limit and an hour of cool-down.
fn base_args(probe: &str) -> Vec<String> {
    [
        "--probe",
        probe,
        "--probe-interval",
        "200ms",
        "--failover-window",
        "2s",
        "--failover-max-rtt",
        "100ms",
        "--failover-cooldown",
        "1h",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// [`impaired_single`] (the relay never has to learn a new client address while probes
/// run), and a handshake through the impairing relay.
fn lab_with_relay(rules: Impairment) -> (Lab, ImpairHandle) {
    let (lab, imp) = impaired_single(PREFIX, rules);
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    (lab, imp)
}

/// A scratch directory for the hook's output, fresh.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wirescope-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The lines of `file`; none when it does not exist.
fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Scrapes until `pred` holds (every 100 ms, up to `timeout`); returns the scrape and the
/// time it took.
fn wait_until(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Metrics) -> bool,
) -> (Metrics, Duration) {
    let t = Instant::now();
    loop {
        let m = agent.scrape().expect("scrape");
        if pred(&m) {
            return (m, t.elapsed());
        }
        assert!(
            t.elapsed() < timeout,
            "{what}: not within {timeout:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every `wirescope_failover_total` series as (action, result, value), sorted.
fn outcomes(m: &Metrics) -> Vec<(String, String, u64)> {
    let mut v: Vec<(String, String, u64)> = m
        .select(FAILOVER, &[])
        .map(|(l, v)| {
            (
                l.get("action").cloned().unwrap_or_default(),
                l.get("result").cloned().unwrap_or_default(),
                v as u64,
            )
        })
        .collect();
    v.sort();
    v
}

/// The counts of the non-zero `wirescope_failover_total` series: absent and 0 are the
/// same here (the agent may or may not export a configured action's series at 0).
fn nonzero_outcomes(m: &Metrics) -> Vec<(String, String, u64)> {
    outcomes(m).into_iter().filter(|o| o.2 != 0).collect()
}

/// `wirescope_path_healthy` of `path`: None while the series is absent.
fn healthy(m: &Metrics, path: &[(&str, &str)]) -> Option<f64> {
    let v: Vec<f64> = m.select(HEALTHY, path).map(|(_, v)| v).collect();
    assert!(v.len() <= 1, "several {HEALTHY} series for {path:?}");
    v.first().copied()
}

fn outcome(action: &str, result: &str, n: u64) -> Vec<(String, String, u64)> {
    vec![(action.to_owned(), result.to_owned(), n)]
}

/// The processes (pids) whose environment holds `WSF_MARKER=tag`: a hook's command run as
/// `WSF_MARKER=tag sleep 60` carries it, whatever shell ran it. Zombies have an empty
/// environment and do not count.
fn marked(tag: &str) -> Vec<u32> {
    let want = format!("WSF_MARKER={tag}");
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(env) = std::fs::read(e.path().join("environ"))
            && env.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// Waits until no process carries `WSF_MARKER=tag` (up to `timeout`); false when some
/// still do.
fn wait_unmarked(tag: &str, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if marked(tag).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    marked(tag).is_empty()
}

/// Kills what a failed test left (by pid, only the marked ones).
fn kill_marked(tag: &str) {
    for pid in marked(tag) {
        // SAFETY: a plain syscall on a pid this test's hook started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

fn start_agent(lab: &Lab, log: &str, args: &[String]) -> Agent {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(bin(), &lab.client().netns, &args, &log_path(log)).expect("agent starts")
}

#[test]
fn rtt_turn_runs_the_command_once_within_the_cool_down() {
    if !lab::can_run("rtt_turn_runs_the_command_once_within_the_cool_down") {
        return;
    }
    let t0 = Instant::now();
    let (lab, imp) = lab_with_relay(Impairment::none());
    let wg = lab.client().wg().iface.clone();
    let relay = lab.exit().wg().public_key.clone();
    let dir = scratch("failover-rtt");
    let file = dir.join("events");
    let mut args = base_args(&format!("{GATEWAY_V4}@{wg}"));
    args.push("--failover-command".into());
    args.push(format!(
        "echo \"$WIRESCOPE_REASON $WIRESCOPE_INTERFACE $WIRESCOPE_PEER\" >> {}",
        file.display()
    ));
    let agent = start_agent(&lab, "failover-rtt", &args);
    let path = [("interface", wg.as_str()), ("peer", relay.as_str())];
    let gw = GATEWAY_V4.to_string();
    let probe = [("target", gw.as_str()), ("interface", wg.as_str())];

    // Healthy: a full window of replies (2 s of probes) judged.
    let (_, _) = wait_until(&agent, "probe replies", Duration::from_secs(15), |m| {
        val(m, "wirescope_probe_rtt_seconds_count", &probe) >= 10
    });
    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.scrape().expect("scrape");
    assert_eq!(
        m.select(HEALTHY, &[]).count(),
        1,
        "one path: the relay peer on {wg}"
    );
    assert_eq!(healthy(&m, &path), Some(1.0), "healthy before the delay");
    assert_eq!(nonzero_outcomes(&m), vec![], "no action yet");
    assert!(!file.exists(), "the hook did not run");
    assert_eq!(val(&m, "wirescope_probe_lost_total", &probe), 0);

    // 100 ms each way: unhealthy, the hook runs once with the event.
    imp.set(Impairment::delay(DELAY));
    let (_, turned) = wait_until(
        &agent,
        "unhealthy under the delay",
        Duration::from_secs(10),
        |m| healthy(m, &path) == Some(0.0),
    );
    let (m, acted) = wait_until(&agent, "the action counted", Duration::from_secs(5), |m| {
        !nonzero_outcomes(m).is_empty()
    });
    assert_eq!(nonzero_outcomes(&m), outcome("command", "ok", 1));
    // Room for a second (wrong) run.
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.scrape().expect("scrape");
    assert_eq!(nonzero_outcomes(&m), outcome("command", "ok", 1));
    assert_eq!(healthy(&m, &path), Some(0.0), "still unhealthy");
    assert_eq!(lines(&file), vec![format!("rtt {wg} {relay}")]);

    // The delay gone: healthy again once the window holds fast probes only (hysteresis:
    // below 80 ms).
    imp.set(Impairment::none());
    let (_, recovered) = wait_until(&agent, "healthy again", Duration::from_secs(10), |m| {
        healthy(m, &path) == Some(1.0)
    });

    // A second delay within the cool-down: unhealthy again, no second action.
    imp.set(Impairment::delay(DELAY));
    let (_, turned2) = wait_until(&agent, "unhealthy again", Duration::from_secs(10), |m| {
        healthy(m, &path) == Some(0.0)
    });
    std::thread::sleep(Duration::from_secs(3));
    let m = agent.scrape().expect("scrape");
    assert_eq!(healthy(&m, &path), Some(0.0));
    assert_eq!(nonzero_outcomes(&m), outcome("command", "ok", 1));
    assert_eq!(lines(&file), vec![format!("rtt {wg} {relay}")]);
    let log = agent.log_text();
    assert_eq!(
        log.matches("within the cool-down of the last action")
            .count(),
        1,
        "the second turn is logged as within the cool-down:\n{log}"
    );
    assert_eq!(
        val(&m, "wirescope_probe_lost_total", &probe),
        0,
        "the delay loses nothing"
    );

    imp.set(Impairment::none());
    stop(agent);
    drop(imp);
    lab.teardown().expect("lab down");
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "rtt_turn_runs_the_command_once_within_the_cool_down: unhealthy {turned:?} after the \
         delay, action counted {acted:?} later, healthy {recovered:?} after it ended, unhealthy \
         again {turned2:?}; {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// What became of a hook that hangs, its process marked with `tag`.
struct Hang {
    /// Its processes, seen running (waited for up to 3 s).
    running: Vec<u32>,
    /// The first scrape with an outcome counted (waited for up to 5 s) ...
    m: Metrics,
    /// ... and when it came, after the processes were seen.
    counted_after: Duration,
    /// The processes were gone within 2 s of that.
    gone: bool,
    /// The processes left then (killed since).
    left: Vec<u32>,
}

fn hang(agent: &Agent, tag: &str) -> Hang {
    let t = Instant::now();
    while marked(tag).is_empty() && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let running = marked(tag);
    let (m, counted_after) = wait_until(
        agent,
        "the hanging command counted",
        Duration::from_secs(5),
        |m| !nonzero_outcomes(m).is_empty(),
    );
    let gone = wait_unmarked(tag, Duration::from_secs(2));
    let left = marked(tag);
    kill_marked(tag);
    Hang {
        running,
        m,
        counted_after,
        gone,
        left,
    }
}

#[test]
fn failing_hanging_and_dry_run_actions_are_counted() {
    if !lab::can_run("failing_hanging_and_dry_run_actions_are_counted") {
        return;
    }
    let t0 = Instant::now();
    // The delay from the start: each agent's path turns unhealthy at its first judged probes.
    let (lab, imp) = lab_with_relay(Impairment::delay(DELAY));
    let wg = lab.client().wg().iface.clone();
    let relay = lab.exit().wg().public_key.clone();
    let path = [("interface", wg.as_str()), ("peer", relay.as_str())];
    let probe = format!("{GATEWAY_V4}@{wg}");
    let dir = scratch("failover-actions");
    let unhealthy = |m: &Metrics| healthy(m, &path) == Some(0.0);
    // The agent with `args` (its log `log`) once unhealthy (15 s at most), its first outcome
    // counted (5 s), and 2 s more for a second one that must not come: the agent and its
    // scrape then.
    let act = |log: &str, what: &str, args: &[String]| {
        let agent = start_agent(&lab, log, args);
        let unhealthy_what = format!("unhealthy ({what})");
        wait_until(&agent, &unhealthy_what, Duration::from_secs(15), unhealthy);
        let counted = format!("an outcome of {what} counted");
        wait_until(&agent, &counted, Duration::from_secs(5), |m| {
            !nonzero_outcomes(m).is_empty()
        });
        std::thread::sleep(Duration::from_secs(2));
        let m = agent.scrape().expect("scrape");
        (agent, m)
    };

    // A command that fails: counted as failed.
    let mut args = base_args(&probe);
    args.extend(["--failover-command".into(), "exit 3".into()]);
    let (agent, m) = act("failover-fail", "exit 3", &args);
    assert_eq!(nonzero_outcomes(&m), outcome("command", "failed", 1));
    assert!(agent.log_text().contains("failover command failed"));
    stop(agent);

    // A command that hangs: killed after the 1 s timeout, counted as failed, no process left.
    let tag = format!("hang-{}", std::process::id());
    let mut args = base_args(&probe);
    args.extend([
        "--failover-command".into(),
        format!("WSF_MARKER={tag} sleep 60"),
        "--failover-timeout".into(),
        "1s".into(),
    ]);
    let agent = start_agent(&lab, "failover-hang", &args);
    wait_until(
        &agent,
        "unhealthy (sleep 60)",
        Duration::from_secs(15),
        unhealthy,
    );
    // The command runs (its process carries the marker) until the timeout.
    let Hang {
        running,
        m,
        counted_after: killed_after,
        gone,
        left,
    } = hang(&agent, &tag);
    assert!(!running.is_empty(), "the hook's `sleep 60` never ran");
    assert_eq!(nonzero_outcomes(&m), outcome("command", "failed", 1));
    // Checked at the end, so that the dry run below is checked too.
    let mut failures = Vec::new();
    if !gone {
        failures.push(format!(
            "the hook's `sleep 60` (pids {left:?}; seen running: {running:?}) still runs after the \
             timeout: /bin/sh (dash) forks it, and the agent kills only the shell"
        ));
    }
    assert!(
        killed_after < Duration::from_secs(3),
        "counted {killed_after:?} after the command was seen: the 1 s timeout"
    );
    std::thread::sleep(Duration::from_secs(1));
    let m = agent.scrape().expect("scrape");
    assert_eq!(nonzero_outcomes(&m), outcome("command", "failed", 1));
    assert!(agent.log_text().contains("still running after 1s: killed"));
    stop(agent);

    // --dry-run: counted as dry_run, nothing runs.
    let file = dir.join("dry");
    let mut args = base_args(&probe);
    args.extend([
        "--failover-command".into(),
        format!("echo ran >> {}", file.display()),
        "--dry-run".into(),
    ]);
    let (agent, m) = act("failover-dry", "dry run", &args);
    assert_eq!(nonzero_outcomes(&m), outcome("dry_run", "ok", 1));
    assert!(
        outcomes(&m).iter().all(|o| o.0 == "dry_run"),
        "no `command` series with --dry-run: {:?}",
        outcomes(&m)
    );
    assert!(!file.exists(), "--dry-run ran the command");
    assert_eq!(
        agent
            .log_text()
            .matches("failover (dry run): would run")
            .count(),
        1
    );
    stop(agent);

    drop(imp);
    lab.teardown().expect("lab down");
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "failing_hanging_and_dry_run_actions_are_counted: the hanging command counted \
         {killed_after:?} after it was seen running; {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A hook of several commands (the usual `mullvad relay set location se; mullvad
/// reconnect`) that hangs in the first: the timeout must kill the whole command, not only
/// the shell. And a configured action has both its result series from the start (at 0), as
/// the collector says, so that rates and increases are 0 rather than absent.
#[test]
fn hanging_compound_command_leaves_nothing_running() {
    if !lab::can_run("hanging_compound_command_leaves_nothing_running") {
        return;
    }
    let (lab, imp) = lab_with_relay(Impairment::delay(DELAY));
    let wg = lab.client().wg().iface.clone();
    let relay = lab.exit().wg().public_key.clone();
    let path = [("interface", wg.as_str()), ("peer", relay.as_str())];
    let dir = scratch("failover-compound");
    let file = dir.join("after");
    let tag = format!("compound-{}", std::process::id());
    let mut args = base_args(&format!("{GATEWAY_V4}@{wg}"));
    args.extend([
        "--failover-command".into(),
        format!(
            "WSF_MARKER={tag} sleep 60; echo after >> {}",
            file.display()
        ),
        "--failover-timeout".into(),
        "1s".into(),
    ]);
    let agent = start_agent(&lab, "failover-compound", &args);
    wait_until(&agent, "unhealthy", Duration::from_secs(15), |m| {
        healthy(m, &path) == Some(0.0)
    });
    let Hang {
        running,
        m,
        gone,
        left,
        ..
    } = hang(&agent, &tag);
    let status = agent.stop().expect("agent stops");
    drop(imp);
    lab.teardown().expect("lab down");
    let _ = std::fs::remove_dir_all(&dir);

    assert!(!running.is_empty(), "the hook's `sleep 60` never ran");
    assert_eq!(nonzero_outcomes(&m), outcome("command", "failed", 1));
    let mut failures = Vec::new();
    if !gone {
        failures.push(format!(
            "the hook's `sleep 60` (pids {left:?}) outlived the killed shell: the timeout \
             kills /bin/sh only, not its process group"
        ));
    }
    if m.select(FAILOVER, &[("action", "command"), ("result", "ok")])
        .next()
        .is_none()
    {
        failures.push(format!(
            "no wirescope_failover_total{{action=\"command\",result=\"ok\"}} series at 0 \
             beside the failure: {:?}",
            outcomes(&m)
        ));
    }
    assert!(status.success(), "clean exit after SIGINT: {status}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
