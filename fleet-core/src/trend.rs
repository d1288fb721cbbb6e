//! Fleet trends: health % and online / warning / offline counts in time buckets (hourly by
//! default), for charts over weeks.
//!
//! Each sweep adds one sample of the fleet's counts to the current bucket; a bucket holds the
//! mean of its samples (and the lowest health seen), so an hour's bucket says how the hour went,
//! not how its last second looked. Buckets are written to the store with the heartbeat flush and
//! kept for the history retention.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{FleetSummary, Timestamp};

/// Default bucket width (one hour).
pub const DEFAULT_TREND_BUCKET: Duration = Duration::from_secs(3600);

/// One time bucket of fleet trends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrendBucket {
    /// Start of the bucket (a multiple of its width since the Unix epoch).
    pub start: Timestamp,
    /// Width in seconds.
    pub width_secs: u64,
    /// Samples taken in it.
    pub samples: u64,
    /// Mean number of instances.
    pub total: f64,
    /// Mean number online.
    pub online: f64,
    /// Mean number warning.
    pub warning: f64,
    /// Mean number offline.
    pub offline: f64,
    /// Mean health (percentage online).
    pub health_percent: f64,
    /// Lowest health sampled.
    pub health_min_percent: f64,
    /// When the latest sample was taken: the last moment this bucket's control plane was known
    /// to be running (the start-up grace uses it after a restart).
    pub last_sample_at: Timestamp,
}

impl TrendBucket {
    /// The empty bucket of width `width` containing `at`.
    pub fn containing(at: Timestamp, width: Duration) -> Self {
        let w = i64::try_from(width.as_millis()).unwrap_or(i64::MAX).max(1);
        let start = at.as_unix_millis().div_euclid(w) * w;
        Self {
            start: Timestamp::from_unix_millis(start),
            width_secs: width.as_secs(),
            samples: 0,
            total: 0.0,
            online: 0.0,
            warning: 0.0,
            offline: 0.0,
            health_percent: 0.0,
            health_min_percent: 100.0,
            last_sample_at: Timestamp::from_unix_millis(start),
        }
    }

    /// Whether `at` falls in this bucket.
    pub fn contains(&self, at: Timestamp) -> bool {
        at >= self.start
            && at
                < self
                    .start
                    .saturating_add(Duration::from_secs(self.width_secs))
    }

    /// Adds one sample taken at `at` (running means).
    pub fn add(&mut self, at: Timestamp, s: &FleetSummary) {
        self.samples += 1;
        self.last_sample_at = self.last_sample_at.max(at);
        let n = self.samples as f64;
        let mean = |m: f64, x: f64| m + (x - m) / n;
        self.total = mean(self.total, s.total as f64);
        self.online = mean(self.online, s.online as f64);
        self.warning = mean(self.warning, s.warning as f64);
        self.offline = mean(self.offline, s.offline as f64);
        self.health_percent = mean(self.health_percent, s.health_percent);
        self.health_min_percent = self.health_min_percent.min(s.health_percent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(online: u64, offline: u64) -> FleetSummary {
        let total = online + offline;
        FleetSummary {
            total,
            online,
            warning: 0,
            offline,
            health_percent: if total == 0 {
                100.0
            } else {
                online as f64 * 100.0 / total as f64
            },
            reporting: 0,
            cpu_avg_percent: None,
            cpu_peak_percent: None,
            memory_used_bytes: 0,
            memory_total_bytes: 0,
            disk_used_bytes: 0,
            disk_total_bytes: 0,
            network_rx_bytes_per_sec: 0,
            network_tx_bytes_per_sec: 0,
        }
    }

    #[test]
    fn buckets_align_and_average() {
        let at = Timestamp::from_unix_secs(7_200 + 1_799);
        let mut b = TrendBucket::containing(at, DEFAULT_TREND_BUCKET);
        assert_eq!(b.start, Timestamp::from_unix_secs(7_200));
        assert!(b.contains(at));
        assert!(!b.contains(Timestamp::from_unix_secs(10_800)));
        b.add(at, &summary(10, 0));
        b.add(at, &summary(5, 5));
        assert_eq!(b.last_sample_at, at);
        assert_eq!(b.samples, 2);
        assert!((b.online - 7.5).abs() < 1e-9);
        assert!((b.health_percent - 75.0).abs() < 1e-9);
        assert_eq!(b.health_min_percent, 50.0);
    }
}
