//! Several control-plane replicas on one database.

use std::sync::Arc;

use fleet_core::testing::{DynStore, racing_enrollments_across};
use fleet_store_postgres::PgStore;
use fleet_store_postgres::testing::TestDatabase;

async fn stores(db: &TestDatabase, n: usize) -> Vec<DynStore> {
    let mut out: Vec<DynStore> = Vec::new();
    for _ in 0..n {
        let s = PgStore::connect(&db.url).await.expect("connect");
        s.migrate().await.expect("migrate");
        out.push(Arc::new(s));
    }
    out
}

/// 200 racing enrollments spread over two `Fleet`s, each with its own pool: a token with
/// `max_uses = k` registers exactly k instances (k = 1, 7, 50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_enrollments_over_two_replicas() {
    for k in [1, 7, 50] {
        let db = TestDatabase::create_or_panic().await;
        racing_enrollments_across(stores(&db, 2).await, k).await;
    }
}

/// Heartbeats that reach replica A reach replica B's view through the store's heartbeat log:
/// B keeps the instance online (its own sweeps find nothing), with A's last-seen time and
/// metrics, and records no status change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_see_each_others_heartbeats() {
    use std::time::Duration;

    use fleet_core::store::{HistoryStore, StatusChangeQuery};
    use fleet_core::{
        Clock, Fleet, Heartbeat, ManualClock, MetricsSample, NewInstance, Status, SystemInfo,
        TenantScope, Timestamp,
    };
    let db = TestDatabase::create_or_panic().await;
    let s = stores(&db, 2).await;
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let open = |store: DynStore| {
        Fleet::builder(store)
            .key_encryption_key(fleet_core::testing::kek())
            .clock(clock.clone())
            .open()
    };
    let a = open(Arc::clone(&s[0])).await.expect("a");
    let b = open(Arc::clone(&s[1])).await.expect("b");
    let x = a
        .register(NewInstance {
            system: SystemInfo::with_hostname("x"),
            ..NewInstance::default()
        })
        .await
        .expect("register")
        .id;
    b.sync().await.expect("sync");
    for k in 0..10 {
        clock.advance(Duration::from_secs(15));
        let metrics = MetricsSample {
            cpu_percent: Some(f64::from(k)),
            ..MetricsSample::default()
        };
        a.heartbeat(
            x,
            Heartbeat {
                metrics: Some(metrics),
                apps: None,
            },
        )
        .expect("heartbeat");
        a.flush_heartbeats().await.expect("flush");
        b.sync().await.expect("sync");
        assert!(b.sweep().is_empty(), "round {k}: b sees x alive");
    }
    let seen = b.get(&TenantScope::All, x).expect("x on b");
    assert_eq!(seen.status, Status::Online);
    assert_eq!(seen.last_seen, clock.now());
    assert_eq!(seen.metrics.and_then(|m| m.cpu_percent), Some(9.0));
    let points = b
        .recent_metrics(&TenantScope::All, x, Timestamp::UNIX_EPOCH)
        .expect("points");
    assert_eq!(points.len(), 10);
    // Without the log b would have swept x to warning after 60 s: one way to see it is gone.
    b.flush_heartbeats().await.expect("flush");
    let changes = s[1]
        .status_changes(&StatusChangeQuery {
            limit: 10,
            ..StatusChangeQuery::default()
        })
        .await
        .expect("changes");
    assert!(changes.is_empty(), "{changes:?}");
}

