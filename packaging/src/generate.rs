//! Files generated at package time from the agent's clap definition
//! (`wirescope::config::cli::Cli`): man pages and shell completions; and the packaged systemd
//! unit, derived from deploy/wirescope.service so that there is one unit file to maintain.

use anyhow::{Result, bail};
use clap::CommandFactory as _;
use clap_complete::Shell;

/// The agent's command line, as `wirescope --help` shows it.
pub fn command() -> clap::Command {
    wirescope::config::cli::Cli::command()
}

/// The day the agent was built from, out of its version string (`0.1.0 (revision R, built
/// YYYY-MM-DD)`): the man pages' date, so that one commit gives the same pages.
pub fn build_date() -> &'static str {
    wirescope::config::cli::VERSION
        .rsplit_once("built ")
        .map_or("", |(_, d)| d.trim_end_matches(')'))
}

/// A man page: its file name (`wirescope-run.1`) and roff text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManPage {
    pub name: String,
    pub roff: Vec<u8>,
}

/// Section 1 pages for `cmd` and each of its visible subcommands (`wirescope.1`,
/// `wirescope-run.1`, ...), as `clap_mangen::generate_to` names them: the top page only lists
/// the subcommands, their options are on their own pages.
pub fn man_pages(cmd: clap::Command) -> Result<Vec<ManPage>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    let mut todo = vec![cmd];
    while let Some(c) = todo.pop() {
        todo.extend(c.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        // The package's name and version in the footer, for the subcommands' pages too
        // (clap_mangen would write `run 0.1.0 ...`).
        let man = clap_mangen::Man::new(c)
            .date(build_date())
            .source(format!("wirescope {}", wirescope::config::cli::VERSION));
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        pages.push(ManPage {
            name: man.get_filename(),
            roff,
        });
    }
    pages.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pages)
}

/// The shells completions are shipped for, and where Debian's packages of them look.
pub const SHELLS: &[(Shell, &str)] = &[
    (
        Shell::Bash,
        "/usr/share/bash-completion/completions/wirescope",
    ),
    (Shell::Zsh, "/usr/share/zsh/vendor-completions/_wirescope"),
    (
        Shell::Fish,
        "/usr/share/fish/vendor_completions.d/wirescope.fish",
    ),
];

/// The completion script of `shell` for `cmd`.
pub fn completion(cmd: &clap::Command, shell: Shell) -> Vec<u8> {
    let mut cmd = cmd.clone();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "wirescope", &mut out);
    out
}

/// deploy/wirescope.service, the one unit file.
pub const UNIT_SOURCE: &str = include_str!("../../deploy/wirescope.service");

/// Where deploy/wirescope.service expects the binary, and where the package puts it.
const UNIT_EXEC_FROM: &str = "ExecStart=/usr/local/bin/wirescope ";
const UNIT_EXEC_TO: &str = "ExecStart=/usr/bin/wirescope ";

const UNIT_HEADER: &str = "\
# systemd unit for the wirescope agent, as the Debian package installs it: derived from
# deploy/wirescope.service at package time, with only this header and the binary's path
# (/usr/bin/wirescope) changed. The package enables and starts it on install.
#
# Options: WIRESCOPE_ARGS in /etc/default/wirescope, which passes the settings file
# /etc/wirescope/wirescope.toml (every option with its default); or a drop-in
# (`systemctl edit wirescope`). `man wirescope-run` lists the options.
";

