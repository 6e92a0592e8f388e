//! Unit tests of the impairing relay on loopback: rule parsing, each rule's exact effect on
//! numbered datagrams, rule changes at run time, and the counters.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use super::*;
use crate::udp::UdpEcho;

const LO: &str = "127.0.0.1:0";

/// A WireGuard-looking datagram of type `t` carrying the number `i`.
fn msg(t: u8, i: u32) -> Vec<u8> {
    let mut d = vec![t, 0, 0, 0];
    d.extend_from_slice(&i.to_be_bytes());
    d.resize(32, 0);
    d
}

fn number(d: &[u8]) -> u32 {
    u32::from_be_bytes(d[4..8].try_into().unwrap())
}

fn recv_numbers(sock: &UdpSocket, n: usize, timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        if let Ok(len) = sock.recv(&mut buf) {
            got.push(number(&buf[..len]));
        }
    }
    got
}

#[test]
fn message_types() {
    assert_eq!(message_type(&[4, 0, 0, 0, 1]), 4);
    assert_eq!(message_type(&[1, 0, 0, 0]), 1);
    assert_eq!(message_type(&[4, 0, 1, 0]), 0);
    assert_eq!(message_type(&[5, 0, 0, 0]), 0);
    assert_eq!(message_type(&[4, 0]), 0);
}

#[test]
fn parses_rules() {
    let r: DirRules = "drop-every=10, delay=40,count=all".parse().unwrap();
    assert_eq!(
        r,
        DirRules {
            count: Count::All,
            drop_every: Some(10),
            delay: Duration::from_millis(40),
            ..Default::default()
        }
    );
    let r: DirRules = "reorder-every=5,drop-handshake-responses".parse().unwrap();
    assert_eq!(r.reorder_every, Some(5));
    assert!(r.drop_handshake_responses);
    assert_eq!("".parse::<DirRules>().unwrap(), DirRules::default());
    assert_eq!("pass".parse::<DirRules>().unwrap(), DirRules::default());
    for bad in [
        "drop-every=0",
        "drop-every",
        "delay=x",
        "jitter=3",
        "count=some",
    ] {
        assert!(bad.parse::<DirRules>().is_err(), "{bad}");
    }
}

#[test]
fn describes_rules() {
    let r = DirRules {
        drop_every: Some(10),
        delay: Duration::from_millis(40),
        ..Default::default()
    };
    assert_eq!(r.describe(), "drop every 10th data, delay 40ms");
    assert_eq!(DirRules::default().describe(), "pass");
    let r: DirRules = "reorder-every=2,drop-every=21,count=all".parse().unwrap();
    assert_eq!(
        r.describe(),
        "drop every 21st datagram, swap every 2nd pair of datagrams"
    );
    let i = Impairment::delay(Duration::from_millis(40));
    let json = serde_json::to_string(&i.to_client).unwrap();
    assert!(json.contains("\"delay_ms\":40"), "{json}");
    assert_eq!(
        serde_json::from_str::<DirRules>(&json).unwrap(),
        i.to_client
    );
    assert!(DirRules::default().is_noop());
}

#[test]
fn drops_every_kth_data_message_towards_the_client() {
    let up = UdpSocket::bind(LO).unwrap();
    let echo = UdpEcho::with_socket(up, 110, Duration::from_secs(10)).unwrap();
    let rules = Impairment {
        to_client: DirRules {
            drop_every: Some(10),
            ..Default::default()
        },
        ..Default::default()
    };
    let imp = Impairer::start(None, LO.parse().unwrap(), echo.local_addr(), rules).unwrap();
    let client = UdpSocket::bind(LO).unwrap();
    // Handshake-like datagrams are not counted and pass.
    for i in 0..5 {
        client
            .send_to(&msg(1, 1000 + i), imp.listen_addr())
            .unwrap();
    }
    for i in 0..100 {
        client.send_to(&msg(4, i), imp.listen_addr()).unwrap();
    }
    let got = recv_numbers(&client, 105, Duration::from_secs(3));
    assert_eq!(got.len(), 95, "{got:?}");
    let data: Vec<u32> = got.iter().copied().filter(|n| *n < 1000).collect();
    let want: Vec<u32> = (0..100).filter(|i| (i + 1) % 10 != 0).collect();
    assert_eq!(data, want);
    let s = imp.stop();
    assert_eq!(s.to_client.dropped, 10);
    assert_eq!(s.to_client.counted, 100);
    assert_eq!(s.to_client.messages[4], 100);
    assert_eq!(s.to_client.messages[1], 5);
    assert_eq!(s.to_client.forwarded, 95);
    assert_eq!(s.to_relay.forwarded, 105);
    assert_eq!(s.to_relay.dropped, 0);
    assert_eq!(echo.stop().unwrap(), 105);
}

