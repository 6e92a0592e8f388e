//! State sources that fail for a while (issue 13, item 7), in the lab (prefix `wsg`,
//! wireguard-go, whose control socket the test can break), with the agent running and
//! traffic flowing:
//!
//! - `failed_control_reads_keep_the_last_good_state`: the client's UAPI socket first answers
//!   garbage (a stub bound in its place, the real one moved aside), then is gone, each for a
//!   few sync rounds. Throughout, 5 echoed datagrams count exactly for the relay on the
//!   tunnel (inner packets) and on the underlay (data messages), nothing goes to `unknown`,
//!   no `endpoint:` series appears, the peer's state is still exported, each failed read
//!   counts in `wirescope_source_errors_total{source="wireguard_uapi"}`, and the log has one
//!   line saying the last good state is kept and one that it was read again, but no peer
//!   removed or added, no tunnel gone and no new peer count.
//!
//! Host only: kernel WireGuard has no socket to break. Needs root and the lab's tools; with
//! CI=true a missing prerequisite fails. Run:
//! `cargo test -p wirescope --test lab -- --test-threads=1 sources::`.

use crate::common;

use std::{
    io::{ErrorKind, Read, Write},
    net::SocketAddr,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{Names, echo_via_tunnel, lab_up, start, stop, val};
use xtask::{
    agent::Agent,
    lab::{GATEWAY_V4, LabConfig, Topology, WgImpl},
    scrape::Metrics,
    wg,
};

const PREFIX: &str = "wsg";

/// How the client's control socket is broken.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// A stub in its place answers every `get=1` with a line that is not UAPI.
    Garbage,
    /// No socket at all (moved aside; wireguard-go keeps serving on the moved file).
    Gone,
}

/// The real socket moved aside to `away` (a name the agent does not list), optionally a
/// stub answering garbage in its place; dropping it puts the real one back.
struct Broken {
    path: PathBuf,
    away: PathBuf,
    stub: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Broken {
    fn new(path: &Path, fault: Fault) -> Broken {
        let away = path.with_extension("sock.away");
        std::fs::rename(path, &away).expect("moving the UAPI socket aside");
        let stub = match fault {
            Fault::Gone => None,
            Fault::Garbage => Some(garbage_stub(path)),
        };
        Broken {
            path: path.to_owned(),
            away,
            stub,
        }
    }
}

impl Drop for Broken {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.stub.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
        if let Err(e) = std::fs::rename(&self.away, &self.path) {
            eprintln!("putting the UAPI socket back: {e}");
        }
    }
}

/// Binds `path` and answers each connection's request with a line that is not `key=value`,
/// until the flag is set.
fn garbage_stub(path: &Path) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let listener = UnixListener::bind(path).expect("binding the stub UAPI socket");
    // Non-blocking, so that the thread sees the stop flag between connections.
    listener.set_nonblocking(true).expect("non-blocking stub");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut req = [0u8; 64];
                    let _ = c.read(&mut req);
                    let _ = c.write_all(b"this is not uapi\nerrno=0\n\n");
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (stop, thread)
}

fn uapi_errors(m: &Metrics) -> u64 {
    val(
        m,
        "wirescope_source_errors_total",
        &[("source", "wireguard_uapi")],
    )
}

