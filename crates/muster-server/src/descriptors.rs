//! File descriptors: every connection holds one, so the process's `RLIMIT_NOFILE` bounds how
//! many connections Muster can serve.
//!
//! At start [`raise_limit`] lifts the soft limit to the hard one (systemd's default soft
//! limit is 1,024 while the hard one is far higher), and [`connections_per_listener`] keeps
//! the connection limits below what the descriptors allow, leaving [`RESERVED`] for
//! everything else. Should descriptors still run out, the accept loops back off instead of
//! spinning (`listener.rs`).

/// Descriptors kept for what is not an inbound connection: the store and its WAL, the
/// runtime, outbound connections to linked hubs and webhooks, logs.
pub const RESERVED: u64 = 128;

/// The soft and hard `RLIMIT_NOFILE` after [`raise_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft descriptor limit to the hard one; returns the limits in force afterwards
/// (unchanged when raising failed), or `None` where there is no such limit.
#[cfg(unix)]
pub fn raise_limit() -> Option<DescriptorLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes the limits into the struct it is given, which lives here.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `setrlimit` only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        } else {
            tracing::warn!(
                soft = lim.rlim_cur,
                hard = lim.rlim_max,
                error = %std::io::Error::last_os_error(),
                "could not raise the file descriptor limit"
            );
        }
    }
    Some(DescriptorLimit {
        soft: as_count(lim.rlim_cur),
        hard: as_count(lim.rlim_max),
    })
}

#[cfg(not(unix))]
pub fn raise_limit() -> Option<DescriptorLimit> {
    None
}

#[cfg(unix)]
// `rlim_t` is not `u64` on every target.
#[allow(clippy::unnecessary_cast)]
fn as_count(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        v as u64
    }
}

/// The connection limit each of `listeners` listeners gets: `configured`, lowered so that all
/// listeners together stay within `soft - RESERVED` descriptors (at least 1 each).
pub fn connections_per_listener(configured: usize, listeners: usize, soft: u64) -> usize {
    let budget = soft.saturating_sub(RESERVED) / listeners.max(1) as u64;
    let budget = usize::try_from(budget).unwrap_or(usize::MAX);
    configured.min(budget).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_fit_the_descriptors() {
        // systemd's default soft limit, two listeners.
        assert_eq!(connections_per_listener(10_000, 2, 1024), 448);
        assert_eq!(connections_per_listener(10_000, 2, 524_288), 10_000);
        assert_eq!(connections_per_listener(10_000, 4, u64::MAX), 10_000);
        assert_eq!(connections_per_listener(100, 2, 1024), 100);
        // Too few descriptors for any budget: still one connection each.
        assert_eq!(connections_per_listener(100, 2, 64), 1);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let lim = raise_limit().unwrap();
        assert_eq!(lim.soft, lim.hard);
    }
}
