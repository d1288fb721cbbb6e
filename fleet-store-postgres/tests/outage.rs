//! A database outage under heartbeat load: PostgreSQL is stopped for a while. The control plane
//! stays up: heartbeats keep updating the live view, durable writes (enrollments, registrations,
//! command enqueues) fail as `Unavailable` (503 with Retry-After at the HTTP layer) and change
//! nothing, flushes fail and keep their records; when the database is back the pool reconnects by
//! itself and everything acknowledged is persisted.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::store::{InstanceStore, StatusChangeQuery};
use fleet_core::testing::{key_and_csr, request};
use fleet_core::{
    Clock, CommandKind, EnrollError, Filter, Fleet, Heartbeat, ManualClock, MaxUses, MetricsSample,
    NewCommand, NewInstance, NewToken, StoreError, SystemInfo, TenantScope, Timestamp,
};
use fleet_store_postgres::PgStore;
use fleet_store_postgres::sqlx::postgres::PgPoolOptions;
use fleet_store_postgres::testing::{DedicatedServer, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_heartbeats_and_refuses_durable_writes_until_the_database_is_back() {
    let server = DedicatedServer::start().unwrap_or_else(|e| panic!("{e}"));
    let db = TestDatabase::create_on(&server.admin_url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&db.url)
        .await
        .expect("connect");
    let store = Arc::new(PgStore::new(pool));
    store.migrate().await.expect("migrate");
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let fleet = Fleet::builder(Arc::clone(&store))
        .key_encryption_key(fleet_core::testing::kek())
        .clock(clock.clone())
        .open()
        .await
        .expect("open");
    let mut ids = Vec::new();
    for n in 0..50 {
        let inst = fleet
            .register(NewInstance {
                system: SystemInfo::with_hostname(format!("h{n}")),
                ..NewInstance::default()
            })
            .await
            .expect("register");
        ids.push(inst.id);
    }
    let token = fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Unlimited,
                ..NewToken::default()
            },
        )
        .await
        .expect("token");
    let beat = |k: u64| {
        for &id in &ids {
            let metrics = MetricsSample {
                cpu_percent: Some(k as f64),
                ..MetricsSample::default()
            };
            fleet
                .heartbeat(
                    id,
                    Heartbeat {
                        metrics: Some(metrics),
                        apps: None,
                    },
                )
                .expect("heartbeats never need the database");
        }
    };
    beat(0);
    fleet.flush_heartbeats().await.expect("flush");

    server.stop().unwrap_or_else(|e| panic!("{e}"));
    for k in 1..=10 {
        clock.advance(Duration::from_secs(1));
        beat(k);
        let err = fleet.flush_heartbeats().await.expect_err("database down");
        assert!(err.is_unavailable(), "{err:?}");
        assert_eq!(fleet.pending_heartbeats(), ids.len(), "records kept");
    }
    let summary = fleet.summary(&Filter::all(), &TenantScope::All);
    assert_eq!(summary.online, 50, "the live view carries on");
    let (_, csr) = key_and_csr();
    match fleet
        .enroll(request(&token.presented.to_string(), &csr, "late"))
        .await
    {
        Err(e @ EnrollError::Store(StoreError::Unavailable { .. })) => {
            // What the agent server answers for it: 503 with Retry-After.
            let code = fleet_agent_proto::ErrorCode::from(&e);
            assert_eq!(code.http_status(), 503, "{code:?}");
        }
        other => panic!("enrollment during the outage must be Unavailable, got {other:?}"),
    }
    let err = fleet
        .register(NewInstance {
            system: SystemInfo::with_hostname("also-late"),
            ..NewInstance::default()
        })
        .await
        .expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    let err = fleet
        .enqueue(
            &TenantScope::All,
            NewCommand::for_instance(ids[0], CommandKind::new("ping").expect("kind")),
        )
        .await
        .expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    let last = clock.now();

    server.resume().unwrap_or_else(|e| panic!("{e}"));
    // The pool reconnects by itself: the next flushes go through.
    let mut flushed = false;
    for _ in 0..50 {
        if fleet.flush_heartbeats().await.is_ok() {
            flushed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(flushed, "the flush succeeds once the database is back");
    for &id in &ids {
        let stored = store.get_instance(id).await.expect("get").expect("exists");
        assert_eq!(stored.last_seen, last, "the newest heartbeat was persisted");
        assert_eq!(stored.metrics.and_then(|m| m.cpu_percent), Some(10.0));
    }
    assert_eq!(
        store.count_instances().await.expect("count"),
        50,
        "the refused writes changed nothing"
    );
    let changes = fleet
        .status_changes(
            &TenantScope::All,
            &StatusChangeQuery {
                limit: 10,
                ..StatusChangeQuery::default()
            },
        )
        .await
        .expect("changes");
    assert!(
        changes.is_empty(),
        "ten seconds of outage made nobody stale: {changes:?}"
    );
    let (_, csr) = key_and_csr();
    fleet
        .enroll(request(&token.presented.to_string(), &csr, "after"))
        .await
        .expect("enrollment works again");
}
