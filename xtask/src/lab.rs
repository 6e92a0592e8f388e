//! The WireGuard lab: network namespaces joined by veth links stand for a client and the
//! relays; each has a WireGuard interface with a name unique to the lab's prefix, run by the
//! kernel (`ip link add ... type wireguard`) or by userspace wireguard-go: see [`WgImpl`].
//!
//! ```text
//! single:    PREFIX-cli --veth-- [PREFIX-hop] --veth-- PREFIX-relay
//! multihop:  PREFIX-cli --veth-- [PREFIX-hop] --veth-- PREFIX-entry --veth-- PREFIX-exit
//! ```
//!
//! Multihop is built as the Mullvad app builds it on Linux: the client has one interface with
//! two peers. The entry peer's allowed IPs are only the exit relay's veth address, and the
//! client routes that address into its own wg interface, so the exit-layer WireGuard UDP is
//! itself encrypted for the entry peer. Names and addresses: see [`plan`].
//!
//! Impairments: the optional hop (`--hop`) is a kernel router (ip_forward). With
//! `--path-mtu N` its onward link has MTU N, so the path sends real ICMP
//! fragmentation-needed. [`Lab::start_impairment`] (or `cargo xtask lab impair`) runs the
//! deterministic impairing UDP relay of [`crate::impair`] in the hop, or between the multihop
//! relays, and points the client's endpoint at it.
//!
//! [`Lab::up`] first removes whatever an earlier lab with the same prefix left (also after a
//! crash), builds the lab, and writes its description to `/run/wirescope-lab/PREFIX.json`.
//! Dropping the returned [`Lab`] tears it down; [`down`] does the same from the prefix alone.

pub mod cleanup;
pub mod impls;
pub mod plan;
pub mod shadowsocks;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

pub use cleanup::{STATE_DIR, down, leftovers, state_path};
pub use impls::{WG_IMPL_ENV, WgImpl};
pub use plan::{
    CLIENT_PORT, CLIENT_TUNNEL_V4, CLIENT_TUNNEL_V6, GATEWAY_V4, GATEWAY_V6, RELAY_PORT,
    TUNNEL_NET_V4, TUNNEL_NET_V6,
};

use crate::{cmd, netns, wg};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// client <-> one relay
    Single,
    /// client <-> entry relay <-> exit relay, WireGuard inside WireGuard on one client interface
    Multihop,
}

/// What a host in the lab stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    /// A router between the client and the first relay, for impairments (no WireGuard): it
    /// forwards IP (with `path_mtu`, onto a smaller-MTU link), and hosts the impairing relay
    /// of [`crate::impair`].
    Hop,
    /// The only relay of the single topology.
    Relay,
    Entry,
    Exit,
}

/// Whether this kernel can create WireGuard interfaces: the `wireguard` module is loaded,
/// `modprobe wireguard` loads it, or (built in, or no modprobe) a throwaway interface can be
/// created in a throwaway network namespace (as root only). Worked out once per process.
pub fn kernel_wireguard_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(probe_kernel_wireguard)
}

