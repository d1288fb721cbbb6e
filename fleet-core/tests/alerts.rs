//! Alert rules over a real store: the start-up grace (a control-plane restart raises no alerts
//! for agents that come back in time), the mass-staleness guard, and fleet trends.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::store::{HistoryStore, InstanceStore, StatusChangeQuery};
use fleet_core::testing::instance;
use fleet_core::{
    AlertPolicy, Clock, Filter, Fleet, FleetAlertKind, FleetAlertQuery, Heartbeat, InstanceId,
    ManualClock, MemoryStore, NewInstance, Status, SystemInfo, TenantScope, Timestamp,
};

const T0: Timestamp = Timestamp::from_unix_secs(1_700_000_000);

async fn open(
    store: &Arc<MemoryStore>,
    clock: &ManualClock,
    alerts: AlertPolicy,
) -> Fleet<Arc<MemoryStore>> {
    Fleet::builder(Arc::clone(store))
        .clock(clock.clone())
        .alerts(alerts)
        .open()
        .await
        .unwrap()
}

async fn all_changes(store: &MemoryStore) -> Vec<fleet_core::StatusChange> {
    store
        .status_changes(&StatusChangeQuery {
            limit: usize::MAX,
            ..StatusChangeQuery::default()
        })
        .await
        .unwrap()
}

