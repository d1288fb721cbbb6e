//! `Clock`: the only source of "now" in the library.
//!
//! Staleness, token expiry and certificate validity all take time from a `Clock`, so tests drive
//! them with a [`ManualClock`] instead of sleeping. Stores never read a clock; the time they need
//! is passed in by [`Fleet`](crate::Fleet).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use crate::Timestamp;

/// A source of the current time.
///
/// Implementations must be cheap (`now` is called on every heartbeat) and must not panic.
/// Time may step backwards (NTP corrections, a manual clock set back); everything in this crate
/// tolerates that without panicking and without making an instance look fresher than its last
/// heartbeat allows.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

impl<C: Clock + ?Sized> Clock for Box<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use fleet_core::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
/// clock.advance(Duration::from_secs(61));
/// assert_eq!(clock.now(), Timestamp::from_unix_secs(1_061));
/// ```
#[derive(Clone, Default)]
pub struct ManualClock {
    millis: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        Self {
            millis: Arc::new(AtomicI64::new(start.as_unix_millis())),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let step = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        // fetch_update with a saturating add: never wraps.
        let _ = self
            .millis
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                Some(m.saturating_add(step))
            });
    }

    /// Sets the clock to `t`, which may be earlier than the current time.
    pub fn set(&self, t: Timestamp) {
        self.millis.store(t.as_unix_millis(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.millis.load(Ordering::SeqCst))
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock").field(&self.now()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_clones_share_time_and_saturate() {
        let a = ManualClock::new(Timestamp::from_unix_millis(i64::MAX - 5));
        let b = a.clone();
        a.advance(Duration::from_secs(10));
        assert_eq!(b.now(), Timestamp::from_unix_millis(i64::MAX));
        b.set(Timestamp::UNIX_EPOCH);
        assert_eq!(a.now(), Timestamp::UNIX_EPOCH);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > Timestamp::from_unix_secs(1_577_836_800));
    }
}
