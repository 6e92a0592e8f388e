//! Active probes and path MTU, end to end: the `wirescope` binary in the client namespace of
//! a single-relay lab whose hop is a kernel router with a 1400-byte onward link, probing the
//! in-tunnel gateway through the client's WireGuard interface every 200 ms.
//!
//! Both the IPv4 and the IPv6 in-tunnel gateway are probed. Exact checks: on the clean lab
//! no probe is lost and every probe sent is a reply or a loss (`sent == rtt_count + lost`);
//! with the impairing relay in the hop dropping every 10th WireGuard data message towards
//! the client, the probes lost equal the messages it dropped
//! (while it drops, the only data messages towards the client are the probe replies: probes
//! every 200 ms both ways leave WireGuard no reason for keepalives, and the path-MTU searches
//! through the tunnel run only at start). The path MTU to the relay's endpoint through the
//! small-MTU router is 1400, the recommended MTU of the client's interface 1400 - 60 = 1340.
//!
//! Needs root and the lab tools (`cargo xtask setup`); with CI=true a missing prerequisite
//! fails the test. Run with `--test-threads=1` (`cargo xtask test` does): `cargo test -p
//! wirescope --test lab -- --test-threads=1 probe::`.

use crate::common;

use std::time::{Duration, Instant};

use common::{Names, bin, lab_up, log_path, small_mtu_hop, val, wait_series};

use xtask::{
    agent::Agent,
    impair::{DirRules, Impairment},
    lab::{GATEWAY_V4, GATEWAY_V6},
    scrape::Metrics,
};

const PREFIX: &str = "wsp";
const PATH_MTU: u32 = 1400;
const WG_MTU: u32 = 1420;
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_secs(1);

/// (sent, replies, lost) of the probe series `l`.
fn counts(m: &Metrics, l: &[(&str, &str)]) -> (u64, u64, u64) {
    (
        val(m, "wirescope_probe_sent_total", l),
        val(m, "wirescope_probe_rtt_seconds_count", l),
        val(m, "wirescope_probe_lost_total", l),
    )
}

