//! WireGuard through the `wg` tool, the kernel's WireGuard and userspace `wireguard-go`: keys,
//! creating an interface in a namespace, configuring it, and reading its state back (`wg show
//! IFACE dump`, which speaks netlink to the kernel and UAPI to wireguard-go alike).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::{cmd, netns};

/// Where wireguard-go puts its control sockets. It is one directory for every network
/// namespace, so interface names must be unique across all of them.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// wireguard-go refuses to run on Linux without this.
pub const WG_GO_ENV: (&str, &str) = ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");

pub fn socket_path(iface: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{iface}.sock"))
}

#[derive(Clone)]
pub struct Keypair {
    pub private: String,
    pub public: String,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A private key kept in the lab's state (base64, as `wg` prints it); never in Debug output.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PrivateKey(pub String);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

/// A fresh key pair from `wg genkey` / `wg pubkey`.
pub fn genkey() -> Result<Keypair> {
    let private = cmd::stdout("wg", ["genkey"])?;
    let out = cmd::run_with_input(Command::new("wg").arg("pubkey"), private.as_bytes())?;
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(Keypair { private, public })
}

/// Starts Debian's `wireguard-go IFACE` inside `ns` (it daemonizes), waits until its control
/// socket and its link exist, and returns the daemon's PID. Other implementations:
/// [`crate::lab::WgImpl::create`].
pub fn start_userspace(ns: &str, iface: &str, timeout: Duration) -> Result<u32> {
    crate::lab::WgImpl::Userspace.create(ns, iface, timeout)
}

/// Creates a kernel WireGuard interface `iface` inside `ns` (`ip -n NS link add IFACE type
/// wireguard`); configure it with [`setconf`] like a wireguard-go one.
pub fn add_kernel(ns: &str, iface: &str) -> Result<()> {
    cmd::ip(&["-n", ns, "link", "add", iface, "type", "wireguard"]).with_context(|| {
        format!(
            "creating kernel WireGuard interface {iface} in {ns} (does `modprobe wireguard` \
             work on this kernel? `{}=userspace` uses wireguard-go instead)",
            crate::lab::WG_IMPL_ENV
        )
    })?;
    Ok(())
}

/// The rtnetlink kind of a link in `ns` (`wireguard` for kernel WireGuard, `tun` for
/// wireguard-go's device, `veth`, ...), None when it has none (e.g. `lo`).
pub fn link_kind(ns: &str, iface: &str) -> Result<Option<String>> {
    let out = netns::exec(ns, &["ip", "-d", "-j", "link", "show", "dev", iface])?;
    parse_link_kind(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("parsing `ip -d -j link show dev {iface}` in {ns}"))
}

/// `linkinfo.info_kind` of the only link in `ip -d -j link show dev IFACE`'s output.
pub fn parse_link_kind(json: &str) -> Result<Option<String>> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let link = v
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| anyhow!("no link in {json:?}"))?;
    Ok(link
        .pointer("/linkinfo/info_kind")
        .and_then(|k| k.as_str())
        .map(str::to_owned))
}