/// Runs the restart scenario: 10,000 instances heartbeat, the control plane is down for eight
/// minutes (longer than the offline threshold), restarts, and the agents resume over the next
/// four minutes (within the default grace of five) while it sweeps every ten seconds. Returns
/// the status changes recorded.
async fn restart_scenario(alerts: AlertPolicy) -> (Vec<fleet_core::StatusChange>, Vec<InstanceId>) {
    const N: u32 = 10_000;
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let mut ids = Vec::new();
    for n in 0..N {
        let inst = instance(n);
        ids.push(inst.id);
        store.insert_instance(&inst).await.unwrap();
    }
    let first = open(&store, &clock, alerts.clone()).await;
    clock.advance(Duration::from_secs(10));
    for &id in &ids {
        first.heartbeat(id, Heartbeat::default()).unwrap();
    }
    first.sweep();
    first.flush_heartbeats().await.unwrap();
    drop(first);

    clock.advance(Duration::from_secs(480));
    let second = open(&store, &clock, alerts).await;
    // Agents come back a slice every ten seconds and, once back, heartbeat every ten seconds.
    let step = ids.len() / 24;
    for resumed in (step..=ids.len()).step_by(step) {
        clock.advance(Duration::from_secs(10));
        for &id in &ids[..resumed] {
            second.heartbeat(id, Heartbeat::default()).unwrap();
        }
        second.sweep();
    }
    // Well past the grace, everyone keeps heartbeating.
    for _ in 0..60 {
        clock.advance(Duration::from_secs(10));
        for &id in &ids {
            second.heartbeat(id, Heartbeat::default()).unwrap();
        }
        second.sweep();
    }
    second.flush_heartbeats().await.unwrap();
    assert_eq!(
        second.summary(&Filter::all(), &TenantScope::All).online,
        u64::from(N)
    );
    (all_changes(&store).await, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_10000_instances_resuming_within_the_grace_records_no_alerts() {
    let (changes, _) = restart_scenario(AlertPolicy::default()).await;
    let offline = changes
        .iter()
        .filter(|c| c.transition.to == Status::Offline)
        .count();
    assert_eq!(offline, 0, "no offline alerts");
    assert!(
        changes.is_empty(),
        "no alerts at all: {:?}",
        &changes[..changes.len().min(3)]
    );
}

/// The same scenario with the grace turned off shows what it prevents: every instance comes
/// back "recovering" from an outage that was the control plane's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_grace_the_same_restart_is_an_alert_storm() {
    let (changes, _) = restart_scenario(AlertPolicy {
        startup_grace: Some(Duration::ZERO),
        ..AlertPolicy::default()
    })
    .await;
    assert!(changes.len() >= 10_000, "{} changes", changes.len());
}

/// An instance that does not come back is still marked offline once the grace ends, at its
/// exact threshold-crossing time; one that was already offline before the restart stays
/// offline; one registered after the restart is judged normally during the grace.
#[tokio::test]
async fn the_grace_only_protects_instances_that_could_not_reach_the_control_plane() {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let first = open(&store, &clock, AlertPolicy::default()).await;
    let reg = |h: &str| NewInstance {
        system: SystemInfo::with_hostname(h),
        ..NewInstance::default()
    };
    let long_gone = first.register(reg("long-gone")).await.unwrap().id;
    clock.advance(Duration::from_secs(400));
    let silent = first.register(reg("silent")).await.unwrap().id;
    let back = first.register(reg("back")).await.unwrap().id;
    first.sweep();
    first.flush_heartbeats().await.unwrap();
    assert_eq!(first.view().status(long_gone), Some(Status::Offline));
    drop(first);

    clock.advance(Duration::from_secs(120));
    let started = clock.now();
    let second = open(&store, &clock, AlertPolicy::default()).await;
    assert_eq!(
        second.view().status(silent),
        Some(Status::Online),
        "shown online in the grace"
    );
    assert_eq!(second.view().status(long_gone), Some(Status::Offline));
    let fresh = second.register(reg("fresh")).await.unwrap().id;
    clock.advance(Duration::from_secs(61));
    second.heartbeat(back, Heartbeat::default()).unwrap();
    let during = second.sweep();
    assert_eq!(
        during.len(),
        1,
        "only the instance registered after the start: {during:?}"
    );
    assert_eq!(during[0].instance, fresh);
    assert_eq!(second.view().status(silent), Some(Status::Online));

    clock.set(started.saturating_add(Duration::from_secs(300)));
    second.heartbeat(back, Heartbeat::default()).unwrap();
    let after = second.sweep();
    let of_silent: Vec<_> = after.iter().filter(|c| c.instance == silent).collect();
    assert_eq!(of_silent.len(), 2, "{after:?}");
    assert_eq!(of_silent[1].transition.to, Status::Offline);
    let last_seen = T0.saturating_add(Duration::from_secs(400));
    assert_eq!(
        of_silent[1].transition.at,
        last_seen.saturating_add(Duration::from_millis(300_001)),
        "the exact crossing time"
    );
    assert!(after.iter().all(|c| c.instance != back));
    assert_eq!(second.view().status(back), Some(Status::Online));
}

/// A partition, as it really looks: 100 agents heartbeat every 15 s at spread-out moments, the
/// control plane sweeps every second. First four machines die (four alerts, released after the
/// guard's window); later 60 more are cut off at once — their crossings spread over 15 s — and
/// observers get one fleet alert instead of 60, while the history records every change.
#[tokio::test]
async fn a_partition_raises_one_fleet_alert_and_single_failures_raise_their_own() {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let fleet = open(&store, &clock, AlertPolicy::default()).await;
    let mut ids = Vec::new();
    for n in 0..100 {
        let inst = fleet
            .register(NewInstance {
                system: SystemInfo::with_hostname(format!("h{n}")),
                ..NewInstance::default()
            })
            .await
            .unwrap();
        ids.push(inst.id);
    }
    // `alive(i)`: whether agent i still heartbeats; agent i heartbeats when k % 15 == i % 15.
    let run = |from: u64, to: u64, alive: &dyn Fn(usize) -> bool| {
        let (mut released, mut fleet_alerts) = (Vec::new(), Vec::new());
        for k in from..to {
            clock.set(T0.saturating_add(Duration::from_secs(k)));
            for (i, &id) in ids.iter().enumerate() {
                if alive(i) && (k as usize) % 15 == i % 15 {
                    fleet.heartbeat(id, Heartbeat::default()).unwrap();
                }
            }
            let report = fleet.sweep_report();
            released.extend(report.alerts);
            fleet_alerts.extend(report.fleet_alert);
        }
        (released, fleet_alerts)
    };
    let (released, fleet_alerts) = run(1, 120, &|_| true);
    assert!(released.is_empty() && fleet_alerts.is_empty());
    let (mut released, fleet_alerts) = run(120, 300, &|i| i >= 4);
    assert_eq!(released.len(), 4, "four machines died: four warnings");
    assert!(fleet_alerts.is_empty());
    let (more, fleet_alerts) = run(300, 420, &|i| i >= 64);
    released.extend(more);
    let alert = fleet_alerts.first().cloned().expect("a fleet alert");
    assert_eq!(fleet_alerts.len(), 1, "{fleet_alerts:?}");
    assert_eq!(alert.kind, FleetAlertKind::MassStaleness);
    assert!(alert.affected > 50 && alert.affected <= 60, "{alert:?}");
    assert_eq!(alert.fleet_size, 100);
    assert!(
        released.iter().all(|c| ids[..4].contains(&c.instance)),
        "no per-instance alert for the 60"
    );
    fleet.flush_heartbeats().await.unwrap();
    let stored = fleet
        .fleet_alerts(&FleetAlertQuery {
            limit: 10,
            ..FleetAlertQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(stored, vec![alert]);
    let recorded = all_changes(&store).await;
    let warnings = recorded
        .iter()
        .filter(|c| c.transition.to == Status::Warning)
        .count();
    assert_eq!(
        warnings, 64,
        "history stays exact: every instance's warning is recorded"
    );
}

#[tokio::test]
async fn trends_average_each_bucket_and_survive_a_restart() {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_700_002_800)); // on the hour
    let fleet = Fleet::builder(Arc::clone(&store))
        .clock(clock.clone())
        .alerts(AlertPolicy::default())
        .open()
        .await
        .unwrap();
    let a = fleet
        .register(NewInstance {
            system: SystemInfo::with_hostname("a"),
            ..NewInstance::default()
        })
        .await
        .unwrap()
        .id;
    // Half an hour online (sampled every minute), then offline.
    for _ in 0..30 {
        clock.advance(Duration::from_secs(60));
        fleet.heartbeat(a, Heartbeat::default()).unwrap();
        fleet.sweep();
    }
    for _ in 0..29 {
        clock.advance(Duration::from_secs(60));
        fleet.sweep();
    }
    fleet.flush_heartbeats().await.unwrap();
    let start = Timestamp::from_unix_secs(1_700_002_800);
    let hour = Duration::from_secs(3600);
    let got = fleet
        .trends(start, start.saturating_add(hour))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let b = &got[0];
    assert_eq!(b.samples, 59);
    // Online for 30 samples, warning for 5 (60 to 300 s of silence), offline for 24.
    assert!((b.online - 30.0 / 59.0).abs() < 1e-9, "{b:?}");
    assert!((b.warning - 5.0 / 59.0).abs() < 1e-9, "{b:?}");
    assert!(
        (b.health_percent - 100.0 * 30.0 / 59.0).abs() < 1e-9,
        "{b:?}"
    );
    assert_eq!(b.health_min_percent, 0.0);
    drop(fleet);
    // A restart within the hour continues the same bucket.
    let again = Fleet::builder(Arc::clone(&store))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    again.sweep();
    let got = again
        .trends(start, start.saturating_add(hour))
        .await
        .unwrap();
    assert_eq!(got[0].samples, 60);
    clock.advance(Duration::from_secs(120));
    again.sweep();
    again.flush_heartbeats().await.unwrap();
    let got = again
        .trends(start, start.saturating_add(hour * 2))
        .await
        .unwrap();
    assert_eq!(got.len(), 2, "the next hour has its own bucket");
    assert_eq!(got[1].samples, 1);
}

/// An instance the previous control plane saw go offline stays offline after a restart (the
/// horizon is the previous control plane's last sweep, not the last heartbeat), and its return
/// is recorded as a recovery — the history stays consistent.
#[tokio::test]
async fn an_instance_offline_before_the_restart_recovers_visibly() {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let first = open(&store, &clock, AlertPolicy::default()).await;
    let lost = first
        .register(NewInstance {
            system: SystemInfo::with_hostname("lost"),
            ..NewInstance::default()
        })
        .await
        .unwrap()
        .id;
    for _ in 0..10 {
        clock.advance(Duration::from_secs(60));
        first.sweep();
    }
    first.flush_heartbeats().await.unwrap();
    assert_eq!(first.view().status(lost), Some(Status::Offline));
    drop(first);

    clock.advance(Duration::from_secs(120));
    let second = open(&store, &clock, AlertPolicy::default()).await;
    assert_eq!(
        second.view().status(lost),
        Some(Status::Offline),
        "as it was at the horizon"
    );
    clock.advance(Duration::from_secs(5));
    let ack = second.heartbeat(lost, Heartbeat::default()).unwrap();
    let back: Vec<_> = ack.transitions.iter().collect();
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(
        (back[0].from, back[0].to),
        (Status::Offline, Status::Online)
    );
    second.flush_heartbeats().await.unwrap();
    let changes = all_changes(&store).await;
    let path: Vec<(Status, Status)> = changes
        .iter()
        .rev()
        .map(|c| (c.transition.from, c.transition.to))
        .collect();
    assert_eq!(
        path,
        vec![
            (Status::Online, Status::Warning),
            (Status::Warning, Status::Offline),
            (Status::Offline, Status::Online)
        ]
    );
}

/// Alerts for a tenant (or a filter) are found by reading the store newest first a page at a
/// time: the newest changes of the tenant come back even when thousands of other tenants'
/// changes are newer, and even when a page boundary cuts a millisecond shared by many changes.
#[tokio::test]
async fn scoped_alerts_of_a_few_instances_in_a_long_history() {
    scoped_alerts_in_a_long_history(1).await;
}

/// More instances than are read one by one: the history is paged.
#[tokio::test]
async fn scoped_alerts_page_through_a_long_history() {
    scoped_alerts_in_a_long_history(100).await;
}

async fn scoped_alerts_in_a_long_history(acme_instances: usize) {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let fleet = open(&store, &clock, AlertPolicy::default()).await;
    let acme = fleet_core::TenantId::new("acme").unwrap();
    let mut ids = Vec::new();
    for n in 0..acme_instances {
        let id = fleet
            .register(NewInstance {
                tenant: Some(acme.clone()),
                system: SystemInfo::with_hostname(format!("acme-{n:02}")),
                ..NewInstance::default()
            })
            .await
            .unwrap()
            .id;
        ids.push(id);
    }
    let mine = ids[0];
    let change = |instance: InstanceId, at: Timestamp, n: usize| fleet_core::StatusChange {
        instance,
        transition: fleet_core::Transition {
            from: Status::ALL[n % 3],
            to: Status::ALL[(n + 1) % 3],
            at,
        },
    };
    let at = |secs: u64| T0.saturating_add(Duration::from_secs(secs));
    // Three of acme's, oldest; one in the crowded millisecond below.
    let mut changes: Vec<_> = (0..3).map(|n| change(mine, at(10 + n as u64), n)).collect();
    changes.push(change(mine, at(500), 0));
    // 2,500 others' changes in one millisecond (a page of 1,000 cuts it), and 3,000 newer ones.
    changes
        .extend((0..2_500).map(|n| change(InstanceId::from_u128(1_000 + n as u128), at(500), n)));
    changes.extend((0..3_000).map(|n| {
        change(
            InstanceId::from_u128(10_000 + n as u128),
            at(1_000 + n as u64),
            n,
        )
    }));
    store.record_status_changes(&changes).await.unwrap();

    let scope = TenantScope::Tenant(acme);
    let query = |limit| StatusChangeQuery {
        limit,
        ..StatusChangeQuery::default()
    };
    let got = fleet.status_changes(&scope, &query(2)).await.unwrap();
    assert_eq!(
        got.iter().map(|c| c.transition.at).collect::<Vec<_>>(),
        [at(500), at(12)],
        "the newest two of acme's, one from inside the cut millisecond"
    );
    let got = fleet.status_changes(&scope, &query(100)).await.unwrap();
    assert_eq!(got.len(), 4, "all of acme's and nothing else");
    assert!(got.iter().all(|c| c.instance == mine));
    // The same through a filter as a global operator; and an empty answer for no match.
    let filter = Filter::parse("text:acme-00").unwrap();
    let got = fleet
        .status_changes_matching(&TenantScope::All, &query(3), &filter)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    let none = Filter::parse("text:nobody").unwrap();
    let got = fleet
        .status_changes_matching(&TenantScope::All, &query(3), &none)
        .await
        .unwrap();
    assert!(got.is_empty());
}
