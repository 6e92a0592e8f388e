//! Mullvad: whether the app is installed, and its daemon's state (connected, relays,
//! features; the error state and a daemon that does not answer are problems).

use std::{fmt::Write as _, os::unix::fs::PermissionsExt, time::Duration};

use super::{Finding, Severity};
use crate::{
    config::MullvadConfig,
    sources::mullvad::{self, TunnelState},
};

/// Whether an executable file `name` is in a PATH directory (unreadable ones skipped).
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

pub(super) async fn check_mullvad(f: &mut Vec<Finding>, cli: &str) {
    let cfg = MullvadConfig {
        cli: cli.to_string(),
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(5),
    };
    if !cli.contains('/') && !on_path(cli) {
        f.push(Finding::info("mullvad", "Mullvad is not installed"));
        return;
    }
    match mullvad::poll_once(&cfg).await {
        Err(e) if e.is_not_found() => {
            f.push(Finding::info("mullvad", "Mullvad is not installed"));
        }
        Err(e) => f.push(Finding::problem(
            "mullvad",
            format!("the Mullvad daemon does not answer: {e}"),
            "systemctl restart mullvad-daemon",
        )),
        Ok(st) => {
            let mut msg = format!("state {}", st.state.name());
            if let Some(loc) = &st.location {
                if let Some(h) = &loc.hostname {
                    let _ = write!(msg, ", exit {h}");
                    if let Some(c) = &loc.city {
                        let _ = write!(msg, " ({c})");
                    }
                }
                if let Some(h) = &loc.entry_hostname {
                    let _ = write!(msg, ", entry {h}");
                    if let Some(c) = &loc.entry_city {
                        let _ = write!(msg, " ({c})");
                    }
                }
            }
            let _ = write!(
                msg,
                ", multihop {}, DAITA {}, quantum-resistant {}",
                if st.multihop() { "on" } else { "off" },
                if st.daita() { "on" } else { "off" },
                if st.quantum_resistant() { "on" } else { "off" },
            );
            if let Some(true) = st.locked_down {
                msg.push_str(", lockdown mode (blocks traffic while disconnected)");
            }
            match st.state {
                TunnelState::Error => f.push(Finding::problem(
                    "mullvad",
                    format!(
                        "{msg}: {}",
                        st.error_cause
                            .as_deref()
                            .unwrap_or("the tunnel is in the error state")
                    ),
                    "mullvad reconnect",
                )),
                TunnelState::Disconnected => f.push(Finding::new(
                    "mullvad",
                    Severity::Info,
                    msg,
                    Some("mullvad connect".into()),
                )),
                _ => f.push(Finding::info("mullvad", msg)),
            }
            if !st.unreadable.is_empty() {
                f.push(Finding::info(
                    "mullvad",
                    format!("fields not understood: {}", st.unreadable.join(", ")),
                ));
            }
        }
    }
}
