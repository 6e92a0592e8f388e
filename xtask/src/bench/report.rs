//! bench/REPORT.md and bench/report.json: the same figures, for people and for tools.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{Figure, Goal};

/// When and where the figures were measured.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// UTC, `date -u +%Y-%m-%dT%H:%MZ`.
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub quick: bool,
    pub seconds: f64,
    /// `git rev-parse --short HEAD`, with `-dirty` when the tree has changes.
    pub commit: String,
}

impl Meta {
    pub fn collect(quick: bool, took: Duration) -> Result<Meta> {
        let date = crate::cmd::stdout("date", ["-u", "+%Y-%m-%dT%H:%MZ"])?
            .trim()
            .to_string();
        let kernel = crate::cmd::stdout("uname", ["-r"])?.trim().to_string();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_gib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let commit = crate::cmd::stdout("git", ["rev-parse", "--short", "HEAD"])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let dirty = crate::cmd::stdout("git", ["status", "--porcelain", "--untracked-files=no"])
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false);
        Ok(Meta {
            date,
            kernel,
            cpu,
            cpus,
            memory_gib,
            quick,
            seconds: took.as_secs_f64(),
            commit: if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            },
        })
    }
}

#[derive(Serialize)]
struct Json<'a> {
    meta: &'a Meta,
    figures: &'a [Figure],
}

pub fn write(dir: &Path, meta: &Meta, figures: &[Figure]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(&Json { meta, figures })?;
    let jpath = dir.join("report.json");
    std::fs::write(&jpath, json + "\n").with_context(|| format!("writing {}", jpath.display()))?;
    let mpath = dir.join("REPORT.md");
    std::fs::write(&mpath, markdown(meta, figures))
        .with_context(|| format!("writing {}", mpath.display()))?;
    Ok(())
}

/// A value with as many digits as it deserves.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 100.0 || v == v.trunc() && a < 1e9 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_goal(g: Option<Goal>, unit: &str) -> String {
    match g {
        None => String::new(),
        Some(Goal::AtMost(l)) => format!("<= {} {unit}", fmt_value(l)),
        Some(Goal::AtLeast(l)) => format!(">= {} {unit}", fmt_value(l)),
    }
}

/// A row of a goals table: figure, measured, goal, verdict.
fn goal_row(s: &mut String, f: &Figure) {
    let _ = writeln!(
        s,
        "| {}: {} | {} {} | {} | {} |",
        f.section,
        f.name,
        fmt_value(f.value),
        f.unit,
        fmt_goal(f.goal, &f.unit),
        verdict(f)
    );
}

fn verdict(f: &Figure) -> &'static str {
    match f.met() {
        None => "",
        Some(true) => "met",
        Some(false) => "**not met**",
    }
}

pub fn markdown(meta: &Meta, figures: &[Figure]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# wirescope benchmark report\n");
    let _ = writeln!(
        s,
        "Measured {} by `cargo xtask bench{}` on commit {}: Linux {}, {} ({} CPUs), {:.0} GiB; \
         the run took {:.0} s.\n",
        meta.date,
        if meta.quick { " --quick" } else { "" },
        meta.commit,
        meta.kernel,
        meta.cpu,
        meta.cpus,
        meta.memory_gib,
        meta.seconds
    );
    if meta.quick {
        let _ = writeln!(
            s,
            "**Quick mode**: small counts, a smoke check that every figure is produced; the \
             figures are not precise.\n"
        );
    }
    let goals: Vec<&Figure> = figures.iter().filter(|f| f.goal.is_some()).collect();
    if !goals.is_empty() {
        let _ = writeln!(s, "## Goals\n");
        let _ = writeln!(s, "| figure | measured | goal | |");
        let _ = writeln!(s, "|---|---:|---|---|");
        for f in goals {
            goal_row(&mut s, f);
        }
        s.push('\n');
    }
    let mut sections: Vec<&str> = Vec::new();
    for f in figures {
        if !sections.contains(&f.section.as_str()) {
            sections.push(&f.section);
        }
    }
    for sec in sections {
        let _ = writeln!(s, "## {sec}\n");
        let _ = writeln!(s, "| figure | value | goal | how |");
        let _ = writeln!(s, "|---|---:|---|---|");
        for f in figures.iter().filter(|f| f.section == sec) {
            let _ = writeln!(
                s,
                "| {} | {} {} | {} {} | {} |",
                f.name,
                fmt_value(f.value),
                f.unit,
                fmt_goal(f.goal, &f.unit),
                verdict(f),
                f.note
            );
        }
        s.push('\n');
    }
    s
}

