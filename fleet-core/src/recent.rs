//! Recent metrics: a bounded ring of each instance's latest figures (by default the last hour at
//! heartbeat resolution), for the detail page's graphs.
//!
//! Kept in memory only — never written per heartbeat — and bounded twice: each ring holds
//! `window / resolution` points of 20 bytes (240 points, 4.7 KiB, by default), and all rings
//! together stay under [`RecentMetricsConfig::max_bytes`] (512 MiB by default, about 110,000
//! instances). Instances beyond the budget keep their live figures but no graph history;
//! [`RecentMetricsStats::without_history`] counts them. A fleet of a million that wants graphs for
//! every machine raises the budget or coarsens the resolution (one point a minute is a quarter of
//! the memory). A control-plane restart starts the rings empty.

use std::mem::size_of;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::{InstanceId, Timestamp};

/// How much recent history to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentMetricsConfig {
    /// How far back the rings reach (default one hour).
    pub window: Duration,
    /// Spacing of the points (default 15 s, the default heartbeat interval); samples closer
    /// together than half of it replace the newest point instead of adding one.
    pub resolution: Duration,
    /// Memory budget of all rings together (default 512 MiB); 0 turns the history off.
    pub max_bytes: usize,
}

impl Default for RecentMetricsConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(3600),
            resolution: Duration::from_secs(15),
            max_bytes: 512 << 20,
        }
    }
}

/// One point of an instance's recent figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricsPoint {
    /// When the sample arrived (second resolution).
    pub at: Timestamp,
    /// CPU utilization, percent.
    pub cpu_percent: Option<f64>,
    /// Memory in use, percent of installed.
    pub memory_percent: Option<f64>,
    /// Disk in use, percent of capacity.
    pub disk_percent: Option<f64>,
    /// Inbound traffic, bytes per second.
    pub network_rx_bytes_per_sec: Option<f64>,
    /// Outbound traffic, bytes per second.
    pub network_tx_bytes_per_sec: Option<f64>,
}

const NONE16: u16 = u16::MAX;

/// A point in 20 bytes: seconds, three per-ten-thousand figures, two rates.
#[derive(Debug, Clone, Copy, Default)]
struct Packed {
    secs: u32,
    cpu: u16,
    mem: u16,
    disk: u16,
    rx: f32,
    tx: f32,
}

fn pack_pct(p: Option<f64>) -> u16 {
    p.filter(|p| p.is_finite())
        .map_or(NONE16, |p| (p.clamp(0.0, 100.0) * 100.0).round() as u16)
}

fn unpack_pct(v: u16) -> Option<f64> {
    (v != NONE16).then(|| f64::from(v) / 100.0)
}

impl Packed {
    fn from_point(p: &MetricsPoint) -> Self {
        let rate = |r: Option<f64>| r.map_or(f32::NAN, |r| r as f32);
        Self {
            secs: u32::try_from(p.at.as_unix_secs().max(0)).unwrap_or(u32::MAX),
            cpu: pack_pct(p.cpu_percent),
            mem: pack_pct(p.memory_percent),
            disk: pack_pct(p.disk_percent),
            rx: rate(p.network_rx_bytes_per_sec),
            tx: rate(p.network_tx_bytes_per_sec),
        }
    }

    fn point(&self) -> MetricsPoint {
        let rate = |r: f32| (!r.is_nan()).then_some(f64::from(r));
        MetricsPoint {
            at: Timestamp::from_unix_secs(i64::from(self.secs)),
            cpu_percent: unpack_pct(self.cpu),
            memory_percent: unpack_pct(self.mem),
            disk_percent: unpack_pct(self.disk),
            network_rx_bytes_per_sec: rate(self.rx),
            network_tx_bytes_per_sec: rate(self.tx),
        }
    }
}

#[derive(Debug)]
struct Ring {
    buf: Box<[Packed]>,
    /// Index of the oldest point.
    head: usize,
    len: usize,
}

impl Ring {
    fn newest(&mut self) -> Option<&mut Packed> {
        if self.len == 0 {
            return None;
        }
        let i = (self.head + self.len - 1) % self.buf.len();
        self.buf.get_mut(i)
    }

    fn push(&mut self, p: Packed) {
        let cap = self.buf.len();
        if self.len < cap {
            self.buf[(self.head + self.len) % cap] = p;
            self.len += 1;
        } else {
            self.buf[self.head] = p;
            self.head = (self.head + 1) % cap;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Packed> {
        let cap = self.buf.len();
        (0..self.len).map(move |k| &self.buf[(self.head + k) % cap])
    }
}

/// Figures about the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentMetricsStats {
    /// Instances with a ring.
    pub instances: usize,
    /// Bytes the rings hold.
    pub bytes: usize,
    /// Instances that sent metrics but got no ring because the budget was spent.
    pub without_history: usize,
}

/// The rings; see the module docs.
#[derive(Debug)]
pub(crate) struct RecentMetrics {
    config: RecentMetricsConfig,
    capacity: usize,
    rings: FxHashMap<InstanceId, Ring>,
    refused: rustc_hash::FxHashSet<InstanceId>,
}

impl RecentMetrics {
    pub(crate) fn new(config: RecentMetricsConfig) -> Self {
        let res = config.resolution.max(Duration::from_secs(1));
        let capacity = usize::try_from(config.window.as_secs() / res.as_secs())
            .unwrap_or(usize::MAX)
            .clamp(1, u16::MAX as usize);
        Self {
            config,
            capacity,
            rings: FxHashMap::default(),
            refused: rustc_hash::FxHashSet::default(),
        }
    }

