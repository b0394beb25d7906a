//! Which of the guest agent's OOM events the shim passes on to containerd, and how long it
//! waits before asking the agent for the next one.
//!
//! The agent, inside a guest that may be hostile, answers a long poll with a container id per
//! OOM kill. Nothing stops it from answering with ids the shim never created, or at once and
//! in a loop: [`OomFilter`] publishes only containers the shim knows, at most one event per
//! container per [`PER_CONTAINER`] (a container that keeps running out of memory is reported,
//! once a second, which is all containerd and the kubelet act on), and makes the poll back
//! off exponentially while the agent fails or answers with more dropped events than a
//! working one would.
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// At most one TaskOOM per container per this long.
pub const PER_CONTAINER: Duration = Duration::from_secs(1);
/// Dropped events (unknown containers, repeats) taken per second before the poll backs off.
pub const DROPS_PER_SECOND: u32 = 5;
/// The first wait of a backoff; each further one doubles, up to [`MAX_WAIT`].
pub const FIRST_WAIT: Duration = Duration::from_millis(100);
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// After this long without a failure or a dropped event, a backoff starts over from
/// [`FIRST_WAIT`]. Longer than [`MAX_WAIT`], so that a steady flood keeps its backoff.
pub const QUIET: Duration = Duration::from_secs(60);

/// What becomes of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Publish TaskOOM for the container.
    Publish,
    /// Dropped: the shim has no such container.
    Unknown,
    /// Dropped: the container's last OOM was published under [`PER_CONTAINER`] ago.
    Repeat,
}

/// The decision on one answer of the agent's poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// How long to wait before polling again (zero: at once).
    pub wait: Duration,
}

/// The OOM poll's state: when each known container's event was last published, and the
/// backoff. Time is passed in, so the decisions can be tested without waiting.
#[derive(Debug)]
pub struct OomFilter {
    /// Known containers whose event was published within [`PER_CONTAINER`] (older entries
    /// are pruned on each publish, so this holds no more than the pod's containers).
    published: HashMap<String, Instant>,
    /// Start of the current one-second window of dropped events, and how many it has had.
    window: Option<(Instant, u32)>,
    /// The wait the next backoff takes.
    next_wait: Duration,
    /// When the agent last failed or had an event dropped.
    last_bad: Option<Instant>,
}

impl Default for OomFilter {
    fn default() -> Self {
        OomFilter {
            published: HashMap::new(),
            window: None,
            next_wait: FIRST_WAIT,
            last_bad: None,
        }
    }
}

impl OomFilter {
    /// An event for `container_id` arrived at `now`; `known`: the shim has that container.
    pub fn event(&mut self, container_id: &str, known: bool, now: Instant) -> Decision {
        if known {
            let recent = self
                .published
                .get(container_id)
                .is_some_and(|at| now.saturating_duration_since(*at) < PER_CONTAINER);
            if !recent {
                self.published
                    .retain(|_, at| now.saturating_duration_since(*at) < PER_CONTAINER);
                self.published.insert(container_id.to_string(), now);
                return Decision {
                    verdict: Verdict::Publish,
                    wait: Duration::ZERO,
                };
            }
        }
        let verdict = if known {
            Verdict::Repeat
        } else {
            Verdict::Unknown
        };
        self.misbehaved(now);
        let dropped = match self.window {
            Some((start, n)) if now.saturating_duration_since(start) < Duration::from_secs(1) => {
                n + 1
            }
            _ => 1,
        };
        let start = match self.window {
            Some((start, _)) if dropped > 1 => start,
            _ => now,
        };
        self.window = Some((start, dropped));
        let wait = if dropped > DROPS_PER_SECOND {
            self.back_off()
        } else {
            Duration::ZERO
        };
        Decision { verdict, wait }
    }

    /// The poll failed at `now`: returns how long to wait before polling again. Every failure
    /// waits, since a failing poll returns at once and would otherwise spin.
    pub fn error(&mut self, now: Instant) -> Duration {
        self.misbehaved(now);
        self.back_off()
    }

    /// Notes a failure or a dropped event, starting the backoff over after a quiet stretch.
    fn misbehaved(&mut self, now: Instant) {
        if self
            .last_bad
            .is_some_and(|at| now.saturating_duration_since(at) >= QUIET)
        {
            self.next_wait = FIRST_WAIT;
        }
        self.last_bad = Some(now);
    }

