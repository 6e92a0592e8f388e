//! Peer state from WireGuard's control interfaces: the kernel's generic netlink family first,
//! then a userspace implementation's UAPI socket (/var/run/wireguard/IFACE.sock).
//!
//! The UAPI exchange is implemented here rather than with wireguard-uapi's `xplatform`
//! client because that client reads until the peer stops talking, with no deadline and no
//! size limit: a hung or hostile socket would block the sync loop or grow the agent's memory
//! without bound. Here the whole exchange has one deadline and the answer a size cap.
//!
//! All functions are blocking (netlink and UnixStream); call them from `spawn_blocking`.

use std::{
    fmt,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, SocketAddrV6},
    os::unix::{fs::FileTypeExt, net::UnixStream},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use ipnet::IpNet;
use zeroize::{Zeroize, Zeroizing};

/// Where peer state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's WireGuard generic netlink family.
    Netlink,
    /// A userspace implementation's UAPI socket (/var/run/wireguard/IFACE.sock).
    Uapi,
    /// No control interface could be read (e.g. Mullvad's in-app WireGuard): datapath only.
    None,
}

/// A peer as the control interface reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

impl WgPeer {
    /// A peer known by its key alone, as a control interface's answer starts one.
    pub fn new(public_key: [u8; 32]) -> WgPeer {
        WgPeer {
            public_key,
            endpoint: None,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: None,
        }
    }
}

/// An interface as the control interface reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgDevice {
    pub name: String,
    pub listen_port: u16,
    pub public_key: Option<[u8; 32]>,
    pub peers: Vec<WgPeer>,
}

/// Where userspace WireGuard implementations (wireguard-go, boringtun) put their sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// Deadline for one whole UAPI exchange (connect, request, complete answer). A healthy
/// wireguard-go answers in well under a millisecond.
pub const UAPI_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest UAPI answer accepted. A peer takes roughly 300 bytes plus ~20 per allowed IP, so
/// this leaves room for tens of thousands of peers while bounding what a hostile socket
/// can make the agent allocate.
pub const UAPI_MAX_BYTES: usize = 8 << 20;

/// Linux's IFNAMSIZ minus the terminating NUL.

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error(
        "{0:?} is not a valid interface name (1 to 15 bytes, no '/', whitespace, ':' or NUL, not '.' or '..')"
    )]
    InvalidName(String),
    #[error(
        "no WireGuard control interface for {name}: netlink: {netlink}; and no UAPI socket at {}",
        path.display()
    )]
    NotFound {
        name: String,
        netlink: String,
        path: PathBuf,
    },
    #[error("UAPI socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("UAPI socket {}: no complete answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("UAPI socket {}: answer larger than {cap} bytes", path.display())]
    TooLarge { path: PathBuf, cap: usize },
    #[error("UAPI socket {}: connection closed before the end of the answer", path.display())]
    Truncated { path: PathBuf },
    #[error("UAPI answer for {name}, line {line_no} {line:?}: {reason}")]
    Malformed {
        name: String,
        line_no: usize,
        line: String,
        reason: String,
    },
    #[error("UAPI answer for {name}: errno={errno}")]
    Errno { name: String, errno: i64 },
}

/// Reads an interface's state: netlink when the kernel has WireGuard and owns `name`, else
/// the UAPI socket. Returns which one answered.
pub fn read_device(name: &str) -> Result<(WgDevice, Backend), WgError> {
    validate_ifname(name)?;
    let netlink_err = match read_netlink(name) {
        Ok(dev) => return Ok((dev, Backend::Netlink)),
        Err(e) => e,
    };
    let path = uapi_path(name);
    // Only a missing socket means "not userspace either"; any other failure of an existing
    // socket is the more specific error and is reported as is.
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(WgError::NotFound {
            name: name.to_owned(),
            netlink: netlink_err,
            path,
        }),
        _ => read_uapi_at(&path, name, UAPI_TIMEOUT, UAPI_MAX_BYTES).map(|d| (d, Backend::Uapi)),
    }
}

