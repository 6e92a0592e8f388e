//! The lab tests whose results depend on the kernel and the WireGuard implementation it
//! runs (kernel module or wireguard-go), which `cargo xtask vm-test` runs again in QEMU on
//! Debian's kernels (6.1: clsact and kernel WireGuard; 6.12 with `--kernel all`): it runs
//! the lab binary with the libtest filter `kernel::`, so a module belongs here when its
//! tests are worth that VM time. Exact counts per layer (`tunnel`), handshake round trips
//! and timeouts (`health`), leaks around the tunnel (`leak`), path-MTU signals from a real
//! router (`path`), the recommended MTU behind a Mullvad-like firewall, whose method depends
//! on whether the implementation's datagrams carry don't-fragment (`firewall`), the kernel's
//! drops and their reason names (`drops`), and pinned maps over a SIGKILL and restart, whose
//! gap depends on the TC hook (`restart`).

mod drops;
mod firewall;
mod health;
mod leak;
mod path;
mod restart;
mod tunnel;
