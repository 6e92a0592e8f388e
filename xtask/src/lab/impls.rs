//! The WireGuard implementations the lab can run its interfaces with, and how each daemon is
//! found and started. Users run all of these under the agent, and they differ where it
//! matters: kernel WireGuard has no daemon and no TUN device; wireguard-go before
//! 0.0.20230223 writes one packet per TUN write, later versions coalesce TCP segments into
//! one GSO write (a virtio-net header with `gso_segs` 0); boringtun answers UAPI in its own
//! dialect (`own_public_key`, handshake times as "seconds ago").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::{cmd, netns, procs, wg};

/// Which WireGuard implementation runs the lab's interfaces. Everything else (names,
/// addresses, routes, MTUs, policy routing) is the same with all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WgImpl {
    /// The kernel's WireGuard (module `wireguard`): `ip -n NS link add IFACE type wireguard`,
    /// configured over netlink; no process, no control socket.
    Kernel,
    /// Debian bookworm's wireguard-go (0.0.20220316, from PATH): one daemon per interface
    /// (a tun device), configured over its UAPI socket in /var/run/wireguard.
    Userspace,
    /// A wireguard-go of 0.0.20230223 or later ([`WG_GO_CURRENT`], which `cargo xtask setup`
    /// extracts from Debian trixie's package): it writes coalesced TCP (GSO) to its TUN.
    #[value(name = "wireguard-go-current")]
    #[serde(rename = "wireguard-go-current")]
    WireguardGoCurrent,
    /// Cloudflare's boringtun (`boringtun-cli` [`BORINGTUN_VERSION`] from crates.io), with
    /// the same UAPI socket path as wireguard-go.
    Boringtun,
}

/// Forces the lab's WireGuard implementation: `kernel`, `userspace`, `wireguard-go-current`
/// or `boringtun` (else it is detected: see [`WgImpl::auto`]). The same test binaries then
/// run with any.
pub const WG_IMPL_ENV: &str = "WIRESCOPE_LAB_WG";

/// Where `cargo xtask setup` puts the current wireguard-go. Its file name stays
/// `wireguard-go` so that the lab's cleanup recognises the daemon by its argv.
pub const WG_GO_CURRENT: &str = "/opt/wirescope/wireguard-go-current/wireguard-go";

/// The first wireguard-go that writes coalesced packets (GSO) to its TUN device, as its
/// `--version` prints the date.
pub const WG_GO_GSO_SINCE: u32 = 20230223;

/// The boringtun-cli release `cargo xtask setup` installs (the newest on crates.io).
pub const BORINGTUN_VERSION: &str = "0.6.0";
pub const BORINGTUN_BIN: &str = "boringtun-cli";

/// Where boringtun writes its log when it daemonizes (it defaults to /tmp/boringtun.out,
/// shared by every instance).
pub fn boringtun_log(iface: &str) -> PathBuf {
    PathBuf::from(super::STATE_DIR).join(format!("{iface}.boringtun.log"))
}

impl WgImpl {
    /// What [`WG_IMPL_ENV`] asks for: None when unset or empty, an error when it names no
    /// implementation.
    pub fn from_env() -> Result<Option<WgImpl>> {
        match std::env::var(WG_IMPL_ENV) {
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => <WgImpl as clap::ValueEnum>::from_str(v.trim(), true)
                .map(Some)
                .map_err(|_| {
                    anyhow!(
                        "{WG_IMPL_ENV}={v:?}: use `kernel`, `userspace`, \
                         `wireguard-go-current` or `boringtun`"
                    )
                }),
            Err(_) => Ok(None),
        }
    }

