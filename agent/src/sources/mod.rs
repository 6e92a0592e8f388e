//! Where the agent's state comes from, each read on its own and none writing anything:
//! WireGuard's control interfaces ([`wg`]: generic netlink, UAPI sockets), rtnetlink
//! ([`netlink`]), the Mullvad daemon's CLI ([`mullvad`]) and the running kernel's BTF
//! ([`btf`]). A failed read counts in [`errors`].

pub mod btf;
pub mod errors;
pub mod mullvad;
pub mod netlink;
pub mod wg;