/// Reads `name` through the kernel's WireGuard generic netlink family. The error is a
/// description only: callers fall back to UAPI whatever it was.
pub fn read_netlink(name: &str) -> Result<WgDevice, String> {
    use wireguard_uapi::{DeviceInterface, WgSocket};
    let mut sock = WgSocket::connect().map_err(|e| e.to_string())?;
    let dev = sock
        .get_device(DeviceInterface::from_name(name))
        .map_err(|e| e.to_string())?;
    Ok(from_netlink(dev))
}

/// Zeroes the private and preshared keys the kernel sends with every dump: nothing here
/// needs them, and they must not linger in freed memory for a core dump or a heap read.
fn scrub(dev: &mut wireguard_uapi::get::Device) {
    if let Some(k) = dev.private_key.as_mut() {
        k.zeroize();
    }
    for p in dev.peers.iter_mut() {
        p.preshared_key.zeroize();
    }
}

fn from_netlink(mut dev: wireguard_uapi::get::Device) -> WgDevice {
    scrub(&mut dev);
    let peers = dev
        .peers
        .into_iter()
        .map(|p| WgPeer {
            public_key: p.public_key,
            endpoint: p.endpoint,
            allowed_ips: p
                .allowed_ips
                .iter()
                // The kernel never reports a prefix longer than the address; skip rather
                // than fail the whole device if it ever did.
                .filter_map(|a| IpNet::new(a.ipaddr, a.cidr_mask).ok())
                .collect(),
            last_handshake: handshake_time(p.last_handshake_time),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            persistent_keepalive: Some(p.persistent_keepalive_interval).filter(|&k| k != 0),
        })
        .collect();
    // The private key is not kept: nothing here needs it.
    WgDevice {
        name: dev.ifname,
        listen_port: dev.listen_port,
        public_key: dev.public_key,
        peers,
    }
}

/// Zero means "never" in both control interfaces.
/// (`checked_add`: a value past what SystemTime holds must not panic.)
fn handshake_time(since_epoch: Duration) -> Option<SystemTime> {
    (!since_epoch.is_zero())
        .then(|| UNIX_EPOCH.checked_add(since_epoch))
        .flatten()
}

/// The UAPI socket path for an interface.
pub fn uapi_path(name: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{name}.sock"))
}

/// Interface names that have a UAPI socket in /var/run/wireguard, sorted. The socket may be
/// stale (its process gone) or belong to another network namespace: callers check that the
/// interface exists where they look.
pub fn list_uapi_sockets() -> Vec<String> {
    list_uapi_sockets_in(Path::new(UAPI_DIR))
}

/// [`list_uapi_sockets`] for another directory (tests).
pub fn list_uapi_sockets_in(dir: &Path) -> Vec<String> {
    // A missing directory just means no userspace WireGuard has run since boot.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let name = file.strip_suffix(".sock")?;
            validate_ifname(name).ok()?;
            Some(name.to_owned())
        })
        .collect();
    names.sort();
    names
}

/// Rejects names that are not Linux interface names, so a name can never make the socket
/// path point outside UAPI_DIR.
pub fn validate_ifname(name: &str) -> Result<(), WgError> {
    if crate::config::is_ifname(name) {
        Ok(())
    } else {
        Err(WgError::InvalidName(name.to_owned()))
    }
}