/// Scrapes until `wirescope_source_errors_total{source="wireguard_uapi"}` is at least `want`.
fn wait_errors(agent: &Agent, want: u64, what: &str) -> Metrics {
    let t = Instant::now();
    loop {
        let m = agent.scrape().expect("scrape");
        if uapi_errors(&m) >= want {
            return m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: wireguard_uapi errors {} after 10 s, want {want}; log:\n{}",
            uapi_errors(&m),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's log lines (without the timestamp and level prefix) from line `from` on.
fn log_lines(agent: &Agent, from: usize) -> Vec<String> {
    agent
        .log_text()
        .lines()
        .skip(from)
        .map(|l| match l.split_once("] ") {
            Some((_, rest)) if l.starts_with('[') => rest.to_string(),
            _ => l.to_string(),
        })
        .collect()
}

#[test]
fn failed_control_reads_keep_the_last_good_state() {
    let cfg = LabConfig {
        wireguard: WgImpl::Userspace,
        ..LabConfig::new(Topology::Single, PREFIX)
    };
    let Some(lab) = lab_up("failed_control_reads_keep_the_last_good_state", cfg) else {
        return;
    };
    let Names {
        tun, veth, relay, ..
    } = Names::of(&lab);
    let agent = start(&lab, "sources");
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let sock = wg::socket_path(&tun);
    let dst = SocketAddr::new(GATEWAY_V4.into(), 7000);
    let payloads: Vec<usize> = (0..5).map(|i| 100 + i).collect();

    // Exact counts of 5 echoes between two scrapes: (tunnel, wire data) packets of the relay
    // per direction, and tunnel packets of `unknown`.
    let echo = |what: &str| {
        let b = echo_via_tunnel(&lab, dst, &payloads, || {
            agent.scrape().expect("scrape before")
        });
        let a = agent.scrape().expect("scrape after");
        for dir in ["tx", "rx"] {
            let t = [
                ("interface", tun.as_str()),
                ("peer", &relay),
                ("direction", dir),
            ];
            let w = [
                ("interface", veth.as_str()),
                ("peer", &relay),
                ("direction", dir),
                ("message", "data"),
            ];
            let u = [
                ("interface", tun.as_str()),
                ("peer", "unknown"),
                ("direction", dir),
            ];
            let d = |name, l: &[(&str, &str)]| val(&a, name, l) as i64 - val(&b, name, l) as i64;
            assert_eq!(
                (
                    d("wirescope_tunnel_packets_total", &t),
                    d("wirescope_wire_packets_total", &w),
                    d("wirescope_tunnel_packets_total", &u),
                ),
                (5, 5, 0),
                "{what}, {dir}: (relay's tunnel packets, relay's wire data packets, unknown's \
                 tunnel packets) for 5 echoes; log:\n{}",
                agent.log_text()
            );
        }
        a
    };
    echo("before any fault");

    for fault in [Fault::Garbage, Fault::Gone] {
        let what = format!("{fault:?}");
        let from = agent.log_text().lines().count();
        let base = uapi_errors(&agent.scrape().unwrap());
        let broken = Broken::new(&sock, fault);
        // Two failed rounds: on the unchanged agent the maps are empty by now.
        wait_errors(&agent, base + 2, &what);
        let a = echo(&format!("{what}: during the fault"));
        let during = uapi_errors(&a);
        let endpoint_series: Vec<String> = [
            "wirescope_wire_packets_total",
            "wirescope_tunnel_packets_total",
        ]
        .iter()
        .flat_map(|f| a.select(f, &[]))
        .filter_map(|(l, _)| l.get("peer").filter(|p| p.starts_with("endpoint:")))
        .cloned()
        .collect();
        assert!(
            endpoint_series.is_empty(),
            "{what}: endpoint: series {endpoint_series:?}"
        );
        assert_eq!(
            a.select("wireguard_sent_bytes_total", &[("public_key", &relay)])
                .count(),
            1,
            "{what}: the relay's peer state is still exported"
        );
        assert_eq!(
            val(
                &a,
                "wirescope_attach_info",
                &[("interface", &tun), ("direction", "tx")]
            ),
            1,
            "{what}: still attached"
        );
        drop(broken);

        // Read again: the errors stop, and the peer's byte counters move again.
        let t = Instant::now();
        loop {
            let lines = log_lines(&agent, from);
            if lines.iter().any(|l| l.contains("peer state read again")) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{what}: no recovery logged in 10 s; new log lines:\n{}",
                lines.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let m1 = agent.scrape().unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        let m2 = echo(&format!("{what}: after the fault"));
        assert_eq!(
            uapi_errors(&m1),
            uapi_errors(&m2),
            "{what}: no failed reads once the socket is back"
        );
        assert!(uapi_errors(&m1) >= during, "{what}: counter went back");
        // The peer's byte counters come from the control interface: read again within a
        // round of the echoes, they have moved.
        std::thread::sleep(Duration::from_millis(1500));
        let m3 = agent.scrape().unwrap();
        let sent = |m: &Metrics| val(m, "wireguard_sent_bytes_total", &[("public_key", &relay)]);
        assert!(
            sent(&m3) > sent(&m1),
            "{what}: the peer's state is read again ({} then {})",
            sent(&m1),
            sent(&m3)
        );

        let lines = log_lines(&agent, from);
        let kept = lines
            .iter()
            .filter(|l| l.contains(&format!("{tun}: ")) && l.contains("keeping the last good"))
            .count();
        assert_eq!(
            kept,
            1,
            "{what}: the kept state logged once; new log lines:\n{}",
            lines.join("\n")
        );
        let again = lines
            .iter()
            .filter(|l| l.contains("peer state read again"))
            .count();
        assert_eq!(
            again,
            1,
            "{what}: recovery logged once:\n{}",
            lines.join("\n")
        );
        let unwanted = [
            format!("tunnel {tun}: peer "),
            format!("tunnel {tun} is gone"),
            "peers synced".to_string(),
            "detached from".to_string(),
        ];
        for bad in &unwanted {
            assert!(
                !lines.iter().any(|l| l.contains(bad.as_str())),
                "{what}: no {bad:?} line; new log lines:\n{}",
                lines.join("\n")
            );
        }
        eprintln!(
            "{what}: wireguard_uapi errors {base} -> {}, new log lines:\n{}",
            uapi_errors(&m2),
            lines.join("\n")
        );
    }
    stop(agent);
    lab.teardown().unwrap();
}
