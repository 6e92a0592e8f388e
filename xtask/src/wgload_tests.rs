use super::*;

use std::net::UdpSocket;

const SINK: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 64, 0, 1), 7);

#[test]
fn inner_packets_have_the_asked_length_and_a_valid_header() {
    let me = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 3), INNER_SOURCE_PORT);
    let p = inner_packet(me, SINK, 100, 0x0102).unwrap();
    assert_eq!(p.len(), 100);
    let h = etherparse::Ipv4HeaderSlice::from_slice(&p).unwrap();
    assert_eq!(h.total_len(), 100);
    assert_eq!(h.source_addr(), *me.ip());
    assert_eq!(h.destination_addr(), *SINK.ip());
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
    // UDP: ports, length 80, then the sequence number.
    assert_eq!(&p[20..24], &[0x9c, 0x40, 0, 7]);
    assert_eq!(u16::from_be_bytes([p[24], p[25]]), 80);
    assert_eq!(&p[28..36], &0x0102u64.to_le_bytes());
    assert!(p[36..].iter().all(|&b| b == 0));
    assert!(inner_packet(me, SINK, 35, 0).is_err());
    assert!(inner_packet(me, SINK, 1501, 0).is_err());
}

#[test]
fn echoes_are_recognised_by_addresses_ports_and_length() {
    let me = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 3), INNER_SOURCE_PORT);
    let echo = inner_packet(SINK, me, 100, 0).unwrap();
    assert!(is_echo(&echo, me, SINK, 100));
    assert!(!is_echo(&echo, me, SINK, 101), "length");
    let other = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 4), INNER_SOURCE_PORT);
    assert!(!is_echo(&echo, other, SINK, 100), "another client's");
    let ours = inner_packet(me, SINK, 100, 0).unwrap();
    assert!(!is_echo(&ours, me, SINK, 100), "our own packet is no echo");
    assert!(!is_echo(&echo[..50], me, SINK, 100), "truncated");
}

#[test]
fn messages_are_classified_by_type_and_length() {
    assert_eq!(classify(&[1; 148]), Some(Message::Initiation));
    assert_eq!(classify(&[2; 92]), Some(Message::Response));
    assert_eq!(classify(&[3; 64]), Some(Message::Cookie));
    assert_eq!(classify(&[4; 32]), Some(Message::Keepalive));
    assert_eq!(classify(&[4; 33]), Some(Message::Data));
    assert_eq!(classify(&[1; 147]), None);
    assert_eq!(classify(&[5; 64]), None);
    assert_eq!(classify(&[]), None);
}

#[test]
fn peer_configuration_for_wg() {
    let a = ("QUFB".to_owned(), Ipv4Addr::new(10, 200, 0, 1));
    let b = ("QkJC".to_owned(), Ipv4Addr::new(10, 200, 1, 0));
    assert_eq!(
        addconf(&[a.clone(), b.clone()]),
        "[Peer]\nPublicKey = QUFB\nAllowedIPs = 10.200.0.1/32\n\
         [Peer]\nPublicKey = QkJC\nAllowedIPs = 10.200.1.0/32\n"
    );
    assert_eq!(
        replace_args("bcr0", &["T0xE".to_owned()], &[a]).join(" "),
        "wg set bcr0 peer T0xE remove peer QUFB allowed-ips 10.200.0.1/32"
    );
    assert_eq!(nth_ip(Ipv4Addr::new(10, 200, 0, 0), 256), b.1);
}

#[test]
fn keys_round_trip_through_base64() {
    let k = Key::generate();
    let text = k.public_b64();
    assert_eq!(text.len(), 44);
    assert_eq!(parse_public(&text).unwrap().as_bytes(), k.public.as_bytes());
    assert_ne!(Key::generate().public_b64(), text, "fresh keys differ");
    // RFC 7748's test vector: the public key of Alice's private key.
    let alice: [u8; 32] = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
    assert_eq!(
        Key::from_secret(StaticSecret::from(alice))
            .public
            .as_bytes(),
        &hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    );
    assert!(parse_public("QUFB").is_err(), "3 bytes");
    assert!(parse_public("not base64!").is_err());
}

