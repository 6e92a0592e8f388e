//! The Debian package of wirescope (`cargo xtask package`): what goes in it and where, the
//! files generated from the agent's own command line definition, and the .deb itself.
//!
//! - [`contents`]: the packaging definition, one table of every file with its path, mode
//!   and whether it is a conffile; the install test derives its expected `dpkg -L` from it.
//! - [`generate`]: man pages (clap_mangen) and bash/zsh/fish completions (clap_complete)
//!   from `wirescope::config::cli::Cli`, and the systemd unit derived from
//!   deploy/wirescope.service.
//! - [`config_file`]: /etc/wirescope/wirescope.toml, every option of `wirescope run` with its
//!   default, generated from the same clap definition and checked with the agent's own
//!   config reader, so it cannot drift from the options the agent takes.
//! - [`deb`]: the staged tree, DEBIAN/ (control, conffiles, md5sums, maintainer scripts) and
//!   `dpkg-deb --build`; [`cmd`] runs the Debian tools it needs.
//!
//! A crate of its own, not part of xtask: it links the agent (whose build needs the eBPF
//! toolchain that `cargo xtask setup` installs), and the shipped binary stays free of the
//! man page and completion generators.

pub mod cmd;
pub mod config_file;
pub mod contents;
pub mod deb;
pub mod generate;

/// The Debian package's name.
pub const PACKAGE: &str = "wirescope";
