//! Unit tests of `vm-test`'s pure parts: apt's and cargo's output, the tiers and their
//! filters, the guest script and the guest log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use super::guest::{Tail, shell_quote};
use super::install::natural_key;
use super::*;
use crate::lab::parse_kernel_release;

#[test]
fn madison_lines() {
    let text = "linux-image-amd64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages\n\
                linux-image-amd64 | 6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n\
                linux-image-amd64 | 6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages\n";
    let m = parse_madison(text);
    assert_eq!(
        m,
        [
            (
                "6.12.95-1~bpo12+1".to_owned(),
                "bookworm-backports".to_owned()
            ),
            ("6.1.192-2".to_owned(), "bookworm-security".to_owned()),
            ("6.1.176-1".to_owned(), "bookworm".to_owned()),
        ]
    );
    assert_eq!(parse_kernel_release(&m[0].0), Some((6, 12)));
    assert_eq!(parse_kernel_release(&m[1].0), Some((6, 1)));
}

#[test]
fn policy_suites() {
    let policy = "Package files:\n 100 /var/lib/dpkg/status\n     release a=now\n \
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages\n     \
        release o=Debian Backports,a=oldstable-backports,n=bookworm-backports,l=Debian Backports,c=main,b=amd64\n";
    assert!(policy_has_suite(policy, "bookworm-backports"));
    assert!(policy_has_suite(policy, "oldstable-backports"));
    assert!(!policy_has_suite(policy, "bookworm"));
    assert!(!policy_has_suite(policy, "trixie-backports"));
}

#[test]
fn image_dependency() {
    let text = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n";
    assert_eq!(
        parse_image_dependency(text).as_deref(),
        Some("linux-image-6.12.95+deb12-amd64")
    );
    assert_eq!(parse_image_dependency("linux-image-amd64\n"), None);
}

#[test]
fn generic_flavour_and_order() {
    assert!(is_generic("6.1.0-56-amd64"));
    assert!(is_generic("6.12.95+deb12-amd64"));
    assert!(!is_generic("6.1.0-56-cloud-amd64"));
    assert!(!is_generic("6.1.0-56-rt-amd64"));
    assert!(natural_key("6.1.0-9-amd64") < natural_key("6.1.0-56-amd64"));
    assert!(natural_key("6.12.9+deb12-amd64") < natural_key("6.12.95+deb12-amd64"));
}

#[test]
fn kernel_args() {
    assert_eq!(KernelArg::V6_1.series(), [SERIES[0]]);
    assert_eq!(KernelArg::All.series().len(), 2);
    assert_eq!(series("6.12").unwrap().version, (6, 12));
    assert!(series("5.10").is_err());
}

/// cargo's messages for both layouts of a test target (`tests/NAME/main.rs`,
/// `tests/NAME.rs`), a unit-test binary of a library and of a binary, and a plain binary.
const ARTIFACTS: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/agent#wirescope@0.1.0","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["test"],"name":"lab","src_path":"/w/agent/tests/lab/main.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/lab-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/agent#wirescope@0.1.0","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["test"],"name":"datapath","src_path":"/w/agent/tests/datapath/main.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/datapath-2"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["test"],"name":"lab","src_path":"/w/xtask/tests/lab.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/lab-3"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["test"],"name":"impair","src_path":"/w/xtask/tests/impair.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/impair-4"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["lib"],"name":"xtask","src_path":"/w/xtask/src/lib.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/xtask-5"}
{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["bin"],"name":"wirescope","src_path":"/w/agent/src/main.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/wirescope-6"}
{"reason":"compiler-artifact","manifest_path":"/w/agent/Cargo.toml","target":{"kind":["bin"],"name":"wirescope","src_path":"/w/agent/src/main.rs"},"profile":{"test":false},"executable":"/w/target/debug/wirescope"}
{"reason":"build-finished","success":true}"#;

#[test]
fn artifacts() {
    let a = parse_artifacts(ARTIFACTS, Path::new("/w"));
    let names: Vec<(&str, &str)> = a
        .iter()
        .map(|a| (a.package.as_str(), a.test.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("agent", "lab"),
            ("agent", "datapath"),
            ("xtask", "lab"),
            ("xtask", "impair")
        ],
        "test targets only, by package directory"
    );
    assert_eq!(a[0].exe, Path::new("/w/target/debug/deps/lab-1"));
    assert_eq!(a[0].cwd, Path::new("/w/agent"));
    assert_eq!(
        agent_binary(ARTIFACTS).as_deref(),
        Some(Path::new("/w/target/debug/wirescope")),
        "the agent's bin target, not its unit tests (listed first, as a fresh build may)"
    );
    assert_eq!(agent_binary(""), None);
}

