//! Metrics samples that heartbeats carry, and network rates derived from them.
//!
//! A heartbeat may carry no sample at all (liveness only), and a sample may carry any subset of
//! fields. Network traffic is reported as monotonically increasing byte counters; the control plane
//! turns two consecutive samples into rates using **its own** receive times, never the agent's
//! clock. A counter that goes backwards (the agent restarted, the interface was reset) yields no
//! rate for that interval rather than a huge bogus one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::error::ValidationError;

/// One metrics report from an instance. Every field is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSample {
    /// Whole-machine CPU utilization, 0–100.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Memory in use, bytes.
    #[serde(default)]
    pub memory_used_bytes: Option<u64>,
    /// Memory installed, bytes.
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
    /// Disk space in use, bytes.
    #[serde(default)]
    pub disk_used_bytes: Option<u64>,
    /// Disk capacity, bytes.
    #[serde(default)]
    pub disk_total_bytes: Option<u64>,
    /// Bytes received since some fixed point (a counter, not a rate).
    #[serde(default)]
    pub network_rx_bytes: Option<u64>,
    /// Bytes sent since some fixed point (a counter, not a rate).
    #[serde(default)]
    pub network_tx_bytes: Option<u64>,
    /// Seconds since the instance booted.
    #[serde(default)]
    pub uptime_secs: Option<u64>,
    /// 1-minute load average.
    #[serde(default)]
    pub load_1m: Option<f64>,
    /// 5-minute load average.
    #[serde(default)]
    pub load_5m: Option<f64>,
    /// 15-minute load average.
    #[serde(default)]
    pub load_15m: Option<f64>,
    /// The agent's own clock when it took the sample. Kept only to measure clock skew; never used
    /// for staleness or rates.
    #[serde(default)]
    pub agent_time: Option<Timestamp>,
}

/// The largest value an integer metric (bytes, counters, uptime) may carry: `u64::MAX − 1`.
/// Larger values are refused rather than altered, so every accepted value is shown exactly as
/// it was reported.
pub const MAX_METRIC_INTEGER: u64 = u64::MAX - 1;

fn pair_ok(used: Option<u64>, total: Option<u64>) -> bool {
    match (used, total) {
        (Some(u), Some(t)) => u <= t,
        _ => true,
    }
}

impl MetricsSample {
    /// Checks the documented ranges: CPU within 0–100, loads finite and non-negative, integers at
    /// most [`MAX_METRIC_INTEGER`], used ≤ total for memory and disk when both are given. Every
    /// value that passes is kept and shown exactly as reported (CPU in aggregates at 0.1 %).
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (what, v) in [
            ("memory_used_bytes", self.memory_used_bytes),
            ("memory_total_bytes", self.memory_total_bytes),
            ("disk_used_bytes", self.disk_used_bytes),
            ("disk_total_bytes", self.disk_total_bytes),
            ("network_rx_bytes", self.network_rx_bytes),
            ("network_tx_bytes", self.network_tx_bytes),
            ("uptime_secs", self.uptime_secs),
        ] {
            if let Some(v) = v
                && v > MAX_METRIC_INTEGER
            {
                return Err(ValidationError::new(
                    what,
                    v.to_string(),
                    "must be an integer from 0 to 18446744073709551614 (u64::MAX - 1)",
                ));
            }
        }
        if let Some(c) = self.cpu_percent
            && !(c.is_finite() && (0.0..=100.0).contains(&c))
        {
            return Err(ValidationError::new(
                "cpu_percent",
                c.to_string(),
                "must be a number from 0 to 100",
            ));
        }
        for (what, v) in [
            ("load_1m", self.load_1m),
            ("load_5m", self.load_5m),
            ("load_15m", self.load_15m),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(ValidationError::new(
                    what,
                    v.to_string(),
                    "must be a finite number >= 0",
                ));
            }
        }
        if !pair_ok(self.memory_used_bytes, self.memory_total_bytes) {
            return Err(ValidationError::new(
                "memory_used_bytes",
                format!("{:?}", self.memory_used_bytes),
                "must not exceed memory_total_bytes",
            ));
        }
        if !pair_ok(self.disk_used_bytes, self.disk_total_bytes) {
            return Err(ValidationError::new(
                "disk_used_bytes",
                format!("{:?}", self.disk_used_bytes),
                "must not exceed disk_total_bytes",
            ));
        }
        Ok(())
    }

    /// Whether the sample carries no field at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Network throughput of one instance over the interval between two samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkRates {
    /// Inbound bytes per second, if both samples had an rx counter and it did not go backwards.
    pub rx_bytes_per_sec: Option<u64>,
    /// Outbound bytes per second, if both samples had a tx counter and it did not go backwards.
    pub tx_bytes_per_sec: Option<u64>,
}