/// Waits until a UDP socket in `ns` is bound to `port`: WireGuard (kernel or wireguard-go)
/// opens its socket only once the device is up (after `ip link set IFACE up` and a configured
/// listen port), and wireguard-go drops what it would send before that.
pub fn wait_listening(ns: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let bound = netns::run_in(ns, move || udp_port_bound(port))??;
        if bound {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "nothing listens on UDP port {port} in {ns} after {timeout:?}: \
                 WireGuard did not bring its device up (`ip netns exec {ns} ss -ulpn`)"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a UDP socket (IPv4 or IPv6) in `ns` is bound to `port`.
pub fn udp_port_bound_in(ns: &str, port: u16) -> Result<bool> {
    netns::run_in(ns, move || udp_port_bound(port))?
}

/// Whether a UDP socket of the calling thread's network namespace is bound to `port`.
fn udp_port_bound(port: u16) -> Result<bool> {
    let want = format!(":{port:04X} ");
    for file in ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"] {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {file}")),
        };
        // "  sl  local_address rem_address ..." then "   0: 00000000:9C41 00000000:0000 07 ..."
        if text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|local| format!("{local} ").ends_with(&want))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `wg setconf IFACE` with `conf` (wg(8) configuration text, not wg-quick's), run in `ns`.
pub fn setconf(ns: &str, iface: &str, conf: &str) -> Result<()> {
    let mut cmd = netns::command(ns, "wg");
    cmd.args(["setconf", iface, "/dev/stdin"]);
    cmd::run_with_input(&mut cmd, conf.as_bytes())
        .with_context(|| format!("configuring WireGuard interface {iface} in {ns}"))?;
    Ok(())
}

/// The interface line of `wg show IFACE dump`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgDump {
    pub public_key: String,
    pub listen_port: u16,
    /// None when wg prints `off`.
    pub fwmark: Option<u32>,
    pub peers: Vec<WgPeer>,
}

/// One peer line of `wg show IFACE dump`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgPeer {
    pub public_key: String,
    pub has_preshared_key: bool,
    pub endpoint: Option<SocketAddr>,
    /// As wg prints them, e.g. `10.64.1.2/32`.
    pub allowed_ips: Vec<String>,
    /// UNIX seconds; 0 when there was no handshake.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds; None when off.
    pub persistent_keepalive: Option<u16>,
}

impl WgDump {
    pub fn peer(&self, public_key: &str) -> Option<&WgPeer> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

/// `wg show IFACE dump` run in `ns`, parsed.
pub fn dump(ns: &str, iface: &str) -> Result<WgDump> {
    let out = netns::exec(ns, &["wg", "show", iface, "dump"])?;
    parse_dump(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("parsing `wg show {iface} dump` in {ns}"))
}

/// Parses the output of `wg show IFACE dump` (tab-separated; the first line is the interface:
/// private key, public key, listen port, fwmark; then one line per peer: public key, preshared
/// key, endpoint, allowed ips, latest handshake, rx, tx, persistent keepalive).
pub fn parse_dump(text: &str) -> Result<WgDump> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().ok_or_else(|| anyhow!("empty output"))?;
    let f: Vec<&str> = first.split('\t').collect();
    if f.len() != 4 {
        bail!(
            "interface line has {} fields, expected 4: {first:?}",
            f.len()
        );
    }
    let mut dump = WgDump {
        public_key: f[1].to_owned(),
        listen_port: f[2]
            .parse()
            .with_context(|| format!("listen port {:?}", f[2]))?,
        fwmark: parse_fwmark(f[3]).with_context(|| format!("fwmark {:?}", f[3]))?,
        peers: Vec::new(),
    };
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 8 {
            bail!("peer line has {} fields, expected 8: {line:?}", f.len());
        }
        dump.peers.push(WgPeer {
            public_key: f[0].to_owned(),
            has_preshared_key: f[1] != "(none)",
            endpoint: match f[2] {
                "(none)" => None,
                e => Some(e.parse().with_context(|| format!("endpoint {e:?}"))?),
            },
            allowed_ips: match f[3] {
                "(none)" => Vec::new(),
                a => a.split(',').map(str::to_owned).collect(),
            },
            latest_handshake: f[4]
                .parse()
                .with_context(|| format!("handshake {:?}", f[4]))?,
            rx_bytes: f[5].parse().with_context(|| format!("rx {:?}", f[5]))?,
            tx_bytes: f[6].parse().with_context(|| format!("tx {:?}", f[6]))?,
            persistent_keepalive: parse_off(f[7])
                .with_context(|| format!("keepalive {:?}", f[7]))?,
        });
    }
    Ok(dump)
}

/// wg prints the fwmark as `off` or in hex (`0xca6c`); decimal is accepted too.
fn parse_fwmark(s: &str) -> Result<Option<u32>> {
    Ok(match s {
        "off" => None,
        hex if hex.starts_with("0x") => Some(u32::from_str_radix(&hex[2..], 16)?),
        dec => Some(dec.parse()?),
    })
}

