//! Kernel drops, end to end: the `wirescope` binary in the lab's client namespace, drops
//! provoked there (an nftables rule on the tunnel's input, a UDP socket whose receive buffer
//! overflows) and in the relay's namespace, compared with what the kernel itself counted (the
//! nftables rule's counter, `RcvbufErrors` of /proc/net/snmp). Plus the reason names: those
//! the agent exports exist in this kernel's BTF, and on a BTF fixture with moved values the
//! mapping follows the BTF, not the kernel source.
//!
//! Needs root, the lab tools (`cargo xtask setup`) and `nft`; with CI=true a missing
//! prerequisite fails the test. The lab tests share the lab prefix `wsd`: run them with
//! `--test-threads=1`.
//! Run: `cargo test -p wirescope --test lab -- --test-threads=1 kernel::drops::`.

use crate::common;

use std::{net::UdpSocket, path::Path, process::Output, time::Duration};

use btf_rs::Btf;
use wirescope::datapath::drops::DropReasons;
use xtask::{
    agent::Agent,
    lab::{self, Lab, LabConfig, Topology},
    scrape::Metrics,
};

use common::{Names, stop, val};

const PREFIX: &str = "wsd";
/// Packets the nftables rule drops.
const N: u64 = 10;
/// Datagrams sent to the socket that never reads, and their payload.
const M: usize = 200;
const PAYLOAD: usize = 1000;
/// The local port of that socket (each namespace has its own ports).
const PORT: u16 = 47_474;
/// Its receive buffer: the kernel doubles it and raises it to its minimum (about 4.5 KiB),
/// room for one or two of these datagrams.
const RCVBUF: usize = 1024;
/// The nftables table the tests add (and delete).
const TABLE: &str = "wsd_drops";

const DROPS: &str = "wirescope_drops_total";
const UDP_ERRORS: &str = "wirescope_udp_receive_errors_total";

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// The lab's prerequisites and `nft`: true when the test can run; otherwise fails with
/// CI=true, else prints why and returns false.
fn can_run(test: &str) -> bool {
    if !lab::can_run(test) {
        return false;
    }
    if on_path("nft") {
        return true;
    }
    let why = "`nft` (nftables) is not on PATH (apt-get install nftables)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why} (CI=true, so this fails instead of being skipped)");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// The single-hop lab up, when [`can_run`]`(test)`.
fn lab_up(test: &str) -> Option<Lab> {
    can_run(test).then(|| Lab::up(LabConfig::new(Topology::Single, PREFIX)).expect("lab up"))
}

/// Starts the agent in the client namespace (it waits for /healthz) and checks that both
/// drop programs are attached.
fn start(lab: &Lab, test: &str) -> Agent {
    let agent = common::start(lab, &format!("drops-{test}"));
    let m = agent.scrape().expect("scrape");
    for feature in [
        "tracepoint_kfree_skb",
        "raw_tracepoint_udp_fail_queue_rcv_skb",
    ] {
        assert_eq!(
            m.get("wirescope_feature_available", &[("feature", feature)])
                .expect("one series"),
            1.0,
            "{feature} is attached on this kernel; the agent's log:\n{}",
            agent.log_text()
        );
    }
    agent
}

/// Sum over every series matching `labels`.
fn sum(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    m.sum(name, labels) as u64
}

