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
    let open = |store: DynStore| Fleet::builder(store).clock(clock.clone()).open();
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
