//! Staleness: how an instance's status follows from the time since its last heartbeat.
//!
//! | time since the last heartbeat | status |
//! |---|---|
//! | less than `warning_after` (60 s) | [`Status::Online`] |
//! | `warning_after` up to and including `offline_after` (5 min) | [`Status::Warning`] |
//! | more than `offline_after` | [`Status::Offline`] |
//!
//! The rules live in one pure function, [`StalenessPolicy::step`], over **server-observed** time
//! (millisecond resolution). It has two events: a heartbeat arrived, or time passed (a sweep).
//! Its guarantees, each checked by property tests:
//!
//! - a heartbeat always yields `Online` (unless hysteresis is configured, below);
//! - without heartbeats the status never improves, whatever the clock does — a clock stepped
//!   backwards cannot make an instance look fresher than its last heartbeat allows, and never
//!   panics;
//! - every transition starts from the previous one's `to`;
//! - a transition caused by time carries the **threshold-crossing time** (the last heartbeat plus
//!   `warning_after`, or plus `offline_after` and one millisecond, the first instant that is "more
//!   than" it), not the time a sweep happened to notice it. So the transitions are the same whether
//!   sweeps run every second or at random times: a heartbeat first catches up on the transitions
//!   that time already caused.
//!
//! **Hysteresis** (off by default): with `recovery_heartbeats = n > 1`, an instance that is not
//! online needs `n` consecutive heartbeats, each less than `warning_after` after the previous, to
//! count as online again. Until then a heartbeat takes it to `Warning` (reachable, not yet
//! trusted). This stops a flapping instance from raising a recovery and a failure every minute.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::error::ValidationError;

/// An instance's health as derived from heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Heard from within `warning_after`.
    Online,
    /// Silent for at least `warning_after`, at most `offline_after`.
    Warning,
    /// Silent for more than `offline_after`.
    Offline,
}

impl Status {
    /// All statuses, from best to worst.
    pub const ALL: [Self; 3] = [Self::Online, Self::Warning, Self::Offline];

    /// `"online"`, `"warning"` or `"offline"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Warning => "warning",
            Self::Offline => "offline",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "online" => Ok(Self::Online),
            "warning" => Ok(Self::Warning),
            "offline" => Ok(Self::Offline),
            _ => Err(ValidationError::new(
                "status",
                s,
                "must be online, warning or offline",
            )),
        }
    }
}

/// A status change and when it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transition {
    /// Status before.
    pub from: Status,
    /// Status after.
    pub to: Status,
    /// When it happened: the threshold-crossing time for changes caused by silence, the heartbeat's
    /// receive time for recoveries.
    pub at: Timestamp,
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A heartbeat was received.
    Heartbeat,
    /// Time passed (a sweep looked at the instance).
    Tick,
}

/// The per-instance input and output of [`StalenessPolicy::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StalenessState {
    /// Current status.
    pub status: Status,
    /// Server time of the last heartbeat (registration counts as the first).
    pub last_heartbeat: Timestamp,
    /// Consecutive heartbeats counted towards recovery (hysteresis only; 0 otherwise).
    pub streak: u32,
}

impl StalenessState {
    /// The state of an instance first heard from at `at` (registration): online.
    pub const fn new(at: Timestamp) -> Self {
        Self {
            status: Status::Online,
            last_heartbeat: at,
            streak: 0,
        }
    }
}

/// The at most three transitions one step can produce (a late heartbeat after a long silence:
/// online → warning → offline, then the recovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transitions {
    items: [Option<Transition>; 3],
    len: u8,
}

impl Transitions {
    fn push(&mut self, t: Transition) {
        if let Some(slot) = self.items.get_mut(usize::from(self.len)) {
            *slot = Some(t);
            self.len += 1;
        }
    }

    /// Number of transitions.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The transitions in order.
    pub fn iter(&self) -> impl Iterator<Item = Transition> + '_ {
        self.items.iter().flatten().copied()
    }
}

impl IntoIterator for Transitions {
    type Item = Transition;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<Transition>, 3>>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter().flatten()
    }
}

