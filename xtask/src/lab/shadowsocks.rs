//! A real obfuscator in the lab, as Mullvad's Shadowsocks obfuscation runs it: shadowsocks-rust
//! (`cargo xtask setup` installs [`crate::setup::SHADOWSOCKS_VERSION`]) with `sslocal` in the
//! client namespace in UDP tunnel mode on 127.0.0.1, `ssserver` at the first relay (entry, or
//! the single relay), and the client's peer endpoint of that relay pointed at `sslocal`. The
//! client's WireGuard then talks to 127.0.0.1 only, and what leaves its underlay is
//! Shadowsocks UDP to the relay's [`Shadowsocks::server`]; `ssserver` hands the WireGuard
//! datagrams to the relay's own WireGuard port.
//!
//! With an AEAD cipher of a 32-byte key (the lab's `aes-256-gcm`) every WireGuard datagram
//! becomes exactly one Shadowsocks datagram [`ADDED_BYTES`] longer, both ways: a 32-byte
//! salt, the target address (1 type byte, 4 IPv4 bytes, 2 port bytes) and a 16-byte tag.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use crate::lab::Lab;
use crate::{netns, setup, wg};

/// What Shadowsocks adds to each datagram with the lab's cipher (see the module doc).
pub const ADDED_BYTES: u64 = 32 + 1 + 4 + 2 + 16;
/// The cipher and key; nothing here is secret.
pub const METHOD: &str = "aes-256-gcm";
const PASSWORD: &str = "wirescope-lab";
/// Where `sslocal` listens in the client namespace, and `ssserver` at the relay.
pub const LOCAL_PORT: u16 = 51900;
pub const SERVER_PORT: u16 = 8388;

/// Whether the shadowsocks-rust binaries are here; otherwise, with `CI=true`, a panic naming
/// what to run, else "skipping TEST: ..." on stderr and false.
pub fn can_run(test: &str) -> bool {
    let missing: Vec<&str> = setup::SHADOWSOCKS_BINS
        .iter()
        .copied()
        .filter(|b| setup::shadowsocks_bin(b).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: shadowsocks-rust {} is not installed ({} missing): run `cargo xtask setup`",
        setup::SHADOWSOCKS_VERSION,
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
    /// `sslocal`'s address: the client's peer endpoint while this runs.
    pub local: SocketAddr,
    /// `ssserver`'s address at the relay: the obfuscation flow's remote end.
    pub server: SocketAddr,
    /// Where `ssserver` delivers WireGuard: the relay's WireGuard endpoint.
    pub forward: SocketAddr,
}

impl Lab {
    /// Starts `ssserver` at the first relay and `sslocal` in the client (see the module
    /// doc), waits until both listen, and points the client's peer of the first relay at
    /// `sslocal`.
    pub fn start_shadowsocks(&self) -> Result<Shadowsocks> {
        let bin = |name: &str| {
            setup::shadowsocks_bin(name).ok_or_else(|| {
                anyhow!(
                    "{name} of shadowsocks-rust {} not found: run `cargo xtask setup`",
                    setup::SHADOWSOCKS_VERSION
                )
            })
        };
        let (sslocal, ssserver) = (bin("sslocal")?, bin("ssserver")?);
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
        let common = |s: &mut Vec<String>| {
            s.extend(
                ["-m", METHOD, "-k", PASSWORD, "-u"]
                    .iter()
                    .map(|a| a.to_string()),
            );
        };
        let mut server_args = vec!["-s".to_string(), server.to_string()];
        common(&mut server_args);
        ss.children
            .push(spawn(&relay.netns, &ssserver, server_args)?);
        let mut local_args = vec![
            "--protocol".to_string(),
            "tunnel".into(),
            "-b".into(),
            local.to_string(),
            "-f".into(),
            forward.to_string(),
            "-s".into(),
            server.to_string(),
        ];
        common(&mut local_args);
        ss.children
            .push(spawn(&client.netns, &sslocal, local_args)?);
        for (ns, port, who) in [
            (&relay.netns, SERVER_PORT, "ssserver"),
            (&client.netns, LOCAL_PORT, "sslocal"),
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
            .context("pointing the client's WireGuard at sslocal")?;
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