fn probe_kernel_wireguard() -> bool {
    let loaded = || std::path::Path::new("/sys/module/wireguard").exists();
    if loaded() {
        return true;
    }
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    let modprobe = std::process::Command::new("modprobe")
        .args(["-q", "wireguard"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if modprobe.is_ok_and(|s| s.success()) && loaded() {
        return true;
    }
    let ns = format!("wirescope-wgprobe-{}", std::process::id());
    if cmd::ip(&["netns", "add", &ns]).is_err() {
        return false;
    }
    let ok = cmd::ip(&["-n", &ns, "link", "add", "wgprobe0", "type", "wireguard"]).is_ok();
    let _ = cmd::ip(&["netns", "del", &ns]);
    ok
}

/// The running kernel's release, (major, minor), from /proc/sys/kernel/osrelease (what
/// `uname -r` prints, e.g. `6.1.0-56-amd64` is (6, 1)).
pub fn kernel_version() -> Result<(u32, u32)> {
    let path = "/proc/sys/kernel/osrelease";
    let release = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    parse_kernel_release(&release)
        .ok_or_else(|| anyhow!("cannot read a version out of the kernel release {release:?}"))
}

/// `6.12.95+deb12-amd64` is (6, 12).
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The first kernel with TCX (BPF links for TC): the agent attaches with it from here on,
/// through a clsact qdisc below.
pub const TCX_SINCE: (u32, u32) = (6, 6);

/// How the agent attaches its TC programs on a kernel of this version: `tcx` or `clsact`.
pub fn attach_mode_for(version: (u32, u32)) -> &'static str {
    if version >= TCX_SINCE {
        "tcx"
    } else {
        "clsact"
    }
}

/// How the agent must attach on the running kernel, as `wirescope_attach_info{mode}` says it:
/// `tcx` on 6.6 and later, `clsact` before. Panics when the kernel release cannot be read.
pub fn expected_attach_mode() -> &'static str {
    attach_mode_for(kernel_version().unwrap_or_else(|e| panic!("expected_attach_mode: {e:#}")))
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    pub topology: Topology,
    /// 1 to 10 lowercase letters or digits; namespaces are `PREFIX-cli` etc.
    pub prefix: String,
    /// MTU of the client's wg interface and of the exit (or single) relay's; the entry
    /// relay's is 80 more, so that it can carry the exit layer back.
    pub wg_mtu: u32,
    /// MTU of every veth.
    pub veth_mtu: u32,
    /// Put a forwarding hop namespace between the client and the first relay.
    pub hop: bool,
    /// With `hop`: the MTU of the hop's onward link (both ends of the veth towards the first
    /// relay), smaller than `veth_mtu`. The hop is a kernel router (ip_forward), so a packet
    /// with DF bigger than this gets a real ICMP fragmentation-needed (type 3 code 4) from it
    /// with this MTU, and one without DF leaves it in fragments.
    pub path_mtu: Option<u32>,
    /// Kernel WireGuard or wireguard-go; the default is [`WgImpl::auto`].
    pub wireguard: WgImpl,
}

impl Default for LabConfig {
    /// Panics when [`WG_IMPL_ENV`] names no implementation (a typo must not silently test
    /// the other one).
    fn default() -> Self {
        LabConfig {
            topology: Topology::Single,
            prefix: plan::DEFAULT_PREFIX.to_owned(),
            wg_mtu: plan::DEFAULT_WG_MTU,
            veth_mtu: plan::DEFAULT_VETH_MTU,
            hop: false,
            path_mtu: None,
            wireguard: WgImpl::auto().unwrap_or_else(|e| panic!("{e:#}")),
        }
    }
}

impl LabConfig {
    pub fn new(topology: Topology, prefix: &str) -> Self {
        LabConfig {
            topology,
            prefix: prefix.to_owned(),
            ..Default::default()
        }
    }
}

/// One end of a veth link, seen from the host that has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Veth {
    pub name: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The other end: its namespace, name and address.
    pub peer_netns: String,
    pub peer_name: String,
    pub peer_address: Ipv4Addr,
}

/// A peer as configured on a host's wg interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConf {
    /// The host this peer is.
    pub role: Role,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
}

/// A host's WireGuard interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgHost {
    pub iface: String,
    /// Standard base64, as `wg` prints it.
    pub public_key: String,
    /// The lab's own throwaway key, kept because boringtun's UAPI never returns it: its
    /// `wg showconf` has no PrivateKey line (see [`WgHost::with_private_key`]).
    #[serde(default)]
    pub private_key: wg::PrivateKey,
    pub listen_port: u16,
    /// CIDR, e.g. `10.64.1.2/32`.
    pub addresses: Vec<String>,
    pub mtu: u32,
    /// The wireguard-go daemon; 0 with kernel WireGuard.
    pub pid: u32,
    pub peers: Vec<PeerConf>,
}

impl WgHost {
    pub fn peer(&self, role: Role) -> Option<&PeerConf> {
        self.peers.iter().find(|p| p.role == role)
    }

