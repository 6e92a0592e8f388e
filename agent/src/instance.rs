//! One agent per network namespace. Two would hook the same interfaces twice and fight over
//! nothing useful; a second one started by mistake (a second unit, a shell left running)
//! must say which agent is already there instead.
//!
//! The claim is an abstract unix socket (`@wirescope-agent`): Linux scopes abstract socket
//! names by network namespace, so the name is per namespace by itself, it works under
//! `ip netns exec` and in containers without any shared file system, needs no directory
//! to be writable, and the kernel releases it when the agent dies, even by SIGKILL (no stale
//! lock). The holder answers each connection with one line, `pid=N listen=ADDR`, which the
//! refused agent quotes.

use std::{
    io::{Read, Write},
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream},
    },
    time::Duration,
};

use log::debug;

/// The abstract socket name (without the leading NUL).
pub const NAME: &[u8] = b"wirescope-agent";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another wirescope agent is already running in this network namespace ({holder}); \
         stop it first (one agent per network namespace), or run this one in another namespace"
    )]
    Running { holder: String },
    #[error(
        "claiming this network namespace for the agent (abstract unix socket @wirescope-agent): {0}"
    )]
    Io(#[from] std::io::Error),
}

/// Claims this network namespace for an agent serving on `listen`, or says which agent
/// already has it. The claim lasts until the process exits.
pub fn claim(listen: std::net::SocketAddr) -> Result<(), InstanceError> {
    claim_name(NAME, &listen.to_string())
}

/// [`claim`] with another socket name (tests).
pub fn claim_name(name: &[u8], listen: &str) -> Result<(), InstanceError> {
    let addr = UnixAddr::from_abstract_name(name)?;
    let listener = match UnixListener::bind_addr(&addr) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(InstanceError::Running {
                holder: describe_holder(&addr),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let line = format!("pid={} listen={listen}\n", std::process::id());
    std::thread::Builder::new()
        .name("wirescope-instance".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(mut c) => {
                        let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = c.write_all(line.as_bytes());
                    }
                    Err(e) => {
                        debug!("instance socket: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(())
}

/// "pid N, serving http://ADDR" from the holder's answer; its pid from the socket's
/// credentials when it does not answer in time.
fn describe_holder(addr: &UnixAddr) -> String {
    let Ok(mut c) = UnixStream::connect_addr(addr) else {
        return "it did not answer".into();
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 256];
    let mut n = 0;
    while n < buf.len() {
        match c.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                n += k;
                if buf[..n].contains(&b'\n') {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&buf[..n]);
    if let Some(parsed) = parse_answer(&text) {
        return parsed;
    }
    match peer_pid(&c) {
        Some(pid) => format!("pid {pid}"),
        None => "it did not say which".into(),
    }
}

/// `pid=N listen=ADDR` as "pid N, serving http://ADDR".
pub fn parse_answer(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let mut pid = None;
    let mut listen = None;
    for field in line.split_whitespace() {
        match field.split_once('=') {
            Some(("pid", v)) => pid = v.parse::<u32>().ok(),
            Some(("listen", v)) => listen = Some(v),
            _ => {}
        }
    }
    Some(format!("pid {}, serving http://{}", pid?, listen?))
}

fn peer_pid(c: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd as _;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred.
    let r = unsafe {
        libc::getsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_names_the_first() {
        let name = format!("wirescope-test-{}", std::process::id());
        claim_name(name.as_bytes(), "127.0.0.1:9586").expect("first claim");
        let err = claim_name(name.as_bytes(), "127.0.0.1:9587").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "pid {}, serving http://127.0.0.1:9586",
                std::process::id()
            )),
            "{msg}"
        );
        assert!(
            msg.contains("already running in this network namespace"),
            "{msg}"
        );
    }

    #[test]
    fn answers_are_parsed_tolerantly() {
        assert_eq!(
            parse_answer("pid=12 listen=[::1]:9586\n").as_deref(),
            Some("pid 12, serving http://[::1]:9586")
        );
        assert_eq!(parse_answer("pid=x listen=a\n"), None);
        assert_eq!(parse_answer(""), None);
        assert_eq!(parse_answer("garbage"), None);
    }
}
