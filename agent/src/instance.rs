//! One agent per network namespace. Two would hook the same interfaces twice and fight over
//! nothing useful; a second one started by mistake (a second unit, a shell left running)
//! must say which agent is already there instead.
//!
//! The claim is a lock file in the state directory, `agent-net<INODE>.lock`, named by the
//! network namespace's inode (agents in other namespaces may share the directory) and
//! held with flock(2): only who may write the state directory (root, mode 0700) can take
//! it, so no local user can claim it first and keep the agent from starting, and the kernel
//! releases it when the agent dies, even by SIGKILL (no stale lock). The holder writes
//! `pid=N listen=ADDR` into it, which a refused agent quotes.
//!
//! Beside it, an abstract unix socket (`@wirescope-agent`, scoped to the network namespace
//! by Linux) catches a second agent that was given another `--state-dir`. Anyone can bind
//! an abstract name, so a holder counts only when it runs as the same user as this agent
//! (SO_PEERCRED); a squatter gets a warning and is otherwise ignored.

use std::{
    fs::File,
    io::{Read, Seek, Write},
    os::{
        fd::AsRawFd as _,
        linux::net::SocketAddrExt,
        unix::{
            fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
            net::{SocketAddr as UnixAddr, UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use log::{debug, warn};

/// The abstract socket name (without the leading NUL).
pub const NAME: &[u8] = b"wirescope-agent";

/// The lock files this process holds, kept open (and so locked) until it exits.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another wirescope agent is already running in this network namespace ({holder}); \
         stop it first (one agent per network namespace), or run this one in another namespace"
    )]
    Running { holder: String },
    #[error(
        "claiming this network namespace for the agent: the lock file {path}: {error} \
         (the state directory must be writable by the agent: --state-dir)"
    )]
    Lock {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "claiming this network namespace for the agent (abstract unix socket @wirescope-agent): {0}"
    )]
    Io(#[from] std::io::Error),
}

/// Claims this network namespace for an agent serving on `listen`, or says which agent
/// already has it. The claim lasts until the process exits.
pub fn claim(state_dir: &Path, listen: std::net::SocketAddr) -> Result<(), InstanceError> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .map_err(InstanceError::Io)?;
    claim_with(state_dir, netns, NAME, &listen.to_string())
}

/// [`claim`] with the namespace id and the socket name given (tests).
pub fn claim_with(
    state_dir: &Path,
    netns: u64,
    name: &[u8],
    listen: &str,
) -> Result<(), InstanceError> {
    let line = format!("pid={} listen={listen}\n", std::process::id());
    let lock = lock_file(state_dir, netns, &line)?;
    if let Err(e) = claim_socket(name, line) {
        // Unlocks: a refused agent must leave the lock to the one that runs.
        drop(lock);
        return Err(e);
    }
    if let Ok(mut held) = HELD.lock() {
        held.push(lock);
    }
    Ok(())
}

/// Takes `<state_dir>/agent-net<netns>.lock` and writes `line` into it.
fn lock_file(state_dir: &Path, netns: u64, line: &str) -> Result<File, InstanceError> {
    let path = state_dir.join(format!("agent-net{netns}.lock"));
    let err = |error: std::io::Error| InstanceError::Lock {
        path: path.clone(),
        error,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(err)?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(InstanceError::Running {
                holder: parse_answer(&text).unwrap_or_else(|| "it did not say which".into()),
            });
        }
        return Err(err(e));
    }
    f.set_len(0).map_err(err)?;
    f.rewind().map_err(err)?;
    f.write_all(line.as_bytes()).map_err(err)?;
    Ok(f)
}

/// Binds the abstract socket `name` and answers each connection with `line`; a holder
/// that runs as another user is a squatter, warned about and ignored.
fn claim_socket(name: &[u8], line: String) -> Result<(), InstanceError> {
    let addr = UnixAddr::from_abstract_name(name)?;
    let listener = match UnixListener::bind_addr(&addr) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let (holder, same_user) = describe_holder(&addr);
            if same_user {
                return Err(InstanceError::Running { holder });
            }
            warn!(
                "the abstract socket @{} is held by a process of another user ({holder}), \
                 not an agent; going on (the state directory's lock file is the claim)",
                String::from_utf8_lossy(name)
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
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

/// "pid N, serving http://ADDR" from the holder's answer (its pid from the socket's
/// credentials when it does not answer in time), and whether it runs as this process's
/// user.
fn describe_holder(addr: &UnixAddr) -> (String, bool) {
    let Ok(mut c) = UnixStream::connect_addr(addr) else {
        return ("it did not answer".into(), false);
    };
    let cred = peer_cred(&c);
    // SAFETY: geteuid cannot fail.
    let same_user = cred.is_some_and(|c| c.uid == unsafe { libc::geteuid() });
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
    let holder = match (parse_answer(&text), cred) {
        (Some(parsed), _) => parsed,
        (None, Some(c)) => format!("pid {}", c.pid),
        (None, None) => "it did not say which".into(),
    };
    (holder, same_user)
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

fn peer_cred(c: &UnixStream) -> Option<libc::ucred> {
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
    (r == 0 && cred.pid > 0).then_some(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("wirescope-instance-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The lock file is the claim: a second claim in the same namespace and directory names
    /// the first (from the file), even with the socket name free; other namespaces' claims
    /// in the same directory are independent; the directory is made 0700, the file 0600.
    #[test]
    fn a_second_claim_names_the_first() {
        let dir = temp_dir("second");
        let sock = |i: u32| format!("wirescope-test-{}-{i}", std::process::id());
        claim_with(&dir, 7, sock(1).as_bytes(), "127.0.0.1:9586").expect("first claim");
        let err = claim_with(&dir, 7, sock(2).as_bytes(), "127.0.0.1:9587").unwrap_err();
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
        claim_with(&dir, 8, sock(3).as_bytes(), "127.0.0.1:9588").expect("another namespace");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("agent-net7.lock")), 0o600);
        let text = std::fs::read_to_string(dir.join("agent-net7.lock")).unwrap();
        assert_eq!(
            text,
            format!("pid={} listen=127.0.0.1:9586\n", std::process::id())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A second agent given another state directory is still refused by the socket when
    /// the holder runs as the same user; the refused claim leaves its own lock free.
    #[test]
    fn another_state_dir_is_refused_by_the_socket() {
        let (a, b) = (temp_dir("dir-a"), temp_dir("dir-b"));
        let name = format!("wirescope-test-sock-{}", std::process::id());
        claim_with(&a, 9, name.as_bytes(), "127.0.0.1:9586").expect("first claim");
        let err = claim_with(&b, 9, name.as_bytes(), "127.0.0.1:9587").unwrap_err();
        assert!(
            err.to_string().contains("serving http://127.0.0.1:9586"),
            "{err}"
        );
        // Its lock was released: a third claim in b with a free socket name succeeds.
        let other = format!("{name}-free");
        claim_with(&b, 9, other.as_bytes(), "127.0.0.1:9589").expect("b's lock is free");
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    /// An unwritable state directory is an error that names the file and the option.
    #[test]
    fn unwritable_state_dir_names_the_fix() {
        let err = claim_with(Path::new("/proc/wirescope"), 1, b"wirescope-test-x", "a")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/proc/wirescope/agent-net1.lock") && err.contains("--state-dir"),
            "{err}"
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