    /// `conf` (`wg showconf` of this interface) with its PrivateKey: as it is when it has
    /// one, else with this interface's. boringtun's `wg showconf` has none, and `wg setconf`
    /// of it would leave a device without a key.
    pub fn with_private_key(&self, conf: &str) -> String {
        if conf
            .lines()
            .any(|l| l.trim_start().starts_with("PrivateKey"))
        {
            return conf.to_owned();
        }
        conf.replacen(
            "[Interface]\n",
            &format!("[Interface]\nPrivateKey = {}\n", self.private_key.0),
            1,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub role: Role,
    pub netns: String,
    /// The client-side veth first (the only one for the client).
    pub veths: Vec<Veth>,
    /// net.ipv4.ip_forward is on.
    pub ip_forward: bool,
    /// None only for the hop.
    pub wg: Option<WgHost>,
    /// The `ip` commands (run as `ip -n NETNS ...`) that set up routes and rules.
    pub routes: Vec<String>,
}

impl Host {
    /// The WireGuard interface; panics for the hop, which has none.
    pub fn wg(&self) -> &WgHost {
        self.wg
            .as_ref()
            .unwrap_or_else(|| panic!("host {} has no WireGuard interface", self.netns))
    }

    /// The address other hosts reach this one at (its client-side veth).
    pub fn address(&self) -> Ipv4Addr {
        self.veths[0].address
    }

    /// The veth facing the client (for the client: its only veth, the underlay).
    pub fn underlay(&self) -> &Veth {
        &self.veths[0]
    }
}

/// A running lab. Dropping it tears it down, unless it was [`Lab::load`]ed or
/// [`Lab::detach`]ed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lab {
    pub prefix: String,
    pub topology: Topology,
    pub wg_mtu: u32,
    pub veth_mtu: u32,
    /// State files written before the switch existed were userspace labs.
    #[serde(default = "userspace")]
    pub wireguard: WgImpl,
    /// In chain order: client, [hop], relay | entry, exit.
    pub hosts: Vec<Host>,
    /// MTU of the hop's onward link, when smaller than the veths' (see [`LabConfig::path_mtu`]).
    #[serde(default)]
    pub path_mtu: Option<u32>,
    /// The impairing relay `cargo xtask lab impair` runs, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impairment: Option<ImpairState>,
    #[serde(skip)]
    owned: bool,
}

/// What `cargo xtask lab impair` runs, as the state file records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImpairState {
    pub place: crate::impair::Place,
    pub rules: crate::impair::Impairment,
    /// The `cargo xtask lab impair` process.
    pub pid: u32,
}

fn userspace() -> WgImpl {
    WgImpl::Userspace
}

/// Why the lab cannot run here, or Ok: root, the programs it uses, and what the default
/// WireGuard implementation ([`WgImpl::auto`]) needs.
pub fn prerequisites() -> Result<()> {
    prerequisites_for(WgImpl::auto()?)
}

/// Why a lab with this WireGuard implementation cannot run here, or Ok: root, the programs
/// it uses, /dev/net/tun and the daemon for a userspace one, the kernel module for kernel.
pub fn prerequisites_for(wireguard: WgImpl) -> Result<()> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (the lab creates network namespaces)".to_owned());
    }
    let progs = ["ip", "wg", "ping", "tcpdump"];
    if wireguard.is_userspace() {
        if let Err(e) = wireguard.program() {
            missing.push(format!("{e:#}"));
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            missing.push(format!(
                "/dev/net/tun ({wireguard} needs the tun driver: `modprobe tun`)"
            ));
        }
    } else if !kernel_wireguard_available() {
        missing.push(format!(
            "kernel WireGuard (`modprobe wireguard` fails on {}; wireguard-go is \
             `--wireguard userspace`, or {WG_IMPL_ENV}=userspace for tests)",
            kernel_version().map_or("this kernel".into(), |(a, b)| format!("{a}.{b}"))
        ));
    }
    for prog in progs {
        if !on_path(prog) {
            missing.push(format!("`{prog}` (run `cargo xtask setup`)"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("the lab needs: {}", missing.join(", ")))
    }
}

/// For tests that need the lab: true when it can run here. Otherwise, with `CI=true` in the
/// environment, panics with the reason (CI must not silently skip); without, prints
/// "skipping TEST: reason" to stderr (past the test harness's capture) and returns false.
pub fn can_run(test: &str) -> bool {
    skip_unless(test, prerequisites())
}

/// [`can_run`] for a lab with this WireGuard implementation rather than the default one.
pub fn can_run_for(test: &str, wireguard: WgImpl) -> bool {
    skip_unless(test, prerequisites_for(wireguard))
}

fn skip_unless(test: &str, prerequisites: Result<()>) -> bool {
    match prerequisites {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {e:#} (CI=true, so this fails instead of being skipped)")
        }
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "skipping {test}: {e:#}");
            false
        }
    }
}

