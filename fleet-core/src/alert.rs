//! Alerts: every status change of an instance is one alert (see [`StatusChange`]); this module
//! adds the fleet-level alerts and the rules that keep a control-plane restart or a network
//! partition from raising thousands of them.
//!
//! - **Start-up grace.** After the control plane starts, nothing is marked warning or offline for
//!   [`AlertPolicy::startup_grace`] (default: the offline threshold), so every agent has the
//!   time to reach the restarted control plane; see [`LiveView::begin_grace`].
//! - **Mass-staleness guard.** When one sweep finds more than [`AlertPolicy::mass_share`] of the
//!   fleet (default 50 %, and at least [`AlertPolicy::mass_min_instances`]) going stale, the
//!   instances' status changes are still recorded (uptime stays exact) but observers get one
//!   [`FleetAlert`] instead of a storm, and the fleet alert is recorded.
//!
//! [`StatusChange`]: crate::StatusChange
//! [`LiveView::begin_grace`]: crate::LiveView::begin_grace

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::{Status, Timestamp};

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
}

impl Default for AlertPolicy {
    fn default() -> Self {
        Self {
            mass_share: 0.5,
            mass_min_instances: 10,
            startup_grace: None,
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
