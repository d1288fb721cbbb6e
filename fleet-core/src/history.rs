//! Status history: an instance's status as intervals, from which uptime over any window is exact.
//!
//! A [`History`] is the status an instance started with and the [`Transition`]s after it — the
//! same transitions the staleness machine produces, with their threshold-crossing times. Its
//! intervals cover every instant from registration on, so time spent in a status is measured, not
//! sampled: an instance powered off for a month shows 0 % uptime for that month, not the status of
//! its last sample.
//!
//! **Uptime** over a window is the time the instance was `Online` divided by the time it existed
//! within the window (from registration to the end of the window or "now", whichever comes
//! first). `Warning` counts as not up.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::staleness::{Status, Transition};

/// A period with one status; `to` is exclusive, `None` while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInterval {
    /// The status.
    pub status: Status,
    /// Start (inclusive).
    pub from: Timestamp,
    /// End (exclusive), or `None` for the current interval.
    pub to: Option<Timestamp>,
}

/// Why a transition cannot extend a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The transition does not start from the current status.
    #[error("transition from {found} does not continue the current status {expected}")]
    Broken {
        /// The current status.
        expected: Status,
        /// The transition's `from`.
        found: Status,
    },
    /// The transition is earlier than the last one.
    #[error("transition at {at} is earlier than the last one at {last}")]
    OutOfOrder {
        /// The transition's time.
        at: Timestamp,
        /// The last transition's time.
        last: Timestamp,
    },
}

/// An instance's status history; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    start: Timestamp,
    initial: Status,
    transitions: Vec<Transition>,
}

impl History {
    /// A history starting at `start` (registration) with `initial` status.
    pub fn new(start: Timestamp, initial: Status) -> Self {
        Self {
            start,
            initial,
            transitions: Vec::new(),
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.transitions.last().map_or(self.initial, |t| t.to)
    }

    /// Appends a transition; it must continue the current status and not go back in time.
    pub fn record(&mut self, t: Transition) -> Result<(), HistoryError> {
        let current = self.status();
        if t.from != current {
            return Err(HistoryError::Broken {
                expected: current,
                found: t.from,
            });
        }
        let last = self.transitions.last().map_or(self.start, |l| l.at);
        if t.at < last {
            return Err(HistoryError::OutOfOrder { at: t.at, last });
        }
        self.transitions.push(t);
        Ok(())
    }

    /// The transitions recorded.
    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// Every interval from the start; the last one is open.
    pub fn intervals(&self) -> Vec<StatusInterval> {
        let mut out = Vec::with_capacity(self.transitions.len() + 1);
        let mut status = self.initial;
        let mut from = self.start;
        for t in &self.transitions {
            if t.at > from {
                out.push(StatusInterval {
                    status,
                    from,
                    to: Some(t.at),
                });
            }
            status = t.to;
            from = t.at;
        }
        out.push(StatusInterval {
            status,
            from,
            to: None,
        });
        out
    }

    /// Time spent in `status` within `[from, to)`, counting the open interval up to `to`.
    pub fn time_in(&self, status: Status, from: Timestamp, to: Timestamp) -> Duration {
        self.intervals()
            .iter()
            .filter(|i| i.status == status)
            .map(|i| {
                let start = i.from.max(from);
                let end = i.to.unwrap_or(to).min(to);
                end.duration_since(start)
            })
            .sum()
    }

    /// Uptime in percent over `[from, to)`, `to` being at most "now": online time over the time the
    /// instance existed in the window. `None` when it did not exist in the window at all.
    pub fn uptime_percent(&self, from: Timestamp, to: Timestamp) -> Option<f64> {
        let observed_from = from.max(self.start);
        if to <= observed_from {
            return None;
        }
        let observed = to.duration_since(observed_from);
        let online = self.time_in(Status::Online, observed_from, to);
        Some(online.as_secs_f64() * 100.0 / observed.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_unix_secs(s)
    }

    #[test]
    fn powered_off_all_month_is_zero_percent() {
        let mut h = History::new(t(0), Status::Online);
        h.record(Transition {
            from: Status::Online,
            to: Status::Warning,
            at: t(60),
        })
        .unwrap();
        h.record(Transition {
            from: Status::Warning,
            to: Status::Offline,
            at: t(300),
        })
        .unwrap();
        let month = 30 * 86_400;
        assert_eq!(h.uptime_percent(t(86_400), t(86_400 + month)), Some(0.0));
        assert_eq!(h.uptime_percent(t(0), t(120)), Some(50.0));
        assert_eq!(h.uptime_percent(t(-100), t(0)), None, "before registration");
        assert_eq!(
            h.time_in(Status::Warning, t(0), t(1000)),
            Duration::from_secs(240)
        );
    }

    #[test]
    fn broken_or_backwards_transitions_are_refused() {
        let mut h = History::new(t(0), Status::Online);
        let err = h
            .record(Transition {
                from: Status::Warning,
                to: Status::Offline,
                at: t(5),
            })
            .unwrap_err();
        assert!(matches!(err, HistoryError::Broken { .. }));
        h.record(Transition {
            from: Status::Online,
            to: Status::Warning,
            at: t(60),
        })
        .unwrap();
        let err = h
            .record(Transition {
                from: Status::Warning,
                to: Status::Online,
                at: t(59),
            })
            .unwrap_err();
        assert!(matches!(err, HistoryError::OutOfOrder { .. }));
        assert_eq!(
            h.transitions().len(),
            1,
            "refused transitions change nothing"
        );
    }
}