    fn ring_bytes(&self) -> usize {
        self.capacity * size_of::<Packed>()
    }

    pub(crate) fn record(&mut self, id: InstanceId, point: &MetricsPoint) {
        let p = Packed::from_point(point);
        // One point per resolution slot (time ÷ resolution): samples of any interval up to the
        // resolution fill every slot, so the ring spans its whole window.
        let res = u32::try_from(self.config.resolution.as_secs().max(1)).unwrap_or(u32::MAX);
        if let Some(ring) = self.rings.get_mut(&id) {
            match ring.newest() {
                // A sample in the newest point's slot updates its figures and keeps its time.
                Some(last) if p.secs / res == last.secs / res => {
                    *last = Packed {
                        secs: last.secs,
                        ..p
                    };
                }
                _ => ring.push(p),
            }
            return;
        }
        if (self.rings.len() + 1) * self.ring_bytes() > self.config.max_bytes {
            self.refused.insert(id);
            return;
        }
        let mut ring = Ring {
            buf: vec![Packed::default(); self.capacity].into_boxed_slice(),
            head: 0,
            len: 0,
        };
        ring.push(p);
        self.rings.insert(id, ring);
        self.refused.remove(&id);
    }

    /// The points at or after `since`, oldest first.
    pub(crate) fn points(&self, id: InstanceId, since: Timestamp) -> Vec<MetricsPoint> {
        self.rings.get(&id).map_or_else(Vec::new, |r| {
            r.iter()
                .map(Packed::point)
                .filter(|p| p.at >= since)
                .collect()
        })
    }

    pub(crate) fn remove(&mut self, id: InstanceId) {
        self.rings.remove(&id);
        self.refused.remove(&id);
    }

    pub(crate) fn stats(&self) -> RecentMetricsStats {
        RecentMetricsStats {
            instances: self.rings.len(),
            bytes: self.rings.len() * self.ring_bytes(),
            without_history: self.refused.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(secs: i64, cpu: f64) -> MetricsPoint {
        MetricsPoint {
            at: Timestamp::from_unix_secs(secs),
            cpu_percent: Some(cpu),
            memory_percent: None,
            disk_percent: Some(12.345),
            network_rx_bytes_per_sec: Some(1000.0),
            network_tx_bytes_per_sec: None,
        }
    }

    #[test]
    fn rings_keep_the_window_and_replace_close_samples() {
        let mut r = RecentMetrics::new(RecentMetricsConfig {
            window: Duration::from_secs(60),
            resolution: Duration::from_secs(15),
            max_bytes: 1 << 20,
        });
        let id = InstanceId::from_u128(1);
        for k in 0..10 {
            r.record(id, &point(1000 + k * 15, k as f64));
        }
        r.record(id, &point(1000 + 9 * 15 + 3, 99.0));
        let got = r.points(id, Timestamp::UNIX_EPOCH);
        assert_eq!(got.len(), 4, "60 s at 15 s");
        assert_eq!(got[0].at, Timestamp::from_unix_secs(1000 + 6 * 15));
        assert_eq!(
            got[3].cpu_percent,
            Some(99.0),
            "a sample 3 s later replaced the newest"
        );
        assert_eq!(got[3].disk_percent, Some(12.35));
        assert_eq!(got[3].memory_percent, None);
        assert_eq!(got[3].network_tx_bytes_per_sec, None);
        assert_eq!(
            r.points(id, Timestamp::from_unix_secs(1000 + 8 * 15)).len(),
            2
        );
        assert_eq!(size_of::<Packed>(), 20);
    }

    #[test]
    fn samples_faster_than_the_resolution_still_make_a_graph() {
        let mut r = RecentMetrics::new(RecentMetricsConfig {
            window: Duration::from_secs(3600),
            resolution: Duration::from_secs(15),
            max_bytes: 1 << 20,
        });
        let id = InstanceId::from_u128(1);
        // A sample every 5 s for a minute.
        for k in 0..12 {
            r.record(id, &point(1000 + k * 5, k as f64));
        }
        let got = r.points(id, Timestamp::UNIX_EPOCH);
        let at: Vec<i64> = got.iter().map(|p| p.at.as_unix_secs()).collect();
        assert_eq!(
            at,
            [1000, 1005, 1020, 1035, 1050],
            "a point per 15 s slot (990–1004, 1005–1019, …)"
        );
        assert_eq!(got[4].cpu_percent, Some(11.0), "with the newest figures");
    }

    #[test]
    fn the_budget_bounds_the_rings() {
        let mut r = RecentMetrics::new(RecentMetricsConfig {
            window: Duration::from_secs(3600),
            resolution: Duration::from_secs(15),
            max_bytes: 3 * 240 * 20,
        });
        for n in 0..5 {
            r.record(InstanceId::from_u128(n), &point(1000, 1.0));
        }
        let s = r.stats();
        assert_eq!((s.instances, s.bytes, s.without_history), (3, 3 * 4800, 2));
        r.remove(InstanceId::from_u128(0));
        r.record(InstanceId::from_u128(4), &point(1015, 1.0));
        assert_eq!(r.stats().instances, 3);
        assert_eq!(
            r.stats().without_history,
            1,
            "4 got a ring once there was room"
        );
        assert!(
            r.points(InstanceId::from_u128(3), Timestamp::UNIX_EPOCH)
                .is_empty()
        );
    }
}
