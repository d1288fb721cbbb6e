//! Persisted heartbeats per second through `PgStore::write_heartbeats`: batches of 10,000
//! records with a metrics sample each (the write-behind path: one `UNNEST` upsert per flush) over
//! 100,000 instances, median of 9 batches after 3 warm-up batches. The database runs on the same
//! machine; with `FLEET_TEST_PG_DURABLE=1` it keeps PostgreSQL's default durability (fsync on,
//! synchronous commit), as for the README figure.
//!
//! `FLEET_TEST_PG_DURABLE=1 cargo bench -p fleet-store-postgres --features testing --bench heartbeats`
//! (a throwaway server is started unless `FLEET_TEST_DATABASE_URL` names one;
//! `FLEET_BENCH_INSTANCES` and `FLEET_BENCH_BATCH` change the sizes).

use std::time::Instant;

use fleet_core::store::{HeartbeatRecord, HeartbeatStore};
use fleet_core::{Instance, InstanceId, MetricsSample, SystemInfo, Tags, Timestamp};
use fleet_store_postgres::PgStore;
use fleet_store_postgres::testing::TestDatabase;

const T0: i64 = 1_790_000_000_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn instance(i: u32) -> Instance {
    Instance {
        id: InstanceId::from_u128(
            u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) | 1,
        ),
        tenant: None,
        system: SystemInfo {
            hostname: format!("node-{i:07}.example.com"),
            ..SystemInfo::default()
        },
        tags: Tags::from_pairs([
            ("env", "prod".to_string()),
            ("region", format!("r{}", i % 10)),
        ])
        .expect("tags"),
        groups: fleet_core::Groups::new(),
        registered_at: Timestamp::from_unix_millis(T0),
        last_seen: Timestamp::from_unix_millis(T0),
        metrics: None,
        apps: Vec::new(),
        certificate: None,
        next_certificate: None,
    }
}

fn sample(i: u32, round: u64) -> MetricsSample {
    MetricsSample {
        cpu_percent: Some(f64::from(i % 1000) / 10.0),
        memory_used_bytes: Some(4 << 30),
        memory_total_bytes: Some(16 << 30),
        disk_used_bytes: Some(100 << 30),
        disk_total_bytes: Some(500 << 30),
        network_rx_bytes: Some(round * 1_000_000),
        network_tx_bytes: Some(round * 500_000),
        uptime_secs: Some(3600 + round),
        ..MetricsSample::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var_os("FLEET_TEST_DATABASE_URL").is_none()
        && std::env::var_os("FLEET_TEST_PG_DURABLE").is_none()
    {
        eprintln!(
            "note: without FLEET_TEST_PG_DURABLE=1 the throwaway server runs with fsync=off; \
             the README figure is measured with it set"
        );
    }
    let n = u32::try_from(env("FLEET_BENCH_INSTANCES", 100_000)).expect("instances");
    let batch = env("FLEET_BENCH_BATCH", 10_000);
    let db = TestDatabase::create_or_panic().await;
    let store = PgStore::connect(&db.url).await.expect("connect");
    store.migrate().await.expect("migrate");

    // Register in bulk (one statement per 10,000): the figure below is about heartbeats.
    let started = Instant::now();
    let all: Vec<Instance> = (0..n).map(instance).collect();
    for chunk in all.chunks(10_000) {
        let ids: Vec<uuid::Uuid> = chunk.iter().map(|i| i.id.as_uuid()).collect();
        let hosts: Vec<String> = chunk.iter().map(|i| i.system.hostname.clone()).collect();
        let texts: Vec<String> = chunk
            .iter()
            .map(|i| fleet_core::live::searchable_text(&i.system.hostname, &i.system.ip_addresses))
            .collect();
        let tags: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| serde_json::to_value(&i.tags).expect("json"))
            .collect();
        let records: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| serde_json::to_value(i).expect("json"))
            .collect();
        sqlx::query(
            "INSERT INTO fleet_instances (id, tenant, hostname, tags, groups, record, search_text) \
             SELECT u.id, NULL, u.host, u.tags, '{}', u.record, u.text \
             FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], $5::text[]) \
                 AS u(id, host, tags, record, text)",
        )
        .bind(&ids)
        .bind(&hosts)
        .bind(&tags)
        .bind(&records)
        .bind(&texts)
        .execute(store.pool())
        .await
        .expect("bulk insert");
    }
    eprintln!(
        "{n} instances registered in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // What a filter pushed down to SQL costs (a tag selector matching 10 % on the GIN index,
    // first page of 100 in id order), to compare with the live view's first filtered page.
    sqlx::query("ANALYZE fleet_instances")
        .execute(store.pool())
        .await
        .expect("analyze");
    let mut pages = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let rows: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM fleet_instances WHERE tags @> $1 ORDER BY id LIMIT 100",
        )
        .bind(serde_json::json!({"region": "r1"}))
        .fetch_all(store.pool())
        .await
        .expect("page");
        assert_eq!(rows.len(), 100);
        pages.push(t.elapsed().as_secs_f64() * 1e3);
    }
    pages.sort_by(f64::total_cmp);
    println!(
        "postgres tag-filtered first page (100 rows, {n} instances): {:.2} ms median",
        pages[pages.len() / 2]
    );

    let ids: Vec<InstanceId> = all.iter().map(|i| i.id).collect();
    let mut rates = Vec::new();
    for round in 0..12u64 {
        let start = (round as usize * batch) % ids.len();
        let records: Vec<HeartbeatRecord> = (0..batch)
            .map(|k| {
                let i = (start + k) % ids.len();
                HeartbeatRecord {
                    id: ids[i],
                    last_seen: Timestamp::from_unix_millis(T0 + 1000 * (round as i64 + 1)),
                    metrics: Some(sample(i as u32, round)),
                    apps: None,
                }
            })
            .collect();
        let t = Instant::now();
        store.write_heartbeats(&records).await.expect("write");
        if round >= 3 {
            rates.push(batch as f64 / t.elapsed().as_secs_f64());
        }
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "postgres persisted heartbeats: {:.0}/s (median of {} batches of {batch} over {n} \
         instances; min {:.0}/s, max {:.0}/s)",
        rates[rates.len() / 2],
        rates.len(),
        rates[0],
        rates[rates.len() - 1]
    );
}
