//! SledStore figures at 100,000 and 1,000,000 instances:
//!
//! - persisted heartbeats per second: `write_heartbeats` batches of 50,000 records with a metrics
//!   sample each (the write-behind path: one sled batch and one flush per call), median of 5;
//! - open-to-serving: `SledStore::open` plus `Fleet::open` (which rebuilds the live view) on the
//!   populated store, and the store's size on disk.
//!
//! `taskset -c 1 cargo bench -p fleet-store-sled --bench heartbeats`
//! (`FLEET_BENCH_SIZES=100000` to run one size).

use std::time::Instant;

use fleet_core::store::{HeartbeatRecord, HeartbeatStore};
use fleet_core::{
    Filter, Fleet, Groups, Instance, InstanceId, MetricsSample, SystemInfo, Tags, TenantScope,
    Timestamp,
};
use fleet_store_sled::SledStore;

const T0: i64 = 1_790_000_000_000;
const BATCH: usize = 50_000;

fn instance(i: u32) -> Instance {
    Instance {
        id: InstanceId::from_u128(
            u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) | 1,
        ),
        tenant: None,
        system: SystemInfo {
            hostname: format!("node-{i:07}.example.com"),
            ip_addresses: vec![std::net::IpAddr::from([
                10,
                (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8,
            ])],
            os: Some("Cloud OS".into()),
            ..SystemInfo::default()
        },
        tags: Tags::from_pairs([
            (
                "env",
                if i.is_multiple_of(4) {
                    "staging"
                } else {
                    "prod"
                }
                .to_string(),
            ),
            ("region", format!("r{}", i % 10)),
            ("team", format!("team-{}", i % 8)),
            ("tier", "standard".to_string()),
            ("rack", format!("rack-{}", i % 1000)),
        ])
        .expect("tags"),
        groups: Groups::from_names([format!("group-{}", i % 20)]).expect("groups"),
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

async fn run(n: u32) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("db");
    let store = SledStore::open(&path).await.expect("open");
    let started = Instant::now();
    for start in (0..n).step_by(100_000) {
        let part: Vec<Instance> = (start..(start + 100_000).min(n)).map(instance).collect();
        store.bulk_insert(part, 10_000).await.expect("bulk insert");
    }
    let load = started.elapsed();

    // Batches of 50,000 heartbeats with a metrics sample each, sweeping over the fleet: at least
    // 60 batches (several journal compactions) and two passes over the fleet.
    let ids: Vec<InstanceId> = (0..n).map(|i| instance(i).id).collect();
    let batches = 60.max(2 * n as usize / BATCH);
    let mut slowest = std::time::Duration::ZERO;
    let started = Instant::now();
    for round in 0..batches {
        let batch: Vec<HeartbeatRecord> = (0..BATCH)
            .map(|k| {
                let i = ((round * BATCH + k) % n as usize) as u32;
                HeartbeatRecord {
                    id: ids[i as usize],
                    last_seen: Timestamp::from_unix_millis(T0 + round as i64 * 1000),
                    metrics: Some(sample(i, round as u64)),
                    apps: None,
                }
            })
            .collect();
        let t = Instant::now();
        store.write_heartbeats(&batch).await.expect("write");
        slowest = slowest.max(t.elapsed());
    }
    let elapsed = started.elapsed();
    let written = batches * BATCH;
    let rate = written as f64 / elapsed.as_secs_f64();
    // The store is dropped without `close`: reopening replays the journal, as after a crash.
    let journal_bytes =
        std::fs::metadata(path.join("fleet-heartbeats.journal")).map_or(0, |m| m.len());
    drop(store);
    let (crash_open, crash_serving) = open_to_serving(&path, n).await;

    // A clean shutdown (`close`) compacts the journal; the next open has nothing to replay.
    let store = SledStore::open(&path).await.expect("reopen");
    store.close().await.expect("close");
    drop(store);
    let (clean_open, clean_serving) = open_to_serving(&path, n).await;

    let store = SledStore::open(&path).await.expect("reopen");
    let stats = store.stats().await.expect("stats");
    let files = du(&path);
    println!(
        "sled {n} instances: load {:.1} s; heartbeats persisted {:.0}/s ({written} in {batches} batches of {BATCH}, \
         compactions included, slowest batch {:.0} ms); after a crash ({:.0} MiB journal): open {:.2} s, \
         open-to-serving {:.2} s; after a clean shutdown: open {:.2} s, open-to-serving {:.2} s; \
         {:.0} MiB on disk by sled's count ({:.0} B/instance), {:.0} MiB of files",
        load.as_secs_f64(),
        rate,
        slowest.as_secs_f64() * 1000.0,
        journal_bytes as f64 / f64::from(1 << 20),
        crash_open.as_secs_f64(),
        crash_serving.as_secs_f64(),
        clean_open.as_secs_f64(),
        clean_serving.as_secs_f64(),
        stats.size_on_disk as f64 / f64::from(1 << 20),
        stats.size_on_disk as f64 / f64::from(n),
        files as f64 / f64::from(1 << 20),
    );
}

/// Times `SledStore::open` and then `Fleet::open` (the live-view rebuild) on `path`.
async fn open_to_serving(
    path: &std::path::Path,
    n: u32,
) -> (std::time::Duration, std::time::Duration) {
    let t = Instant::now();
    let store = SledStore::open(path).await.expect("reopen");
    let opened = t.elapsed();
    let fleet = Fleet::builder(store)
        .key_encryption_key(fleet_core::testing::kek())
        .open()
        .await
        .expect("fleet");
    let serving = t.elapsed();
    assert_eq!(
        fleet.summary(&Filter::all(), &TenantScope::All).total,
        u64::from(n)
    );
    (opened, serving)
}

/// Bytes of the files under `dir`.
fn du(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn main() {
    let sizes: Vec<u32> = std::env::var("FLEET_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000]);
    // `cargo test --benches` runs bench targets with --test: keep that quick.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for n in sizes {
        rt.block_on(run(n));
    }
}
