//! A real fleet agent: reads this machine's CPU, memory, disk, network and uptime, enrolls with a
//! join string, heartbeats over mutual TLS, renews its certificate before it expires, and
//! re-enrolls (keeping its identity) when the certificate expired while it was off.
//!
//! ```text
//! cargo run -p fleet-examples --bin agent -- --join fleet1.... --server https://localhost:8443
//! ```
//!
//! Its key and certificate live in `--state-dir` (`identity.json`, mode 0600); restarting the agent
//! or the control panel keeps its identity.
//!
//! Commands arrive in heartbeat replies; the agent runs only the built-ins of
//! `fleet_agent_proto::runner` (`ping`, `collect-inventory`, `restart-agent`, which re-executes
//! the agent once its result is delivered) and answers every other kind with a failed result.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fleet_agent_proto::client::{
    self, AgentClient, AgentIdentity, ClientError, Endpoint, backoff, next_delay, renewal_due,
};
use fleet_agent_proto::runner::CommandRunner;
use fleet_agent_proto::{ErrorCode, HeartbeatRequest};
use fleet_core::{Clock, JoinString, MetricsSample, SystemClock, SystemInfo};

#[derive(Parser, Debug)]
#[command(name = "agent", version, about = "Fleet agent")]
struct Args {
    /// The join string printed when the operator created the token.
    #[arg(long)]
    join: String,
    /// The control panel's agent listener, e.g. `https://cp.example.com:8443`.
    #[arg(long)]
    server: String,
    /// Where the agent keeps its key and certificate.
    #[arg(long, default_value = "./agent-state")]
    state_dir: PathBuf,
}

fn endpoint(server: &str) -> Result<Endpoint> {
    let rest = server
        .strip_prefix("https://")
        .context("--server must start with https://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => (h.to_owned(), p.to_owned()),
        _ => (authority.to_owned(), "8443".to_owned()),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(Endpoint {
        address: format!(
            "{}:{port}",
            if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            }
        ),
        server_name: host,
    })
}

fn save(path: &Path, identity: &AgentIdentity) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(identity)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Unit-interval noise for jitter, from the clock (no RNG crate needed for spreading timers).
fn noise() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

struct Sensors {
    system: sysinfo::System,
    disks: sysinfo::Disks,
    networks: sysinfo::Networks,
}

impl Sensors {
    fn new() -> Result<Self> {
        Ok(Self {
            system: sysinfo::System::new().context("system metrics")?,
            disks: sysinfo::Disks::new_with_refreshed_list().context("disk metrics")?,
            networks: sysinfo::Networks::new_with_refreshed_list().context("network metrics")?,
        })
    }

    fn info() -> SystemInfo {
        let mut ips: Vec<std::net::IpAddr> = sysinfo::Networks::new_with_refreshed_list()
            .map(|n| {
                n.values()
                    .flat_map(|d| d.ip_networks().iter().map(|i| i.addr))
                    .filter(|a| !a.is_loopback())
                    .collect()
            })
            .unwrap_or_default();
        ips.sort();
        ips.dedup();
        ips.truncate(fleet_core::instance::MAX_IP_ADDRESSES);
        SystemInfo {
            hostname: sysinfo::System::host_name().unwrap_or_else(|_| "unknown-host".into()),
            ip_addresses: ips,
            os: sysinfo::System::name().ok(),
            os_version: sysinfo::System::os_version().ok(),
            arch: Some(sysinfo::System::cpu_arch()),
            agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        }
    }

    fn sample(&mut self) -> MetricsSample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        let (disk_total, disk_free) = self.disks.iter().fold((0u64, 0u64), |(t, f), d| {
            (t + d.total_space(), f + d.available_space())
        });
        let (rx, tx) = self.networks.values().fold((0u64, 0u64), |(r, t), n| {
            (r + n.total_received(), t + n.total_transmitted())
        });
        let load = sysinfo::System::load_average().ok();
        MetricsSample {
            cpu_percent: Some(f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0)),
            memory_used_bytes: Some(self.system.used_memory().min(self.system.total_memory())),
            memory_total_bytes: Some(self.system.total_memory()),
            disk_used_bytes: Some(disk_total.saturating_sub(disk_free)),
            disk_total_bytes: Some(disk_total),
            network_rx_bytes: Some(rx),
            network_tx_bytes: Some(tx),
            uptime_secs: sysinfo::System::uptime().ok(),
            load_1m: load.as_ref().map(|l| l.one),
            load_5m: load.as_ref().map(|l| l.five),
            load_15m: load.as_ref().map(|l| l.fifteen),
            agent_time: Some(SystemClock.now()),
        }
    }
}