#[test]
fn swaps_every_mth_pair_and_counts_all() {
    let sink = UdpSocket::bind(LO).unwrap();
    let rules = Impairment {
        to_relay: DirRules {
            count: Count::All,
            reorder_every: Some(5),
            ..Default::default()
        },
        ..Default::default()
    };
    let imp =
        Impairer::start(None, LO.parse().unwrap(), sink.local_addr().unwrap(), rules).unwrap();
    let client = UdpSocket::bind(LO).unwrap();
    for i in 0..100 {
        // Types vary: Count::All counts every datagram.
        client
            .send_to(&msg(if i % 3 == 0 { 1 } else { 4 }, i), imp.listen_addr())
            .unwrap();
    }
    let got = recv_numbers(&sink, 100, Duration::from_secs(3));
    let mut want: Vec<u32> = (0..100).collect();
    // Pairs are (0,1), (2,3), ...: pairs 5, 10, ... (1-based) are swapped.
    for p in (5..=50).step_by(5) {
        want.swap(2 * p - 2, 2 * p - 1);
    }
    assert_eq!(got, want);
    let s = imp.stats();
    assert_eq!(s.to_relay.reordered_pairs, 10);
    assert_eq!(s.to_relay.unpaired, 0);
    // A held datagram without a partner goes out alone after HOLD_LIMIT.
    imp.set(Impairment {
        to_relay: DirRules {
            reorder_every: Some(1),
            ..Default::default()
        },
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(50));
    client.send_to(&msg(4, 7), imp.listen_addr()).unwrap();
    let t = Instant::now();
    assert_eq!(recv_numbers(&sink, 1, Duration::from_secs(2)), [7]);
    assert!(t.elapsed() >= HOLD_LIMIT - Duration::from_millis(5));
    assert_eq!(imp.stop().to_relay.unpaired, 1);
}

#[test]
fn delays_both_ways_in_order() {
    let up = UdpSocket::bind(LO).unwrap();
    let echo = UdpEcho::with_socket(up, 20, Duration::from_secs(10)).unwrap();
    let d = Duration::from_millis(30);
    let imp = Impairer::start(
        None,
        LO.parse().unwrap(),
        echo.local_addr(),
        Impairment::delay(d),
    )
    .unwrap();
    let client = UdpSocket::bind(LO).unwrap();
    let t = Instant::now();
    for i in 0..20 {
        client.send_to(&msg(4, i), imp.listen_addr()).unwrap();
    }
    let got = recv_numbers(&client, 20, Duration::from_secs(3));
    assert!(t.elapsed() >= 2 * d, "{:?}", t.elapsed());
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    let s = imp.stop();
    assert_eq!((s.to_relay.delayed, s.to_client.delayed), (20, 20));
}

#[test]
fn drops_handshake_responses() {
    let up = UdpSocket::bind(LO).unwrap();
    let rules = Impairment {
        to_client: DirRules {
            drop_handshake_responses: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let imp = Impairer::start(None, LO.parse().unwrap(), up.local_addr().unwrap(), rules).unwrap();
    let client = UdpSocket::bind(LO).unwrap();
    client.send_to(&msg(1, 0), imp.listen_addr()).unwrap();
    let mut buf = [0u8; 64];
    up.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (_, from) = up.recv_from(&mut buf).unwrap();
    for (t, i) in [(2, 1), (4, 2), (2, 3), (3, 4)] {
        up.send_to(&msg(t, i), from).unwrap();
    }
    assert_eq!(recv_numbers(&client, 4, Duration::from_millis(500)), [2, 4]);
    let s = imp.stop();
    assert_eq!(s.to_client.dropped_handshake_responses, 2);
    assert_eq!(s.to_client.messages, [0, 0, 2, 1, 1]);
}
