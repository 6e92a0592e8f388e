//! A real obfuscator in the lab, as Mullvad's Shadowsocks obfuscation runs it: Debian's
//! shadowsocks-libev (`cargo xtask setup` installs it with apt) with `ss-tunnel` in the client
//! namespace in UDP tunnel mode on 127.0.0.1, `ss-server` at the first relay (entry, or the
//! single relay), and the client's peer endpoint of that relay pointed at `ss-tunnel`. The
//! client's WireGuard then talks to 127.0.0.1 only, and what leaves its underlay is
//! Shadowsocks UDP to the relay's [`Shadowsocks::server`]; `ss-server` hands the WireGuard
//! datagrams to the relay's own WireGuard port.
//!
//! The Mullvad app embeds shadowsocks-rust; both speak the same AEAD Shadowsocks protocol, so
//! the flow on the wire has the same shape (shadowsocks-rust 1.25.0's `sslocal`/`ssserver`
//! gave the same exact counts when this was written; it takes minutes to build, the Debian
//! package seconds to install).
//!
//! With an AEAD cipher of a 32-byte key (the lab's `aes-256-gcm`) every WireGuard datagram
//! becomes exactly one Shadowsocks datagram [`ADDED_BYTES`] longer, both ways: a 32-byte
//! salt, the target address (1 type byte, 4 IPv4 bytes, 2 port bytes) and a 16-byte tag.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use crate::lab::Lab;
use crate::{netns, wg};

/// What Shadowsocks adds to each datagram with the lab's cipher (see the module doc).
pub const ADDED_BYTES: u64 = 32 + 1 + 4 + 2 + 16;
/// The cipher and key; nothing here is secret.
pub const METHOD: &str = "aes-256-gcm";
const PASSWORD: &str = "wirescope-lab";
/// Where `ss-tunnel` listens in the client namespace, and `ss-server` at the relay.
pub const LOCAL_PORT: u16 = 51900;
pub const SERVER_PORT: u16 = 8388;

/// The shadowsocks-libev binaries the lab runs.
pub const BINS: [&str; 2] = ["ss-tunnel", "ss-server"];

fn bin(name: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new("/usr/bin").join(name);
    p.is_file().then_some(p)
}

/// Whether the shadowsocks-libev binaries are here; otherwise, with `CI=true`, a panic naming
/// what to run, else "skipping TEST: ..." on stderr and false.
pub fn can_run(test: &str) -> bool {
    let missing: Vec<&str> = BINS.iter().copied().filter(|b| bin(b).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: shadowsocks-libev is not installed ({} missing): run `cargo xtask setup`",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why} (CI=true, so this fails instead of being skipped)");
    }
    eprintln!("skipping {why}");
    false
}

/// The running pair; dropping it points the client back at the relay and stops both.
pub struct Shadowsocks {
    children: Vec<Child>,
    /// Restores the client's endpoint: (namespace, argv).
    undo: Option<(String, Vec<String>)>,
    /// `ss-tunnel`'s address: the client's peer endpoint while this runs.
    pub local: SocketAddr,
    /// `ss-server`'s address at the relay: the obfuscation flow's remote end.
    pub server: SocketAddr,
    /// Where `ss-server` delivers WireGuard: the relay's WireGuard endpoint.
    pub forward: SocketAddr,
}

impl Lab {
    /// Starts `ss-server` at the first relay and `ss-tunnel` in the client (see the module
    /// doc), waits until both listen, and points the client's peer of the first relay at
    /// `ss-tunnel`.
    pub fn start_shadowsocks(&self) -> Result<Shadowsocks> {
        let need = |name: &str| {
            bin(name).ok_or_else(|| {
                anyhow!("{name} (shadowsocks-libev) not found: run `cargo xtask setup`")
            })
        };
        let (tunnel, server_bin) = (need("ss-tunnel")?, need("ss-server")?);
        let relay = self.first_relay();
        let client = self.client();
        let server = SocketAddr::new(relay.address().into(), SERVER_PORT);
        let forward = self.entry_endpoint();
        let local = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), LOCAL_PORT);
        let mut ss = Shadowsocks {
            children: Vec::new(),
            undo: None,
            local,
            server,
            forward,
        };
        let spawn = |ns: &str, bin: &std::path::Path, args: Vec<String>| -> Result<Child> {
            let mut cmd = netns::command(ns, &bin.display().to_string());
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd.spawn()
                .with_context(|| format!("starting {} {} in {ns}", bin.display(), args.join(" ")))
        };
        // -U: UDP only (WireGuard); the server listens on the relay's address.
        let common = |s: &mut Vec<String>| {
            s.extend(
                ["-m", METHOD, "-k", PASSWORD, "-U"]
                    .iter()
                    .map(|a| a.to_string()),
            );
        };
        let mut server_args = vec![
            "-s".to_string(),
            server.ip().to_string(),
            "-p".into(),
            server.port().to_string(),
        ];
        common(&mut server_args);
        ss.children
            .push(spawn(&relay.netns, &server_bin, server_args)?);
        let mut local_args = vec![
            "-b".to_string(),
            local.ip().to_string(),
            "-l".into(),
            local.port().to_string(),
            "-L".into(),
            forward.to_string(),
            "-s".into(),
            server.ip().to_string(),
            "-p".into(),
            server.port().to_string(),
        ];
        common(&mut local_args);
        ss.children.push(spawn(&client.netns, &tunnel, local_args)?);
        for (ns, port, who) in [
            (&relay.netns, SERVER_PORT, "ss-server"),
            (&client.netns, LOCAL_PORT, "ss-tunnel"),
        ] {
            wg::wait_listening(ns, port, Duration::from_secs(10))
                .with_context(|| format!("{who} does not listen"))?;
        }
        let iface = &client.wg().iface;
        let key = &relay.wg().public_key;
        let set = |endpoint: SocketAddr| -> Vec<String> {
            [
                "wg",
                "set",
                iface,
                "peer",
                key,
                "endpoint",
                &endpoint.to_string(),
            ]
            .iter()
            .map(|a| a.to_string())
            .collect()
        };
        netns::exec(&client.netns, &set(local))
            .context("pointing the client's WireGuard at ss-tunnel")?;
        ss.undo = Some((client.netns.clone(), set(forward)));
        Ok(ss)
    }
}

impl Drop for Shadowsocks {
    fn drop(&mut self) {
        if let Some((ns, argv)) = self.undo.take()
            && let Err(e) = netns::exec(&ns, &argv)
        {
            eprintln!("pointing the client back at its relay: {e:#}");
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