async fn enroll_until_done(
    endpoint: &Endpoint,
    join: &JoinString,
    previous: Option<&AgentIdentity>,
) -> Result<AgentIdentity> {
    let mut failures = 0;
    loop {
        match client::enroll(endpoint, join, Sensors::info(), previous).await {
            Ok(id) => return Ok(id),
            Err(e @ ClientError::Refused(_)) => bail!("enrollment refused: {e}"),
            Err(e) => {
                let wait = backoff(failures, Duration::from_secs(90), noise());
                eprintln!("enrollment failed ({e}); retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                failures += 1;
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let join: JoinString = args.join.parse().context("--join is not a join string")?;
    let endpoint = endpoint(&args.server)?;
    std::fs::create_dir_all(&args.state_dir)?;
    let state = args.state_dir.join("identity.json");
    let mut identity: AgentIdentity = match std::fs::read(&state) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", state.display()))?,
        Err(_) => {
            let id = enroll_until_done(&endpoint, &join, None).await?;
            save(&state, &id)?;
            eprintln!("enrolled as instance {}", id.instance_id);
            id
        }
    };
    let mut sensors = Sensors::new()?;
    // Commands: only the built-ins run (see fleet_agent_proto::runner); results ride on the
    // next heartbeats until one succeeds.
    let mut runner = CommandRunner::new(|| {
        serde_json::json!({
            "system": Sensors::info(),
            "agent": env!("CARGO_PKG_VERSION"),
        })
    });
    let mut interval = Duration::from_secs(15);
    let mut failures = 0;
    let mut sequence = 0;
    // The server said this certificate's CA no longer signs (a CA rotation): renew now.
    let mut renew_now = false;
    loop {
        let now = SystemClock.now();
        let (not_before, not_after) = client::validity(&identity.certificate_pem)?;
        if now >= not_after {
            eprintln!("certificate expired; re-enrolling with the join string");
            identity = enroll_until_done(&endpoint, &join, Some(&identity)).await?;
            save(&state, &identity)?;
        }
        let mut agent = AgentClient::new(endpoint.clone(), identity.clone())?;
        if renew_now || now >= renewal_due(not_before, not_after, 0.7 + 0.2 * noise()) {
            match agent.renew().await {
                Ok(()) => {
                    identity = agent.identity().clone();
                    save(&state, &identity)?;
                    renew_now = false;
                    eprintln!("certificate renewed");
                }
                Err(e) => eprintln!("renewal failed ({e}); will retry"),
            }
        }
        sequence += 1;
        let req = HeartbeatRequest {
            sequence: Some(sequence),
            metrics: Some(sensors.sample()),
            apps: None,
            command_results: runner.pending_results(),
        };
        let wait = match agent.heartbeat(&req).await {
            Ok(reply) => {
                failures = 0;
                if let Some(bundle) = &reply.ca_bundle_pem {
                    // A CA rotation step: trust the set the server announced, and keep it.
                    match agent.trust_ca_bundle(bundle) {
                        Ok(()) => {
                            identity = agent.identity().clone();
                            save(&state, &identity)?;
                            eprintln!("now trusting CA set {}", agent.trusted_ca_set());
                        }
                        Err(e) => eprintln!("ignoring the announced CA bundle: {e}"),
                    }
                }
                renew_now |= reply.renew_now;
                interval = Duration::from_secs(reply.next_heartbeat_secs.max(1));
                runner.acknowledge(req.command_results.len());
                for c in &reply.commands {
                    eprintln!("running command {} ({})", c.id, c.kind);
                }
                runner.run(&reply.commands);
                if runner.restart_due() {
                    restart()?;
                }
                if runner.pending_results().is_empty() {
                    next_delay(interval, noise())
                } else {
                    // Report results at once rather than a heartbeat interval later.
                    Duration::from_millis(200)
                }
            }
            Err(e) if e.code() == Some(ErrorCode::CertificateRevoked) => {
                bail!("this instance was deregistered or its certificate revoked")
            }
            Err(e) => {
                failures += 1;
                let wait = backoff(failures, Duration::from_secs(90), noise()).max(interval / 4);
                eprintln!("heartbeat failed ({e}); retrying in {wait:?}");
                wait
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Replaces this process with a fresh copy of the agent (same arguments), for `restart-agent`.
#[cfg(unix)]
fn restart() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the agent binary")?;
    eprintln!("restarting as requested by a restart-agent command");
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).context("re-executing the agent")
}

/// Without `exec`, exit and let the service manager start the agent again.
#[cfg(not(unix))]
fn restart() -> Result<()> {
    eprintln!("exiting for a restart-agent command; the service manager restarts the agent");
    std::process::exit(0)
}
