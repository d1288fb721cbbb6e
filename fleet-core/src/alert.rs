//! Alerts: every status change of an instance is one alert (see [`StatusChange`]); this module
//! adds the fleet-level alerts and the rules that keep a control-plane restart or a network
//! partition from raising thousands of them.
//!
//! - **Start-up grace.** After the control plane starts, nothing is marked warning or offline for
//!   [`AlertPolicy::startup_grace`] (default: the offline threshold), so every agent has the
//!   time to reach the restarted control plane; see [`LiveView::begin_grace`].
//! - **Mass-staleness guard.** Per-instance alerts reach observers after a short hold, the
//!   window ([`AlertPolicy::mass_window`], default two heartbeat intervals: when a partition cuts
//!   agents off, their last heartbeats — and so their threshold crossings — are spread over a
//!   heartbeat interval plus jitter). When more than [`AlertPolicy::mass_share`] of the instances
//!   that were not already offline (default 50 %, and at least
//!   [`AlertPolicy::mass_min_instances`]) went stale within one window, the held alerts and those
//!   that follow while the storm goes on (until a window passes with no instance going stale)
//!   become one [`FleetAlert`], which is also recorded. The status changes themselves are always
//!   recorded in the history, so uptime stays exact.
//!
//! [`StatusChange`]: crate::StatusChange
//! [`LiveView::begin_grace`]: crate::LiveView::begin_grace

use std::time::Duration;

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::{InstanceId, Status, StatusChange, Timestamp};

/// How alerts are raised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertPolicy {
    /// Share of the fleet (0–1) that must go stale in one sweep to raise one fleet-level alert
    /// instead of per-instance alerts (default 0.5).
    pub mass_share: f64,
    /// Fewest instances going stale at once that can count as a mass event (default 10), so a
    /// three-machine fleet losing two still gets per-instance alerts.
    pub mass_min_instances: u64,
    /// How long after start-up nothing is marked warning or offline; `None` means the staleness
    /// policy's offline threshold (the default); `Some(ZERO)` turns the grace off.
    pub startup_grace: Option<Duration>,
    /// The guard's window, which is also how long per-instance alerts are held before observers
    /// get them; `None` means two heartbeat intervals (30 s by default).
    pub mass_window: Option<Duration>,
}

impl Default for AlertPolicy {
    fn default() -> Self {
        Self {
            mass_share: 0.5,
            mass_min_instances: 10,
            startup_grace: None,
            mass_window: None,
        }
    }
}

impl AlertPolicy {
    /// Checks the share is within 0–1.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(self.mass_share.is_finite() && (0.0..=1.0).contains(&self.mass_share)) {
            return Err(ValidationError::new(
                "mass_share",
                self.mass_share.to_string(),
                "must be between 0 and 1",
            ));
        }
        Ok(())
    }
}

/// What kind of fleet-level event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FleetAlertKind {
    /// Many instances went stale in one sweep (a partition, a control-plane network failure).
    MassStaleness,
}

/// One fleet-level alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetAlert {
    /// When the sweep found it.
    pub at: Timestamp,
    /// What happened.
    pub kind: FleetAlertKind,
    /// The status most of the affected instances moved to.
    pub status: Status,
    /// Instances affected.
    pub affected: u64,
    /// Instances in the fleet at the time.
    pub fleet_size: u64,
    /// A sentence for people.
    pub message: String,
}

/// Which fleet alerts to read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FleetAlertQuery {
    /// Only alerts at or after this time.
    pub since: Option<Timestamp>,
    /// Only alerts before this time.
    pub until: Option<Timestamp>,
    /// At most this many (0 means none).
    pub limit: usize,
}

impl FleetAlertQuery {
    /// Whether `a` is in the window.
    pub fn matches(&self, a: &FleetAlert) -> bool {
        self.since.is_none_or(|s| a.at >= s) && self.until.is_none_or(|u| a.at < u)
    }
}

/// The guard's state: per-instance alerts held for the window, the stale changes seen within
/// it, and whether a storm is going on.
#[derive(Debug, Default)]
pub(crate) struct MassGuard {
    held: VecDeque<(Timestamp, StatusChange)>,
    stale: VecDeque<(Timestamp, InstanceId, Status)>,
    storm_until: Option<Timestamp>,
}

/// What [`MassGuard::observe`] decided.
#[derive(Debug, Default)]
pub(crate) struct GuardOutcome {
    /// Per-instance alerts whose hold is over, for observers.
    pub(crate) released: Vec<StatusChange>,
    /// A storm began: its one alert.
    pub(crate) alert: Option<FleetAlert>,
}

