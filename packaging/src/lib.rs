//! The Debian package of wirescope: the files generated from the agent's own command line
//! definition.
//!
//! - [`generate`]: man pages (clap_mangen) and bash/zsh/fish completions (clap_complete)
//!   from `wirescope::config::cli::Cli`, and the systemd unit derived from
//!   deploy/wirescope.service.
//! - [`config_file`]: /etc/wirescope/wirescope.toml, every option of `wirescope run` with its
//!   default, generated from the same clap definition and checked with the agent's own
//!   config reader, so it cannot drift from the options the agent takes.
//!
//! A crate of its own, not part of xtask: it links the agent (whose build needs the eBPF
//! toolchain that `cargo xtask setup` installs), and the shipped binary stays free of the
//! man page and completion generators.

pub mod config_file;
pub mod generate;
