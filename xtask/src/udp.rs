//! UDP traffic of exactly known sizes inside lab namespaces: a bounded echo server and a
//! sender. Sockets are created in the namespace (see [`netns::run_in`]) and keep it, so the
//! rest of the work happens on ordinary threads.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::netns;

/// The largest UDP payload that fits an IPv4 packet.
const MAX_PAYLOAD: usize = 65_507;

/// Binds a UDP socket inside `ns`.
pub fn bind_in(ns: &str, addr: SocketAddr) -> Result<UdpSocket> {
    netns::run_in(ns, move || UdpSocket::bind(addr))?
        .with_context(|| format!("binding UDP {addr} in {ns}"))
}

/// A UDP server in a namespace that sends every datagram back to its sender unchanged. It
/// stops after `max_datagrams` datagrams, after `timeout`, or when [`UdpEcho::stop`] is called,
/// whichever comes first, so it never outlives a test for long. A datagram it cannot send
/// back is counted and the echo goes on: one full queue under load must not end the echo
/// for everything after it (the churn bench's sampled peers got no echo at all that way).
pub struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Echoed>>>,
}

/// What an echo did: datagrams sent back, and the ones it could not send with the first
/// error.
#[derive(Debug, Default)]
pub struct Echoed {
    pub echoed: usize,
    pub send_errors: u64,
    pub first_error: Option<String>,
}

impl UdpEcho {
    /// Binds `bind` in `ns` (port 0 picks a free one) and starts echoing.
    pub fn start(
        ns: &str,
        bind: SocketAddr,
        max_datagrams: usize,
        timeout: Duration,
    ) -> Result<Self> {
        Self::with_socket(bind_in(ns, bind)?, max_datagrams, timeout)
    }

    /// Starts echoing on an already bound socket.
    pub fn with_socket(sock: UdpSocket, max_datagrams: usize, timeout: Duration) -> Result<Self> {
        let addr = sock.local_addr()?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("udp-echo-{addr}"))
            .spawn(move || -> Result<Echoed> {
                let deadline = Instant::now() + timeout;
                let mut buf = vec![0u8; MAX_PAYLOAD];
                let mut done = Echoed::default();
                while done.echoed < max_datagrams
                    && Instant::now() < deadline
                    && !flag.load(Ordering::Relaxed)
                {
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => done.record(sock.send_to(&buf[..n], from), n, from),
                        // EINTR: a signal to this process (a child's exit, a profiler)
                        // ended the wait; the socket is fine.
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(e).context("udp echo: receiving"),
                    }
                }
                Ok(done)
            })?;
        Ok(UdpEcho {
            addr,
            stop,
            handle: Some(handle),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and returns how many datagrams it echoed; a datagram it could not
    /// send back is an error here.
    pub fn stop(self) -> Result<usize> {
        self.stop_counting()?.strict()
    }

    /// Stops the server and returns what it did, send errors included.
    pub fn stop_counting(mut self) -> Result<Echoed> {
        self.stop.store(true, Ordering::Relaxed);
        self.join_inner()
    }

    /// Waits until the server stops by itself (count or timeout) and returns how many
    /// datagrams it echoed.
    pub fn join(mut self) -> Result<usize> {
        self.join_inner()?.strict()
    }

    fn join_inner(&mut self) -> Result<Echoed> {
        self.handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow!("udp echo thread panicked"))?
    }
}

impl Echoed {
    fn record(&mut self, sent: std::io::Result<usize>, n: usize, to: SocketAddr) {
        match sent {
            Ok(_) => self.echoed += 1,
            Err(e) => {
                self.send_errors += 1;
                self.first_error
                    .get_or_insert_with(|| format!("echoing {n} bytes to {to}: {e}"));
            }
        }
    }

