//! Filters pushed down to SQL select exactly what the live view selects.

use std::sync::Arc;

use fleet_core::store::InstanceStore;
use fleet_core::testing::instance;
use fleet_core::{Filter, Fleet, InstanceId, TenantId, TenantScope};
use fleet_store_postgres::testing::TestDatabase;
use fleet_store_postgres::{PgStore, PushdownError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_down_filters_select_what_the_live_view_selects() {
    let db = TestDatabase::create_or_panic().await;
    let store = Arc::new(PgStore::connect(&db.url).await.expect("connect"));
    store.migrate().await.expect("migrate");
    for n in 0..120 {
        let mut inst = instance(n);
        if n % 7 == 0 {
            inst.system.hostname = format!("Web_{n}%.example.com");
        }
        store.insert_instance(&inst).await.expect("insert");
    }
    let fleet = Fleet::builder(Arc::clone(&store))
        .key_encryption_key(fleet_core::testing::kek())
        .open()
        .await
        .expect("open");
    let scopes = [
        TenantScope::All,
        TenantScope::Tenant(TenantId::new("tenant-0").expect("tenant")),
    ];
    for text in [
        "",
        "env=prod",
        "env!=prod",
        "env",
        "!env",
        "missing",
        "!missing",
        "n in (1,2,3,50)",
        "n notin (1,2,3)",
        "group:g1",
        "group:g0|g2 env=dev",
        "tenant:tenant-2",
        "text:host-1",
        "text:10.0.0.7|host-99",
        "text:web_",
        "text:_4%",
        "env=prod n in (2,4,6) group:g2|g0",
    ] {
        let filter = Filter::parse(text).expect("filter");
        for scope in &scopes {
            let live: Vec<InstanceId> = {
                let mut ids = fleet.view().matching(&filter, scope);
                ids.sort();
                ids
            };
            let mut sql = Vec::new();
            let mut after = None;
            loop {
                let page = store
                    .list_matching(&filter, scope, after, 7)
                    .await
                    .expect("list");
                let Some(last) = page.last().map(|i| i.id) else {
                    break;
                };
                sql.extend(page.iter().map(|i| i.id));
                after = Some(last);
            }
            assert_eq!(sql, live, "{text:?} in {scope:?}");
        }
    }
    let status = Filter::parse("status:online env=prod").expect("filter");
    assert!(matches!(
        store
            .list_matching(&status, &TenantScope::All, None, 10)
            .await,
        Err(PushdownError::Status)
    ));
}