/// One bounded `get=1` exchange on the socket at `path`, parsed as interface `name`.
pub fn read_uapi_at(
    path: &Path,
    name: &str,
    timeout: Duration,
    cap: usize,
) -> Result<WgDevice, WgError> {
    let answer = uapi_get(path, timeout, cap)?;
    // The answer holds the private key in hex; it is zeroed when `answer` drops.
    let text = std::str::from_utf8(&answer).map_err(|e| WgError::Malformed {
        name: name.to_owned(),
        line_no: 1 + answer[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        line: String::new(),
        reason: "not UTF-8".into(),
    })?;
    parse_uapi(name, text)
}

fn uapi_get(path: &Path, timeout: Duration, cap: usize) -> Result<Zeroizing<Vec<u8>>, WgError> {
    let io_err = |source| WgError::Io {
        path: path.to_owned(),
        source,
    };
    let timed_out = || WgError::Timeout {
        path: path.to_owned(),
        timeout,
    };
    let deadline = Instant::now() + timeout;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };

    // socket2 for a connect that cannot block: on AF_UNIX a full accept backlog (a hung
    // daemon) returns EAGAIN instead of waiting.
    let sock =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(io_err)?;
    let addr = socket2::SockAddr::unix(path).map_err(io_err)?;
    sock.connect_timeout(&addr, timeout)
        .map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => timed_out(),
            _ => io_err(e),
        })?;
    let mut stream: UnixStream = sock.into();

    stream
        .set_write_timeout(Some(remaining().ok_or_else(timed_out)?))
        .map_err(io_err)?;
    stream.write_all(b"get=1\n\n").map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => timed_out(),
        _ => io_err(e),
    })?;

    let mut buf = Zeroizing::new(Vec::with_capacity(16 * 1024));
    let mut chunk = Zeroizing::new([0u8; 8192]);
    loop {
        // Re-arm with what is left of the deadline, so a daemon dribbling a byte at a time
        // cannot stretch the exchange.
        stream
            .set_read_timeout(Some(remaining().ok_or_else(timed_out)?))
            .map_err(io_err)?;
        let n = match stream.read(&mut chunk[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                return Err(timed_out());
            }
            Err(e) => return Err(io_err(e)),
        };
        if n == 0 {
            // wireguard-go keeps the connection open after answering; EOF before the blank
            // line means the daemon went away mid-answer.
            return Err(WgError::Truncated {
                path: path.to_owned(),
            });
        }
        if buf.len() + n > cap {
            return Err(WgError::TooLarge {
                path: path.to_owned(),
                cap,
            });
        }
        let search_from = buf.len().saturating_sub(1);
        extend_zeroizing(&mut buf, &chunk[..n]);
        // The answer ends with an empty line; no empty line occurs inside it.
        if let Some(end) = buf[search_from..].windows(2).position(|w| w == b"\n\n") {
            buf.truncate(search_from + end + 2);
            return Ok(buf);
        }
    }
}

/// Appends without letting `Vec` reallocate behind our back: a reallocation would free the
/// old buffer, private key included, without zeroing it.
fn extend_zeroizing(buf: &mut Zeroizing<Vec<u8>>, data: &[u8]) {
    if buf.len() + data.len() > buf.capacity() {
        let mut bigger = Vec::with_capacity((buf.len() + data.len()).max(buf.capacity() * 2));
        bigger.extend_from_slice(buf);
        buf.zeroize();
        **buf = bigger;
    }
    buf.extend_from_slice(data);
}

/// Parses the answer to `get=1` (wireguard.com/xplatform): device keys, then one block per
/// peer starting at `public_key`, then `errno=N`. Unknown keys are skipped (newer daemons add
/// some); a line without `=` or a known key with a bad value is an error naming the line.
pub fn parse_uapi(name: &str, text: &str) -> Result<WgDevice, WgError> {
    parse_uapi_at(name, text, SystemTime::now())
}

