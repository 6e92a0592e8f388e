//! What a check found: its family, how bad, what it means, and the command that fixes it;
//! the report of all of them, as text (a line each, the fix under it) or JSON.

use std::{fmt::Write as _, process::ExitCode};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Checked and fine.
    Ok,
    /// Something to know, nothing to fix.
    Info,
    /// Wrong: `fix` says what to run.
    Problem,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// The check family: agent, kernel, permissions, wireguard, mtu, keepalive, handshake,
    /// socket_buffers, clock, key_files, kill_switch, firewall, mullvad.
    pub check: &'static str,
    pub severity: Severity,
    pub message: String,
    /// The exact command that fixes it (problems; sometimes an info's suggestion).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub(super) fn ok(check: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, Severity::Ok, message, None)
    }
    pub(super) fn info(check: &'static str, message: impl Into<String>) -> Self {
        Self::new(check, Severity::Info, message, None)
    }
    pub(super) fn problem(
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(check, Severity::Problem, message, Some(fix.into()))
    }
    pub(super) fn new(
        check: &'static str,
        severity: Severity,
        message: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            check,
            severity,
            message: message.into(),
            fix,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// No problem found.
    pub ok: bool,
    pub problems: usize,
    /// The agent consulted, when one answered.
    pub agent: Option<String>,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn new(agent: Option<String>, findings: Vec<Finding>) -> Self {
        let problems = findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .count();
        Self {
            ok: problems == 0,
            problems,
            agent,
            findings,
        }
    }

    /// The human rendering: one line per finding, its fix indented under it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.severity {
                Severity::Ok => "ok     ",
                Severity::Info => "info   ",
                Severity::Problem => "PROBLEM",
            };
            let _ = writeln!(out, "{tag} {:<14} {}", f.check, f.message);
            if let Some(fix) = &f.fix {
                let label = if f.severity == Severity::Problem {
                    "fix:"
                } else {
                    "try:"
                };
                let _ = writeln!(out, "{:22} {label} {fix}", "");
            }
        }
        let _ = writeln!(
            out,
            "{}",
            if self.ok {
                "no problems found".to_string()
            } else {
                format!(
                    "{} problem{} found",
                    self.problems,
                    if self.problems == 1 { "" } else { "s" }
                )
            }
        );
        out
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_exit_and_render() {
        let r = Report::new(None, vec![Finding::ok("clock", "fine")]);
        assert!(r.ok);
        assert!(r.render().ends_with("no problems found\n"));
        let r = Report::new(
            None,
            vec![Finding::problem(
                "key_files",
                "x has mode 0644",
                "chmod 600 x",
            )],
        );
        assert!(!r.ok);
        assert_eq!(r.problems, 1);
        let text = r.render();
        assert!(text.contains("PROBLEM key_files"), "{text}");
        assert!(text.contains("fix: chmod 600 x"), "{text}");
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["findings"][0]["fix"], "chmod 600 x");
        assert_eq!(j["findings"][0]["severity"], "problem");
    }
}
