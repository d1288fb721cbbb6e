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