/// [`parse_uapi`] as read at `now`. boringtun speaks a dialect: it gives the device's
/// `own_public_key` instead of its `private_key`, and its handshake times are the time
/// since the handshake (so `wg show` says "56 years ago"); an answer with `own_public_key`
/// has its handshakes placed before `now`.
pub fn parse_uapi_at(name: &str, text: &str, now: SystemTime) -> Result<WgDevice, WgError> {
    let mut dev = WgDevice {
        name: name.to_owned(),
        listen_port: 0,
        public_key: None,
        peers: Vec::new(),
    };
    let mut hs_sec: Option<u64> = None;
    let mut hs_nsec: u32 = 0;
    let mut errno = None;
    // Some(now) once `own_public_key` showed the boringtun dialect.
    let mut elapsed_since: Option<SystemTime> = None;

    // Folds the handshake fields of the peer being read into it (`sec` None: the answer
    // had none for it).
    fn finish_peer(
        peers: &mut [WgPeer],
        sec: &mut Option<u64>,
        nsec: &mut u32,
        elapsed_since: Option<SystemTime>,
    ) {
        if let Some(p) = peers.last_mut() {
            let t = Duration::new(sec.unwrap_or(0), 0) + Duration::from_nanos(u64::from(*nsec));
            p.last_handshake = match (elapsed_since, *sec) {
                // boringtun leaves the fields out when there was no handshake.
                (Some(now), Some(_)) => now.checked_sub(t),
                (Some(_), None) => None,
                (None, _) => handshake_time(t),
            };
        }
        *sec = None;
        *nsec = 0;
    }

    for (idx, line) in text.lines().enumerate() {
        if line.is_empty() {
            break;
        }
        let bad = |reason: &dyn fmt::Display| WgError::Malformed {
            name: name.to_owned(),
            line_no: idx + 1,
            line: redact(line),
            reason: reason.to_string(),
        };
        if errno.is_some() {
            return Err(bad(&"line after errno"));
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(&"expected key=value"));
        };
        let num = |what: &str| -> Result<u64, WgError> {
            value
                .parse::<u64>()
                .map_err(|e| bad(&format_args!("{what}: {e}")))
        };
        match key {
            "errno" => {
                errno = Some(
                    value
                        .parse::<i64>()
                        .map_err(|e| bad(&format_args!("errno: {e}")))?,
                )
            }
            "private_key" => {
                if !dev.peers.is_empty() {
                    return Err(bad(&"device key inside a peer"));
                }
                let mut secret = parse_hex_key(value).map_err(|e| bad(&e))?;
                // UAPI gives only the private key; derive the public one as `wg` does.
                let sk = x25519_dalek::StaticSecret::from(secret);
                secret.zeroize();
                let pk = x25519_dalek::PublicKey::from(&sk).to_bytes();
                // An all-zero private key means "none set".
                dev.public_key = (sk.to_bytes() != [0u8; 32]).then_some(pk);
            }
            "own_public_key" => {
                if !dev.peers.is_empty() {
                    return Err(bad(&"device key inside a peer"));
                }
                dev.public_key = Some(parse_hex_key(value).map_err(|e| bad(&e))?);
                elapsed_since = Some(now);
            }
            "listen_port" => {
                if !dev.peers.is_empty() {
                    return Err(bad(&"device key inside a peer"));
                }
                dev.listen_port = value
                    .parse()
                    .map_err(|e| bad(&format_args!("listen_port: {e}")))?;
            }
            "fwmark" => {
                value
                    .parse::<u32>()
                    .map_err(|e| bad(&format_args!("fwmark: {e}")))?;
            }
            "public_key" => {
                finish_peer(&mut dev.peers, &mut hs_sec, &mut hs_nsec, elapsed_since);
                dev.peers
                    .push(WgPeer::new(parse_hex_key(value).map_err(|e| bad(&e))?));
            }
            _ => {
                let Some(peer) = dev.peers.last_mut() else {
                    // Device-level keys we do not know are skipped; a known peer key before
                    // any public_key is a protocol violation.
                    if is_peer_key(key) {
                        return Err(bad(&"peer key before any public_key"));
                    }
                    continue;
                };
                match key {
                    "endpoint" => peer.endpoint = Some(parse_endpoint(value).map_err(|e| bad(&e))?),
                    "allowed_ip" => peer.allowed_ips.push(
                        value
                            .parse::<IpNet>()
                            .map_err(|e| bad(&format_args!("allowed_ip: {e}")))?,
                    ),
                    "rx_bytes" => peer.rx_bytes = num("rx_bytes")?,
                    "tx_bytes" => peer.tx_bytes = num("tx_bytes")?,
                    "last_handshake_time_sec" => {
                        let sec = num("last_handshake_time_sec")?;
                        hs_sec = Some(sec);
                        if UNIX_EPOCH.checked_add(Duration::from_secs(sec)).is_none() {
                            return Err(bad(&"last_handshake_time_sec: out of range"));
                        }
                    }
                    "last_handshake_time_nsec" => {
                        hs_nsec = value
                            .parse::<u32>()
                            .ok()
                            .filter(|&n| n < 1_000_000_000)
                            .ok_or_else(|| bad(&"last_handshake_time_nsec: not in 0..1e9"))?
                    }
                    "persistent_keepalive_interval" => {
                        let k: u16 = value.parse().map_err(|e| {
                            bad(&format_args!("persistent_keepalive_interval: {e}"))
                        })?;
                        peer.persistent_keepalive = Some(k).filter(|&k| k != 0);
                    }
                    "preshared_key" => {
                        // Checked for shape only; never kept.
                        let mut psk = parse_hex_key(value).map_err(|e| bad(&e))?;
                        psk.zeroize();
                    }
                    "protocol_version" => {
                        num("protocol_version")?;
                    }
                    _ => {}
                }
            }
        }
    }
    finish_peer(&mut dev.peers, &mut hs_sec, &mut hs_nsec, elapsed_since);
    match errno {
        Some(0) => Ok(dev),
        Some(errno) => Err(WgError::Errno {
            name: name.to_owned(),
            errno,
        }),
        None => Err(WgError::Malformed {
            name: name.to_owned(),
            line_no: text.lines().take_while(|l| !l.is_empty()).count(),
            line: String::new(),
            reason: "answer ends without errno=".into(),
        }),
    }
}