/// Thresholds and heartbeat cadence.
///
/// ```
/// use std::time::Duration;
/// use fleet_core::StalenessPolicy;
///
/// let policy = StalenessPolicy::default();
/// assert_eq!(policy.warning_after, Duration::from_secs(60));
/// assert_eq!(policy.heartbeat_interval(), Duration::from_secs(15));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StalenessPolicy {
    /// Silence after which an instance is `Warning` (default 60 s).
    pub warning_after: Duration,
    /// Silence after which (strictly more than) an instance is `Offline` (default 5 min).
    pub offline_after: Duration,
    /// Interval handed to agents; `None` derives it as a quarter of `warning_after`, so four
    /// heartbeats fit in the online window. When set, at least three must fit.
    pub heartbeat_interval: Option<Duration>,
    /// Consecutive heartbeats a non-online instance needs to count as online again (1 = no
    /// hysteresis, the default).
    pub recovery_heartbeats: u32,
}

impl Default for StalenessPolicy {
    fn default() -> Self {
        Self {
            warning_after: Duration::from_secs(60),
            offline_after: Duration::from_secs(300),
            heartbeat_interval: None,
            recovery_heartbeats: 1,
        }
    }
}

/// Largest accepted `recovery_heartbeats`.
pub const MAX_RECOVERY_HEARTBEATS: u32 = 100;
/// Largest accepted `offline_after` (30 days).
pub const MAX_OFFLINE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

impl StalenessPolicy {
    /// A policy with the given thresholds and the other settings at their defaults.
    pub fn new(warning_after: Duration, offline_after: Duration) -> Result<Self, ValidationError> {
        let p = Self {
            warning_after,
            offline_after,
            ..Self::default()
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks: `warning_after` ≥ 1 s; `offline_after` > `warning_after` and ≤ 30 days; the
    /// heartbeat interval ≥ 1 s with at least three heartbeats fitting in `warning_after`;
    /// `recovery_heartbeats` in 1..=100.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let secs = |d: Duration| format!("{}s", d.as_secs_f64());
        if self.warning_after < Duration::from_secs(1) {
            return Err(ValidationError::new(
                "warning_after",
                secs(self.warning_after),
                "must be at least 1 second",
            ));
        }
        if self.offline_after <= self.warning_after {
            return Err(ValidationError::new(
                "offline_after",
                secs(self.offline_after),
                "must be longer than warning_after",
            ));
        }
        if self.offline_after > MAX_OFFLINE_AFTER {
            return Err(ValidationError::new(
                "offline_after",
                secs(self.offline_after),
                "must be at most 30 days",
            ));
        }
        if let Some(i) = self.heartbeat_interval {
            if i < Duration::from_secs(1) {
                return Err(ValidationError::new(
                    "heartbeat_interval",
                    secs(i),
                    "must be at least 1 second",
                ));
            }
            if i.saturating_mul(3) > self.warning_after {
                return Err(ValidationError::new(
                    "heartbeat_interval",
                    secs(i),
                    "is too long: at least three heartbeats must fit in warning_after",
                ));
            }
        }
        if !(1..=MAX_RECOVERY_HEARTBEATS).contains(&self.recovery_heartbeats) {
            return Err(ValidationError::new(
                "recovery_heartbeats",
                self.recovery_heartbeats.to_string(),
                "must be from 1 to 100",
            ));
        }
        Ok(())
    }

    /// The heartbeat interval to hand to agents.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
            .unwrap_or_else(|| (self.warning_after / 4).max(Duration::from_secs(1)))
    }

    /// The status an instance last heard from at `last` has at `now`, by the table alone (no
    /// hysteresis, no memory of earlier status). A `now` before `last` counts as no time elapsed.
    pub fn status_at(&self, last: Timestamp, now: Timestamp) -> Status {
        let elapsed = now.duration_since(last);
        if elapsed < self.warning_after {
            Status::Online
        } else if elapsed <= self.offline_after {
            Status::Warning
        } else {
            Status::Offline
        }
    }

