//! Packet captures with tcpdump inside a lab namespace, read back as text lines, with a parser
//! for the UDP lines (enough to tell which WireGuard layer a packet belongs to).

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns;

/// A running `tcpdump -lnn -i IFACE FILTER` in a namespace.
pub struct Capture {
    child: Child,
    lines: Option<JoinHandle<Vec<String>>>,
    what: String,
}

impl Capture {
    /// Starts capturing on `iface` in `ns` and returns once tcpdump listens. `filter` is a pcap
    /// filter expression ("" for everything).
    pub fn start(ns: &str, iface: &str, filter: &str) -> Result<Capture> {
        let mut cmd = netns::command(ns, "tcpdump");
        cmd.args(["-lnn", "-i", iface]);
        cmd.args(filter.split_whitespace());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = crate::cmd::describe(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting `{what}`"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");

        // tcpdump says "listening on IFACE, ..." on stderr once the socket is open.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut said = Vec::new();
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("listening on") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                } else {
                    said.push(line);
                }
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(said.join("; ")));
            }
        });
        let lines = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.trim().is_empty())
                .collect()
        });
        let mut cap = Capture {
            child,
            lines: Some(lines),
            what,
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(cap),
            Ok(Err(said)) => {
                let _ = cap.child.wait();
                bail!("`{}` stopped before listening: {said}", cap.what)
            }
            Err(_) => {
                let _ = cap.child.kill();
                let _ = cap.child.wait();
                bail!("`{}` did not start listening within 10 s", cap.what)
            }
        }
    }

    /// Stops tcpdump (after a short pause so the last packets are printed) and returns the
    /// lines it printed, one per packet.
    pub fn stop(mut self) -> Result<Vec<String>> {
        std::thread::sleep(Duration::from_millis(200));
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        self.child
            .wait()
            .with_context(|| format!("waiting for `{}`", self.what))?;
        self.lines
            .take()
            .expect("stopped once")
            .join()
            .map_err(|_| anyhow!("capture reader panicked"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.lines.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A UDP packet line of tcpdump: source, destination, UDP payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpLine {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub len: usize,
}

/// Parses `... IP 10.64.1.2.40001 > 203.0.113.1.51820: UDP, length 128` (IPv4 or IPv6;
/// tcpdump run with -nn). None for other lines.
pub fn parse_udp_line(line: &str) -> Option<UdpLine> {
    let mut words = line
        .split_whitespace()
        .skip_while(|w| *w != "IP" && *w != "IP6");
    words.next()?;
    let src = words.next()?;
    if words.next()? != ">" {
        return None;
    }
    let dst = words.next()?.strip_suffix(':')?;
    if words.next()? != "UDP," || words.next()? != "length" {
        return None;
    }
    let len = words.next()?.parse().ok()?;
    Some(UdpLine {
        src: parse_host_port(src)?,
        dst: parse_host_port(dst)?,
        len,
    })
}

/// `1.2.3.4.80` or `fc00::1.80` (tcpdump's dotted port) as a socket address.
fn parse_host_port(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.rsplit_once('.')?;
    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_udp_lines() {
        let l = parse_udp_line(
            "00:27:38.845008 IP 10.64.1.2.40001 > 203.0.113.1.51820: UDP, length 128",
        )
        .unwrap();
        assert_eq!(l.src, "10.64.1.2:40001".parse().unwrap());
        assert_eq!(l.dst, "203.0.113.1:51820".parse().unwrap());
        assert_eq!(l.len, 128);
        let l = parse_udp_line("12:00:00.1 IP6 fc00::1:2.5000 > fc00::1.7: UDP, length 3").unwrap();
        assert_eq!(l.dst, "[fc00::1]:7".parse().unwrap());
        assert_eq!(
            parse_udp_line(
                "00:27:38.844608 IP 10.64.1.2 > 10.64.0.1: ICMP echo request, id 1, seq 1, length 64"
            ),
            None
        );
        assert_eq!(parse_udp_line("ARP, Request who-has 198.51.100.2"), None);
    }
}