fn hex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// A WireGuard relay in this process for the tests: one UDP socket on loopback, a
/// responder `Tunn` per peer (a datagram goes to the first that accepts it), and an echo of
/// every inner packet back to its sender. Stops echoing the peers named in `mute`.
struct FakeRelay {
    addr: SocketAddr,
    public: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRelay {
    fn start(peers: Vec<String>) -> FakeRelay {
        let key = Key::generate();
        let public = key.public_b64();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut tunns: Vec<Tunn> = peers
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let secret = StaticSecret::from(key.secret.to_bytes());
                    Tunn::new(
                        secret,
                        parse_public(p).unwrap(),
                        None,
                        None,
                        1000 + i as u32,
                        None,
                    )
                })
                .collect();
            let (mut rx, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut rx) else {
                    continue;
                };
                for t in tunns.iter_mut() {
                    match t.decapsulate(Some(from.ip()), &rx[..n], &mut out) {
                        TunnResult::Err(_) => continue,
                        TunnResult::WriteToNetwork(d) => {
                            sock.send_to(d, from).unwrap();
                            while let TunnResult::WriteToNetwork(d) =
                                t.decapsulate(None, &[], &mut out)
                            {
                                sock.send_to(d, from).unwrap();
                            }
                        }
                        TunnResult::WriteToTunnelV4(p, _) => {
                            let echo = swap(p);
                            let mut enc = vec![0u8; 2048];
                            if let TunnResult::WriteToNetwork(d) = t.encapsulate(&echo, &mut enc) {
                                sock.send_to(d, from).unwrap();
                            }
                        }
                        _ => {}
                    }
                    break;
                }
            }
        });
        FakeRelay {
            addr,
            public,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The echo of an inner IPv4/UDP packet: addresses and ports swapped, same payload.
fn swap(p: &[u8]) -> Vec<u8> {
    let s = etherparse::SlicedPacket::from_ip(p).unwrap();
    let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Udp(udp))) =
        (s.net, s.transport)
    else {
        panic!("not IPv4/UDP");
    };
    let h = ip.header();
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(h.destination_addr().octets(), h.source_addr().octets(), 64)
        .udp(udp.destination_port(), udp.source_port())
        .write(&mut out, udp.payload())
        .unwrap();
    out
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three clients handshake with the fake relay, send for a while, one switches to a new key;
/// once quiet, every key's sent count equals its received count, the sum of the keys a
/// client used equals what the relay saw from it, and nothing unexpected came back.
#[test]
fn clients_handshake_send_switch_and_count_exactly() {
    let keys: Vec<Key> = (0..4).map(|_| Key::generate()).collect();
    let publics: Vec<String> = keys.iter().map(Key::public_b64).collect();
    let relay = FakeRelay::start(publics.clone());
    let cfg = LoadConfig {
        relay: relay.addr,
        relay_public: relay.public.clone(),
        bind: Ipv4Addr::LOCALHOST,
        sink: SINK,
        inner_len: 100,
        interval: Duration::from_millis(20),
        handshakes_per_sec: 50,
    };
    let mut keys = keys.into_iter();
    let clients: Vec<ClientSpec> = (0..3)
        .map(|i| ClientSpec {
            key: keys.next().unwrap(),
            ip: nth_ip(Ipv4Addr::new(10, 200, 0, 0), i),
        })
        .collect();
    let load = Load::start(None, cfg, clients).unwrap();
    wait_until("3 handshakes", Duration::from_secs(10), || {
        load.established() == 3
    });
    wait_until("traffic", Duration::from_secs(10), || {
        publics[..3]
            .iter()
            .all(|k| load.tallies().get(k).received >= 5)
    });
    let spare = ClientSpec {
        key: keys.next().unwrap(),
        ip: nth_ip(Ipv4Addr::new(10, 200, 0, 0), 3),
    };
    // As the churn bench does: no echo of the old key is still on its way when it goes.
    load.pause(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    load.switch(1, spare, Duration::from_millis(50)).unwrap();
    wait_until(
        "the switched key's traffic",
        Duration::from_secs(10),
        || load.tallies().get(&publics[3]).received >= 5,
    );
    assert_eq!(load.established(), 3);
    load.set_quiet(true);
    // In flight on loopback: well under this.
    std::thread::sleep(Duration::from_millis(300));
    let frozen: Vec<Tally> = publics.iter().map(|k| load.tallies().get(k)).collect();
    std::thread::sleep(Duration::from_millis(200));
    for (k, t) in publics.iter().zip(&frozen) {
        assert_eq!(*t, load.tallies().get(k), "{k}: still moving after quiet");
        assert_eq!(t.sent, t.received, "{k}: {t:?}");
        assert_eq!(t.unexpected, 0, "{k}: {t:?}");
        assert!(t.handshakes >= 1, "{k}: {t:?}");
    }
    let total = load.tallies().total();
    assert_eq!(total.sent, frozen.iter().map(|t| t.sent).sum::<u64>());
    load.stop().unwrap();
}

#[test]
fn a_load_without_rate_or_interval_is_refused() {
    let cfg = LoadConfig {
        relay: "127.0.0.1:9".parse().unwrap(),
        relay_public: Key::generate().public_b64(),
        bind: Ipv4Addr::LOCALHOST,
        sink: SINK,
        inner_len: 100,
        interval: Duration::ZERO,
        handshakes_per_sec: 10,
    };
    assert!(Load::start(None, cfg.clone(), Vec::new()).is_err());
    let cfg = LoadConfig {
        inner_len: 20,
        interval: Duration::from_secs(1),
        ..cfg
    };
    assert!(
        Load::start(None, cfg, Vec::new()).is_err(),
        "too short a packet"
    );
}
