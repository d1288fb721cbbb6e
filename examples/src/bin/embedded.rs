//! fleet-core embedded in a process of your own, in one screen: a thousand simulated instances
//! register, heartbeat with metrics, some fall silent, and the fleet view follows.
//!
//! Time comes from a manual clock, so the seven simulated minutes take milliseconds:
//!
//! ```text
//! cargo run -p fleet-examples --bin embedded
//! ```

use std::time::Duration;

use anyhow::Result;
use fleet_core::{
    Filter, Fleet, Groups, Heartbeat, ManualClock, MemoryStore, MetricsSample, NewInstance,
    StalenessPolicy, SystemInfo, Tags, TenantScope, Timestamp,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_767_225_600));
    let fleet = Fleet::builder(MemoryStore::new())
        .clock(clock.clone())
        .policy(StalenessPolicy::default())
        .open()
        .await?;

    let regions = ["us-east", "eu-west", "ap-south"];
    let mut ids = Vec::new();
    for i in 0..1000u32 {
        let instance = fleet
            .register(NewInstance {
                system: SystemInfo {
                    hostname: format!("node-{i:04}"),
                    ip_addresses: vec![std::net::IpAddr::from([10, 0, (i >> 8) as u8, i as u8])],
                    os: Some("Cloud OS".into()),
                    ..SystemInfo::default()
                },
                tags: Tags::from_pairs([
                    ("env", if i % 4 == 0 { "staging" } else { "production" }),
                    ("region", regions[i as usize % 3]),
                ])?,
                groups: Groups::from_names([if i % 10 == 0 {
                    "database-servers"
                } else {
                    "web"
                }])?,
                ..NewInstance::default()
            })
            .await?;
        ids.push(instance.id);
    }

    // Seven minutes of heartbeats every 15 s; instances 0..50 stop after the first minute.
    for round in 0..28u64 {
        clock.advance(Duration::from_secs(15));
        for (i, id) in ids.iter().enumerate() {
            if i < 50 && round >= 4 {
                continue;
            }
            let metrics = MetricsSample {
                cpu_percent: Some((i % 100) as f64),
                memory_used_bytes: Some(2 << 30),
                memory_total_bytes: Some(8 << 30),
                disk_used_bytes: Some(40 << 30),
                disk_total_bytes: Some(100 << 30),
                network_rx_bytes: Some(round * 15_000_000),
                network_tx_bytes: Some(round * 3_000_000),
                uptime_secs: Some(86_400 + round * 15),
                ..MetricsSample::default()
            };
            fleet.heartbeat(
                *id,
                Heartbeat {
                    metrics: Some(metrics),
                    apps: None,
                },
            )?;
        }
        for change in fleet.sweep() {
            if change.instance == ids[0] {
                println!(
                    "node-0000 went {} at {}",
                    change.transition.to, change.transition.at
                );
            }
        }
        fleet.flush_heartbeats().await?;
    }

    let everyone = fleet.summary(&Filter::all(), &TenantScope::All);
    println!("\nfleet: {}", serde_json::to_string_pretty(&everyone)?);

    let filter = Filter::parse("status:warning|offline region=us-east")?;
    let page = fleet.list(&filter, &TenantScope::All, None, 5);
    println!("\nfirst 5 of `{filter}`:");
    for item in &page.items {
        println!(
            "  {:<10} {:<8} last seen {}",
            item.hostname, item.status, item.last_seen
        );
    }
    let db = fleet.summary(&Filter::parse("group:database-servers")?, &TenantScope::All);
    println!(
        "\ndatabase-servers: {} instances, {:.1}% healthy, CPU avg {:.1}%",
        db.total,
        db.health_percent,
        db.cpu_avg_percent.unwrap_or(0.0)
    );
    Ok(())
}