/// A scrape with no probe in flight to any of the targets `ls` (`sent == replies + lost`
/// for each); probes leave every 200 ms and come back within a millisecond here, so one comes
/// within a few tries. Returns the scrape and the sum of the targets' counts.
fn settled(agent: &Agent, ls: &[&[(&str, &str)]]) -> (Metrics, (u64, u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = agent.scrape().expect("scrape");
        let each: Vec<(u64, u64, u64)> = ls.iter().map(|l| counts(&m, l)).collect();
        if each.iter().all(|c| c.0 == c.1 + c.2) {
            let sum = each
                .iter()
                .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
            return (m, sum);
        }
        assert!(
            Instant::now() < deadline,
            "never sent == replies + lost: {each:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

#[test]
fn probes_and_path_mtu_through_a_small_mtu_hop() {
    let cfg = small_mtu_hop(PREFIX, PATH_MTU, WG_MTU);
    let Some(lab) = lab_up("probes_and_path_mtu_through_a_small_mtu_hop", cfg) else {
        return;
    };
    let Names {
        tun: wg,
        veth: underlay,
        ..
    } = Names::of(&lab);
    lab.handshake(Duration::from_secs(20)).expect("handshake");
    let probe = format!("{GATEWAY_V4}@{wg}");
    let probe6 = format!("{GATEWAY_V6}@{wg}");
    let relay_endpoint = format!("endpoint:{}", lab.entry_endpoint());
    let interval = format!("{}ms", INTERVAL.as_millis());
    let timeout = format!("{}ms", TIMEOUT.as_millis());
    let agent = Agent::start(
        bin(),
        &lab.client().netns,
        &[
            "--probe",
            &probe,
            "--probe",
            &probe6,
            "--probe-interval",
            &interval,
            "--probe-timeout",
            &timeout,
            // Only the search at start (and for new targets): none during the counting.
            "--pmtu-interval",
            "1h",
            // The relay's endpoint is the path-MTU target's label.
            "--export-endpoints",
        ],
        &log_path("probe"),
    )
    .expect("agent starts");
    let gw = GATEWAY_V4.to_string();
    let l = [("target", gw.as_str()), ("interface", wg.as_str())];
    let gw6 = GATEWAY_V6.to_string();
    let l6 = [("target", gw6.as_str()), ("interface", wg.as_str())];

    // Path MTU through the underlay to the relay: the hop's 1400-byte link, exactly; the
    // tunnel's MTU through the tunnel (WireGuard's outer packets are not DF-limited).
    // Bound to the client's underlay, the interface the relay's peer is reached over.
    let lr = [
        ("target", relay_endpoint.as_str()),
        ("interface", underlay.as_str()),
    ];
    wait_series(
        &agent,
        "wirescope_path_mtu_bytes",
        &lr,
        Duration::from_secs(60),
    );
    let m = wait_series(
        &agent,
        "wirescope_path_mtu_bytes",
        &l,
        Duration::from_secs(60),
    );
    assert_eq!(
        val(&m, "wirescope_path_mtu_bytes", &lr),
        u64::from(PATH_MTU),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        val(
            &m,
            "wirescope_recommended_mtu_bytes",
            &[("interface", wg.as_str())]
        ),
        u64::from(PATH_MTU - 60)
    );
    assert_eq!(val(&m, "wirescope_path_mtu_bytes", &l), u64::from(WG_MTU));
    let m = wait_series(
        &agent,
        "wirescope_path_mtu_bytes",
        &l6,
        Duration::from_secs(60),
    );
    assert_eq!(val(&m, "wirescope_path_mtu_bytes", &l6), u64::from(WG_MTU));

    // Clean lab: nothing lost, every probe answered, one every 200 ms to each target.
    let both: [&[(&str, &str)]; 2] = [&l, &l6];
    let (_, c0) = settled(&agent, &both);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let (m, c1) = settled(&agent, &both);
    assert_eq!(counts(&m, &l6).2, 0, "IPv6 probes lost on the clean lab");
    let elapsed = t0.elapsed();
    assert_eq!(c1.2, 0, "probes lost on the clean lab: {c1:?}");
    assert_eq!(c1.0, c1.1 + c1.2);
    let sent = c1.0 - c0.0;
    let expect = 2 * (elapsed.as_millis() / INTERVAL.as_millis()) as u64;
    assert!(
        sent + 4 >= expect && sent <= expect + 2,
        "{sent} probes in {elapsed:?} at one per {INTERVAL:?}"
    );
    println!("clean: {sent} probes in {elapsed:?}, totals (sent, replies, lost) {c1:?}");

    // Every 10th data message towards the client dropped: exactly those probes are lost.
    let imp = lab
        .start_impairment(Impairment::none())
        .expect("impairing relay");
    // The agent syncs the new endpoint (< 2 s) and the relay learns the client.
    std::thread::sleep(Duration::from_secs(3));
    let drop_10th = Impairment {
        to_client: DirRules {
            drop_every: Some(10),
            ..Default::default()
        },
        to_relay: DirRules::default(),
    };
    let s0 = imp.stats();
    assert_eq!(s0.to_client.dropped, 0);
    imp.set(drop_10th);
    std::thread::sleep(Duration::from_secs(10));
    imp.set(Impairment::none());
    let s1 = imp.stats();
    // Every probe whose reply was dropped has timed out.
    std::thread::sleep(TIMEOUT + Duration::from_millis(500));
    let (m, c2) = settled(&agent, &both);
    let dropped = s1.to_client.dropped;
    let counted = s1.to_client.counted - s0.to_client.counted;
    println!(
        "impaired: dropped {dropped} of {counted} data messages to the client; totals (sent, replies, lost) {c2:?}"
    );
    assert!(dropped >= 4, "{s1:?}");
    assert_eq!(c2.2, dropped, "lost == dropped\n{}", agent.log_text());
    assert_eq!(c2.0, c2.1 + c2.2);
    assert_eq!(imp.stats().to_client.dropped, dropped);
    // The histograms hold every reply.
    let (_, replies4, _) = counts(&m, &l);
    let (_, replies6, _) = counts(&m, &l6);
    assert_eq!(replies4 + replies6, c2.1);
    assert_eq!(
        val(
            &m,
            "wirescope_probe_rtt_seconds_bucket",
            &[
                ("target", gw.as_str()),
                ("interface", wg.as_str()),
                ("le", "+Inf")
            ]
        ),
        replies4
    );

    drop(imp);
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "{status:?}");
    lab.teardown().expect("lab down");
}