    /// The backoff's current wait, doubling the next one.
    fn back_off(&mut self) -> Duration {
        let wait = self.next_wait;
        self.next_wait = (wait * 2).min(MAX_WAIT);
        wait
    }
}

/// At most the first 64 bytes of `s` (the agent's words, for a log line), cut at a char
/// boundary; log it with `{:?}` so that control characters are escaped.
pub fn shown(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn known_containers_are_published_once_a_second_and_unknown_ones_dropped() {
        let t0 = Instant::now();
        let mut f = OomFilter::default();
        let publish = Decision {
            verdict: Verdict::Publish,
            wait: Duration::ZERO,
        };
        assert_eq!(f.event("web", true, t0), publish);
        // Another container is not held back by the first one's event.
        assert_eq!(f.event("db", true, t0 + ms(10)), publish);
        // The same container again within the second: dropped, without a wait (a few
        // drops a second are a container OOMing in a loop, not a misbehaving agent).
        assert_eq!(
            f.event("web", true, t0 + ms(500)),
            Decision {
                verdict: Verdict::Repeat,
                wait: Duration::ZERO
            }
        );
        // A second after it was last published, it is published again: never suppressed.
        assert_eq!(f.event("web", true, t0 + ms(1000)), publish);
        assert_eq!(
            f.event("not-ours", false, t0 + ms(1100)),
            Decision {
                verdict: Verdict::Unknown,
                wait: Duration::ZERO
            }
        );
    }

    #[test]
    fn a_flood_of_unknown_ids_backs_off_exponentially_up_to_the_cap() {
        let t0 = Instant::now();
        let mut f = OomFilter::default();
        // The allowance of a second goes by at once, with no wait.
        for i in 0..DROPS_PER_SECOND {
            let d = f.event("bogus", false, t0 + ms(i as u64));
            assert_eq!(
                (d.verdict, d.wait),
                (Verdict::Unknown, Duration::ZERO),
                "{i}"
            );
        }
        // Past it, each dropped event waits twice as long as the one before, up to 30 s;
        // the clock moves on by each wait, as the poll would.
        let mut now = t0 + ms(DROPS_PER_SECOND as u64);
        let mut waits = Vec::new();
        for _ in 0..12 {
            let d = f.event("bogus", false, now);
            assert_eq!(d.verdict, Verdict::Unknown);
            now += d.wait;
            waits.push(d.wait);
        }
        let nonzero: Vec<_> = waits.iter().filter(|w| !w.is_zero()).copied().collect();
        assert_eq!(&nonzero[..4], &[ms(100), ms(200), ms(400), ms(800)]);
        assert!(nonzero.windows(2).all(|w| w[1] >= w[0]), "{nonzero:?}");
        // The cap: however long the flood lasts, no wait goes past 30 s, and it gets there.
        let mut last = Duration::ZERO;
        for _ in 0..200 {
            let d = f.event("bogus", false, now);
            now += d.wait + ms(1);
            last = last.max(d.wait);
        }
        assert_eq!(last, MAX_WAIT);
        // Known containers are still published in the middle of a flood.
        assert_eq!(f.event("web", true, now).verdict, Verdict::Publish);
    }

    #[test]
    fn failures_back_off_at_once_and_a_quiet_minute_starts_over() {
        let t0 = Instant::now();
        let mut f = OomFilter::default();
        // A poll that fails returns at once: the first failure already waits.
        assert_eq!(f.error(t0), ms(100));
        assert_eq!(f.error(t0 + ms(100)), ms(200));
        assert_eq!(f.error(t0 + ms(300)), ms(400));
        // After a quiet stretch (the agent answered, or nothing happened), it starts over.
        assert_eq!(f.error(t0 + ms(300) + QUIET), ms(100));
    }

    #[test]
    fn log_lines_get_at_most_64_bytes_of_the_agents_words() {
        assert_eq!(shown("web"), "web");
        let long = "é".repeat(100);
        assert!(shown(&long).len() <= 64 && long.starts_with(shown(&long)));
        assert_eq!(shown(&long).len(), 64);
        // 64 falls inside a character: cut before it.
        let odd = format!("a{long}");
        assert_eq!(shown(&odd).len(), 63);
        assert!(odd.starts_with(shown(&odd)));
    }
}
