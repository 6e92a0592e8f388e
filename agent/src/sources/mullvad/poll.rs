//! Running `mullvad status --json`: once, bounded in time and output ([`poll_once`]), and
//! on a loop into the shared [`MullvadState`] ([`spawn`]), each distinct failure logged once.

use super::{parse::short, *};

/// Runs `<cli> status --json` once, killing it (and everything it started, by its process
/// group) when it takes longer than `cfg.timeout`.
pub async fn poll_once(cfg: &MullvadConfig) -> Result<MullvadStatus, MullvadError> {
    let cli = cfg.cli.clone();
    let mut cmd = Command::new(&cfg.cli);
    cmd.args(["status", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills what a wrapper script started too.
        .process_group(0)
        // Also killed when this future is dropped (the agent stopping mid-call).
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(MullvadError::NotFound { cli }),
        Err(source) => return Err(MullvadError::Spawn { cli, source }),
    };
    let pid = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let outcome = tokio::time::timeout(cfg.timeout, async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            match stdout {
                Some(s) => s.take(MAX_OUTPUT).read_to_end(&mut out).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let read_err = async {
            match stderr {
                Some(s) => s.take(MAX_OUTPUT).read_to_end(&mut err).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let (o, e, status) = tokio::join!(read_out, read_err, child.wait());
        o.and(e).and(status.map(|s| (s, out, err)))
    })
    .await;
    let (status, out, err) = match outcome {
        Ok(Ok(v)) => v,
        Ok(Err(source)) => return Err(MullvadError::Read { cli, source }),
        Err(_elapsed) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) with a negative pid signals that process group; the group
                // is the child's own (process_group(0) above), still unreaped, so its id
                // cannot have been reused.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            // Kills the child itself if the group kill failed, and reaps it.
            let _ = child.kill().await;
            return Err(MullvadError::Timeout {
                cli,
                timeout: cfg.timeout,
            });
        }
    };
    if !status.success() {
        let text = String::from_utf8_lossy(&err);
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(short)
            .unwrap_or_else(|| "no message".to_owned());
        let status = match status.code() {
            Some(c) => format!("exit status {c}"),
            None => status.to_string(),
        };
        return Err(MullvadError::Exit {
            cli,
            status,
            stderr: first,
        });
    }
    let text = String::from_utf8_lossy(&out);
    parse_status(&text).map_err(|error| MullvadError::Parse {
        cli,
        hint: error.hint(),
        error,
        start: short(text.trim()),
    })
}

/// Polls `<cli> status --json` every `cfg.interval` (every [`NOT_FOUND_INTERVAL`] while the
/// command is not installed) into `state`, until `stop` turns true or its sender goes.
pub fn spawn(
    cfg: MullvadConfig,
    state: Arc<RwLock<MullvadState>>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_logged: Option<String> = None;
        let mut last_state: Option<String> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            let result = tokio::select! {
                r = poll_once(&cfg) => r,
                // Dropping the call kills the command (kill_on_drop).
                _ = stop.changed() => return,
            };
            log_outcome(&cfg, &result, &mut last_logged, &mut last_state);
            let not_found = matches!(&result, Err(e) if e.is_not_found());
            {
                // A poisoned lock only means a reader panicked; the state is replaced
                // wholesale here, so carrying on with it is sound.
                let mut s = state.write().unwrap_or_else(|p| p.into_inner());
                s.record(result.as_ref().map(Clone::clone));
            }
            let wait = if not_found {
                cfg.interval.max(NOT_FOUND_INTERVAL)
            } else {
                cfg.interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    })
}

/// Logs a failure once per distinct message, a recovery, state changes and what could not
/// be read, instead of every poll.
fn log_outcome(
    cfg: &MullvadConfig,
    result: &Result<MullvadStatus, MullvadError>,
    last_logged: &mut Option<String>,
    last_state: &mut Option<String>,
) {
    match result {
        Ok(s) => {
            if last_logged.take().is_some() {
                info!("Mullvad: `{} status --json` works again", cfg.cli);
            }
            let summary = format!("{} {:?} {:?}", s.state, s.device, s.unreadable);
            if last_state.as_deref() != Some(summary.as_str()) {
                match &s.state {
                    TunnelState::Other(name) => warn!(
                        "Mullvad: unknown tunnel state {name:?}, exported as mullvad_tunnel_state{{state=\"{name}\"}}"
                    ),
                    st => info!("Mullvad: tunnel {st}"),
                }
                if matches!(s.device, DeviceState::Revoked | DeviceState::LoggedOut) {
                    warn!(
                        "Mullvad: the CLI says {:?}: the tunnel cannot reconnect until an account \
                         is logged in again (`mullvad account login`); mullvad_device_state says so",
                        s.warnings.join(" ")
                    );
                }
                if !s.unreadable.is_empty() {
                    warn!(
                        "Mullvad: parts of `{} status --json` could not be read: {}",
                        cfg.cli,
                        s.unreadable.join("; ")
                    );
                }
                *last_state = Some(summary);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            if last_logged.as_deref() != Some(msg.as_str()) {
                if e.is_not_found() {
                    info!("Mullvad: {msg}");
                } else {
                    warn!("Mullvad: {msg}");
                }
                *last_logged = Some(msg);
            }
            *last_state = None;
        }
    }
}
