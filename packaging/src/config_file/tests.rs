use std::{collections::BTreeSet, path::PathBuf};

use clap::Arg;
use wirescope::config::{RunConfig, WebConfig, cli::RunArgs};

use super::*;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wirescope-conffile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// `text` as the agent reads it with `--config` and no flag.
fn read_with_agent(dir: &std::path::Path, text: &str) -> RunConfig {
    let path = dir.join("wirescope.toml");
    std::fs::write(&path, text).expect("write");
    RunConfig::from_args(&RunArgs {
        config: Some(path),
        ..RunArgs::default()
    })
    .unwrap_or_else(|e| panic!("the agent refuses the file: {e}\n{text}"))
}

/// The agent's configuration with no flag and no file.
fn defaults() -> RunConfig {
    RunConfig::from_args(&RunArgs::default()).expect("defaults")
}

/// Every `#key = value` line made a setting.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The keys the file sets when uncommented.
fn keys(text: &str) -> Vec<String> {
    uncommented(text)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(" = ").next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn every_option_of_run_is_in_the_file_once_in_help_order() {
    let text = generate().expect("generated");
    let run = crate::generate::command();
    let run = run.find_subcommand("run").expect("run");
    let want: Vec<String> = run
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !NOT_IN_FILE.contains(l))
        .map(str::to_owned)
        .collect();
    assert_eq!(keys(&text), want);
    // Each option's flag line and help come before its setting.
    assert!(
        text.contains(
            "\n# --probe-interval DURATION\n# Time between two probes of a target [default: 5s]\n#probe-interval = \"5s\"\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("\n# --tunnel IFACE (repeatable: a list here)\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\n# --dry-run\n# Log the failover action instead of running it\n#dry-run = false\n"
        ),
        "{text}"
    );
    assert!(
        text.lines().all(|l| l.chars().count() <= WIDTH),
        "a line over {WIDTH} columns:\n{text}"
    );
}

/// As shipped every setting is commented out: the agent reads it as no file at all.
#[test]
fn the_file_as_shipped_is_the_defaults() {
    let dir = scratch("shipped");
    let text = generate().expect("generated");
    assert_eq!(
        format!("{:?}", read_with_agent(&dir, &text)),
        format!("{:?}", defaults())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Uncommented, every line is accepted by the agent, every default shown is the agent's
/// default, and the two examples are what they say.
#[test]
fn every_value_shown_is_the_default_or_the_example() {
    let dir = scratch("uncommented");
    // The example web config, relative to the file's directory (an empty one is valid).
    std::fs::write(dir.join(EXAMPLE_WEB_CONFIG), "").expect("web.yml");
    let text = uncommented(&generate().expect("generated"));
    let got = read_with_agent(&dir, &text);
    let mut want = defaults();
    want.web_config = Some(WebConfig {
        path: dir.join(EXAMPLE_WEB_CONFIG),
        ..WebConfig::default()
    });
    want.failover.command = Some(EXAMPLE_FAILOVER_COMMAND.to_owned());
    assert_eq!(format!("{got:?}"), format!("{want:?}"), "{text}");
    // And without the two examples, exactly the defaults.
    let no_examples: String = text
        .lines()
        .filter(|l| !l.starts_with("web.config.file") && !l.starts_with("failover-command"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        format!("{:?}", read_with_agent(&dir, &no_examples)),
        format!("{:?}", defaults())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new option of the agent without a value here stops packaging, naming it and the fix;
/// so does a value left here for an option the agent no longer has.
#[test]
fn an_option_without_a_value_or_a_value_without_an_option_is_refused() {
    let cmd = crate::generate::command().mut_subcommand("run", |r| {
        r.arg(
            Arg::new("obfuscation")
                .long("obfuscation")
                .value_name("MODE"),
        )
    });
    let e = entries(&cmd, &values()).expect_err("no value for --obfuscation");
    assert_eq!(
        e.to_string(),
        "`wirescope run --obfuscation` has no value for the config file: add its default (or, \
         for an option that is off unless given, an example) to `values()` in \
         packaging/src/config_file.rs"
    );
    // Repeatable ones and switches need no value.
    let cmd = crate::generate::command().mut_subcommand("run", |r| {
        r.arg(
            Arg::new("exclude")
                .long("exclude")
                .action(ArgAction::Append),
        )
        .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
    });
    let all = entries(&cmd, &values()).expect("lists and switches have defaults");
    let tail: Vec<(&str, &Shown)> = all
        .iter()
        .rev()
        .take(2)
        .map(|e| (e.key.as_str(), &e.shown))
        .collect();
    assert_eq!(
        tail,
        [
            ("quiet", &Shown::Default("false".into())),
            ("exclude", &Shown::Default("[]".into()))
        ]
    );
    let mut stale = values();
    stale.push(("probe-count", s("3")));
    let e = entries(&crate::generate::command(), &stale).expect_err("stale value");
    assert!(
        e.to_string()
            .starts_with("packaging/src/config_file.rs has a value for `probe-count`"),
        "{e}"
    );
}

#[test]
fn values_are_written_as_the_reader_takes_them() {
    assert_eq!(
        wirescope_duration(std::time::Duration::from_secs(300)),
        "300s"
    );
    assert_eq!(
        wirescope_duration(std::time::Duration::from_millis(200)),
        "200ms"
    );
    assert_eq!(toml_string("a \"b\" \\c\n"), "\"a \\\"b\\\" \\\\c\\u000A\"");
    assert_eq!(wrap("one two three four", 9), ["one two", "three", "four"]);
    let keys: BTreeSet<&str> = values().iter().map(|(k, _)| *k).collect();
    assert_eq!(keys.len(), values().len(), "a key given twice");
}