    fn strict(self) -> Result<usize> {
        match self.first_error {
            None => Ok(self.echoed),
            Some(e) => bail!(
                "udp echo: {} datagram(s) not sent back ({} echoed); the first: {e}",
                self.send_errors,
                self.echoed
            ),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends one datagram per entry of `sizes`, each with exactly that many payload bytes, from
/// a socket bound in `ns` to `src` (or an ephemeral port on the wildcard address of `dst`'s
/// family), to `dst`. Returns the socket, to receive replies with [`recv_sizes`]. It sends
/// back to back: before counting packets through a tunnel, complete the handshake first
/// (wireguard-go queues only a limited number of packets while it handshakes).
pub fn send_udp(
    ns: &str,
    src: Option<SocketAddr>,
    dst: SocketAddr,
    sizes: &[usize],
) -> Result<UdpSocket> {
    let src = src.unwrap_or_else(|| match dst {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    });
    let sock = bind_in(ns, src)?;
    send_sizes(&sock, dst, sizes).with_context(|| format!("in {ns}"))?;
    Ok(sock)
}

/// [`send_udp`] to a destination routed into a WireGuard interface on which no peer's
/// allowed IPs match it. wireguard-go drops such packets silently; kernel WireGuard drops
/// them too but fails the send with ENOKEY ("Required key not available"), which is taken
/// here as sent: the packet did pass the interface's TC egress hook. Any other error fails.
pub fn send_udp_to_no_peer(ns: &str, dst: SocketAddr, sizes: &[usize]) -> Result<UdpSocket> {
    let src: SocketAddr = match dst {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let sock = bind_in(ns, src)?;
    for (i, &size) in sizes.iter().enumerate() {
        match send_one(&sock, dst, size, i) {
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOKEY) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("sending {size} bytes to {dst} in {ns}"));
            }
            Ok(()) => {}
        }
    }
    Ok(sock)
}

fn send_one(sock: &UdpSocket, dst: SocketAddr, size: usize, i: usize) -> std::io::Result<()> {
    if size > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("UDP payload of {size} bytes is over the maximum {MAX_PAYLOAD}"),
        ));
    }
    let payload: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
    let n = sock.send_to(&payload, dst)?;
    if n != size {
        return Err(std::io::Error::other(format!(
            "sent {n} of {size} bytes to {dst}"
        )));
    }
    Ok(())
}

/// Sends one datagram per entry of `sizes` on `sock`, each with exactly that many payload bytes.
pub fn send_sizes(sock: &UdpSocket, dst: SocketAddr, sizes: &[usize]) -> Result<()> {
    for (i, &size) in sizes.iter().enumerate() {
        send_one(sock, dst, size, i).with_context(|| format!("sending {size} bytes to {dst}"))?;
    }
    Ok(())
}

/// Receives up to `count` datagrams on `sock` within `timeout`, returning their sizes in
/// arrival order (fewer when the time ran out).
pub fn recv_sizes(sock: &UdpSocket, count: usize, timeout: Duration) -> Result<Vec<usize>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut sizes = Vec::new();
    while sizes.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv(&mut buf) {
            Ok(n) => sizes.push(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving UDP replies"),
        }
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_sizes_times_out() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = Instant::now();
        let got = recv_sizes(&sock, 1, Duration::from_millis(100)).unwrap();
        assert!(got.is_empty());
        assert!(t.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_failed_echo_is_counted_and_the_echo_goes_on() {
        let to: SocketAddr = "10.0.0.1:9".parse().unwrap();
        let mut done = Echoed::default();
        done.record(Err(std::io::Error::from_raw_os_error(105)), 10, to);
        done.record(Ok(20), 20, to);
        done.record(Err(std::io::Error::from_raw_os_error(101)), 30, to);
        assert_eq!((done.echoed, done.send_errors), (1, 2));
        let e = done.strict().unwrap_err().to_string();
        assert!(
            e.contains("2 datagram(s) not sent back (1 echoed)")
                && e.contains("echoing 10 bytes to 10.0.0.1:9"),
            "{e}"
        );
    }

    #[test]
    fn echo_on_loopback() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo = UdpEcho::with_socket(server, 3, Duration::from_secs(5)).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sizes = [0, 1, 1400];
        send_sizes(&client, echo.local_addr(), &sizes).unwrap();
        let got = recv_sizes(&client, 3, Duration::from_secs(5)).unwrap();
        assert_eq!(got, sizes);
        // Stops by itself after 3 datagrams.
        assert_eq!(echo.join().unwrap(), 3);
    }

    #[test]
    fn echo_stops_on_request_and_on_timeout() {
        let echo = UdpEcho::with_socket(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            10,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(echo.stop().unwrap(), 0);
        let t = Instant::now();
        let echo = UdpEcho::with_socket(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            10,
            Duration::from_millis(100),
        )
        .unwrap();
        assert_eq!(echo.join().unwrap(), 0);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