/// Whether a file `prog` is in one of PATH's directories.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

impl Lab {
    /// Removes what an earlier lab with this prefix left, builds the lab, writes the state
    /// file. On failure, removes whatever it had made.
    pub fn up(cfg: LabConfig) -> Result<Lab> {
        prerequisites_for(cfg.wireguard)?;
        crate::procs::become_subreaper();
        let mut lab = plan::plan(&cfg)?;
        down(&cfg.prefix).context("removing the previous lab with this prefix")?;
        lab.owned = true; // from here on, an error drops and so tears down
        lab.build().with_context(|| {
            format!(
                "building the {} lab `{}` ({} WireGuard)",
                cfg.topology, cfg.prefix, cfg.wireguard
            )
        })?;
        lab.save()?;
        Ok(lab)
    }

    /// The lab described by the state file of `prefix`. Dropping it does not tear it down.
    pub fn load(prefix: &str) -> Result<Lab> {
        let path = state_path(prefix);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (no lab `{prefix}` is up? `cargo xtask lab up --prefix {prefix}`)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Keeps the lab running after this value is dropped (`cargo xtask lab up`).
    pub fn detach(&mut self) {
        self.owned = false;
    }

    /// Tears the lab down now, reporting failure (Drop can only print it).
    pub fn teardown(mut self) -> Result<()> {
        self.owned = false;
        down(&self.prefix).map(|_| ())
    }

    pub fn state_path(&self) -> PathBuf {
        state_path(&self.prefix)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, role: Role) -> Option<&Host> {
        self.hosts.iter().find(|h| h.role == role)
    }

    pub fn client(&self) -> &Host {
        &self.hosts[0]
    }

    /// The impairing hop, when configured.
    pub fn hop(&self) -> Option<&Host> {
        self.host(Role::Hop)
    }

    /// The hop's link towards the first relay (seen from the hop), when there is a hop.
    pub fn hop_onward(&self) -> Option<&Veth> {
        self.hop().map(|h| &h.veths[1])
    }

    /// The entry relay (multihop only).
    pub fn entry(&self) -> Option<&Host> {
        self.host(Role::Entry)
    }

    /// The relay that owns the in-tunnel gateway: the exit in multihop, the relay in single.
    pub fn exit(&self) -> &Host {
        self.hosts.last().expect("a lab has hosts")
    }

    /// The relay the client reaches over its underlay (hop 1): entry or the single relay.
    pub fn first_relay(&self) -> &Host {
        self.entry().unwrap_or_else(|| self.exit())
    }

    /// Endpoint of the hop-1 relay, as the client's peer list has it.
    pub fn entry_endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.first_relay().address().into(), RELAY_PORT)
    }

    /// Endpoint of the exit relay (the single relay in single), as the client has it.
    pub fn exit_endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.exit().address().into(), RELAY_PORT)
    }

    pub fn namespaces(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.netns.as_str()).collect()
    }

    /// Runs a program in `ns` to completion; fails with its stderr on a non-zero exit.
    pub fn exec<S: AsRef<str>>(&self, ns: &str, args: &[S]) -> Result<Output> {
        netns::exec(ns, args)
    }

    /// Starts a program in `ns` (stdin closed, stdout/stderr inherited).
    pub fn spawn<S: AsRef<str>>(&self, ns: &str, args: &[S]) -> Result<Child> {
        netns::spawn(ns, args)
    }

    /// Pings the in-tunnel gateway from the client until every peer of the client's interface
    /// (entry and exit in multihop) has completed a handshake, then once more, so that when
    /// this returns every session is confirmed and no packet of it is still in flight.
    /// (Later, WireGuard sends a keepalive 10 s after receiving data when it had nothing to
    /// send back: mind that when counting packets.)
    pub fn handshake(&self, timeout: Duration) -> Result<()> {
        let c = self.client();
        let gw = GATEWAY_V4.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            let _ = netns::exec(&c.netns, &["ping", "-c1", "-W1", "-q", &gw]);
            match wg::wait_for_handshake(&c.netns, &c.wg().iface, Duration::ZERO) {
                Ok(()) => {
                    netns::exec(&c.netns, &["ping", "-c1", "-W2", "-q", &gw]).with_context(
                        || {
                            format!(
                                "lab `{}`: handshakes done, but {gw} does not answer",
                                self.prefix
                            )
                        },
                    )?;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("lab `{}`: no handshake", self.prefix)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `wg show dump` of a host's interface.
    pub fn wg_dump(&self, role: Role) -> Result<wg::WgDump> {
        let h = self
            .host(role)
            .ok_or_else(|| anyhow!("lab `{}` has no {role:?} host", self.prefix))?;
        wg::dump(&h.netns, &h.wg().iface)
    }

    /// A few lines for people: hosts, interfaces, addresses, keys.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "lab `{}` ({}, {} WireGuard, wg MTU {}, veth MTU {}), state in {}\n",
            self.prefix,
            self.topology,
            self.wireguard,
            self.wg_mtu,
            self.veth_mtu,
            self.state_path().display()
        );
        if let Some(i) = &self.impairment {
            let state = if crate::procs::is_alive(i.pid) {
                format!("pid {}", i.pid)
            } else {
                format!("pid {} gone: `cargo xtask lab up` again", i.pid)
            };
            s += &format!(
                "  impairing relay ({:?}, {state}): {}\n",
                i.place,
                i.rules.describe()
            );
        }
        for h in &self.hosts {
            s += &format!(
                "  {:<6} netns {}\n",
                format!("{:?}", h.role).to_lowercase(),
                h.netns
            );
            for v in &h.veths {
                s += &format!(
                    "         veth {} {}/{} <-> {} {} in {}\n",
                    v.name, v.address, v.prefix_len, v.peer_name, v.peer_address, v.peer_netns
                );
            }
            if h.role == Role::Hop {
                if let (Some(mtu), Some(v)) = (self.path_mtu, self.hop_onward()) {
                    s += &format!(
                        "         path MTU {mtu} on {} <-> {}: a router; DF packets bigger get \
                         ICMP fragmentation-needed (mtu {mtu}) back\n",
                        v.name, v.peer_name
                    );
                }
                s += &format!(
                    "         impairing relay: `cargo xtask lab impair --prefix {}` relays the \
                     client's WireGuard through {}:{RELAY_PORT} (drop, reorder, delay)\n",
                    self.prefix,
                    h.address()
                );
            }
            if let Some(w) = &h.wg {
                let run_by = match self.wireguard {
                    WgImpl::Kernel => "kernel".to_owned(),
                    i => format!("{i} pid {}", w.pid),
                };
                s += &format!(
                    "         wg {} port {} [{}] {run_by} key {}\n",
                    w.iface,
                    w.listen_port,
                    w.addresses.join(", "),
                    w.public_key
                );
                for p in &w.peers {
                    s += &format!(
                        "           peer {:?} endpoint {} allowed {}\n",
                        p.role,
                        p.endpoint.map_or("(learned)".to_owned(), |e| e.to_string()),
                        p.allowed_ips.join(", ")
                    );
                }
            }
        }
        s
    }

    /// Records in the state file that this process runs an impairing relay (None: no
    /// longer), for `lab show` and the summary.
    pub fn mark_impairment(
        &self,
        place: Option<crate::impair::Place>,
        rules: Option<&crate::impair::Impairment>,
    ) -> Result<()> {
        let mut state = Lab::load(&self.prefix)?;
        state.impairment = place.zip(rules).map(|(place, rules)| ImpairState {
            place,
            rules: *rules,
            pid: std::process::id(),
        });
        state.save()
    }

    fn save(&self) -> Result<()> {
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let path = self.state_path();
        let json = serde_json::to_string_pretty(self).expect("lab serializes");
        std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    fn build(&mut self) -> Result<()> {
        let keys: Vec<Option<wg::Keypair>> = self
            .hosts
            .iter()
            .map(|h| h.wg.as_ref().map(|_| wg::genkey()).transpose())
            .collect::<Result<_>>()?;
        for (h, k) in self.hosts.iter_mut().zip(&keys) {
            if let (Some(w), Some(k)) = (h.wg.as_mut(), k) {
                w.public_key = k.public.clone();
                w.private_key = wg::PrivateKey(k.private.trim().to_owned());
            }
        }
        let public_of = |role: Role, hosts: &[Host]| {
            hosts
                .iter()
                .find(|h| h.role == role)
                .map(|h| h.wg().public_key.clone())
                .expect("peer role in lab")
        };
        let snapshot = self.hosts.clone();
        for h in &mut self.hosts {
            if let Some(w) = h.wg.as_mut() {
                for p in &mut w.peers {
                    p.public_key = public_of(p.role, &snapshot);
                }
            }
        }

        for h in &self.hosts {
            create_netns(h)?;
        }
        for h in &self.hosts {
            for v in &h.veths {
                // Each pair once, created from the client side.
                if self.hosts.iter().position(|x| x.netns == h.netns)
                    < self.hosts.iter().position(|x| x.netns == v.peer_netns)
                {
                    create_veth(h, v, self.veth_mtu)?;
                }
            }
        }
        let wireguard = self.wireguard;
        for h in &mut self.hosts {
            if let Some(w) = h.wg.as_mut() {
                w.pid = wireguard.create(&h.netns, &w.iface, Duration::from_secs(10))?;
            }
        }
        // Relays first: a client that is up sends its first handshake at once, and one lost
        // to a relay not yet listening is retried only after 5 s.
        for (h, k) in self.hosts.iter().zip(&keys).rev() {
            if let (Some(w), Some(k)) = (&h.wg, k) {
                configure_wg(h, w, k)?;
            }
        }
        if let (Some(mtu), Some(v)) = (self.path_mtu, self.hop_onward()) {
            let mtu = mtu.to_string();
            let hop_ns = self.hop().expect("hop").netns.clone();
            ip_n(&hop_ns, &["link", "set", &v.name, "mtu", &mtu])?;
            ip_n(&v.peer_netns, &["link", "set", &v.peer_name, "mtu", &mtu])?;
        }
        for h in &self.hosts {
            for r in &h.routes {
                let mut args = vec!["-n", h.netns.as_str()];
                args.extend(r.split_whitespace());
                cmd::ip(&args).with_context(|| format!("setting up routing in {}", h.netns))?;
            }
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = down(&self.prefix)
        {
            eprintln!("tearing down lab `{}`: {e:#}", self.prefix);
        }
    }
}

fn ip_n(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    cmd::ip(&all)?;
    Ok(())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    netns::run_in(ns, move || std::fs::write(&path, value))?
        .with_context(|| format!("setting {key} in {ns}"))
}

fn create_netns(h: &Host) -> Result<()> {
    cmd::ip(&["netns", "add", &h.netns])?;
    ip_n(&h.netns, &["link", "set", "lo", "up"])?;
    // Strict reverse-path filtering would drop the multihop paths (tunnel addresses arriving
    // on veths, relay addresses arriving on wg). Set before any link exists, so that new
    // links inherit it from `default`.
    for scope in ["all", "default"] {
        sysctl(&h.netns, &format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    if h.ip_forward {
        sysctl(&h.netns, "net.ipv4.ip_forward", "1")?;
    }
    Ok(())
}

fn create_veth(h: &Host, v: &Veth, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    cmd::ip(&[
        "link",
        "add",
        &v.name,
        "netns",
        &h.netns,
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        &v.peer_name,
        "netns",
        &v.peer_netns,
        "mtu",
        &mtu,
    ])
    .with_context(|| format!("creating veth {} <-> {}", v.name, v.peer_name))?;
    for (ns, name, addr) in [
        (&h.netns, &v.name, v.address),
        (&v.peer_netns, &v.peer_name, v.peer_address),
    ] {
        // The underlay is IPv4 only; without IPv6 the veths carry no router solicitations,
        // MLD reports or DAD probes, so only the lab's traffic is on the wire.
        sysctl(ns, &format!("net.ipv6.conf.{name}.disable_ipv6"), "1")?;
        ip_n(
            ns,
            &[
                "addr",
                "add",
                &format!("{addr}/{}", v.prefix_len),
                "dev",
                name,
            ],
        )?;
        ip_n(ns, &["link", "set", name, "up"])?;
    }
    Ok(())
}

fn configure_wg(h: &Host, w: &WgHost, key: &wg::Keypair) -> Result<()> {
    let mut conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {}\n",
        key.private, w.listen_port
    );
    for p in &w.peers {
        conf += &format!("\n[Peer]\nPublicKey = {}\n", p.public_key);
        if let Some(e) = p.endpoint {
            conf += &format!("Endpoint = {e}\n");
        }
        conf += &format!("AllowedIPs = {}\n", p.allowed_ips.join(", "));
    }
    wg::setconf(&h.netns, &w.iface, &conf)?;
    // No IPv6 link-local address: the kernel would send router solicitations from it into
    // the tunnel, which would trigger handshakes and spoil exact packet counts.
    ip_n(&h.netns, &["link", "set", &w.iface, "addrgenmode", "none"])?;
    ip_n(
        &h.netns,
        &["link", "set", &w.iface, "mtu", &w.mtu.to_string()],
    )?;
    for a in &w.addresses {
        if a.contains(':') {
            ip_n(
                &h.netns,
                &["-6", "addr", "add", a, "dev", &w.iface, "nodad"],
            )?;
        } else {
            ip_n(&h.netns, &["addr", "add", a, "dev", &w.iface])?;
        }
    }
    ip_n(&h.netns, &["link", "set", &w.iface, "up"])?;
    wg::wait_listening(&h.netns, w.listen_port, Duration::from_secs(5))?;
    Ok(())
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Topology::Single => "single",
            Topology::Multihop => "multihop",
        })
    }
}

