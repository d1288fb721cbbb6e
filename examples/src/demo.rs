//! Simulated agents for `control-panel serve --demo-agents N`: each enrolls over real TLS with a
//! shared multi-use token and heartbeats with made-up but plausible metrics, so a newcomer sees a
//! living fleet at once.

use std::time::Duration;

use fleet_agent_proto::client::{self, AgentClient, Endpoint, next_delay};
use fleet_agent_proto::runner::CommandRunner;
use fleet_agent_proto::{HeartbeatRequest, fleet_core};
use fleet_core::{JoinString, MetricsSample, SystemInfo};
use tokio::sync::watch;

/// A small deterministic generator (xorshift), so the demo needs no RNG crate.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs `n` simulated agents against `endpoint` until `stop` turns true.
pub async fn run(n: usize, endpoint: Endpoint, join: JoinString, stop: watch::Receiver<bool>) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let endpoint = endpoint.clone();
        let join = join.clone();
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng =
                Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
            let system = SystemInfo {
                hostname: format!("demo-{i:03}.fleet.local"),
                ip_addresses: vec![std::net::IpAddr::from([
                    10,
                    42,
                    (i >> 8) as u8,
                    (i & 0xff) as u8,
                ])],
                os: Some("Cloud OS".into()),
                os_version: Some("1.0".into()),
                arch: Some("x86_64".into()),
                agent_version: Some(env!("CARGO_PKG_VERSION").into()),
            };
            let identity = match client::enroll(&endpoint, &join, system, None).await {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(agent = i, error = %e, "demo agent could not enroll");
                    return;
                }
            };
            let Ok(agent) = AgentClient::new(endpoint, identity) else {
                return;
            };
            let total_mem = (4 + (i % 4) as u64 * 4) << 30;
            let (mut rx, mut tx) = (0u64, 0u64);
            let mut interval = Duration::from_secs(15);
            let mut sequence = 0;
            let host = format!("demo-{i:03}.fleet.local");
            let mut runner =
                CommandRunner::new(move || serde_json::json!({ "hostname": host, "demo": true }));
            loop {
                sequence += 1;
                rx += (rng.unit() * 5e6) as u64;
                tx += (rng.unit() * 1e6) as u64;
                let metrics = MetricsSample {
                    cpu_percent: Some((rng.unit() * 60.0 + (i % 5) as f64 * 8.0).min(100.0)),
                    memory_used_bytes: Some((total_mem as f64 * (0.3 + rng.unit() * 0.5)) as u64),
                    memory_total_bytes: Some(total_mem),
                    disk_used_bytes: Some((40 + i as u64 % 50) << 30),
                    disk_total_bytes: Some(100 << 30),
                    network_rx_bytes: Some(rx),
                    network_tx_bytes: Some(tx),
                    uptime_secs: Some(86_400 + sequence * 15),
                    load_1m: Some(rng.unit() * 2.0),
                    ..MetricsSample::default()
                };
                let req = HeartbeatRequest {
                    sequence: Some(sequence),
                    metrics: Some(metrics),
                    apps: None,
                    command_results: runner.pending_results(),
                };
                match agent.heartbeat(&req).await {
                    Ok(reply) => {
                        interval = Duration::from_secs(reply.next_heartbeat_secs.max(1));
                        runner.acknowledge(req.command_results.len());
                        // A demo agent cannot restart a process: it just reports success.
                        runner.run(&reply.commands);
                    }
                    Err(e) => tracing::debug!(agent = i, error = %e, "demo heartbeat failed"),
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(next_delay(interval, rng.unit())) => {}
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