fn exec(lab: &Lab, ns: &str, args: &[&str]) -> Output {
    let out = lab.exec(ns, args).expect("running a command in the lab");
    assert!(
        out.status.success(),
        "`{}` in {ns}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An nftables table in `ns` whose one rule, on the input hook, counts and drops ICMP
/// `icmp_type` arriving on `iface`. Deleted by [`NftDrop::remove`], or when dropped.
struct NftDrop<'a> {
    lab: &'a Lab,
    ns: String,
    removed: bool,
}

impl<'a> NftDrop<'a> {
    fn add(lab: &'a Lab, ns: &str, iface: &str, icmp_type: &str) -> Self {
        // A table left by an earlier, interrupted run (the lab is rebuilt, but be sure).
        let _ = lab.exec(ns, &["nft", "delete", "table", "inet", TABLE]);
        exec(lab, ns, &["nft", "add", "table", "inet", TABLE]);
        let guard = NftDrop {
            lab,
            ns: ns.to_owned(),
            removed: false,
        };
        exec(
            lab,
            ns,
            &[
                "nft",
                "add",
                "chain",
                "inet",
                TABLE,
                "input",
                "{ type filter hook input priority 0 ; policy accept ; }",
            ],
        );
        let quoted = format!("\"{iface}\"");
        exec(
            lab,
            ns,
            &[
                "nft", "add", "rule", "inet", TABLE, "input", "iifname", &quoted, "icmp", "type",
                icmp_type, "counter", "drop",
            ],
        );
        guard
    }

    /// Packets the rule has dropped, from its own counter.
    fn dropped(&self) -> u64 {
        let out = exec(self.lab, &self.ns, &["nft", "list", "table", "inet", TABLE]);
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let i = words
            .windows(2)
            .position(|w| w == ["counter", "packets"])
            .unwrap_or_else(|| panic!("no counter in the table:\n{text}"));
        words[i + 2].parse().expect("packet count")
    }

    fn remove(mut self) {
        exec(
            self.lab,
            &self.ns,
            &["nft", "delete", "table", "inet", TABLE],
        );
        self.removed = true;
    }
}

impl Drop for NftDrop<'_> {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self
                .lab
                .exec(&self.ns, &["nft", "delete", "table", "inet", TABLE]);
        }
    }
}