/// Fails unless `left` is empty, listing what is left and how to remove it.
pub fn ensure_clean(prefix: &str) -> Result<()> {
    let left = leftovers(prefix)?;
    if !left.is_empty() {
        bail!(
            "lab `{prefix}` left: {}; run `cargo xtask lab down --prefix {prefix}`",
            left.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_kernel_release("6.1.0-56-amd64\n"), Some((6, 1)));
        assert_eq!(parse_kernel_release("6.12.95+deb12-amd64"), Some((6, 12)));
        assert_eq!(parse_kernel_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_release("6.6"), Some((6, 6)));
        assert_eq!(parse_kernel_release("linux"), None);
        assert!(kernel_version().is_ok());
    }

    /// boringtun's `wg showconf` has no PrivateKey: the lab's is added; a conf with one is
    /// left alone.
    #[test]
    fn showconf_gets_the_private_key_it_lacks() {
        let w = WgHost {
            iface: "t0".into(),
            public_key: "cHVi".into(),
            private_key: wg::PrivateKey("cHJpdg==".into()),
            listen_port: 40001,
            addresses: vec![],
            mtu: 1420,
            pid: 0,
            peers: vec![],
        };
        let boringtun = "[Interface]\nListenPort = 40001\n\n[Peer]\nPublicKey = cGVlcg==\n";
        assert_eq!(
            w.with_private_key(boringtun),
            "[Interface]\nPrivateKey = cHJpdg==\nListenPort = 40001\n\n[Peer]\nPublicKey = cGVlcg==\n"
        );
        let kernel = "[Interface]\nListenPort = 40001\nPrivateKey = b3du\n";
        assert_eq!(w.with_private_key(kernel), kernel);
        assert!(
            !format!("{w:?}").contains("cHJpdg=="),
            "Debug shows no private key"
        );
    }

    #[test]
    fn attach_mode_follows_the_kernel() {
        assert_eq!(attach_mode_for((6, 1)), "clsact");
        assert_eq!(attach_mode_for((5, 15)), "clsact");
        assert_eq!(attach_mode_for((6, 5)), "clsact");
        assert_eq!(attach_mode_for((6, 6)), "tcx");
        assert_eq!(attach_mode_for((6, 12)), "tcx");
        assert_eq!(attach_mode_for((7, 0)), "tcx");
        assert!(["tcx", "clsact"].contains(&expected_attach_mode()));
    }
}
