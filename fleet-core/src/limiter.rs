//! The failed-attempt limiter: a bounded count of failed secret checks per source, for
//! enrollment tokens and operator logins.
//!
//! # What it protects, and what it does not
//!
//! Registration-token secrets carry 128 bits and operator tokens at least 16 characters, so
//! guessing one is not what the limiter stops; it bounds what guessing **costs us**: ledger rows,
//! CSR checks, log lines and store round trips per source. It is built so that it can never be
//! turned against the fleet:
//!
//! - **A correct secret is never refused because of others' failures.** Over its budget a source
//!   still has its secret checked (one hash and one compare); a correct one proceeds as usual,
//!   only a wrong one is answered `rate limited` (with the time until the window ends), and it
//!   costs nothing else — no ledger row, no CSR parse. A site behind one NAT address whose
//!   neighbour guesses keeps enrolling; the only thing it notices is that *its own* wrong tokens
//!   are answered "rate limited" rather than "invalid" until the window ends.
//! - **Check and count are one step.** [`AttemptLimiter::begin`] reserves the attempt under the
//!   lock before the secret is looked at, and a success gives the reservation back, so 200
//!   concurrent wrong guesses from one source are 20 evaluated attempts and 180 cheap refusals,
//!   never 200 evaluations.
//! - **Nothing is keyed by token id**, which is public (it is in every join string): a per-token
//!   lockout would let anyone lock a token.
//! - **Sources are aggregated** the way addresses are handed out: an IPv4 address is one source, an
//!   IPv6 address counts for its /64 (a host usually has a whole /64 to pick from).
//! - **Bounded.** At most [`AttemptLimit::max_sources`] sources are tracked; when full, the source
//!   whose window began first is forgotten (O(1) amortized, never a scan under the lock). An
//!   attacker with more addresses than that can make the limiter forget some of them early,
//!   which only costs the protection of our resources, never an agent's access.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::error::ValidationError;

/// Limits of an [`AttemptLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLimit {
    /// Failed attempts a source may make in one window before it is answered "rate limited"
    /// (default 20).
    pub max_failures: u32,
    /// Length of the window, counted from a source's first failure in it (default 60 s).
    pub window: Duration,
    /// Sources tracked at once (default 65,536, about 4 MiB at most).
    pub max_sources: usize,
}

impl Default for AttemptLimit {
    fn default() -> Self {
        Self {
            max_failures: 20,
            window: Duration::from_secs(60),
            max_sources: 65_536,
        }
    }
}

impl AttemptLimit {
    /// Checks: at least one failure per window, a window from 1 s to 1 day, at least one source.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.max_failures == 0 {
            return Err(ValidationError::new(
                "max_failures",
                "0",
                "must be at least 1",
            ));
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(86_400) {
            return Err(ValidationError::new(
                "window",
                format!("{}ms", self.window.as_millis()),
                "must be from 1 second to 1 day",
            ));
        }
        if self.max_sources == 0 {
            return Err(ValidationError::new(
                "max_sources",
                "0",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Where attempts come from: an IPv4 address, or the /64 of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source(u128);

impl Source {
    /// The source of an attempt from `ip` (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(u128::from(u32::from(v4))),
                // The /64, marked with a bit no IPv4 value has (bit 32) so the two never meet.
                None => Self((u128::from(v6) & !u128::from(u64::MAX)) | (1 << 32)),
            },
        }
    }
}

#[derive(Debug)]
struct Entry {
    start: Timestamp,
    /// Failures counted in the window, reservations of attempts in progress included.
    used: u32,
}

#[derive(Debug, Default)]
struct Table {
    by_source: FxHashMap<Source, Entry>,
    /// Sources in the order their windows began (entries whose window restarted later are
    /// skipped when they reach the front).
    order: VecDeque<(Source, Timestamp)>,
}

/// Counts failed attempts per [`Source`]; see the module docs.
#[derive(Debug)]
pub struct AttemptLimiter {
    limit: AttemptLimit,
    table: Mutex<Table>,
}

/// The verdict of [`AttemptLimiter::begin`].
#[derive(Debug)]
#[must_use]
pub enum Attempt<'a> {
    /// Within budget; the attempt is counted as a failure unless it is
    /// [`succeeded`](Reservation::succeeded).
    Counted(Reservation<'a>),
    /// Over budget: check the secret, let a correct one proceed, and answer a wrong one with
    /// "rate limited" at no further cost.
    OverBudget {
        /// Until the source's window ends.
        retry_after: Duration,
    },
}

/// An attempt counted in advance; dropping it keeps it counted (a failure), and
/// [`succeeded`](Self::succeeded) gives it back.
#[derive(Debug)]
pub struct Reservation<'a> {
    limiter: &'a AttemptLimiter,
    source: Source,
    start: Timestamp,
}