/// `N` pings from the client to the in-tunnel gateway, 20 ms apart, each waited for at
/// most 1 s; asserts that all were sent and none was answered (a rule drops them).
fn ping_unanswered(lab: &Lab) {
    // ping exits with 1 when nothing is answered, which `Lab::exec` takes for a failure.
    let out = common::ping_gateway(lab, N as u32, &["-W", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{N} packets transmitted, 0 received")),
        "ping: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `RcvbufErrors` of the Udp line of /proc/net/snmp in `ns` (the file reflects the reading
/// thread's namespace).
fn rcvbuf_errors(ns: &str) -> u64 {
    let text = xtask::netns::run_in(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/snmp").expect("reading net/snmp")
    })
    .expect("entering the namespace");
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (
        udp.next().expect("Udp header"),
        udp.next().expect("Udp values"),
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "RcvbufErrors")
        .expect("an RcvbufErrors column");
    values
        .split_whitespace()
        .nth(i)
        .expect("value")
        .parse()
        .expect("number")
}

/// In `ns`: a UDP socket on 127.0.0.1:`PORT` with a `RCVBUF` receive buffer that never
/// reads, and `M` datagrams of `PAYLOAD` bytes sent to it from another socket. Returns the
/// receiving socket, to be closed after the measurement (closing purges its queue).
fn overflow(ns: &str) -> UdpSocket {
    xtask::netns::run_in(ns, || -> std::io::Result<UdpSocket> {
        let rx = UdpSocket::bind(("127.0.0.1", PORT))?;
        socket2::SockRef::from(&rx).set_recv_buffer_size(RCVBUF)?;
        let tx = UdpSocket::bind("127.0.0.1:0")?;
        let payload = [0x5a; PAYLOAD];
        for _ in 0..M {
            tx.send_to(&payload, ("127.0.0.1", PORT))?;
        }
        Ok(rx)
    })
    .expect("entering the namespace")
    .expect("the UDP sockets")
}

/// Loopback delivery is synchronous, but leave softirq processing time to finish.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// Every `reason` of `wirescope_drops_total` is `unknown_N` or, with `SKB_DROP_REASON_`
/// before it, a member of this kernel's `enum skb_drop_reason`.
fn assert_reasons_named(m: &Metrics) {
    let btf = wirescope::sources::btf::read(Path::new(wirescope::sources::btf::VMLINUX))
        .expect("kernel BTF");
    let members = wirescope::sources::btf::enum_values(&btf, "skb_drop_reason").expect("enum");
    let mut seen = 0;
    for (labels, _) in m.select(DROPS, &[]) {
        let reason = labels.get("reason").expect("a reason label");
        seen += 1;
        if let Some(n) = reason.strip_prefix("unknown_") {
            assert!(n.parse::<u32>().is_ok(), "reason {reason:?}");
            continue;
        }
        let full = format!("SKB_DROP_REASON_{reason}");
        assert!(
            members.values().any(|v| *v == full),
            "reason {reason:?}: {full} is no member of this kernel's enum skb_drop_reason"
        );
    }
    assert!(seen > 0, "no series of {DROPS}");
}

#[test]
fn netfilter_drops_on_the_tunnel_input_count_exactly() {
    let Some(lab) = lab_up("netfilter_drops_on_the_tunnel_input_count_exactly") else {
        return;
    };
    let Names { cns, tun, .. } = Names::of(&lab);
    let agent = start(&lab, "netfilter");
    lab.handshake(Duration::from_secs(20)).expect("handshake");

    let l = [("interface", tun.as_str()), ("reason", "NETFILTER_DROP")];
    let b = agent.scrape().unwrap();
    let rule = NftDrop::add(&lab, &cns, &tun, "echo-reply");
    ping_unanswered(&lab);
    settle();
    let a = agent.scrape().unwrap();
    let by_rule = rule.dropped();
    rule.remove();
    let got = val(&a, DROPS, &l) - val(&b, DROPS, &l);
    eprintln!(
        "{} WireGuard: NETFILTER_DROP on {tun}: {got}, the rule's counter {by_rule}, pings {N}",
        lab.wireguard
    );
    assert_eq!((got, by_rule), (N, N), "(agent, nft counter)");
    // No other interface got them.
    let all = [("reason", "NETFILTER_DROP")];
    assert_eq!(sum(&a, DROPS, &all) - sum(&b, DROPS, &all), N);

    // With the table gone, the pings are answered and nothing more is dropped.
    ping_answered(&lab);
    let c = agent.scrape().unwrap();
    assert_eq!(val(&c, DROPS, &l), val(&a, DROPS, &l), "after the rule");
    assert_reasons_named(&c);

    stop(agent);
    lab.teardown().unwrap();
}

/// `N` pings that must all be answered.
fn ping_answered(lab: &Lab) {
    common::ping(lab, N as u32, &["-W", "1"], false);
}

#[test]
fn udp_receive_errors_equal_the_kernels_rcvbuf_errors() {
    let Some(lab) = lab_up("udp_receive_errors_equal_the_kernels_rcvbuf_errors") else {
        return;
    };
    let agent = start(&lab, "rcvbuf");
    let cns = lab.client().netns.clone();
    let port = PORT.to_string();
    let p = [("port", port.as_str())];
    let lo = [("interface", "lo"), ("reason", "SOCKET_RCVBUFF")];

    let (b, kb) = (agent.scrape().unwrap(), rcvbuf_errors(&cns));
    let rx = overflow(&cns);
    settle();
    let (ka, a) = (rcvbuf_errors(&cns), agent.scrape().unwrap());
    drop(rx);
    let kernel = ka - kb;
    let errors = val(&a, UDP_ERRORS, &p) - val(&b, UDP_ERRORS, &p);
    let drops = val(&a, DROPS, &lo) - val(&b, DROPS, &lo);
    eprintln!(
        "{M} datagrams: RcvbufErrors +{kernel}, udp_receive_errors{{port={PORT}}} +{errors}, \
         drops{{lo, SOCKET_RCVBUFF}} +{drops}"
    );
    assert!(kernel > 100, "only {kernel} of {M} overflowed");
    assert_eq!(errors, kernel, "udp_receive_errors against RcvbufErrors");
    assert_eq!(
        drops, kernel,
        "drops{{lo, SOCKET_RCVBUFF}} against RcvbufErrors"
    );
    // Nothing on another port, and no SOCKET_RCVBUFF drop elsewhere.
    assert_eq!(sum(&a, UDP_ERRORS, &[]) - sum(&b, UDP_ERRORS, &[]), kernel);
    let r = [("reason", "SOCKET_RCVBUFF")];
    assert_eq!(sum(&a, DROPS, &r) - sum(&b, DROPS, &r), kernel);
    assert_reasons_named(&a);

    stop(agent);
    lab.teardown().unwrap();
}

#[test]
fn another_namespaces_drops_are_not_counted() {
    let Some(lab) = lab_up("another_namespaces_drops_are_not_counted") else {
        return;
    };
    let agent = start(&lab, "other-netns");
    let cns = lab.client().netns.clone();
    let rns = lab.exit().netns.clone();
    let rtun = lab.exit().wg().iface.clone();
    lab.handshake(Duration::from_secs(20)).expect("handshake");

    let port = PORT.to_string();
    // The series these provocations would move, summed over every interface.
    let watched = |m: &Metrics| {
        (
            sum(m, DROPS, &[("reason", "NETFILTER_DROP")]),
            sum(m, DROPS, &[("reason", "SOCKET_RCVBUFF")]),
            sum(m, UDP_ERRORS, &[("port", port.as_str())]),
        )
    };

    let (b, kb) = (agent.scrape().unwrap(), rcvbuf_errors(&rns));
    // The relay drops the pings' echo requests as they come out of its tunnel.
    let rule = NftDrop::add(&lab, &rns, &rtun, "echo-request");
    ping_unanswered(&lab);
    // And a socket of the relay's overflows.
    let rx = overflow(&rns);
    settle();
    let (ka, a) = (rcvbuf_errors(&rns), agent.scrape().unwrap());
    drop(rx);
    let by_rule = rule.dropped();
    rule.remove();
    eprintln!(
        "in {rns}: the rule dropped {by_rule}, RcvbufErrors +{}; the client's agent: {:?} -> {:?}",
        ka - kb,
        watched(&b),
        watched(&a)
    );
    assert_eq!(by_rule, N, "the relay's rule dropped every echo request");
    assert!(ka - kb > 100, "the relay's socket overflowed: +{}", ka - kb);
    assert_eq!(
        watched(&a),
        watched(&b),
        "(NETFILTER_DROP, SOCKET_RCVBUFF, udp_receive_errors{{port={PORT}}}) in the client's agent"
    );

    // Control: the same overflow in the agent's own namespace is counted.
    let kb = rcvbuf_errors(&cns);
    let rx = overflow(&cns);
    settle();
    let (ka, c) = (rcvbuf_errors(&cns), agent.scrape().unwrap());
    drop(rx);
    let p = [("port", port.as_str())];
    assert_eq!(val(&c, UDP_ERRORS, &p) - val(&a, UDP_ERRORS, &p), ka - kb);
    assert!(ka - kb > 100);

    stop(agent);
    lab.teardown().unwrap();
}

/// Both provocations in the agent's namespace, then: every exported reason is a name of
/// this kernel's enum (or `unknown_N`), and the two provoked ones are there.
#[test]
fn reason_names_exist_in_this_kernels_btf() {
    let Some(lab) = lab_up("reason_names_exist_in_this_kernels_btf") else {
        return;
    };
    let Names { cns, tun, .. } = Names::of(&lab);
    let agent = start(&lab, "names");
    lab.handshake(Duration::from_secs(20)).expect("handshake");

    let rule = NftDrop::add(&lab, &cns, &tun, "echo-reply");
    ping_unanswered(&lab);
    rule.remove();
    let rx = overflow(&cns);
    settle();
    drop(rx);
    settle();
    let m = agent.scrape().unwrap();
    let reasons: Vec<String> = m
        .select(DROPS, &[])
        .map(|(l, v)| format!("{}/{}={v}", l["interface"], l["reason"]))
        .collect();
    eprintln!("series of {DROPS}: {reasons:?}");
    assert_reasons_named(&m);
    for reason in ["NETFILTER_DROP", "SOCKET_RCVBUFF"] {
        assert!(
            sum(&m, DROPS, &[("reason", reason)]) > 0,
            "{reason} among {reasons:?}"
        );
    }

    stop(agent);
    lab.teardown().unwrap();
}

// ---------------------------------------------------------------------------------------
// A BTF fixture
// ---------------------------------------------------------------------------------------

const BTF_KIND_ENUM: u32 = 6;

/// Raw little-endian BTF with one type: `enum NAME` (4 bytes) with these members.
fn enum_btf(name: &str, members: &[(&str, i32)]) -> Vec<u8> {
    let mut strings = vec![0u8];
    let mut string = |s: &str| {
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let mut types = Vec::new();
    let name_off = string(name);
    types.extend_from_slice(&name_off.to_le_bytes());
    types.extend_from_slice(&((BTF_KIND_ENUM << 24) | members.len() as u32).to_le_bytes());
    types.extend_from_slice(&4u32.to_le_bytes());
    for (m, v) in members {
        let off = string(m);
        types.extend_from_slice(&off.to_le_bytes());
        types.extend_from_slice(&v.to_le_bytes());
    }
    let mut btf = Vec::new();
    btf.extend_from_slice(&0xEB9F_u16.to_le_bytes());
    btf.push(1); // version
    btf.push(0); // flags
    btf.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
    btf.extend_from_slice(&0u32.to_le_bytes()); // type_off
    btf.extend_from_slice(&(types.len() as u32).to_le_bytes()); // type_len
    btf.extend_from_slice(&(types.len() as u32).to_le_bytes()); // str_off
    btf.extend_from_slice(&(strings.len() as u32).to_le_bytes()); // str_len
    btf.extend_from_slice(&types);
    btf.extend_from_slice(&strings);
    btf
}

/// The values in the fixture are nowhere near the kernel source's: the names come from the
/// BTF's values, whatever they are.
#[test]
fn mapping_follows_the_kernel_not_the_source() {
    let raw = enum_btf(
        "skb_drop_reason",
        &[
            ("SKB_NOT_DROPPED_YET", 1),
            ("SKB_CONSUMED", 3),
            ("SKB_DROP_REASON_NOT_SPECIFIED", 40),
            ("SKB_DROP_REASON_NETFILTER_DROP", 77),
        ],
    );
    let btf = Btf::from_bytes(&raw).expect("the fixture parses");
    let r = DropReasons::from_btf(&btf).expect("enum skb_drop_reason");
    assert_eq!(r.name(77), "NETFILTER_DROP");
    assert_eq!(r.name(40), "NOT_SPECIFIED");
    // Where the source has NETFILTER_DROP and NOT_SPECIFIED: unnamed here.
    assert_eq!(r.name(12), "unknown_12");
    assert_eq!(r.name(2), "unknown_2");
    assert_eq!(r.consumed, 3);
    assert_eq!(r.not_dropped, 1);
    let mut names: Vec<&str> = r.names().collect();
    names.sort_unstable();
    assert_eq!(names, ["NETFILTER_DROP", "NOT_SPECIFIED"]);

    // A BTF without the enum is an error that names it, not an empty mapping.
    let other = enum_btf("something_else", &[("SKB_DROP_REASON_NETFILTER_DROP", 77)]);
    let btf = Btf::from_bytes(&other).expect("parses");
    let e = DropReasons::from_btf(&btf).expect_err("no skb_drop_reason");
    assert!(e.to_string().contains("skb_drop_reason"), "{e}");
}
