//! `Timestamp`: a point in server time with millisecond resolution.
//!
//! Every time the library reasons about (last seen, threshold crossings, expiry) is a
//! `Timestamp` read from a [`Clock`](crate::Clock) on the control plane — never a time an agent
//! reported. Arithmetic saturates instead of panicking, so a clock stepped far backwards or
//! forwards can never crash a request.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch (UTC), as observed by the control plane.
///
/// Serialized as an RFC 3339 string (`"2026-11-24T15:35:37.123Z"`); parsed from the same.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch, 1970-01-01T00:00:00Z.
    pub const UNIX_EPOCH: Self = Self(0);

    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_unix_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// A timestamp from whole seconds since the Unix epoch.
    pub const fn from_unix_secs(secs: i64) -> Self {
        Self(secs.saturating_mul(1000))
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_unix_millis(self) -> i64 {
        self.0
    }

    /// Whole seconds since the Unix epoch (rounded towards negative infinity).
    pub const fn as_unix_secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// This timestamp moved forward by `d` (saturating).
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_millis(d)))
    }

    /// This timestamp moved backward by `d` (saturating).
    pub fn saturating_sub(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(duration_millis(d)))
    }

    /// Time elapsed from `earlier` to `self`; zero if `earlier` is not before `self`.
    pub fn duration_since(self, earlier: Self) -> Duration {
        let diff = self.0.saturating_sub(earlier.0);
        Duration::from_millis(u64::try_from(diff).unwrap_or(0))
    }

    /// Converts a `SystemTime`, truncating to milliseconds and saturating far outside the
    /// representable range (about ±292 million years).
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(after) => Self(duration_millis(after)),
            Err(before) => Self(duration_millis(before.duration()).saturating_neg()),
        }
    }

    /// Converts to a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        let magnitude = Duration::from_millis(self.0.unsigned_abs());
        if self.0 >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            UNIX_EPOCH - magnitude
        }
    }

    /// Converts to a `time::OffsetDateTime` in UTC, or `None` if it is outside the range the
    /// `time` crate represents (years −9999..=9999).
    pub fn to_offset_date_time(self) -> Option<time::OffsetDateTime> {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000).ok()
    }

    /// Converts from a `time::OffsetDateTime`, truncating to milliseconds.
    pub fn from_offset_date_time(t: time::OffsetDateTime) -> Self {
        let millis = t.unix_timestamp_nanos().div_euclid(1_000_000);
        Self(i64::try_from(millis).unwrap_or(if millis < 0 { i64::MIN } else { i64::MAX }))
    }

    /// Formats as RFC 3339 with millisecond precision, e.g. `2026-11-24T15:35:37.123Z`.
    /// Timestamps outside years 0..=9999 print as `@<millis>ms` so that printing never fails.
    pub fn to_rfc3339(self) -> String {
        self.to_string()
    }

    /// Parses an RFC 3339 timestamp.
    pub fn parse_rfc3339(s: &str) -> Result<Self, time::error::Parse> {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)?;
        Ok(Self::from_offset_date_time(t))
    }
}

fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(t) = self.to_offset_date_time() else {
            return write!(f, "@{}ms", self.0);
        };
        let (year, month, day) = (t.year(), u8::from(t.month()), t.day());
        if !(0..=9999).contains(&year) {
            return write!(f, "@{}ms", self.0);
        }
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl Serialize for Timestamp {
    /// RFC 3339 text in human-readable formats (JSON); milliseconds as an `i64` in binary ones.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if !deserializer.is_human_readable() {
            return i64::deserialize(deserializer).map(Self);
        }
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        if let Some(ms) = s.strip_prefix('@').and_then(|r| r.strip_suffix("ms")) {
            return ms.parse().map(Self).map_err(serde::de::Error::custom);
        }
        Self::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_rfc3339_with_millis() {
        let t = Timestamp::from_unix_millis(1_700_000_000_123);
        assert_eq!(t.to_string(), "2023-11-14T22:13:20.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.to_string()).ok(), Some(t));
    }

    #[test]
    fn arithmetic_saturates() {
        let max = Timestamp::from_unix_millis(i64::MAX);
        assert_eq!(max.saturating_add(Duration::from_secs(1)), max);
        let min = Timestamp::from_unix_millis(i64::MIN);
        assert_eq!(min.saturating_sub(Duration::from_secs(1)), min);
        assert_eq!(min.duration_since(max), Duration::ZERO);
        assert_eq!(max.to_string(), format!("@{}ms", i64::MAX));
    }

    #[test]
    fn serde_round_trip_including_out_of_range() {
        for ms in [0, -1, 1_700_000_000_000, i64::MAX, i64::MIN] {
            let t = Timestamp::from_unix_millis(ms);
            let json = serde_json::to_string(&t).unwrap();
            let back: Timestamp = serde_json::from_str(&json).unwrap();
            assert_eq!(back, t, "{json}");
        }
    }

    #[test]
    fn system_time_round_trip() {
        for ms in [0, 1, -1_500, 1_700_000_000_999] {
            let t = Timestamp::from_unix_millis(ms);
            assert_eq!(Timestamp::from_system_time(t.to_system_time()), t);
        }
    }
}