impl Reservation<'_> {
    /// The attempt succeeded: it does not count against its source.
    pub fn succeeded(self) {
        let mut table = self.limiter.lock();
        if let Some(e) = table.by_source.get_mut(&self.source)
            && e.start == self.start
        {
            e.used = e.used.saturating_sub(1);
        }
    }
}

impl AttemptLimiter {
    /// A limiter with `limit` (see [`AttemptLimit::validate`]).
    pub fn new(limit: AttemptLimit) -> Self {
        Self {
            limit,
            table: Mutex::new(Table::default()),
        }
    }

    /// Its limits.
    pub fn limit(&self) -> &AttemptLimit {
        &self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Begins an attempt from `ip` at `now`: reserves it within the source's budget, or says the
    /// source is over it. One lock, O(1) amortized.
    pub fn begin(&self, ip: IpAddr, now: Timestamp) -> Attempt<'_> {
        let source = Source::of(ip);
        let window = self.limit.window;
        let mut table = self.lock();
        let table = &mut *table;
        let fresh = match table.by_source.get_mut(&source) {
            Some(e) if now.duration_since(e.start) < window => {
                if e.used >= self.limit.max_failures {
                    let retry_after = window.saturating_sub(now.duration_since(e.start));
                    return Attempt::OverBudget {
                        retry_after: retry_after.max(Duration::from_secs(1)),
                    };
                }
                e.used += 1;
                return Attempt::Counted(Reservation {
                    limiter: self,
                    source,
                    start: e.start,
                });
            }
            Some(e) => {
                // The window has passed: a new one begins now.
                e.start = now;
                e.used = 1;
                false
            }
            None => true,
        };
        if fresh {
            while table.by_source.len() >= self.limit.max_sources {
                match table.order.pop_front() {
                    Some((old, start)) => {
                        if table.by_source.get(&old).is_some_and(|e| e.start == start) {
                            table.by_source.remove(&old);
                        }
                    }
                    None => break,
                }
            }
            table.by_source.insert(
                source,
                Entry {
                    start: now,
                    used: 1,
                },
            );
        }
        table.order.push_back((source, now));
        // Stale order entries (windows that restarted) are dropped as they reach the front;
        // bound them too, so a source restarting its window often cannot grow the queue.
        while table.order.len() > 2 * self.limit.max_sources {
            if let Some((old, start)) = table.order.pop_front()
                && table.by_source.get(&old).is_some_and(|e| e.start == start)
            {
                table.by_source.remove(&old);
            }
        }
        Attempt::Counted(Reservation {
            limiter: self,
            source,
            start: now,
        })
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().by_source.len()
    }
}

/// Renewals per instance in a sliding hour: a holder of a valid certificate cannot make the CA
/// sign in a loop (each renewal is a signature, a store write and, on the next heartbeat, a
/// retired serial). Keyed by the instance of the authenticated certificate — never by anything a
/// client chooses — so the table is bounded by the fleet's size, and entries older than the
/// window are swept as the table grows. Per process: with several control-plane replicas each
/// counts its own.
#[derive(Debug)]
pub(crate) struct RenewalLimiter {
    per_hour: u32,
    table: Mutex<FxHashMap<crate::InstanceId, (Timestamp, u32)>>,
}

/// The renewal window.
const RENEWAL_WINDOW: Duration = Duration::from_secs(3600);

impl RenewalLimiter {
    pub(crate) fn new(per_hour: u32) -> Self {
        Self {
            per_hour,
            table: Mutex::new(FxHashMap::default()),
        }
    }