/// The unit as packaged: `source` with its header comment (everything before `[Unit]`, which
/// tells how to install it by hand) replaced, and its one `ExecStart=` pointed at
/// /usr/bin/wirescope. Anything else in the source would be a second unit to keep in step.
pub fn packaged_unit(source: &str) -> Result<String> {
    let Some(start) = source.find("\n[Unit]\n") else {
        bail!(
            "deploy/wirescope.service has no [Unit] section at the start of a line: the \
             packaged unit keeps everything from there on"
        );
    };
    let body = &source[start + 1..];
    let found = body.matches(UNIT_EXEC_FROM).count();
    if found != 1 {
        bail!(
            "deploy/wirescope.service has {found} lines starting `{UNIT_EXEC_FROM}`, not one: \
             the package points that one line at /usr/bin/wirescope; keep a single \
             ExecStart= naming /usr/local/bin/wirescope (or change UNIT_EXEC_FROM in \
             packaging/src/generate.rs with it)"
        );
    }
    Ok(format!(
        "{UNIT_HEADER}\n{}",
        body.replacen(UNIT_EXEC_FROM, UNIT_EXEC_TO, 1)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_differs_from_deploy_only_in_header_and_binary() {
        let unit = packaged_unit(UNIT_SOURCE).expect("derived");
        assert!(unit.starts_with(UNIT_HEADER));
        let src: Vec<&str> = UNIT_SOURCE.lines().skip_while(|l| *l != "[Unit]").collect();
        let pkg: Vec<&str> = unit.lines().skip_while(|l| *l != "[Unit]").collect();
        assert_eq!(src.len(), pkg.len());
        let changed: Vec<(&str, &str)> = src
            .iter()
            .zip(&pkg)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (*a, *b))
            .collect();
        assert_eq!(
            changed,
            [(
                "ExecStart=/usr/local/bin/wirescope run $WIRESCOPE_ARGS",
                "ExecStart=/usr/bin/wirescope run $WIRESCOPE_ARGS"
            )]
        );
        assert!(!unit.contains("/usr/local"), "{unit}");
    }

    #[test]
    fn a_unit_the_package_cannot_derive_from_is_refused_with_the_reason() {
        let two = UNIT_SOURCE.replace(
            "ExecStart=/usr/local/bin/wirescope run $WIRESCOPE_ARGS",
            "ExecStart=/usr/local/bin/wirescope run $WIRESCOPE_ARGS\n\
             ExecStart=/usr/local/bin/wirescope run --log-level debug",
        );
        let e = packaged_unit(&two)
            .expect_err("two ExecStart lines")
            .to_string();
        assert!(
            e.contains("has 2 lines starting `ExecStart=/usr/local/bin/wirescope `"),
            "{e}"
        );
        let moved = UNIT_SOURCE.replace("/usr/local/bin/wirescope", "/opt/wirescope");
        let e = packaged_unit(&moved).expect_err("no ExecStart").to_string();
        assert!(e.contains("has 0 lines"), "{e}");
        let e = packaged_unit("ExecStart=/usr/local/bin/wirescope run\n")
            .expect_err("no [Unit]")
            .to_string();
        assert!(e.contains("no [Unit] section"), "{e}");
    }

    #[test]
    fn one_man_page_per_command() {
        let pages = man_pages(command()).expect("rendered");
        let names: Vec<&str> = pages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "wirescope-doctor.1",
                "wirescope-run.1",
                "wirescope-status.1",
                "wirescope.1"
            ]
        );
        let run = String::from_utf8(pages[1].roff.clone()).expect("roff is text");
        // The title line names the page, its section, the build day and the version.
        let th = run.lines().find(|l| l.starts_with(".TH ")).expect(".TH");
        assert_eq!(
            th,
            format!(
                ".TH wirescope-run 1 {} \"wirescope {}\" ",
                build_date(),
                wirescope::config::cli::VERSION
            )
        );
        // Every long option of `run` is documented on its page.
        for arg in command()
            .find_subcommand("run")
            .expect("run")
            .get_arguments()
        {
            if let Some(long) = arg.get_long() {
                let roff_long = long.replace('-', "\\-");
                assert!(run.contains(&format!("\\-\\-{roff_long}")), "--{long}");
            }
        }
        assert_eq!(build_date().len(), "YYYY-MM-DD".len(), "{}", build_date());
    }

    #[test]
    fn completions_offer_the_subcommands_and_options() {
        let cmd = command();
        for (shell, path) in SHELLS {
            let script = String::from_utf8(completion(&cmd, *shell)).expect("text");
            // fish spells a long option `-l web.listen-address`.
            for word in [
                "run",
                "status",
                "doctor",
                "web.listen-address",
                "failover-peer",
            ] {
                assert!(script.contains(word), "{shell} ({path}): {word}");
            }
        }
    }
}