fn parse_off<T: std::str::FromStr>(s: &str) -> Result<Option<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    if s == "off" {
        Ok(None)
    } else {
        Ok(Some(s.parse()?))
    }
}

/// `wg show IFACE latest-handshakes` in `ns`: (peer public key, UNIX seconds or 0).
pub fn latest_handshakes(ns: &str, iface: &str) -> Result<Vec<(String, u64)>> {
    let out = netns::exec(ns, &["wg", "show", iface, "latest-handshakes"])?;
    let mut res = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line.split_whitespace();
        if let (Some(key), Some(ts)) = (it.next(), it.next()) {
            res.push((
                key.to_owned(),
                ts.parse().with_context(|| format!("{line:?}"))?,
            ));
        }
    }
    Ok(res)
}

/// Polls `wg show IFACE latest-handshakes` in `ns` until every peer of IFACE has completed a
/// handshake. Something must send traffic meanwhile (the lab configures no keepalives, so
/// that packet counts in tests stay exact): see `Lab::handshake`.
pub fn wait_for_handshake(ns: &str, iface: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let hs = latest_handshakes(ns, iface)?;
        let missing: Vec<&str> = hs
            .iter()
            .filter(|(_, t)| *t == 0)
            .map(|(k, _)| k.as_str())
            .collect();
        if !hs.is_empty() && missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "no handshake within {timeout:?} on {iface} in {ns} for peers {missing:?}; \
                 check `ip netns exec {ns} wg show {iface}` and the relays' routes"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "cHJpdmF0ZQ==\tcHVibGlj\t40001\toff\n\
        ZW50cnk=\t(none)\t198.51.100.1:51820\t203.0.113.2/32\t1700000000\t1240\t2480\toff\n\
        ZXhpdA==\t(none)\t203.0.113.2:51820\t0.0.0.0/0,::/0\t0\t0\t148\t25\n\
        bm9uZQ==\tcHNr\t(none)\t(none)\t0\t0\t0\toff\n";

    #[test]
    fn parses_dump() {
        let d = parse_dump(DUMP).unwrap();
        assert_eq!(d.public_key, "cHVibGlj");
        assert_eq!(d.listen_port, 40001);
        assert_eq!(d.fwmark, None);
        assert_eq!(d.peers.len(), 3);
        let entry = d.peer("ZW50cnk=").unwrap();
        assert_eq!(entry.endpoint, Some("198.51.100.1:51820".parse().unwrap()));
        assert_eq!(entry.allowed_ips, vec!["203.0.113.2/32"]);
        assert_eq!(
            (entry.latest_handshake, entry.rx_bytes, entry.tx_bytes),
            (1700000000, 1240, 2480)
        );
        let exit = &d.peers[1];
        assert_eq!(exit.allowed_ips, vec!["0.0.0.0/0", "::/0"]);
        assert_eq!(exit.persistent_keepalive, Some(25));
        let none = &d.peers[2];
        assert!(none.has_preshared_key);
        assert_eq!(none.endpoint, None);
        assert!(none.allowed_ips.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_dump("").is_err());
        assert!(parse_dump("a\tb\n").is_err());
        assert!(parse_dump("a\tb\tx\toff\n").is_err());
    }

    #[test]
    fn link_kinds() {
        let wg = r#"[{"ifindex":3,"ifname":"wsc0","linkinfo":{"info_kind":"wireguard"}}]"#;
        assert_eq!(parse_link_kind(wg).unwrap().as_deref(), Some("wireguard"));
        assert_eq!(parse_link_kind(r#"[{"ifname":"lo"}]"#).unwrap(), None);
        assert!(parse_link_kind("[]").is_err());
    }

    #[test]
    fn fwmark_value() {
        let d = parse_dump("p\tq\t51820\t0xca6c\n").unwrap();
        assert_eq!(d.fwmark, Some(0xca6c));
    }
}
