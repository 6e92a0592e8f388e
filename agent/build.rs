use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Compiles agent-ebpf for the BPF target with the nightly toolchain and bpf-linker; the
/// object lands in OUT_DIR and is embedded by `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
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