#[test]
fn tiers() {
    let labels: Vec<String> = TIERS.iter().map(Tier::label).collect();
    assert_eq!(
        labels,
        [
            "xtask/tests/lab",
            "xtask/tests/impair",
            "agent/tests/datapath",
            "agent/tests/lab[kernel::]"
        ]
    );
    // The guest log's markers split on whitespace.
    assert!(labels.iter().all(|l| !l.contains(char::is_whitespace)));
    let a = parse_artifacts(ARTIFACTS, Path::new("/w"));
    let picked = pick_tiers(TIERS, &a).unwrap();
    let exes: Vec<&Path> = picked.iter().map(|(_, a)| a.exe.as_path()).collect();
    assert_eq!(
        exes,
        [
            "/w/target/debug/deps/lab-3",
            "/w/target/debug/deps/impair-4",
            "/w/target/debug/deps/datapath-2",
            "/w/target/debug/deps/lab-1"
        ]
        .map(Path::new)
    );
    let e = pick_tiers(TIERS, &a[1..]).unwrap_err().to_string();
    assert!(e.contains("agent/tests/lab[kernel::]"), "{e}");
}

#[test]
fn tier_filters() {
    let lab = TIERS[3];
    let datapath = TIERS[2];
    let list = "kernel::health::rtt_with_40ms_delay_each_way: test\n\
                kernel::tunnel::single_hop_counts_are_exact: test\n\
                doctor::missing_capabilities: test\n\
                probe::probes_and_path_mtu_through_a_small_mtu_hop: test\n\
                \n\
                4 tests, 0 benchmarks\n";
    let unlisted = || -> Result<String> { panic!("listed without need") };
    let listed = || Ok(list.to_owned());
    assert_eq!(
        test_args(&datapath, None, unlisted).unwrap(),
        [] as [&str; 0]
    );
    assert_eq!(
        test_args(&datapath, Some("wire::"), unlisted).unwrap(),
        ["wire::"]
    );
    assert_eq!(test_args(&lab, None, unlisted).unwrap(), ["kernel::"]);
    // Both: the tier's tests that match the user's filter, exactly.
    assert_eq!(
        test_args(&lab, Some("rtt"), listed).unwrap(),
        ["--exact", "kernel::health::rtt_with_40ms_delay_each_way"]
    );
    assert_eq!(
        test_args(&lab, Some("_"), listed).unwrap(),
        [
            "--exact",
            "kernel::health::rtt_with_40ms_delay_each_way",
            "kernel::tunnel::single_hop_counts_are_exact"
        ]
    );
    // None of them: a name no test has.
    assert_eq!(
        test_args(&lab, Some("probe"), listed).unwrap(),
        ["--exact", "kernel::"]
    );
}

