//! Live-view benchmarks at a million instances (5 tags and 1 group each).
//!
//! `cargo bench -p fleet-core --bench live_view`; `FLEET_BENCH_INSTANCES` changes the size.
//! Besides criterion's timings it prints the resident memory per instance, measured from the
//! process's RSS before and after building the view.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fleet_core::{
    Filter, Groups, Instance, InstanceId, LiveView, MetricsSample, StalenessPolicy, SystemInfo,
    Tags, TenantId, TenantScope, Timestamp,
};

const T0: i64 = 1_700_000_000_000;

fn instances() -> u32 {
    std::env::var("FLEET_BENCH_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn id(i: u32) -> InstanceId {
    // Spread like random UUIDs, but reproducible.
    InstanceId::from_u128(u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) | 1)
}

fn instance(i: u32, tenants: &[TenantId]) -> Instance {
    let envs = ["prod", "prod", "staging", "dev"];
    let tags = Tags::from_pairs([
        ("env", envs[(i % 4) as usize].to_string()),
        ("region", format!("r{}", i % 10)),
        ("team", format!("team-{}", i % 8)),
        (
            "tier",
            if i.is_multiple_of(5) {
                "critical"
            } else {
                "standard"
            }
            .to_string(),
        ),
        ("rack", format!("rack-{}", i % 1000)),
    ])
    .expect("valid tags");
    Instance {
        id: id(i),
        tenant: Some(tenants[(i % 10) as usize].clone()),
        system: SystemInfo {
            hostname: format!("node-{i:07}.dc{}.example.com", i % 4),
            ip_addresses: vec![IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])],
            ..SystemInfo::default()
        },
        tags,
        groups: Groups::from_names([format!("group-{}", i % 20)]).expect("valid group"),
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
        network_rx_bytes: Some(round * 1_000_000 + u64::from(i)),
        network_tx_bytes: Some(round * 500_000),
        uptime_secs: Some(3600 + round),
        ..MetricsSample::default()
    }
}

fn build(n: u32) -> LiveView {
    let tenants: Vec<TenantId> = (0..10)
        .map(|t| TenantId::new(format!("tenant-{t}")).expect("valid"))
        .collect();
    let mut view = LiveView::new(StalenessPolicy::default()).expect("valid policy");
    let now = Timestamp::from_unix_millis(T0);
    for i in 0..n {
        view.upsert(&instance(i, &tenants), 1, now);
    }
    // Every instance has reported metrics once, spread over the first 15 s.
    for i in 0..n {
        let at = Timestamp::from_unix_millis(T0 + i64::from(i % 15_000));
        view.heartbeat(id(i), at, Some(&sample(i, 0)));
    }
    view
}

fn benches(c: &mut Criterion) {
    let n = instances();
    let before = rss_bytes();
    let mut view = build(n);
    let after = rss_bytes();
    let mem = view.memory();
    eprintln!(
        "live view: {n} instances, RSS {:.1} MiB, {:.0} bytes resident per instance \
         (heap by part: slots {} B, text {} B, wheel {} B, postings {} B per instance)",
        (after - before) as f64 / f64::from(1 << 20),
        (after - before) as f64 / f64::from(n),
        mem.slots_bytes / n as usize,
        mem.text_bytes / n as usize,
        mem.wheel_bytes / n as usize,
        mem.postings_bytes / n as usize,
    );
    let all = Filter::all();
    let scope = TenantScope::All;
    let region = Filter::parse("region=r3").expect("filter");
    let search = Filter::parse("text:node-00123").expect("filter");
    let mut g = c.benchmark_group(format!("live_view_{n}"));
    g.measurement_time(Duration::from_secs(5));

    // Ingest: each iteration is one heartbeat with a full metrics sample, ids in a scattered
    // order, server time advancing 1 ms every 1,000 heartbeats (1 M heartbeats/s).
    let mut i: u64 = 0;
    let mut order = 0u32;
    g.bench_function("heartbeat_ingest", |b| {
        b.iter(|| {
            i += 1;
            order = (order + 7_919) % n;
            let at = Timestamp::from_unix_millis(T0 + 15_000 + (i / 1000) as i64);
            let m = sample(order, i / u64::from(n) + 1);
            black_box(view.heartbeat(id(order), at, Some(&m)));
        });
    });
    let now = Timestamp::from_unix_millis(T0 + 15_000 + (i / 1000) as i64);

    g.bench_function("summary_unfiltered", |b| {
        b.iter(|| black_box(view.summary(&all, &scope)));
    });
    let s = view.summary(&region, &scope);
    eprintln!("region=r3 selects {} of {} instances", s.total, n);
    g.bench_function("summary_tag_filter_10pct", |b| {
        b.iter(|| black_box(view.summary(&region, &scope)));
    });
    g.bench_function("list_first_page_100_tag_filter", |b| {
        b.iter(|| black_box(view.list(&region, &scope, None, 100)));
    });
    let hits = view.list(&search, &scope, None, 1000).items.len();
    eprintln!("text:node-00123 finds {hits} instances");
    g.bench_function("free_text_search", |b| {
        b.iter(|| black_box(view.list(&search, &scope, None, 100)));
    });
    // Sweeping at the current time: every deadline is ~45-60 s away, nothing is due.
    assert!(
        view.sweep(now).is_empty(),
        "the benchmark fleet must have nothing due"
    );
    g.bench_function("sweep_nothing_due", |b| {
        b.iter_batched(
            || (),
            |()| black_box(view.sweep(now)),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group!(live_view, benches);
criterion_main!(live_view);
