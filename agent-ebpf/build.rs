use which::which;

/// Rebuild when bpf-linker changes, since aya-build cannot see it.
fn main() {
    match which("bpf-linker") {
        Ok(p) => println!("cargo:rerun-if-changed={}", p.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}): run `cargo xtask setup`"),
    }
}
