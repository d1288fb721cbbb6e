//! The store conformance suite against PostgreSQL: each property gets a fresh database on a
//! server given by `FLEET_TEST_DATABASE_URL`, or on a throwaway one this test process starts.

use fleet_store_postgres::PgStore;
use fleet_store_postgres::testing::TestDatabase;

fleet_core::store_conformance_tests!(async {
    let db = TestDatabase::create_or_panic().await;
    let store = PgStore::connect(&db.url).await.expect("connect");
    store.migrate().await.expect("migrate");
    (db, store)
});