fn is_peer_key(key: &str) -> bool {
    matches!(
        key,
        "endpoint"
            | "allowed_ip"
            | "rx_bytes"
            | "tx_bytes"
            | "last_handshake_time_sec"
            | "last_handshake_time_nsec"
            | "persistent_keepalive_interval"
            | "preshared_key"
            | "protocol_version"
    )
}

/// Error messages quote the offending line, except a secret's value.
fn redact(line: &str) -> String {
    match line.split_once('=') {
        Some((k @ ("private_key" | "preshared_key"), _)) => format!("{k}=<redacted>"),
        _ => line.chars().take(200).collect(),
    }
}

fn parse_hex_key(value: &str) -> Result<[u8; 32], String> {
    let bytes = value.as_bytes();
    if bytes.len() != 64 {
        return Err(format!("key must be 64 hex digits, got {}", bytes.len()));
    }
    let mut key = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0]);
        let lo = hex_digit(pair[1]);
        match (hi, lo) {
            (Some(h), Some(l)) => key[i] = h << 4 | l,
            _ => {
                key.zeroize();
                return Err("key is not hex".into());
            }
        }
    }
    Ok(key)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `IP:PORT` or `[IPv6]:PORT`, where wireguard-go may add a zone (`[fe80::1%eth0]:51820`).
/// A numeric zone becomes the scope id; a named one is dropped (scope 0), since resolving
/// it would depend on the namespace this runs in.
fn parse_endpoint(value: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = value.parse() {
        return Ok(a);
    }
    let bad = || format!("endpoint {value:?} is not IP:PORT or [IPv6]:PORT");
    let rest = value.strip_prefix('[').ok_or_else(bad)?;
    let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
    let (ip, zone) = host.split_once('%').ok_or_else(bad)?;
    let IpAddr::V6(ip) = ip.parse::<IpAddr>().map_err(|_| bad())? else {
        return Err(bad());
    };
    let port = port.parse::<u16>().map_err(|_| bad())?;
    Ok(SocketAddr::V6(SocketAddrV6::new(
        ip,
        port,
        0,
        zone.parse().unwrap_or(0),
    )))
}

/// Standard base64 of a key, as `wg` and the metrics labels write it.
pub fn key_to_base64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Allowed IPs as `wg show dump` writes them, and so prometheus_wireguard_exporter's
/// `allowed_ips` label: joined with `,`, `(none)` when there are none.
pub fn format_allowed_ips(ips: &[IpNet]) -> String {
    if ips.is_empty() {
        return "(none)".to_owned();
    }
    let mut out = String::new();
    for (i, ip) in ips.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Display of IpNet is address/prefix-length, with the address as given (not
        // truncated to the network), which is what `wg` prints.
        out.push_str(&ip.to_string());
    }
    out
}

#[cfg(test)]
mod tests;