#[test]
fn guest_log() {
    let log = "@@wirescope-vm booted 6.1.0-56-amd64 9.81\n\
               @@wirescope-vm fact kernel_wireguard yes\n\
               @@wirescope-vm suite-start xtask/tests/lab 10.00\n\
               running 2 tests\n\
               test a ... ok\n\
               @@wirescope-vm t 10.75\n\
               test b ... FAILED\n\
               @@wirescope-vm t 11.00\n\
               test c ... server says hi\n\
               @@wirescope-vm t 11.20\n\
               FAILED\n\
               @@wirescope-vm t 12.00\n\
               \n\
               failures:\n\
               \n\
               ---- b stdout ----\n\
               thread 'b' panicked\n\
               \n\
               failures:\n\
               \x20   b\n\
               \x20   c\n\
               \n\
               test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n\
               @@wirescope-vm suite-end xtask/tests/lab 101 12.50\n\
               @@wirescope-vm suite-start agent/tests/lab[kernel::] 12.50\n\
               test result: ok. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.00s\n";
    let r = parse_guest_log(log);
    assert_eq!(r.release.as_deref(), Some("6.1.0-56-amd64"));
    assert_eq!(r.booted_at, Some(9.81));
    assert_eq!(r.fact("kernel_wireguard"), Some("yes"));
    assert!(!r.done);
    assert_eq!(r.suites.len(), 2);
    let x = &r.suites[0];
    assert_eq!((x.counts.passed, x.counts.failed), (1, 2));
    assert_eq!(x.exit, Some(101));
    assert_eq!(x.failed_tests, ["b", "c"]);
    assert!((x.secs - 2.5).abs() < 1e-9);
    // Each test from the mark before its line to the last mark before the next test's: c's
    // output split its line, and its result came later.
    let times: Vec<(&str, f64)> = x.tests.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    assert_eq!(times.len(), 3);
    for ((n, t), (want_n, want_t)) in times.iter().zip([("a", 0.75), ("b", 0.25), ("c", 1.0)]) {
        assert_eq!(*n, want_n);
        assert!((t - want_t).abs() < 1e-9, "{n}: {t}");
    }
    assert_eq!(x.slowest(2)[0].0, "c");
    assert_eq!(
        r.suites[1].exit, None,
        "the VM stopped during the second suite"
    );
    assert_eq!(r.suites[1].counts.ignored, 1);

    let report = VmReport {
        series: "6.1",
        release: "6.1.0-56-amd64".into(),
        boot: Some(Duration::from_secs(14)),
        total: Duration::from_secs(60),
        guest: r,
        error: None,
        out_dir: PathBuf::from("/w/target/vm/6.1"),
        expected_suites: vec!["xtask/tests/lab".into(), "agent/tests/lab[kernel::]".into()],
    };
    assert!(!report.ok());
    assert_eq!(report.counts().passed, 5);
    assert_eq!(report.counts().failed, 2);
    let s = report.summary();
    assert!(s.contains("clsact expected"), "{s}");
    assert!(s.contains("failed: b"), "{s}");
    assert!(s.contains("slowest: c 1.0 s, a 0.8 s, b 0.2 s"), "{s}");
    assert!(s.contains("did not finish"), "{s}");
}

#[test]
fn script_runs_every_suite() {
    let suites = [
        Suite {
            label: "agent/tests/datapath".into(),
            exe: "/w/target/debug/deps/datapath-2".into(),
            cwd: "/w/agent".into(),
            args: Vec::new(),
        },
        Suite {
            label: "agent/tests/lab[kernel::]".into(),
            exe: "/w/target/debug/deps/lab-1".into(),
            cwd: "/w/agent".into(),
            args: vec!["kernel::".into()],
        },
    ];
    let s = guest_script(
        Path::new("/w/target/vm/6.1"),
        &suites,
        &[("CI", "true".into())],
    );
    assert!(
        s.contains("exec >>'/w/target/vm/6.1/guest.log' 2>&1"),
        "{s}"
    );
    assert!(s.contains("export CI='true'"), "{s}");
    assert!(
        s.contains(
            "(cd '/w/agent' && exec '/w/target/debug/deps/datapath-2' --test-threads=1) \
             >/tmp/wirescope-vm-fifo 2>&1\n"
        ),
        "{s}"
    );
    assert!(
        s.contains(
            "(cd '/w/agent' && exec '/w/target/debug/deps/lab-1' --test-threads=1 'kernel::') \
             >/tmp/wirescope-vm-fifo 2>&1\n"
        ),
        "{s}"
    );
    assert!(s.contains("stamp </tmp/wirescope-vm-fifo &\n"), "{s}");
    assert!(
        s.contains("@@wirescope-vm suite-start agent/tests/lab[kernel::] $(cut"),
        "{s}"
    );
    let r = parse_guest_log(
        "@@wirescope-vm suite-start agent/tests/lab[kernel::] 1.0\n\
         @@wirescope-vm suite-end agent/tests/lab[kernel::] 0 2.0\n",
    );
    assert_eq!(r.suites[0].label, "agent/tests/lab[kernel::]");
    assert!(s.contains("@@wirescope-vm done"), "{s}");
    assert_eq!(shell_quote("a'b"), r"'a'\''b'");
}

#[test]
fn tail_reads_whole_lines() {
    let dir = std::env::temp_dir().join(format!("wirescope-tail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("log");
    std::fs::write(&p, "one\ntw").unwrap();
    let mut t = Tail::new(&p);
    assert_eq!(t.read_lines(), ["one"]);
    std::fs::write(&p, "one\ntwo\nthree").unwrap();
    assert_eq!(t.read_lines(), ["two"]);
    assert_eq!(t.finish(), ["three"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
