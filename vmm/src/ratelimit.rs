//! Log lines the guest can trigger: per-call-site rate limits, and the binaries' log filter.
//!
//! A guest that sends malformed requests in a loop must not be able to fill the host's logs
//! (the shim's log is containerd's, written through a FIFO that blocks when containerd reads
//! slowly). Every line a guest can cause goes through [`guest_warn!`](crate::guest_warn) or
//! [`guest_error!`](crate::guest_error): each call site prints at most [`LINES_PER_WINDOW`]
//! lines per [`WINDOW`], and the first line after a quiet stretch says how many were dropped.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines one call site may print per window.
pub const LINES_PER_WINDOW: u64 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(5);

/// One call site's budget. Lock-free; a race between threads at a window's edge lets a line
/// or two more through, which is fine.
pub struct RateLimit {
    /// Start of the current window, in ms since the process's first rate-limited line.
    window_ms: AtomicU64,
    /// Lines seen in the current window, printed or not.
    seen: AtomicU64,
    /// Lines dropped since the last one printed.
    dropped: AtomicU64,
}

fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl RateLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        RateLimit {
            window_ms: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be printed now: `Some(dropped)` with the number of lines dropped
    /// since the last printed one, or `None` to drop this one.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let start = self.window_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW.as_millis() as u64
            && self
                .window_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.seen.store(0, Ordering::Relaxed);
        }
        if self.seen.fetch_add(1, Ordering::Relaxed) < LINES_PER_WINDOW {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The binaries' log filter: `SHOAL_LOG` if it is set and parses, else `default`.
/// fuse-backend-rs (the virtio-fs server) logs through the `log` crate, which reaches the
/// tracing subscriber too, and some of its error lines print whole buffers the guest sent
/// (up to 1 MiB per malformed request, as often as the guest likes): it is turned off unless
/// the filter names it.
pub fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let given = std::env::var("SHOAL_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(&s).ok().map(|f| (f, s)));
    let (filter, spec) = given.unwrap_or_else(|| (EnvFilter::new(default), default.to_owned()));
    if spec.contains("fuse_backend_rs") {
        filter
    } else {
        filter.add_directive("fuse_backend_rs=off".parse().expect("a valid directive"))
    }
}

/// `tracing::warn!` for a line the guest can trigger: rate-limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        match LIMIT.allow() {
            Some(0) => tracing::warn!($($arg)+),
            Some(dropped) => tracing::warn!(dropped_before = dropped, $($arg)+),
            None => {}
        }
    }};
}

/// `tracing::error!` for a line the guest can trigger: rate-limited per call site.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        match LIMIT.allow() {
            Some(0) => tracing::error!($($arg)+),
            Some(dropped) => tracing::error!(dropped_before = dropped, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_prints_a_burst_per_window_and_then_counts_what_it_dropped() {
        let limit = RateLimit::new();
        let window = WINDOW.as_millis() as u64;
        let printed = (0..10_000).filter(|_| limit.allow_at(1).is_some()).count();
        assert_eq!(printed as u64, LINES_PER_WINDOW);
        // The next window: the first line tells how many were dropped.
        assert_eq!(limit.allow_at(window + 2), Some(10_000 - LINES_PER_WINDOW));
        assert_eq!(limit.allow_at(window + 3), Some(0));
    }
}
