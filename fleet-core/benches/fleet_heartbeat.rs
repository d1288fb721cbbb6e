//! The whole in-process heartbeat path of `Fleet` at 100,000 instances: live view, write-behind
//! record, recent-metrics ring; and `exchange` (the agent server's call: heartbeat, results,
//! command delivery) for an instance with nothing queued.
//!
//! `taskset -c 1 cargo bench -p fleet-core --bench fleet_heartbeat`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fleet_core::store::InstanceStore;
use fleet_core::testing::instance;
use fleet_core::{
    Fleet, Heartbeat, InstanceId, ManualClock, MemoryStore, MetricsSample, RecentMetricsConfig,
    Timestamp,
};

const N: u32 = 100_000;

fn sample(k: u64) -> MetricsSample {
    MetricsSample {
        cpu_percent: Some((k % 100) as f64),
        memory_used_bytes: Some(2 << 30),
        memory_total_bytes: Some(8 << 30),
        disk_used_bytes: Some(40 << 30),
        disk_total_bytes: Some(100 << 30),
        network_rx_bytes: Some(k * 1000),
        network_tx_bytes: Some(k * 500),
        uptime_secs: Some(k),
        load_1m: Some(0.5),
        ..MetricsSample::default()
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let store = Arc::new(MemoryStore::new());
    let ids: Vec<InstanceId> = rt.block_on(async {
        let mut ids = Vec::new();
        for n in 0..N {
            let inst = instance(n);
            ids.push(inst.id);
            store.insert_instance(&inst).await.expect("insert");
        }
        ids
    });
    for (name, recent) in [
        (
            "fleet_heartbeat_with_metrics",
            RecentMetricsConfig::default(),
        ),
        (
            "fleet_heartbeat_with_metrics_no_ring",
            RecentMetricsConfig {
                max_bytes: 0,
                ..RecentMetricsConfig::default()
            },
        ),
    ] {
        let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
        let fleet = rt
            .block_on(
                Fleet::builder(Arc::clone(&store))
                    .clock(clock.clone())
                    .recent_metrics(recent)
                    .open(),
            )
            .expect("fleet");
        let mut k = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                k += 1;
                if k.is_multiple_of(u64::from(N)) {
                    clock.advance(Duration::from_secs(15));
                    // Keep the write-behind map bounded as a flush every second would.
                    rt.block_on(fleet.flush_heartbeats()).expect("flush");
                }
                let id = ids[(k % u64::from(N)) as usize];
                let hb = Heartbeat {
                    metrics: Some(sample(k)),
                    apps: None,
                };
                black_box(fleet.heartbeat(id, hb).expect("heartbeat"));
            });
        });
        if name == "fleet_heartbeat_with_metrics" {
            c.bench_function("fleet_exchange_nothing_queued", |b| {
                b.iter(|| {
                    k += 1;
                    let id = ids[(k % u64::from(N)) as usize];
                    let hb = Heartbeat {
                        metrics: Some(sample(k)),
                        apps: None,
                    };
                    black_box(
                        rt.block_on(fleet.exchange(id, hb, Vec::new()))
                            .expect("exchange"),
                    );
                });
            });
            eprintln!("recent metrics: {:?}", fleet.recent_metrics_stats());
        }
    }
}

criterion_group! {
    name = fleet_heartbeat;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(fleet_heartbeat);
