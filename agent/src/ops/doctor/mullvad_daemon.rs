//! Mullvad: whether the app is installed, and its daemon's state (connected, relays,
//! features; the error state, a logged-out or revoked device and a daemon that does not
//! answer are problems).

use std::{fmt::Write as _, os::unix::fs::PermissionsExt, time::Duration};

use super::{Finding, Severity};
use crate::{
    config::MullvadConfig,
    sources::mullvad::{self, DeviceState, TunnelState},
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
                for (role, p) in [("exit", loc.exit()), ("entry", loc.entry())] {
                    if !p.hostname.is_empty() {
                        let _ = write!(msg, ", {role} {}", p.hostname);
                        if !p.city.is_empty() {
                            let _ = write!(msg, " ({})", p.city);
                        }
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
            // The daemon cannot make a new tunnel without a valid device: the next reconnect
            // (or relay rotation) fails and the firewall then blocks everything.
            let account = match st.device {
                DeviceState::Revoked => Some("this device has been revoked"),
                DeviceState::LoggedOut => Some("no account is logged in"),
                _ => None,
            };
            if let Some(why) = account {
                f.push(Finding::problem(
                    "mullvad",
                    format!("{why}: the tunnel cannot reconnect"),
                    "mullvad account login",
                ));
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// The findings for a `mullvad` that prints `output`.
    async fn findings(test: &str, output: &str) -> Vec<Finding> {
        let dir = std::env::temp_dir().join(format!(
            "wirescope-doctor-mullvad-{test}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cli = dir.join("mullvad");
        std::fs::write(&cli, format!("#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")).unwrap();
        std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut f = Vec::new();
        check_mullvad(&mut f, &cli.display().to_string()).await;
        std::fs::remove_dir_all(dir).unwrap();
        f
    }

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/mullvad/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[tokio::test]
    async fn a_revoked_device_is_a_problem_with_its_fix() {
        let f = findings("revoked", fixture("revoked_connected.txt").trim()).await;
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            (f[0].severity, f[0].message.as_str()),
            (
                Severity::Info,
                "state connected, exit se-got-wg-001 (Gothenburg), multihop off, DAITA off, \
                 quantum-resistant off"
            )
        );
        assert_eq!(
            (f[1].severity, f[1].message.as_str(), f[1].fix.as_deref()),
            (
                Severity::Problem,
                "this device has been revoked: the tunnel cannot reconnect",
                Some("mullvad account login")
            )
        );
        let f = findings("logged-out", fixture("logged_out_error.txt").trim()).await;
        let messages: Vec<&str> = f.iter().map(|x| x.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "state error, multihop off, DAITA off, quantum-resistant off: tunnel_parameter_error",
                "no account is logged in: the tunnel cannot reconnect"
            ]
        );
    }

    #[tokio::test]
    async fn the_entry_relay_is_named_by_its_hostname_codes() {
        let f = findings(
            "multihop",
            fixture("connected_multihop_current.json").trim(),
        )
        .await;
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            f[0].message,
            "state connected, exit se-got-wg-101 (Gothenburg), entry de-fra-wg-001 (fra), \
             multihop on, DAITA on, quantum-resistant on"
        );
    }
}