    /// [`WG_IMPL_ENV`] when set; otherwise kernel WireGuard where this kernel has it (see
    /// [`super::kernel_wireguard_available`]), Debian's wireguard-go where not.
    pub fn auto() -> Result<WgImpl> {
        Ok(match WgImpl::from_env()? {
            Some(i) => i,
            None if super::kernel_wireguard_available() => WgImpl::Kernel,
            None => WgImpl::Userspace,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WgImpl::Kernel => "kernel",
            WgImpl::Userspace => "userspace",
            WgImpl::WireguardGoCurrent => "wireguard-go-current",
            WgImpl::Boringtun => "boringtun",
        }
    }

    /// Whether it pads a data message's plaintext to a multiple of 16 (not past the tunnel
    /// MTU), as the protocol asks: kernel WireGuard and wireguard-go do; boringtun 0.6.0 sends
    /// it as is (its source: "spec requires padding to 16 bytes, but actually works fine
    /// without it"), so its overhead is exactly 60 bytes per IPv4-carried packet.
    pub fn pads(self) -> bool {
        self != WgImpl::Boringtun
    }

    /// Whether its UAPI gives a handshake's time as the time since it (boringtun), not as a
    /// UNIX time: `wg show dump` then prints that age (and `wg show`, "56 years ago"); the
    /// agent places it before the time it read it.
    pub fn reports_handshake_age(self) -> bool {
        self == WgImpl::Boringtun
    }

    /// A daemon with a TUN device and a UAPI socket runs the interface (all but kernel).
    pub fn is_userspace(self) -> bool {
        self != WgImpl::Kernel
    }

    /// The daemon's program, None for kernel WireGuard; an error naming the fix when it is
    /// not installed.
    pub fn program(self) -> Result<Option<PathBuf>> {
        match self {
            WgImpl::Kernel => Ok(None),
            WgImpl::Userspace => find_on_path("wireguard-go")
                .map(Some)
                .ok_or_else(|| anyhow!("`wireguard-go` (run `cargo xtask setup`)")),
            WgImpl::WireguardGoCurrent => match wireguard_go_version(Path::new(WG_GO_CURRENT)) {
                Some(v) if v >= WG_GO_GSO_SINCE => Ok(Some(WG_GO_CURRENT.into())),
                Some(v) => Err(anyhow!(
                    "{WG_GO_CURRENT} is wireguard-go 0.0.{v}, older than 0.0.{WG_GO_GSO_SINCE} \
                     (remove it and run `cargo xtask setup`)"
                )),
                None => Err(anyhow!(
                    "a wireguard-go >= 0.0.{WG_GO_GSO_SINCE} at {WG_GO_CURRENT} \
                     (run `cargo xtask setup`)"
                )),
            },
            WgImpl::Boringtun => boringtun().map(Some).ok_or_else(|| {
                anyhow!("`{BORINGTUN_BIN}` {BORINGTUN_VERSION} (run `cargo xtask setup`)")
            }),
        }
    }

    /// Creates `iface` in `ns` with this implementation and returns its daemon's PID (0 for
    /// kernel WireGuard). A daemon's interface exists, with its control socket, on return.
    pub fn create(self, ns: &str, iface: &str, timeout: Duration) -> Result<u32> {
        let Some(prog) = self.program()? else {
            wg::add_kernel(ns, iface)?;
            return Ok(0);
        };
        let mut cmd = netns::command(ns, &prog.to_string_lossy());
        cmd.arg(iface);
        match self {
            WgImpl::Boringtun => {
                std::fs::create_dir_all(super::STATE_DIR)
                    .with_context(|| format!("creating {}", super::STATE_DIR))?;
                // WG_SUDO: stay root. Without it boringtun drops to the user who ran sudo,
                // or fails when there is none (as here).
                cmd.env("WG_SUDO", "1")
                    .env("WG_LOG_FILE", boringtun_log(iface));
            }
            _ => {
                cmd.env(wg::WG_GO_ENV.0, wg::WG_GO_ENV.1);
            }
        }
        cmd::run(&mut cmd).with_context(|| format!("starting {self} for {iface} in {ns}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let sock = wg::socket_path(iface).exists();
            let link = netns::exec(ns, &["ip", "link", "show", "dev", iface]).is_ok();
            let pid = procs::wireguard_go_pids(|i| i == iface)?.first().copied();
            match pid {
                Some(pid) if sock && link => return Ok(pid),
                _ if Instant::now() >= deadline => bail!(
                    "{self} for {iface} in {ns} did not come up within {timeout:?} (socket {}: \
                     {sock}, link: {link}, process: {pid:?}); try it by hand in the foreground: \
                     `ip netns exec {ns} {} -f {iface}`",
                    wg::socket_path(iface).display(),
                    prog.display(),
                ),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl WgImpl {
    /// `wg set IFACE peer KEY ARGS` in `ns` (ARGS as `wg set` takes them: `endpoint E`,
    /// `allowed-ips L`, `persistent-keepalive S`, `preshared-key FILE`), for a peer that
    /// exists. boringtun (0.6.0) panics on any change to an existing peer ("Modifying
    /// existing peers is not yet supported. Remove and add again instead."), so there the peer
    /// is removed and added again with its whole configuration and ARGS applied: the same
    /// public key, but its sessions are gone and the next packet starts a handshake.
    pub fn set_peer(self, ns: &str, iface: &str, key: &str, args: &[&str]) -> Result<()> {
        if self != WgImpl::Boringtun {
            let mut argv = vec!["wg", "set", iface, "peer", key];
            argv.extend_from_slice(args);
            netns::exec(ns, &argv)?;
            return Ok(());
        }
        let out = netns::exec(ns, &["wg", "show", iface, "dump"])?;
        let dump = String::from_utf8_lossy(&out.stdout);
        let psk_file = PathBuf::from(super::STATE_DIR).join(format!("{iface}.readd.psk"));
        let conf = readd_args(&dump, key, args, &psk_file)
            .with_context(|| format!("peer {key} of {iface} in {ns}"))?;
        let mut argv = vec!["wg", "set", iface, "peer", key];
        argv.extend(conf.iter().map(String::as_str));
        let res = netns::exec(ns, &["wg", "set", iface, "peer", key, "remove"])
            .and_then(|_| netns::exec(ns, &argv))
            .with_context(|| format!("re-adding peer {key} of {iface} in {ns} ({self})"));
        let _ = std::fs::remove_file(&psk_file);
        res.map(|_| ())
    }
}

/// The `wg set IFACE peer KEY` arguments that add peer `key` of `dump` (`wg show IFACE
/// dump`) back with `args` applied on top (each `NAME VALUE`; a later one replaces an
/// earlier). A preshared key is written to `psk_file` (0600), which `wg set` reads.
fn readd_args(dump: &str, key: &str, args: &[&str], psk_file: &Path) -> Result<Vec<String>> {
    let f: Vec<&str> = dump
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&key))
        .ok_or_else(|| anyhow!("no peer {key} in `wg show dump`"))?;
    let [_, psk, endpoint, allowed, _, _, _, keepalive] = f[..] else {
        bail!("a peer line of {} fields, expected 8: {f:?}", f.len());
    };
    let mut conf: Vec<(String, String)> = Vec::new();
    let mut put = |name: &str, value: &str| match conf.iter_mut().find(|(n, _)| n == name) {
        Some(e) => e.1 = value.to_owned(),
        None => conf.push((name.to_owned(), value.to_owned())),
    };
    if allowed != "(none)" {
        put("allowed-ips", allowed);
    }
    if endpoint != "(none)" {
        put("endpoint", endpoint);
    }
    if keepalive != "off" {
        put("persistent-keepalive", keepalive);
    }
    if psk != "(none)" {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = psk_file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(psk_file)
            .with_context(|| format!("writing {}", psk_file.display()))?;
        writeln!(file, "{psk}").with_context(|| format!("writing {}", psk_file.display()))?;
        put("preshared-key", &psk_file.to_string_lossy());
    }
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow!("`{name}` without a value in {args:?}"))?;
        put(name, value);
    }
    Ok(conf.into_iter().flat_map(|(n, v)| [n, v]).collect())
}

impl std::fmt::Display for WgImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn find_on_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// The date part of `wireguard-go --version` (`wireguard-go v0.0.20230223` is 20230223),
/// None when the binary does not run.
pub fn wireguard_go_version(bin: &Path) -> Option<u32> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    parse_wireguard_go_version(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_wireguard_go_version(text: &str) -> Option<u32> {
    let first = text.lines().next()?;
    let v = first.split_whitespace().nth(1)?;
    v.strip_prefix("v0.0.")?.parse().ok()
}

/// The version a `boringtun-cli` binary reports (`boringtun 0.6.0`), None when it does not
/// run.
pub fn boringtun_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// `boringtun-cli` [`BORINGTUN_VERSION`] on PATH or in cargo's bin directory (which a test
/// harness may leave off PATH), None when neither has that version.
pub fn boringtun() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(crate::setup::cargo_bin_dir())
        .map(|d| d.join(BORINGTUN_BIN))
        .filter(|b| b.is_file())
        .find(|b| boringtun_version(b).as_deref() == Some(BORINGTUN_VERSION))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        use clap::ValueEnum as _;
        assert_eq!(WgImpl::from_str("kernel", true), Ok(WgImpl::Kernel));
        assert_eq!(WgImpl::from_str("Userspace", true), Ok(WgImpl::Userspace));
        assert_eq!(
            WgImpl::from_str("wireguard-go-current", true),
            Ok(WgImpl::WireguardGoCurrent)
        );
        assert_eq!(WgImpl::from_str("boringtun", true), Ok(WgImpl::Boringtun));
        assert!(WgImpl::from_str("go", true).is_err());
        for i in WgImpl::value_variants() {
            assert_eq!(WgImpl::from_str(i.as_str(), false).as_ref(), Ok(i));
            let json = serde_json::to_string(i).unwrap();
            assert_eq!(json, format!("\"{}\"", i.as_str()));
            assert_eq!(serde_json::from_str::<WgImpl>(&json).unwrap(), *i);
        }
        assert!(!WgImpl::Kernel.is_userspace());
        assert!(WgImpl::Boringtun.is_userspace());
    }

    /// boringtun's peer change: the peer's whole configuration from the dump, the change on
    /// top, the preshared key through a file.
    #[test]
    fn readd_args_keep_the_peer_and_apply_the_change() {
        let dump = "cHJpdg==\tcHVi\t40001\toff\n\
            ZW50cnk=\tcHNr\t198.51.100.1:51820\t10.64.0.0/10,fd00::/8\t1700000000\t1\t2\t25\n\
            ZXhpdA==\t(none)\t(none)\t(none)\t0\t0\t0\toff\n";
        let dir = std::env::temp_dir().join(format!("wirescope-readd-{}", std::process::id()));
        let psk = dir.join("p.psk");
        let args = readd_args(dump, "ZW50cnk=", &["endpoint", "198.51.100.9:51820"], &psk).unwrap();
        let p = psk.to_string_lossy().to_string();
        assert_eq!(
            args,
            [
                "allowed-ips",
                "10.64.0.0/10,fd00::/8",
                "endpoint",
                "198.51.100.9:51820",
                "persistent-keepalive",
                "25",
                "preshared-key",
                p.as_str(),
            ]
        );
        assert_eq!(std::fs::read_to_string(&psk).unwrap(), "cHNr\n");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            readd_args(dump, "ZXhpdA==", &["allowed-ips", "10.64.0.0/10"], &psk).unwrap(),
            ["allowed-ips", "10.64.0.0/10"]
        );
        assert!(
            readd_args(dump, "bm9uZQ==", &[], &psk).is_err(),
            "no such peer"
        );
        assert!(
            readd_args(dump, "ZXhpdA==", &["endpoint"], &psk).is_err(),
            "no value"
        );
    }

    #[test]
    fn wireguard_go_versions() {
        let text = "wireguard-go v0.0.20230223\n\nUserspace WireGuard daemon for linux-amd64.\n";
        assert_eq!(parse_wireguard_go_version(text), Some(20230223));
        assert_eq!(
            parse_wireguard_go_version("wireguard-go v0.0.20220316\n"),
            Some(20220316)
        );
        assert_eq!(parse_wireguard_go_version("wireguard-go dev\n"), None);
        assert_eq!(parse_wireguard_go_version(""), None);
    }
}