impl MassGuard {
    /// Takes one sweep's changes at `now`. `fleet_size` and `offline_now` are the fleet's counts
    /// after the sweep.
    pub(crate) fn observe(
        &mut self,
        policy: &AlertPolicy,
        window: Duration,
        now: Timestamp,
        changes: &[StatusChange],
        fleet_size: u64,
        offline_now: u64,
    ) -> GuardOutcome {
        let mut new_stale = false;
        for c in changes {
            self.held.push_back((now, *c));
            if c.transition.to != Status::Online {
                self.stale.push_back((now, c.instance, c.transition.to));
                new_stale = true;
            }
        }
        let cutoff = now.saturating_sub(window);
        while self.stale.front().is_some_and(|(t, _, _)| *t <= cutoff) {
            self.stale.pop_front();
        }
        let mut out = GuardOutcome::default();
        match self.storm_until {
            Some(until) if now < until => {
                if new_stale {
                    self.storm_until = Some(now.saturating_add(window));
                }
                self.held.clear();
            }
            _ => {
                self.storm_until = None;
                let mut latest: FxHashMap<InstanceId, Status> = FxHashMap::default();
                for &(_, id, status) in &self.stale {
                    latest.insert(id, status);
                }
                let affected = latest.len() as u64;
                let offline = latest.values().filter(|s| **s == Status::Offline).count() as u64;
                let warning = affected - offline;
                // Instances that were not offline when the window began.
                let exposed = fleet_size.saturating_sub(offline_now.saturating_sub(offline));
                if new_stale
                    && affected >= policy.mass_min_instances.max(1)
                    && affected as f64 > policy.mass_share * exposed as f64
                {
                    let status = if offline >= warning {
                        Status::Offline
                    } else {
                        Status::Warning
                    };
                    out.alert = Some(FleetAlert {
                        at: now,
                        kind: FleetAlertKind::MassStaleness,
                        status,
                        affected,
                        fleet_size,
                        message: format!(
                            "{affected} of {exposed} reachable instances went stale within \
                             {}s ({offline} offline, {warning} warning): likely a network \
                             partition or a control-plane connectivity problem rather than \
                             {affected} separate failures",
                            window.as_secs()
                        ),
                    });
                    self.storm_until = Some(now.saturating_add(window));
                    self.held.clear();
                    self.stale.clear();
                }
            }
        }
        while self.held.front().is_some_and(|(t, _)| *t <= cutoff) {
            if let Some((_, c)) = self.held.pop_front() {
                out.released.push(c);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Transition;

    fn change(n: u128, to: Status, at: Timestamp) -> StatusChange {
        StatusChange {
            instance: InstanceId::from_u128(n),
            transition: Transition {
                from: Status::Online,
                to,
                at,
            },
        }
    }

    const WINDOW: Duration = Duration::from_secs(30);

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_unix_secs(1_000_000 + secs)
    }

    /// A partition cutting off 1,000 agents whose last heartbeats were spread over 15 s: their
    /// crossings arrive ~67 per one-second sweep. One fleet alert, no per-instance alerts.
    #[test]
    fn a_partition_spread_over_a_heartbeat_interval_is_one_alert() {
        let mut g = MassGuard::default();
        let policy = AlertPolicy::default();
        let mut alerts = 0;
        let mut released = 0;
        let mut n = 0u128;
        for s in 0..120 {
            let mut batch = Vec::new();
            if s < 15 {
                for _ in 0..67 {
                    batch.push(change(n, Status::Warning, t(s)));
                    n += 1;
                }
            }
            let out = g.observe(&policy, WINDOW, t(s), &batch, 1005, 0);
            alerts += usize::from(out.alert.is_some());
            released += out.released.len();
        }
        assert_eq!(alerts, 1);
        assert_eq!(released, 0, "every held alert was part of the storm");
    }

    #[test]
    fn a_few_failures_are_released_after_the_window() {
        let mut g = MassGuard::default();
        let policy = AlertPolicy::default();
        let out = g.observe(
            &policy,
            WINDOW,
            t(0),
            &[change(1, Status::Warning, t(0))],
            100,
            0,
        );
        assert!(out.released.is_empty() && out.alert.is_none(), "held");
        let out = g.observe(
            &policy,
            WINDOW,
            t(29),
            &[change(2, Status::Offline, t(29))],
            100,
            1,
        );
        assert!(out.released.is_empty());
        let out = g.observe(&policy, WINDOW, t(30), &[], 100, 1);
        assert_eq!(out.released.len(), 1);
        let out = g.observe(&policy, WINDOW, t(59), &[], 100, 1);
        assert_eq!(out.released.len(), 1);
        assert!(g.held.is_empty());
    }

    /// Instances already offline before the window do not dilute the share: 60 of the 100
    /// reachable go stale in a fleet of 1,000 with 900 long offline.
    #[test]
    fn the_share_is_of_instances_not_already_offline() {
        let mut g = MassGuard::default();
        let policy = AlertPolicy::default();
        let batch: Vec<StatusChange> = (0..60).map(|n| change(n, Status::Warning, t(0))).collect();
        let out = g.observe(&policy, WINDOW, t(0), &batch, 1000, 900);
        let alert = out.alert.expect("storm");
        assert_eq!((alert.affected, alert.fleet_size), (60, 1000));
    }

    #[test]
    fn a_storm_lasts_while_instances_keep_going_stale() {
        let mut g = MassGuard::default();
        let policy = AlertPolicy::default();
        let batch: Vec<StatusChange> = (0..20).map(|n| change(n, Status::Warning, t(0))).collect();
        assert!(
            g.observe(&policy, WINDOW, t(0), &batch, 30, 0)
                .alert
                .is_some()
        );
        // Warning → offline of the same instances four minutes later extends nothing new: the
        // storm ended; those are released individually after the window.
        let out = g.observe(
            &policy,
            WINDOW,
            t(20),
            &[change(25, Status::Warning, t(20))],
            30,
            0,
        );
        assert!(out.alert.is_none());
        assert!(out.released.is_empty());
        let out = g.observe(&policy, WINDOW, t(49), &[], 30, 0);
        assert!(
            out.released.is_empty(),
            "absorbed: the storm was extended to 50 s"
        );
        let out = g.observe(
            &policy,
            WINDOW,
            t(50),
            &[change(26, Status::Online, t(50))],
            30,
            0,
        );
        assert!(out.alert.is_none());
        let out = g.observe(&policy, WINDOW, t(80), &[], 30, 0);
        assert_eq!(out.released.len(), 1, "after the storm, alerts flow again");
    }
}