/// A counter reading at a server-observed time, the input of [`NetworkRates::between`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterReading {
    /// Server time at which the sample was received.
    pub at: Timestamp,
    /// rx counter.
    pub rx: Option<u64>,
    /// tx counter.
    pub tx: Option<u64>,
}

fn rate(prev: Option<u64>, next: Option<u64>, elapsed: Duration) -> Option<u64> {
    let delta = next?.checked_sub(prev?)?;
    let millis = elapsed.as_millis();
    if millis == 0 {
        return None;
    }
    u64::try_from(u128::from(delta) * 1000 / millis).ok()
}

impl NetworkRates {
    /// Rates between two readings, by server receive time. No rate when the interval is not
    /// positive or a counter went backwards (reset).
    pub fn between(prev: CounterReading, next: CounterReading) -> Self {
        let elapsed = next.at.duration_since(prev.at);
        Self {
            rx_bytes_per_sec: rate(prev.rx, next.rx, elapsed),
            tx_bytes_per_sec: rate(prev.tx, next.tx, elapsed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(secs: i64, rx: u64, tx: u64) -> CounterReading {
        CounterReading {
            at: Timestamp::from_unix_secs(secs),
            rx: Some(rx),
            tx: Some(tx),
        }
    }

    #[test]
    fn rates_from_counters() {
        let r = NetworkRates::between(reading(0, 1000, 0), reading(10, 11_000, 500));
        assert_eq!(r.rx_bytes_per_sec, Some(1000));
        assert_eq!(r.tx_bytes_per_sec, Some(50));
    }

    #[test]
    fn counter_reset_and_zero_interval_yield_no_rate() {
        let r = NetworkRates::between(reading(0, 1000, 10), reading(10, 5, 20));
        assert_eq!(r.rx_bytes_per_sec, None);
        assert_eq!(r.tx_bytes_per_sec, Some(1));
        let r = NetworkRates::between(reading(10, 0, 0), reading(10, 5, 5));
        assert_eq!(r, NetworkRates::default());
        // Clock stepped backwards: no rate either.
        let r = NetworkRates::between(reading(10, 0, 0), reading(5, 5, 5));
        assert_eq!(r, NetworkRates::default());
    }

    #[test]
    fn validation() {
        let ok = MetricsSample {
            cpu_percent: Some(12.5),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        for bad in [
            MetricsSample {
                cpu_percent: Some(100.5),
                ..Default::default()
            },
            MetricsSample {
                cpu_percent: Some(f64::NAN),
                ..Default::default()
            },
            MetricsSample {
                load_5m: Some(-1.0),
                ..Default::default()
            },
            MetricsSample {
                memory_used_bytes: Some(3),
                memory_total_bytes: Some(2),
                ..Default::default()
            },
            MetricsSample {
                disk_used_bytes: Some(3),
                disk_total_bytes: Some(2),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<MetricsSample>(r#"{"cpu":1}"#).is_err());
        let m: MetricsSample = serde_json::from_str(r#"{"cpu_percent":1.5}"#).unwrap();
        assert_eq!(m.cpu_percent, Some(1.5));
    }
}
