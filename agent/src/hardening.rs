//! What the agent does to its own process, besides dropping capabilities ([`crate::caps`]):
//!
//! - At start, the soft limit of open files goes up to the hard limit (as Go's runtime
//!   does): a relay's path-MTU searches, UAPI sockets and scrapers need more than the
//!   default 1,024 descriptors, and the soft limit is only a guard against leaks.
//! - Once attached, the process is made non-dumpable (PR_SET_DUMPABLE 0): no core dump and
//!   no ptrace by non-root processes, since its memory may hold peers' endpoints and what
//!   the kernel's WireGuard dumps carry.

use log::{debug, warn};

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit. Never fails
/// the agent: it logs and goes on with what it has.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(
            "reading the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: a valid pointer to an rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            debug!(
                "open-file limit raised from {} to {}",
                lim.rlim_cur, lim.rlim_max
            );
            return lim.rlim_max;
        }
        warn!(
            "raising the open-file limit from {} to {}: {}",
            lim.rlim_cur,
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    lim.rlim_cur
}

/// Makes the process non-dumpable. Never fails the agent.
pub fn forbid_core_dumps() -> bool {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument; the others are unused.
    let ok = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0;
    if !ok {
        warn!(
            "making the process non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile() -> (u64, u64) {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid pointer to an rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        (lim.rlim_cur, lim.rlim_max)
    }

    /// From a soft limit below the hard one, the soft limit ends at the hard one.
    #[test]
    fn open_file_limit_goes_to_the_hard_limit() {
        let (_, hard) = nofile();
        let low = libc::rlimit {
            rlim_cur: 256.min(hard),
            rlim_max: hard,
        };
        // SAFETY: a valid pointer to an rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        assert_eq!(raise_nofile(), hard);
        assert_eq!(nofile(), (hard, hard));
    }

    #[test]
    fn process_becomes_non_dumpable() {
        assert!(forbid_core_dumps());
        // SAFETY: PR_GET_DUMPABLE takes no arguments.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