    /// Counts a renewal of `instance` at `now`, or says when the next one is allowed.
    pub(crate) fn check(
        &self,
        instance: crate::InstanceId,
        now: Timestamp,
    ) -> Result<(), Duration> {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.len() >= 1024 && table.len().is_power_of_two() {
            // Amortized: a sweep each time the table doubles.
            table.retain(|_, (start, _)| now.duration_since(*start) < RENEWAL_WINDOW);
        }
        let entry = table.entry(instance).or_insert((now, 0));
        if now.duration_since(entry.0) >= RENEWAL_WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_hour {
            let retry = RENEWAL_WINDOW.saturating_sub(now.duration_since(entry.0));
            return Err(retry.max(Duration::from_secs(1)));
        }
        entry.1 += 1;
        Ok(())
    }
}

impl Default for AttemptLimiter {
    fn default() -> Self {
        Self::new(AttemptLimit::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_unix_secs(1_000);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn counted(a: Attempt<'_>) -> bool {
        matches!(a, Attempt::Counted(_))
    }

    #[test]
    fn failures_are_counted_per_source_and_successes_given_back() {
        let l = AttemptLimiter::new(AttemptLimit {
            max_failures: 3,
            ..AttemptLimit::default()
        });
        for _ in 0..3 {
            assert!(counted(l.begin(ip("192.0.2.1"), T0)));
        }
        match l.begin(ip("192.0.2.1"), T0.saturating_add(Duration::from_secs(10))) {
            Attempt::OverBudget { retry_after } => assert_eq!(retry_after, Duration::from_secs(50)),
            other => panic!("{other:?}"),
        }
        assert!(counted(l.begin(ip("192.0.2.2"), T0)), "another source");
        // After the window the source starts again.
        assert!(counted(l.begin(
            ip("192.0.2.1"),
            T0.saturating_add(Duration::from_secs(60))
        )));
        // Successes do not use the budget.
        for _ in 0..10 {
            match l.begin(ip("198.51.100.1"), T0) {
                Attempt::Counted(r) => r.succeeded(),
                other => panic!("{other:?}"),
            }
        }
        assert!(counted(l.begin(ip("198.51.100.1"), T0)));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let l = AttemptLimiter::new(AttemptLimit {
            max_failures: 2,
            ..AttemptLimit::default()
        });
        assert!(counted(l.begin(ip("2001:db8:1:2::1"), T0)));
        assert!(counted(l.begin(ip("2001:db8:1:2:ffff::9"), T0)));
        assert!(
            !counted(l.begin(ip("2001:db8:1:2:abcd::1"), T0)),
            "same /64"
        );
        assert!(counted(l.begin(ip("2001:db8:1:3::1"), T0)), "another /64");
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.7")),
            Source::of(ip("192.0.2.7"))
        );
        assert_ne!(Source::of(ip("::1")), Source::of(ip("0.0.0.1")));
    }

    #[test]
    fn concurrent_attempts_cannot_exceed_the_budget() {
        let l = std::sync::Arc::new(AttemptLimiter::new(AttemptLimit {
            max_failures: 20,
            ..AttemptLimit::default()
        }));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let l = std::sync::Arc::clone(&l);
                std::thread::spawn(move || {
                    (0..25)
                        .filter(|_| counted(l.begin(ip("203.0.113.9"), T0)))
                        .count()
                })
            })
            .collect();
        let evaluated: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(evaluated, 20, "200 concurrent attempts, 20 evaluated");
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_the_oldest_first() {
        let l = AttemptLimiter::new(AttemptLimit {
            max_failures: 1,
            max_sources: 100,
            ..AttemptLimit::default()
        });
        for i in 0..10_000u32 {
            let _ = l.begin(IpAddr::from(i.to_be_bytes()), T0);
            assert!(l.tracked() <= 100);
            assert!(l.lock().order.len() <= 200);
        }
        // The newest are still limited; the oldest were forgotten.
        assert!(!counted(l.begin(IpAddr::from(9_999u32.to_be_bytes()), T0)));
        assert!(counted(l.begin(IpAddr::from(0u32.to_be_bytes()), T0)));
        // A source restarting its window over and over cannot grow the queue.
        for s in 0..10_000u64 {
            let _ = l.begin(
                ip("192.0.2.200"),
                T0.saturating_add(Duration::from_secs(60 * s)),
            );
        }
        assert!(l.lock().order.len() <= 200);
    }
}
