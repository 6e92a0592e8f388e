//! /etc/wirescope/wirescope.toml, generated from `wirescope run`'s clap definition: every
//! option (the TOML keys are the long option names) with its help text and, commented out,
//! its default value. Repeatable options default to `[]` and switches to `false`; the
//! others take their value from [`values`], which uses the agent's own default constants
//! where it has them. An option with no value here stops packaging with its name, so a new
//! option of the agent cannot be left out of the file; the tests read the file back with
//! the agent's config reader, so a default shown wrongly cannot ship either.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::ArgAction;
use wirescope::config::{self as agent, cli};

/// What the file shows for an option that takes one value.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    /// Its default, as a TOML value: uncommenting the line changes nothing.
    Default(String),
    /// For an option that is off unless given: a TOML value as an example.
    Example(String),
}

fn s(v: &str) -> Shown {
    Shown::Default(toml_string(v))
}

fn d(v: Duration) -> Shown {
    Shown::Default(toml_string(&wirescope_duration(v)))
}

/// `5s`, `300s`, `200ms`: whole seconds where the value has them (the agent's reader
/// parses any humantime duration).
fn wirescope_duration(v: Duration) -> String {
    let ms = v.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A TOML basic string.
fn toml_string(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The example `failover-command`, Mullvad's relay switch.
pub const EXAMPLE_FAILOVER_COMMAND: &str = "mullvad relay set location se && mullvad reconnect";
/// The example `web.config.file`: relative paths in the file are relative to its
/// directory, so this is /etc/wirescope/web.yml.
pub const EXAMPLE_WEB_CONFIG: &str = "web.yml";

/// The value shown for each option of `run` that takes one value (repeatable options and
/// switches need none).
pub fn values() -> Vec<(&'static str, Shown)> {
    vec![
        ("web.listen-address", s(cli::DEFAULT_LISTEN_ADDRESS)),
        ("web.telemetry-path", s(cli::DEFAULT_TELEMETRY_PATH)),
        (
            "web.config.file",
            Shown::Example(toml_string(EXAMPLE_WEB_CONFIG)),
        ),
        ("state-dir", s(agent::DEFAULT_STATE_DIR)),
        ("log.level", s(cli::DEFAULT_LOG_LEVEL)),
        // The agent's LogFormat::default().
        ("log.format", s("text")),
        ("mullvad-cli", s(agent::DEFAULT_MULLVAD_CLI)),
        ("mullvad-interval", d(agent::DEFAULT_MULLVAD_INTERVAL)),
        ("probe-interval", d(agent::DEFAULT_PROBE_INTERVAL)),
        ("probe-timeout", d(agent::DEFAULT_PROBE_TIMEOUT)),
        // On unless `off`; the agent has no constant for it.
        ("transit-time", s("on")),
        ("peer-histograms", s("on")),
        ("peer-grace", d(agent::DEFAULT_PEER_GRACE)),
        ("pmtu-interval", d(agent::DEFAULT_PMTU_INTERVAL)),
        (
            "failover-command",
            Shown::Example(toml_string(EXAMPLE_FAILOVER_COMMAND)),
        ),
        ("failover-max-rtt", d(agent::DEFAULT_FAILOVER_MAX_RTT)),
        // A TOML number: the reader takes a float here, not a string.
        (
            "failover-max-loss",
            Shown::Default(format!("{:?}", agent::DEFAULT_FAILOVER_MAX_LOSS)),
        ),
        (
            "failover-max-handshake-age",
            d(agent::DEFAULT_FAILOVER_MAX_HANDSHAKE_AGE),
        ),
        ("failover-window", d(agent::DEFAULT_FAILOVER_WINDOW)),
        ("failover-cooldown", d(agent::DEFAULT_FAILOVER_COOLDOWN)),
        ("failover-timeout", d(agent::DEFAULT_FAILOVER_TIMEOUT)),
    ]
}

/// Options of `run` that are not settings (`--config` names the file itself).
const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

/// One option as the file shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value_name: Option<String>,
    pub repeatable: bool,
    pub help: String,
    pub shown: Shown,
}

/// Every option of `run` in `cmd` (the agent's [`crate::generate::command`]), in the order
/// `--help` lists them, with what the file shows for it.
pub fn entries(cmd: &clap::Command, values: &[(&'static str, Shown)]) -> Result<Vec<Entry>> {
    let Some(run) = cmd.find_subcommand("run") else {
        bail!("the agent's command line has no `run` subcommand");
    };
    let mut out = Vec::new();
    let mut used = Vec::new();
    for arg in run.get_arguments() {
        let Some(key) = arg.get_long() else {
            bail!(
                "`wirescope run` option {} has no long name, so it has no key in the config \
                 file: give it one",
                arg.get_id()
            );
        };
        if NOT_IN_FILE.contains(&key) {
            continue;
        }
        let action = arg.get_action();
        let repeatable = matches!(action, ArgAction::Append);
        let shown = match action {
            ArgAction::Append => Shown::Default("[]".into()),
            ArgAction::SetTrue => Shown::Default("false".into()),
            _ => match values.iter().find(|(k, _)| *k == key) {
                Some((k, v)) => {
                    used.push(*k);
                    v.clone()
                }
                None => bail!(
                    "`wirescope run --{key}` has no value for the config file: add its default \
                     (or, for an option that is off unless given, an example) to `values()` in \
                     packaging/src/config_file.rs"
                ),
            },
        };
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        out.push(Entry {
            key: key.to_owned(),
            // clap names a value even for switches, which take none.
            value_name: arg
                .get_value_names()
                .and_then(|v| v.first())
                .filter(|_| action.takes_values())
                .map(|v| v.to_string()),
            repeatable,
            help,
            shown,
        });
    }
    if let Some((stale, _)) = values.iter().find(|(k, _)| !used.contains(k)) {
        bail!(
            "packaging/src/config_file.rs has a value for `{stale}`, which is not an option of \
             `wirescope run` that takes one value: remove it (or rename it with the option)"
        );
    }
    Ok(out)
}

const HEADER: &str = "\
# wirescope settings: the options of `wirescope run` (`man wirescope-run`), read by the
# systemd unit through /etc/default/wirescope (--config /etc/wirescope/wirescope.toml).
#
# Every option is listed with its default, commented out: remove the leading `#` of a key
# to set it, then `systemctl restart wirescope`. Keys are the long option names; flags in
# WIRESCOPE_ARGS override this file (a repeatable flag replaces the whole list), relative
# paths are relative to this directory, and an unknown key stops the agent with its name.
# Generated from the agent's command line definition when the package was built.
";

/// The longest comment line.
const WIDTH: usize = 90;

/// The file: [`HEADER`], then per option its flag, its help and the commented-out setting.
pub fn render(entries: &[Entry]) -> String {
    let mut out = String::from(HEADER);
    for e in entries {
        out.push('\n');
        let mut flag = format!("--{}", e.key);
        if let Some(v) = &e.value_name {
            flag.push(' ');
            flag.push_str(v);
        }
        if e.repeatable {
            flag.push_str(" (repeatable: a list here)");
        }
        out.push_str(&format!("# {flag}\n"));
        for line in wrap(&e.help, WIDTH - 2) {
            out.push_str(&format!("# {line}\n"));
        }
        let value = match &e.shown {
            Shown::Default(v) => v,
            Shown::Example(v) => {
                out.push_str("# Not set by default; for example:\n");
                v
            }
        };
        out.push_str(&format!("#{} = {value}\n", e.key));
    }
    out
}

/// The file for the agent's own command line.
pub fn generate() -> Result<String> {
    Ok(render(&entries(&crate::generate::command(), &values())?))
}

/// Greedy word wrap (clap gives each paragraph of help as one line).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.lines() {
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    lines
}

#[cfg(test)]
mod tests;
