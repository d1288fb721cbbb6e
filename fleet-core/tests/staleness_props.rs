//! Property tests of the staleness state machine (`StalenessPolicy::step`).

use std::time::Duration;

use fleet_core::Timestamp;
use fleet_core::staleness::{Event, StalenessPolicy, StalenessState, Status, Transition};
use proptest::prelude::*;

const T0: i64 = 1_700_000_000_000;

fn policy() -> impl Strategy<Value = StalenessPolicy> {
    (1_000u64..120_000, 1u64..600_000, 1u32..4).prop_map(|(warn, extra, recovery)| {
        StalenessPolicy {
            warning_after: Duration::from_millis(warn),
            offline_after: Duration::from_millis(warn + extra),
            heartbeat_interval: None,
            recovery_heartbeats: recovery,
        }
    })
}

fn no_hysteresis() -> impl Strategy<Value = StalenessPolicy> {
    policy().prop_map(|p| StalenessPolicy {
        recovery_heartbeats: 1,
        ..p
    })
}

/// A timeline of events at increasing times: (gap in ms, is heartbeat).
fn timeline() -> impl Strategy<Value = Vec<(u64, bool)>> {
    prop::collection::vec((0u64..700_000, any::<bool>()), 1..60)
}

fn run(p: &StalenessPolicy, events: &[(i64, Event)]) -> (StalenessState, Vec<Transition>) {
    let mut s = StalenessState::new(Timestamp::from_unix_millis(T0));
    let mut all = Vec::new();
    for &(at, ev) in events {
        let (next, tr) = p.step(s, ev, Timestamp::from_unix_millis(at));
        all.extend(tr);
        s = next;
    }
    (s, all)
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg())]

    /// Without hysteresis a heartbeat always yields Online, whatever came before.
    #[test]
    fn heartbeat_always_yields_online(p in no_hysteresis(), tl in timeline(), extra in 0u64..2_000_000) {
        let mut t = T0;
        let mut s = StalenessState::new(Timestamp::from_unix_millis(T0));
        for (gap, hb) in tl {
            t += gap as i64;
            let ev = if hb { Event::Heartbeat } else { Event::Tick };
            s = p.step(s, ev, Timestamp::from_unix_millis(t)).0;
        }
        let (after, _) = p.step(s, Event::Heartbeat, Timestamp::from_unix_millis(t + extra as i64));
        prop_assert_eq!(after.status, Status::Online);
    }

    /// With hysteresis, a heartbeat never makes the status worse, and `recovery_heartbeats`
    /// heartbeats in quick succession always end Online.
    #[test]
    fn hysteresis_recovers_after_enough_quick_heartbeats(p in policy(), silence in 0u64..2_000_000) {
        let s = StalenessState::new(Timestamp::from_unix_millis(T0));
        let mut t = T0 + silence as i64;
        let (mut s, _) = p.step(s, Event::Tick, Timestamp::from_unix_millis(t));
        for _ in 0..p.recovery_heartbeats {
            let before = s.status;
            t += 1;
            s = p.step(s, Event::Heartbeat, Timestamp::from_unix_millis(t)).0;
            prop_assert!(s.status <= before, "a heartbeat made {before:?} worse: {:?}", s.status);
        }
        prop_assert_eq!(s.status, Status::Online);
    }

    /// Without heartbeats the status never improves, for any sequence of tick times — including a
    /// clock that jumps backwards.
    #[test]
    fn status_never_improves_without_heartbeats(
        p in policy(),
        start in prop_oneof![Just(Status::Online), Just(Status::Warning), Just(Status::Offline)],
        ticks in prop::collection::vec(-1_000_000i64..2_000_000, 1..50),
    ) {
        let mut s = StalenessState { status: start, last_heartbeat: Timestamp::from_unix_millis(T0), streak: 0 };
        for dt in ticks {
            let (next, tr) = p.step(s, Event::Tick, Timestamp::from_unix_millis(T0 + dt));
            prop_assert!(next.status >= s.status, "{:?} improved to {:?} without a heartbeat", s.status, next.status);
            prop_assert_eq!(next.last_heartbeat, s.last_heartbeat);
            prop_assert_eq!(tr.is_empty(), next.status == s.status);
            s = next;
        }
    }

    /// Transitions chain (each starts at the previous `to`, the first at Online), are real
    /// changes, and end at the final status.
    #[test]
    fn transitions_chain(p in policy(), tl in timeline()) {
        let mut t = T0;
        let events: Vec<(i64, Event)> = tl.iter().map(|&(gap, hb)| {
            t += gap as i64;
            (t, if hb { Event::Heartbeat } else { Event::Tick })
        }).collect();
        let (last, transitions) = run(&p, &events);
        let mut status = Status::Online;
        for tr in &transitions {
            prop_assert_eq!(tr.from, status);
            prop_assert_ne!(tr.from, tr.to);
            status = tr.to;
        }
        prop_assert_eq!(status, last.status);
    }

    /// Every transition caused by silence happens exactly at the threshold crossing after the
    /// preceding heartbeat; every recovery at a heartbeat's receive time.
    #[test]
    fn transition_times_are_threshold_crossings(p in policy(), tl in timeline()) {
        let mut t = T0;
        let mut last_hb = T0;
        let mut s = StalenessState::new(Timestamp::from_unix_millis(T0));
        for (gap, hb) in tl {
            t += gap as i64;
            let ev = if hb { Event::Heartbeat } else { Event::Tick };
            let (next, tr) = p.step(s, ev, Timestamp::from_unix_millis(t));
            for x in tr {
                let expected = match (x.from, x.to) {
                    (Status::Online, Status::Warning) => last_hb + p.warning_after.as_millis() as i64,
                    (Status::Warning, Status::Offline) => last_hb + p.offline_after.as_millis() as i64 + 1,
                    _ => t, // recoveries (to Online, or to Warning under hysteresis)
                };
                prop_assert_eq!(x.at.as_unix_millis(), expected, "{:?}", x);
                prop_assert!(x.at.as_unix_millis() <= t, "a transition cannot be in the future");
            }
            if hb { last_hb = t; }
            s = next;
        }
        let _ = s;
    }

    /// The transitions and the final status are the same whether sweeps run every second or at
    /// arbitrary random times between the heartbeats.
    #[test]
    fn sweep_schedule_does_not_matter(
        p in policy(),
        heartbeats in prop::collection::vec(0u64..700_000, 1..30),
        random_ticks in prop::collection::vec(0u64..20_000_000, 0..40),
        end in 0u64..900_000,
    ) {
        let mut hb_times = Vec::new();
        let mut t = T0;
        for gap in heartbeats {
            t += gap as i64;
            hb_times.push(t);
        }
        let end = t + end as i64;
        let with_ticks = |ticks: Vec<i64>| {
            let mut events: Vec<(i64, Event)> = hb_times.iter().map(|&h| (h, Event::Heartbeat)).collect();
            events.extend(ticks.into_iter().filter(|&x| x <= end).map(|x| (x, Event::Tick)));
            events.push((end, Event::Tick));
            // Heartbeats before ticks at the same instant: both orders are valid, pick one.
            events.sort_by_key(|&(at, ev)| (at, ev == Event::Tick));
            run(&p, &events)
        };
        let every_second = with_ticks((T0..=end).step_by(1000).collect());
        let random = with_ticks(random_ticks.into_iter().map(|x| T0 + x as i64).collect());
        let none = with_ticks(Vec::new());
        prop_assert_eq!(&every_second, &random);
        prop_assert_eq!(&every_second, &none);
    }
}
