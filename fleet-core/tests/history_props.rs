//! Uptime from status intervals equals a brute-force per-second simulation, for random heartbeat
//! timelines and windows.

use std::time::Duration;

use fleet_core::Timestamp;
use fleet_core::history::History;
use fleet_core::staleness::{Event, StalenessPolicy, StalenessState, Status};
use proptest::prelude::*;

const T0: i64 = 1_700_000_000;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn uptime_from_intervals_equals_per_second_simulation(
        gaps in prop::collection::vec(1i64..900, 0..40),
        sweeps in prop::collection::vec(0i64..20_000, 0..30),
        window in (0i64..20_000, 1i64..20_000),
    ) {
        let policy = StalenessPolicy::default();
        // Heartbeats at whole seconds (registration is the first contact).
        let mut beats = vec![T0];
        for g in gaps {
            let last = *beats.last().unwrap_or(&T0);
            beats.push(last + g);
        }
        let end = beats.last().copied().unwrap_or(T0) + 1_000;

        // The staleness machine, driven by heartbeats and sweeps at arbitrary times, records
        // transitions into a history.
        let mut events: Vec<(i64, Event)> = beats.iter().skip(1).map(|&b| (b, Event::Heartbeat)).collect();
        events.extend(sweeps.into_iter().map(|s| (T0 + s, Event::Tick)).filter(|&(at, _)| at <= end));
        events.push((end, Event::Tick));
        events.sort_by_key(|&(at, ev)| (at, ev == Event::Tick));
        let mut state = StalenessState::new(Timestamp::from_unix_secs(T0));
        let mut history = History::new(Timestamp::from_unix_secs(T0), Status::Online);
        for (at, ev) in events {
            let (next, transitions) = policy.step(state, ev, Timestamp::from_unix_secs(at));
            for tr in transitions {
                history.record(tr).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            state = next;
        }

        // Brute force: the status at every whole second, from the last heartbeat at or before it.
        let (w_from, w_len) = window;
        let from = T0 + w_from - 2_000;
        let to = (from + w_len).min(end);
        let mut online = 0u64;
        let mut observed = 0u64;
        for s in from.max(T0)..to {
            observed += 1;
            let last = beats.iter().rev().find(|&&b| b <= s).copied().unwrap_or(T0);
            if policy.status_at(Timestamp::from_unix_secs(last), Timestamp::from_unix_secs(s)) == Status::Online {
                online += 1;
            }
        }
        let exact = history.time_in(Status::Online, Timestamp::from_unix_secs(from.max(T0)), Timestamp::from_unix_secs(to.max(from.max(T0))));
        prop_assert_eq!(exact, Duration::from_secs(online));
        let pct = history.uptime_percent(Timestamp::from_unix_secs(from), Timestamp::from_unix_secs(to));
        if observed == 0 {
            prop_assert_eq!(pct, None);
        } else {
            let expected = online as f64 * 100.0 / observed as f64;
            let got = pct.unwrap_or(f64::NAN);
            prop_assert!((got - expected).abs() < 1e-9, "uptime {got} vs brute force {expected}");
        }
    }
}