/// The lease: one holder at a time, renewable by its holder, taken over once expired or
/// released, the epoch growing at each change of hands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_have_one_holder_at_a_time() {
    use std::time::Duration;

    use fleet_core::Timestamp;
    use fleet_core::store::ChangeFeed;
    let db = TestDatabase::create_or_panic().await;
    let s = stores(&db, 2).await;
    let t = |secs: i64| Timestamp::from_unix_secs(1_790_000_000 + secs);
    let ttl = Duration::from_secs(10);
    let take = |i: usize, who: &'static str, at| {
        let s = Arc::clone(&s[i]);
        async move {
            s.acquire_lease("sweeper", who, at, ttl)
                .await
                .expect("lease")
        }
    };
    assert_eq!(take(0, "a", t(0)).await, Some(1));
    assert_eq!(take(1, "b", t(1)).await, None, "held by a");
    assert_eq!(take(0, "a", t(5)).await, Some(1), "renewed");
    assert_eq!(take(1, "b", t(14)).await, None, "a renewed until 15 s");
    assert_eq!(take(1, "b", t(15)).await, Some(2), "expired: b takes it");
    assert_eq!(take(0, "a", t(16)).await, None);
    s[1].release_lease("sweeper", "b").await.expect("release");
    assert_eq!(
        take(0, "a", t(17)).await,
        Some(3),
        "released: a takes it at once"
    );

    // Racing claims: exactly one wins.
    let mut tasks = Vec::new();
    for n in 0..16 {
        let s = Arc::clone(&s[n % 2]);
        tasks.push(tokio::spawn(async move {
            s.acquire_lease("other", &format!("r{n}"), t(100), ttl)
                .await
                .expect("lease")
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.expect("task").is_some());
    }
    assert_eq!(winners, 1);
}

/// Two replicas sweep the same fleet: only the sweeper records; when it dies the other takes
/// the lease after it expires and goes on recording — no status change twice, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_moves_to_another_replica_when_the_sweeper_dies() {
    use std::time::Duration;

    use fleet_core::store::{HistoryStore, StatusChangeQuery};
    use fleet_core::{Fleet, Heartbeat, ManualClock, NewInstance, Status, SystemInfo, Timestamp};
    let db = TestDatabase::create_or_panic().await;
    let s = stores(&db, 2).await;
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let open = |store: DynStore| {
        Fleet::builder(store)
            .key_encryption_key(fleet_core::testing::kek())
            .clock(clock.clone())
            .sweep_lag(Duration::from_secs(1))
            .open()
    };
    let a = open(Arc::clone(&s[0])).await.expect("a");
    let b = open(Arc::clone(&s[1])).await.expect("b");
    let ttl = Duration::from_secs(10);
    assert!(a.claim_sweeper(ttl).await.expect("claim"));
    assert!(!b.claim_sweeper(ttl).await.expect("claim"));
    let x = a
        .register(NewInstance {
            system: SystemInfo::with_hostname("x"),
            ..NewInstance::default()
        })
        .await
        .expect("register")
        .id;
    b.sync().await.expect("sync");
    // x heartbeats to a for two minutes while b, cut off from the log, thinks x is silent: b's
    // sweeps find x stale, but b is not the sweeper, so nothing false is recorded.
    for _ in 0..24 {
        clock.advance(Duration::from_secs(5));
        a.heartbeat(x, Heartbeat::default()).expect("heartbeat");
        a.claim_sweeper(ttl).await.expect("claim");
        a.sweep_report();
        a.flush_heartbeats().await.expect("flush");
        b.sweep_report();
        b.flush_heartbeats().await.expect("flush");
    }
    assert_eq!(b.view().status(x), Some(Status::Warning), "b's stale view");
    let none = s[0]
        .status_changes(&StatusChangeQuery {
            limit: 10,
            ..StatusChangeQuery::default()
        })
        .await
        .expect("changes");
    assert!(none.is_empty(), "only the sweeper records: {none:?}");
    b.sync().await.expect("sync");
    assert_eq!(
        b.view().status(x),
        Some(Status::Online),
        "b caught up from the log"
    );

    // y heartbeats to a a little longer: its warning will fall due between a's death and b's
    // takeover, when nobody records — b must record it when it takes over.
    let y = a
        .register(NewInstance {
            system: SystemInfo::with_hostname("y"),
            ..NewInstance::default()
        })
        .await
        .expect("register")
        .id;

    // x goes quiet; both sweep every 5 s; a renews its lease.
    for round in 0..13 {
        clock.advance(Duration::from_secs(5));
        if round == 0 {
            a.heartbeat(y, Heartbeat::default()).expect("heartbeat");
        }
        for r in [&a, &b] {
            r.sync().await.expect("sync");
            r.claim_sweeper(ttl).await.expect("claim");
            r.sweep_report();
            r.flush_heartbeats().await.expect("flush");
        }
    }
    assert_eq!(a.view().status(x), Some(Status::Warning));
    assert_eq!(
        b.view().status(x),
        Some(Status::Warning),
        "b's view follows too"
    );
    let recorded = |store: DynStore| async move {
        store
            .status_changes(&StatusChangeQuery {
                limit: 10,
                ..StatusChangeQuery::default()
            })
            .await
            .expect("changes")
    };
    assert_eq!(
        recorded(Arc::clone(&s[0])).await.len(),
        1,
        "x's warning, recorded once, by a"
    );

    // a dies (no more claims, sweeps or flushes); b takes over once a's lease expired.
    let mut took_over = None;
    for k in 0..60 {
        clock.advance(Duration::from_secs(5));
        b.sync().await.expect("sync");
        if b.claim_sweeper(ttl).await.expect("claim") && took_over.is_none() {
            took_over = Some(k);
        }
        b.sweep_report();
        b.flush_heartbeats().await.expect("flush");
    }
    assert!(took_over.is_some_and(|k| k <= 2), "{took_over:?}");
    assert_eq!(b.view().status(x), Some(Status::Offline));
    let all = recorded(Arc::clone(&s[1])).await;
    let path = |id| {
        all.iter()
            .rev()
            .filter(|c| c.instance == id)
            .map(|c| (c.transition.from, c.transition.to))
            .collect::<Vec<_>>()
    };
    let quiet_path = vec![
        (Status::Online, Status::Warning),
        (Status::Warning, Status::Offline),
    ];
    assert_eq!(path(x), quiet_path, "x: nothing twice, nothing lost");
    assert_eq!(
        path(y),
        quiet_path,
        "y: its warning fell due while nobody swept, and b recorded it on taking over"
    );
}

/// A write through one pool wakes a replica waiting on another at once (LISTEN/NOTIFY), well
/// before a one-second poll would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wake_the_other_replicas() {
    use std::time::{Duration, Instant};

    use fleet_core::store::{ChangeFeed, HeartbeatRecord, HeartbeatStore, InstanceStore};
    let db = TestDatabase::create_or_panic().await;
    let s = stores(&db, 2).await;
    for round in 0..3 {
        let waiter = Arc::clone(&s[1]);
        let woke = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), waiter.wait_for_writes())
                .await
                .is_ok()
        });
        // Give the listener time to start (first round) and the waiter to wait.
        tokio::time::sleep(Duration::from_millis(if round == 0 { 1500 } else { 200 })).await;
        let started = Instant::now();
        let inst = fleet_core::testing::instance(round);
        if round == 2 {
            s[0].insert_instance(&inst).await.expect("insert");
            s[0].write_heartbeats(&[HeartbeatRecord {
                id: inst.id,
                last_seen: inst.last_seen,
                metrics: None,
                apps: None,
            }])
            .await
            .expect("heartbeats");
        } else {
            s[0].insert_instance(&inst).await.expect("insert");
        }
        assert!(woke.await.expect("task"), "round {round}: woken");
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "round {round}: woken in {:?}",
            started.elapsed()
        );
    }
}