    /// First instant an instance last heard from at `last` is `Warning`.
    pub fn warning_at(&self, last: Timestamp) -> Timestamp {
        last.saturating_add(self.warning_after)
    }

    /// First instant (millisecond resolution) an instance last heard from at `last` is `Offline`.
    pub fn offline_at(&self, last: Timestamp) -> Timestamp {
        last.saturating_add(self.offline_after)
            .saturating_add(Duration::from_millis(1))
    }

    /// When the status of `state` will next change if no heartbeat arrives; `None` when offline.
    pub fn next_deadline(&self, state: &StalenessState) -> Option<Timestamp> {
        match state.status {
            Status::Online => Some(self.warning_at(state.last_heartbeat)),
            Status::Warning => Some(self.offline_at(state.last_heartbeat)),
            Status::Offline => None,
        }
    }

    /// Applies `event` at server time `now`: the new state and the transitions, in order.
    pub fn step(
        &self,
        state: StalenessState,
        event: Event,
        now: Timestamp,
    ) -> (StalenessState, Transitions) {
        let mut out = Transitions::default();
        let mut next = state;

        // Time first: catch up on what silence since the last heartbeat has caused. A heartbeat
        // arriving in the very millisecond a threshold is crossed counts as in time (otherwise,
        // with recovery hysteresis, a punctual instance could be held in warning).
        let until = match event {
            Event::Heartbeat => now.saturating_sub(Duration::from_millis(1)),
            Event::Tick => now,
        };
        let target = self.status_at(state.last_heartbeat, until);
        if target > next.status {
            if next.status == Status::Online {
                out.push(Transition {
                    from: Status::Online,
                    to: Status::Warning,
                    at: self.warning_at(state.last_heartbeat),
                });
                next.status = Status::Warning;
            }
            if target == Status::Offline {
                out.push(Transition {
                    from: Status::Warning,
                    to: Status::Offline,
                    at: self.offline_at(state.last_heartbeat),
                });
                next.status = Status::Offline;
            }
            next.streak = 0;
        }

        if event == Event::Heartbeat {
            let recovered = if next.status == Status::Online || self.recovery_heartbeats <= 1 {
                true
            } else {
                let continued = next.streak > 0
                    && now.duration_since(state.last_heartbeat) < self.warning_after;
                next.streak = if continued {
                    next.streak.saturating_add(1)
                } else {
                    1
                };
                next.streak >= self.recovery_heartbeats
            };
            let to = if recovered {
                Status::Online
            } else {
                Status::Warning
            };
            if to != next.status {
                out.push(Transition {
                    from: next.status,
                    to,
                    at: now,
                });
                next.status = to;
            }
            if recovered {
                next.streak = 0;
            }
            next.last_heartbeat = now;
        }
        (next, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_unix_secs(secs)
    }

    /// Found by the property test: warning at 75.782 s, hysteresis 2, a tick at 75.781 s
    /// (online) and a heartbeat at 75.782 s — the crossing instant — kept it in warning.
    #[test]
    fn a_heartbeat_at_the_crossing_instant_is_in_time() {
        let p = StalenessPolicy {
            warning_after: Duration::from_millis(75_782),
            offline_after: Duration::from_millis(75_783),
            heartbeat_interval: None,
            recovery_heartbeats: 2,
        };
        let t0 = Timestamp::from_unix_millis(1_000_000);
        let s = StalenessState::new(t0);
        let (s, _) = p.step(s, Event::Tick, Timestamp::from_unix_millis(1_075_781));
        assert_eq!(s.status, Status::Online);
        let (s, tr) = p.step(s, Event::Heartbeat, Timestamp::from_unix_millis(1_075_782));
        assert_eq!(s.status, Status::Online);
        assert!(tr.is_empty());
        // One millisecond later it is late: caught up, and held by the hysteresis.
        let s = StalenessState::new(t0);
        let (s, tr) = p.step(s, Event::Heartbeat, Timestamp::from_unix_millis(1_075_783));
        assert_eq!(s.status, Status::Warning);
        assert_eq!(tr.len(), 1);
    }

    #[test]
    fn table_boundaries() {
        let p = StalenessPolicy::default();
        let last = t(1000);
        assert_eq!(p.status_at(last, t(1000)), Status::Online);
        assert_eq!(
            p.status_at(last, Timestamp::from_unix_millis(1_059_999)),
            Status::Online
        );
        assert_eq!(p.status_at(last, t(1060)), Status::Warning);
        assert_eq!(p.status_at(last, t(1300)), Status::Warning);
        assert_eq!(
            p.status_at(last, Timestamp::from_unix_millis(1_300_001)),
            Status::Offline
        );
        // Clock before the last heartbeat: no time has passed.
        assert_eq!(p.status_at(last, t(0)), Status::Online);
    }

    #[test]
    fn late_heartbeat_catches_up_with_crossing_times() {
        let p = StalenessPolicy::default();
        let s = StalenessState::new(t(0));
        let (s, tr) = p.step(s, Event::Heartbeat, t(1000));
        let tr: Vec<_> = tr.into_iter().collect();
        assert_eq!(
            tr,
            vec![
                Transition {
                    from: Status::Online,
                    to: Status::Warning,
                    at: t(60)
                },
                Transition {
                    from: Status::Warning,
                    to: Status::Offline,
                    at: Timestamp::from_unix_millis(300_001)
                },
                Transition {
                    from: Status::Offline,
                    to: Status::Online,
                    at: t(1000)
                },
            ]
        );
        assert_eq!(
            s,
            StalenessState {
                status: Status::Online,
                last_heartbeat: t(1000),
                streak: 0
            }
        );
    }

    #[test]
    fn backwards_clock_never_improves_status() {
        let p = StalenessPolicy::default();
        let s = StalenessState::new(t(1000));
        let (s, _) = p.step(s, Event::Tick, t(2000));
        assert_eq!(s.status, Status::Offline);
        let (s2, tr) = p.step(s, Event::Tick, t(0));
        assert_eq!(s2, s);
        assert!(tr.is_empty());
    }

    #[test]
    fn hysteresis_needs_consecutive_heartbeats() {
        let p = StalenessPolicy {
            recovery_heartbeats: 3,
            ..StalenessPolicy::default()
        };
        let s = StalenessState {
            status: Status::Offline,
            last_heartbeat: t(0),
            streak: 0,
        };
        let (s, tr) = p.step(s, Event::Heartbeat, t(1000));
        assert_eq!(s.status, Status::Warning);
        assert_eq!(tr.len(), 1);
        let (s, tr) = p.step(s, Event::Heartbeat, t(1015));
        assert_eq!(s.status, Status::Warning);
        assert!(tr.is_empty());
        // A gap of 60 s restarts the count (and is itself a Warning, no transition).
        let (s, _) = p.step(s, Event::Heartbeat, t(1075));
        assert_eq!((s.status, s.streak), (Status::Warning, 1));
        let (s, _) = p.step(s, Event::Heartbeat, t(1090));
        let (s, tr) = p.step(s, Event::Heartbeat, t(1105));
        assert_eq!(s.status, Status::Online);
        assert_eq!(tr.iter().next().map(|x| x.to), Some(Status::Online));
    }

    #[test]
    fn validation() {
        assert!(StalenessPolicy::default().validate().is_ok());
        assert!(StalenessPolicy::new(Duration::from_secs(60), Duration::from_secs(60)).is_err());
        assert!(StalenessPolicy::new(Duration::ZERO, Duration::from_secs(60)).is_err());
        let too_slow = StalenessPolicy {
            heartbeat_interval: Some(Duration::from_secs(21)),
            ..StalenessPolicy::default()
        };
        assert!(too_slow.validate().is_err());
        let ok = StalenessPolicy {
            heartbeat_interval: Some(Duration::from_secs(20)),
            ..too_slow
        };
        assert!(ok.validate().is_ok());
        assert!(
            StalenessPolicy {
                recovery_heartbeats: 0,
                ..StalenessPolicy::default()
            }
            .validate()
            .is_err()
        );
    }
}
