use std::process::Command;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Compiles agent-ebpf for the BPF target with the nightly toolchain and bpf-linker; the
/// object lands in OUT_DIR and is embedded by `include_bytes_aligned!`. Also stamps the
/// build with the git revision and date that `wirescope --version` prints.
fn main() -> anyhow::Result<()> {
    stamp();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// WIRESCOPE_REVISION (the commit, `unknown` outside a git checkout, e.g. a source tarball)
/// and WIRESCOPE_BUILD_DATE (SOURCE_DATE_EPOCH's day when set, for reproducible packages;
/// else the commit's day, so rebuilding one commit gives the same binary).
fn stamp() {
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let date = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .map(civil_date)
        .or_else(|| git(&["log", "-1", "--format=%cs", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WIRESCOPE_REVISION={revision}");
    println!("cargo:rustc-env=WIRESCOPE_BUILD_DATE={date}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // A new commit moves HEAD (detached) or the branch it points at.
    // Only files that exist: cargo reruns a build script whose watched file is missing on
    // every build (a branch only in packed-refs has no file of its own, a fresh clone may
    // have no packed-refs).
    let watch = |path: String| {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch(format!("{dir}/HEAD"));
    }
    if let (Some(common), Some(branch)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        watch(format!("{common}/{branch}"));
        watch(format!("{common}/packed-refs"));
        // A branch that was only packed gets its own file at its next commit.
        watch(format!("{common}/refs/heads"));
    }
}

/// YYYY-MM-DD of a Unix time (UTC), by Howard Hinnant's days-to-civil algorithm.
fn civil_date(secs: i64) -> String {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