/// Where README.md keeps the latest full run's goals table.
pub const README_START: &str = "<!-- bench:start (written by cargo xtask bench) -->";
pub const README_END: &str = "<!-- bench:end -->";

/// The goals table, with when and where it was measured, for README.md.
pub fn readme_section(meta: &Meta, figures: &[Figure]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Measured {} on commit {}: Linux {}, {} ({} CPUs), {:.0} GiB, by `cargo xtask bench` \
         in {:.0} s. Every figure is a difference or ratio of two measurements of the same run; \
         the whole report (every packet kind, peer count and case) is \
         [bench/REPORT.md](bench/REPORT.md).\n",
        meta.date, meta.commit, meta.kernel, meta.cpu, meta.cpus, meta.memory_gib, meta.seconds
    );
    let _ = writeln!(s, "| goal | measured | target | |");
    let _ = writeln!(s, "|---|---:|---|---|");
    for f in figures.iter().filter(|f| f.goal.is_some()) {
        goal_row(&mut s, f);
    }
    s
}

/// Replaces what lies between [`README_START`] and [`README_END`] in `readme` with
/// [`readme_section`]; the markers must be there.
pub fn update_readme(readme: &Path, meta: &Meta, figures: &[Figure]) -> Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(a), Some(b)) = (text.find(README_START), text.find(README_END)) else {
        anyhow::bail!(
            "{} lacks the markers {README_START} and {README_END}: put them where the bench table goes",
            readme.display()
        );
    };
    if b < a {
        anyhow::bail!(
            "{}: {README_END} comes before {README_START}",
            readme.display()
        );
    }
    let new = format!(
        "{}{README_START}\n{}{}",
        &text[..a],
        readme_section(meta, figures),
        &text[b..]
    );
    std::fs::write(readme, new).with_context(|| format!("writing {}", readme.display()))
}

/// Prints each goal as met or not, with its figure.
pub fn print_goals(figures: &[Figure]) {
    for f in figures.iter().filter(|f| f.goal.is_some()) {
        println!(
            "goal {:>8}: {}: {} = {} {} ({})",
            if f.met() == Some(true) {
                "met"
            } else {
                "NOT MET"
            },
            f.section,
            f.name,
            fmt_value(f.value),
            f.unit,
            fmt_goal(f.goal, &f.unit)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_lists_goals_and_sections() {
        let meta = Meta {
            date: "2026-11-26T07:00Z".into(),
            kernel: "6.18.0".into(),
            cpu: "Test CPU".into(),
            cpus: 2,
            memory_gib: 24.0,
            quick: false,
            seconds: 12.0,
            commit: "abc123".into(),
        };
        let figs = vec![
            Figure::new("cost", "ingress data", 41.5, "ns").goal(Goal::AtMost(40.0)),
            Figure::new("cost", "egress data", 12.34, "ns").goal(Goal::AtMost(40.0)),
            Figure::new("scale", "rss", 20.0, "MB"),
        ];
        let md = markdown(&meta, &figs);
        assert!(
            md.contains("| cost: ingress data | 41.5 ns | <= 40 ns | **not met** |"),
            "{md}"
        );
        assert!(
            md.contains("| cost: egress data | 12.3 ns | <= 40 ns | met |"),
            "{md}"
        );
        assert!(md.contains("## scale\n"), "{md}");
        assert!(md.contains("| rss | 20 MB |   |  |"), "{md}");

        let dir = std::env::temp_dir().join(format!("wirescope-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        std::fs::write(
            &readme,
            format!("# x\n{README_START}\nold\n{README_END}\nrest\n"),
        )
        .unwrap();
        update_readme(&readme, &meta, &figs).unwrap();
        let text = std::fs::read_to_string(&readme).unwrap();
        assert!(!text.contains("old"), "{text}");
        assert!(
            text.contains("| cost: ingress data | 41.5 ns | <= 40 ns | **not met** |"),
            "{text}"
        );
        assert!(text.ends_with(&format!("{README_END}\nrest\n")), "{text}");
        assert!(!text.contains("| rss |"), "only goals: {text}");
        std::fs::write(&readme, "no markers").unwrap();
        assert!(update_readme(&readme, &meta, &figs).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
