//! The scenarios: start the server child, drive load from this process, read the server's own
//! usage from `/proc`, and report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fleet_agent_proto::client::{self, AgentClient, AgentIdentity, Endpoint};
use fleet_agent_proto::{ENROLL_PATH, EnrollRequest, HEARTBEAT_PATH, HeartbeatRequest};
use fleet_core::{JoinString, MetricsSample, SystemInfo};
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinSet;

use super::child::{BENCH_TENANT, Kind, Ready, StoreKind};
use super::procfs::{self, Usage};
use super::stats::{Latencies, Percentiles};
use super::wire::{self, TlsConn};

/// The scenarios.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A bare hyper + rustls server: the transport's floor.
    Baseline,
    /// Keep-alive mTLS heartbeats: maximum rate (beside the baseline), then paced at 70 %.
    Heartbeat,
    /// Registrations with a multi-use token, each on a fresh connection.
    Enroll,
    /// Every agent reconnecting at once (full handshakes) after a server restart.
    Reconnect,
    /// Summary, filtered page and free-text search through the operator API.
    Query,
    /// Heartbeat latency, idle and while tenant operators send the heaviest allowed filter.
    Filter,
    /// Every scenario above, one after another.
    All,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Heartbeat => "heartbeat",
            Self::Enroll => "enroll",
            Self::Reconnect => "reconnect",
            Self::Query => "query",
            Self::Filter => "filter",
            Self::All => "all",
        }
    }
}

/// Settings of a run (see `fleet-bench --help`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Store of the fleet server.
    pub store: StoreKind,
    /// Connections / concurrent clients (scenario default when `None`).
    pub agents: Option<usize>,
    /// Measured time per phase.
    pub duration: Duration,
    /// Warm-up before each measured phase.
    pub warmup: Duration,
    /// Synthetic instances for `query`.
    pub instances: usize,
    /// Persist every heartbeat synchronously (`heartbeat`).
    pub write_through: bool,
    /// Paced rate for `heartbeat` (default: 70 % of the measured maximum).
    pub rate: Option<f64>,
    /// Small, fast settings (CI).
    pub quick: bool,
    /// CPU list for the server child (`taskset -c`), if pinned.
    pub server_cpu: Option<String>,
    /// Where the server keeps its files (a temporary directory when `None`).
    pub dir: Option<PathBuf>,
    /// PostgreSQL URL for `--store postgres` (a throwaway server when `None`).
    pub database_url: Option<String>,
    /// Longest a server may take to start (populating `--instances` included).
    pub start_timeout: Duration,
    /// Operator clients sending the filter in a loop (`filter`).
    pub query_clients: usize,
    /// The filter they send (`filter`; default [`heaviest_filter`]).
    pub filter: Option<String>,
}

/// The machine a run was taken on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    /// CPUs online.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// Server child's CPUs.
    pub server_cpu: Option<String>,
    /// Load generator's CPUs.
    pub load_cpu: Option<String>,
}

impl Machine {
    /// Reads `/proc/cpuinfo`.
    pub fn probe(cores: usize, server_cpu: Option<String>, load_cpu: Option<String>) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            cores,
            cpu,
            server_cpu,
            load_cpu,
        }
    }
}

/// A server child process.
struct Server {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    pid: u32,
    ready: Ready,
}

impl Server {
    async fn start(
        opts: &Options,
        kind: Kind,
        dir: &Path,
        instances: usize,
        write_through: bool,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("finding fleet-bench's own executable")?;
        let mut cmd = match &opts.server_cpu {
            Some(cpus) => {
                let mut c = tokio::process::Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&exe);
                c
            }
            None => tokio::process::Command::new(&exe),
        };
        cmd.arg("child")
            .arg("--kind")
            .arg(match kind {
                Kind::Fleet => "fleet",
                Kind::Baseline => "baseline",
            })
            .arg("--store")
            .arg(match opts.store {
                StoreKind::Memory => "memory",
                StoreKind::Sled => "sled",
                StoreKind::Postgres => "postgres",
            })
            .arg("--dir")
            .arg(dir)
            .arg("--instances")
            .arg(instances.to_string());
        if let Some(url) = &opts.database_url {
            cmd.arg("--database-url").arg(url);
        }
        if write_through {
            cmd.arg("--write-through");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting the server child")?;
        let pid = child.id().context("the server child has no pid")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("server stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(opts.start_timeout, lines.next_line())
            .await
            .map_err(|_| {
                anyhow!(
                    "the server did not start within {} s",
                    opts.start_timeout.as_secs()
                )
            })?
            .context("reading the server's ready line")?;
        let Some(line) = line else {
            let status = child.wait().await?;
            bail!("the server child exited before serving ({status})");
        };
        let ready: Ready = serde_json::from_str(&line)
            .with_context(|| format!("the server's ready line: {line}"))?;
        Ok(Self {
            child,
            stdin,
            pid,
            ready,
        })
    }

    fn usage(&self) -> Result<Usage> {
        procfs::usage(self.pid)
    }

    /// Closes the child's stdin and waits for a clean exit.
    async fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("the server child exited with {status}"),
            Ok(Err(e)) => Err(e).context("waiting for the server child"),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the server child did not stop within 60 s; killed")
            }
        }
    }

    fn join(&self) -> Result<JoinString> {
        self.ready
            .join
            .as_deref()
            .context("the server gave no join string")?
            .parse()
            .map_err(|e| anyhow!("join string: {e}"))
    }
}

/// Where the server keeps its files, removed at the end unless the user chose it.
struct WorkDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl WorkDir {
    fn new(opts: &Options, scenario: Scenario) -> Result<Self> {
        match &opts.dir {
            Some(base) => {
                let path = base.join(format!(
                    "{}-{}",
                    scenario.name(),
                    fleet_core::Clock::now(&fleet_core::SystemClock).as_unix_millis()
                ));
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                Ok(Self { path, _temp: None })
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("fleet-bench-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                Ok(Self {
                    path: temp.path().to_owned(),
                    _temp: Some(temp),
                })
            }
        }
    }
}

/// An enrolled simulated agent.
struct Agent {
    tls: Arc<rustls::ClientConfig>,
    heartbeat: Arc<[u8]>,
}

/// A heartbeat body like the real agent's: a sequence number and a full metrics sample
/// (≈ 330 bytes of JSON).
fn heartbeat_request(i: usize) -> Result<Arc<[u8]>> {
    let body = serde_json::to_vec(&HeartbeatRequest {
        sequence: Some(1_000_000 + i as u64),
        metrics: Some(MetricsSample {
            cpu_percent: Some(12.5 + (i % 50) as f64),
            memory_used_bytes: Some(6_442_450_944 + i as u64),
            memory_total_bytes: Some(17_179_869_184),
            disk_used_bytes: Some(53_687_091_200 + i as u64),
            disk_total_bytes: Some(107_374_182_400),
            network_rx_bytes: Some(987_654_321_000 + i as u64),
            network_tx_bytes: Some(123_456_789_000 + i as u64),
            uptime_secs: Some(8_640_000 + i as u64),
            load_1m: Some(0.42),
            load_5m: Some(0.37),
            load_15m: Some(0.31),
            agent_time: None,
        }),
        apps: None,
        command_results: Vec::new(),
    })?;
    Ok(wire::request("POST", HEARTBEAT_PATH, &[], Some(&body)).into())
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        server_name: "localhost".into(),
        address: addr.to_string(),
    }
}

fn system(i: usize) -> SystemInfo {
    SystemInfo {
        hostname: format!("bench-{i:06}.example.net"),
        ip_addresses: vec![std::net::IpAddr::from([10, 99, (i >> 8) as u8, i as u8])],
        os: Some("Debian GNU/Linux".into()),
        os_version: Some("12".into()),
        arch: Some("x86_64".into()),
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
    }
}

/// TLS settings of an enrolled agent, without session resumption so every connection is a full
/// handshake.
fn agent_tls(server: &Server, identity: AgentIdentity) -> Result<Arc<rustls::ClientConfig>> {
    let client = AgentClient::new(endpoint(server.ready.agent_addr), identity)
        .map_err(|e| anyhow!("agent credentials: {e}"))?;
    let mut tls = (**client.tls_config()).clone();
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(tls))
}

/// Enrolls `n` agents through the real client (key, CSR, CA pinning), 16 at a time.
async fn enroll_agents(server: &Server, n: usize) -> Result<Vec<Agent>> {
    let join = server.join()?;
    let ep = endpoint(server.ready.agent_addr);
    let mut identities = Vec::with_capacity(n);
    let mut tasks = JoinSet::new();
    let mut next = 0;
    while identities.len() < n {
        while next < n && tasks.len() < 16 {
            let (ep, join) = (ep.clone(), join.clone());
            let i = next;
            tasks.spawn(async move { client::enroll(&ep, &join, system(i), None).await });
            next += 1;
        }
        match tasks.join_next().await {
            Some(r) => identities.push(r?.map_err(|e| anyhow!("enrolling an agent: {e}"))?),
            None => break,
        }
    }
    identities
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            Ok(Agent {
                tls: agent_tls(server, id)?,
                heartbeat: heartbeat_request(i)?,
            })
        })
        .collect()
}

async fn connect_all(addr: SocketAddr, agents: &[Agent]) -> Result<Vec<TlsConn>> {
    let mut conns = Vec::with_capacity(agents.len());
    for a in agents {
        conns.push(wire::connect_tls(addr, Arc::clone(&a.tls)).await?);
    }
    Ok(conns)
}

/// Figures of one measured phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    /// Requests answered 2xx within the window.
    pub ok: u64,
    /// Requests that failed (non-2xx or transport error) at any time in the phase.
    pub failed: u64,
    /// Successful requests per second.
    pub rate: f64,
    /// Client-side latency.
    pub latency: Percentiles,
    /// Server CPU microseconds per successful request.
    pub cpu_us_per_op: f64,
    /// Share of one core the server used during the window.
    pub server_core_utilisation: f64,
    /// What the server's core could take at this cost: 1 s ÷ CPU per request.
    pub capacity_per_core: f64,
    /// First failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl Phase {
    /// The figures of what `t` counted over `window`, in which the server used `cpu`.
    fn measured(t: Tally, window: Duration, cpu: Duration) -> Self {
        let secs = window.as_secs_f64().max(1e-9);
        let cpu_us = cpu.as_secs_f64() * 1e6;
        let per_op = if t.ok == 0 { 0.0 } else { cpu_us / t.ok as f64 };
        Self {
            ok: t.ok,
            failed: t.failed,
            rate: t.ok as f64 / secs,
            latency: t.latencies.summary(),
            cpu_us_per_op: per_op,
            server_core_utilisation: cpu.as_secs_f64() / secs,
            capacity_per_core: if per_op > 0.0 { 1e6 / per_op } else { 0.0 },
            first_error: t.first_error,
        }
    }
}

/// A non-2xx reply, for an error message.
fn describe(reply: &wire::Reply) -> String {
    format!(
        "HTTP {}: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    )
}

/// What one connection did in a phase.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    latencies: Latencies,
    first_error: Option<String>,
}

impl Tally {
    fn fail(&mut self, e: impl std::fmt::Display) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, o: Self) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.latencies.merge(o.latencies);
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

/// Samples the server's usage at the start and end of the measured window.
async fn sample_window(
    pid: u32,
    from: Instant,
    until: Instant,
) -> Result<(Usage, Usage, Duration)> {
    tokio::time::sleep_until(from.into()).await;
    let t0 = Instant::now();
    let u0 = procfs::usage(pid)?;
    tokio::time::sleep_until(until.into()).await;
    let u1 = procfs::usage(pid)?;
    Ok((u0, u1, t0.elapsed()))
}

/// Drives `conns` for warm-up + measure: closed loop (next request when the reply is in) when
/// `rate` is `None`, else each connection on a fixed schedule adding up to `rate` per second,
/// latency counted from the scheduled time when the connection was still busy then (no
/// coordinated omission).
async fn drive(
    server: &Server,
    conns: Vec<TlsConn>,
    requests: Vec<Arc<[u8]>>,
    rate: Option<f64>,
    warmup: Duration,
    measure: Duration,
) -> Result<(Raw, Vec<TlsConn>)> {
    let n = conns.len();
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let mut tasks = JoinSet::new();
    for (i, (mut conn, req)) in conns.into_iter().zip(requests).enumerate() {
        tasks.spawn(async move {
            let mut t = Tally::default();
            let interval = rate.map(|r| Duration::from_secs_f64(n as f64 / r));
            let mut next =
                start + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / n as f64));
            let mut free_at = start;
            loop {
                if let Some(iv) = interval {
                    // Behind schedule at the end of the window: the rest is not sent.
                    if next >= until || Instant::now() >= until {
                        break;
                    }
                    tokio::time::sleep_until(next.into()).await;
                    let sent = Instant::now();
                    let origin = if free_at <= next { sent } else { next };
                    let r = conn.send(&req).await;
                    let done = Instant::now();
                    free_at = done;
                    match r {
                        Ok(reply) if reply.status == 200 => {
                            if next >= from {
                                t.ok += 1;
                                t.latencies.record(done - origin);
                            }
                        }
                        Ok(reply) => t.fail(describe(&reply)),
                        Err(e) => {
                            t.fail(format!("{e:#}"));
                            return (t, None);
                        }
                    }
                    next += iv;
                } else {
                    let sent = Instant::now();
                    if sent >= until {
                        break;
                    }
                    match conn.send(&req).await {
                        Ok(reply) if reply.status == 200 => {
                            if sent >= from {
                                t.ok += 1;
                                t.latencies.record(sent.elapsed());
                            }
                        }
                        Ok(reply) => t.fail(describe(&reply)),
                        Err(e) => {
                            t.fail(format!("{e:#}"));
                            return (t, None);
                        }
                    }
                }
            }
            (t, Some(conn))
        });
    }
    let (u0, u1, window) = sample_window(server.pid, from, until).await?;
    let mut raw = Raw {
        window,
        cpu: u1.cpu.saturating_sub(u0.cpu),
        ..Raw::default()
    };
    let mut kept = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        let (t, conn) = r?;
        raw.tally.merge(t);
        kept.extend(conn);
    }
    Ok((raw, kept))
}

/// What measured windows added up to, before it becomes a [`Phase`].
#[derive(Default)]
struct Raw {
    tally: Tally,
    cpu: Duration,
    window: Duration,
}

impl Raw {
    fn merge(&mut self, o: Self) {
        self.tally.merge(o.tally);
        self.cpu += o.cpu;
        self.window += o.window;
    }

    fn phase(self) -> Phase {
        Phase::measured(self.tally, self.window, self.cpu)
    }
}

/// Slices the maximum-rate measurement is cut into, alternating between the baseline and the
/// fleet server, so that a machine whose speed drifts (a shared VM) slows both alike.
const ROUNDS: u32 = 5;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn goal(name: &str, target: &str, measured: f64, met: bool) -> Value {
    json!({"goal": name, "target": target, "measured": measured, "met": met})
}

/// One scenario's report (printed as one JSON object with `--json`).
pub type Report = Value;

/// Failed requests in a report (exit status).
pub fn failures(report: &Report) -> u64 {
    report.get("failed").and_then(Value::as_u64).unwrap_or(0)
}

/// Maximum rate of the baseline (and of the fleet server, when given), in [`ROUNDS`]
/// alternating slices; then each paced at 70 % of its own maximum (the fleet server at `--rate`
/// when given). Returns
/// (baseline max, baseline paced, fleet max and paced).
async fn compare(
    opts: &Options,
    dir: &Path,
    agents: &[Agent],
    fleet: Option<&Server>,
) -> Result<(Phase, Phase, Option<(Phase, Phase)>)> {
    let baseline = Server::start(opts, Kind::Baseline, dir, 0, false).await?;
    let reqs: Vec<Arc<[u8]>> = agents.iter().map(|a| Arc::clone(&a.heartbeat)).collect();
    let mut base_conns = connect_all(baseline.ready.agent_addr, agents).await?;
    let mut fleet_conns = match fleet {
        Some(f) => connect_all(f.ready.agent_addr, agents).await?,
        None => Vec::new(),
    };
    let rounds = if opts.quick { 1 } else { ROUNDS };
    let slice = opts.duration.div_f64(f64::from(rounds));
    let (mut base_raw, mut fleet_raw) = (Raw::default(), Raw::default());
    for round in 0..rounds {
        // A full warm-up first; the connections stay warm between slices.
        let warmup = if round == 0 {
            opts.warmup
        } else {
            opts.warmup.min(Duration::from_millis(200))
        };
        let (raw, conns) = drive(&baseline, base_conns, reqs.clone(), None, warmup, slice).await?;
        base_raw.merge(raw);
        base_conns = conns;
        if let Some(f) = fleet {
            let (raw, conns) = drive(f, fleet_conns, reqs.clone(), None, warmup, slice).await?;
            fleet_raw.merge(raw);
            fleet_conns = conns;
        }
    }
    let base_max = base_raw.phase();
    let target = (base_max.rate * 0.7).max(1.0);
    // Each paced phase on fresh connections: the others' may have sat idle past the server's
    // timeouts meanwhile (long --duration).
    drop(base_conns);
    let base_conns = connect_all(baseline.ready.agent_addr, agents).await?;
    let (raw, base_conns) = drive(
        &baseline,
        base_conns,
        reqs.clone(),
        Some(target),
        opts.warmup,
        opts.duration,
    )
    .await?;
    let base_paced = raw.phase();
    drop(base_conns);
    baseline.stop().await?;
    let Some(f) = fleet else {
        return Ok((base_max, base_paced, None));
    };
    let fleet_max = fleet_raw.phase();
    let target = opts.rate.unwrap_or(fleet_max.rate * 0.7).max(1.0);
    drop(fleet_conns);
    let fleet_conns = connect_all(f.ready.agent_addr, agents).await?;
    let (raw, fleet_conns) = drive(
        f,
        fleet_conns,
        reqs,
        Some(target),
        opts.warmup,
        opts.duration,
    )
    .await?;
    drop(fleet_conns);
    Ok((base_max, base_paced, Some((fleet_max, raw.phase()))))
}

/// `baseline`: the bare hyper + rustls server alone.
pub async fn baseline(opts: &Options) -> Result<Report> {
    let dir = WorkDir::new(opts, Scenario::Baseline)?;
    let n = opts.agents.unwrap_or(if opts.quick { 8 } else { 64 });
    let fleet = Server::start(opts, Kind::Fleet, &dir.path, 0, false).await?;
    let agents = enroll_agents(&fleet, n).await?;
    let (max, paced, _) = compare(opts, &dir.path, &agents, None).await?;
    fleet.stop().await?;
    let failed = max.failed + paced.failed;
    Ok(json!({
        "scenario": "baseline",
        "connections": n,
        "duration_s": opts.duration.as_secs_f64(),
        "max": max,
        "paced": { "target_rate": (max.rate * 0.7).max(1.0), "phase": paced },
        "failed": failed,
    }))
}

/// `heartbeat`: the baseline and the fleet server at their maximum rates (alternating slices),
/// then each paced at 70 % of its maximum.
pub async fn heartbeat(opts: &Options) -> Result<Report> {
    let dir = WorkDir::new(opts, Scenario::Heartbeat)?;
    let n = opts.agents.unwrap_or(if opts.quick { 8 } else { 64 });
    let server = Server::start(opts, Kind::Fleet, &dir.path, 0, opts.write_through).await?;
    let agents = enroll_agents(&server, n).await?;
    let idle = server.usage()?;
    let (base, base_paced, fleet) = compare(opts, &dir.path, &agents, Some(&server)).await?;
    let (max, paced) = fleet.context("the fleet server's phases")?;
    let busy = server.usage()?;
    server.stop().await?;
    let target = opts.rate.unwrap_or(max.rate * 0.7).max(1.0);

    let ratio = if base.rate > 0.0 {
        max.rate / base.rate
    } else {
        0.0
    };
    let failed = base.failed + base_paced.failed + max.failed + paced.failed;
    let write_through = opts.write_through;
    let mut goals = vec![
        goal("heartbeat ÷ baseline", "≥ 0.8", ratio, ratio >= 0.8),
        goal(
            "server CPU per heartbeat (µs)",
            "≤ 15",
            max.cpu_us_per_op,
            max.cpu_us_per_op <= 15.0,
        ),
        goal(
            "p99 at 70 % of max (ms)",
            "≤ 5",
            paced.latency.p99_ms,
            paced.latency.p99_ms <= 5.0,
        ),
        goal("failed requests", "0", failed as f64, failed == 0),
    ];
    if write_through {
        goals.clear();
        goals.push(goal("failed requests", "0", failed as f64, failed == 0));
    }
    Ok(json!({
        "scenario": "heartbeat",
        "store": opts.store,
        "write_through": write_through,
        "connections": n,
        "request_bytes": agents.first().map_or(0, |a| a.heartbeat.len()),
        "duration_s": opts.duration.as_secs_f64(),
        "baseline": base,
        "baseline_paced": { "target_rate": (base.rate * 0.7).max(1.0), "phase": base_paced },
        "max": max,
        "paced": { "target_rate": target, "phase": paced },
        "ratio_to_baseline": ratio,
        "server_rss_idle_mib": mib(idle.rss),
        "server_peak_rss_mib": mib(busy.peak_rss),
        "failed": failed,
        "goals": goals,
    }))
}

/// `enroll`: registrations with a multi-use token, each on a fresh connection (full handshake
/// without a client certificate, CSR signed, committed to the store).
pub async fn enroll(opts: &Options) -> Result<Report> {
    let dir = WorkDir::new(opts, Scenario::Enroll)?;
    let workers = opts.agents.unwrap_or(if opts.quick { 4 } else { 16 });
    let server = Server::start(opts, Kind::Fleet, &dir.path, 0, false).await?;
    let join = server.join()?;
    // Keys and CSRs are made before the clock starts, so the load core measures the server.
    let budget = (opts.duration + opts.warmup).as_secs_f64();
    let pool = ((budget * 4000.0) as usize).clamp(200, 80_000);
    let mut requests = Vec::with_capacity(pool);
    for i in 0..pool {
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let body = serde_json::to_vec(&EnrollRequest {
            token: join.to_string(),
            csr_pem: csr,
            system: system(i),
            previous_certificate_pem: None,
        })?;
        requests.push(wire::request("POST", ENROLL_PATH, &[], Some(&body)));
    }
    let requests = Arc::new(requests);
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(dir.path.join("ca.pem"))?;
    for cert in <rustls_pki_types::CertificateDer<'_> as PemObject>::pem_slice_iter(&ca_pem) {
        roots.add(cert.context("CA certificate")?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.resumption = rustls::client::Resumption::disabled();
    let tls = Arc::new(tls);

    let start = Instant::now();
    let from = start + opts.warmup;
    let until = from + opts.duration;
    let next = Arc::new(AtomicUsize::new(0));
    let addr = server.ready.agent_addr;
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (requests, next, tls) = (Arc::clone(&requests), Arc::clone(&next), Arc::clone(&tls));
        tasks.spawn(async move {
            let mut t = Tally::default();
            let mut exhausted = false;
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                let Some(req) = requests.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    exhausted = true;
                    break;
                };
                let r = async {
                    let mut conn = wire::connect_tls(addr, Arc::clone(&tls)).await?;
                    conn.send(req).await
                }
                .await;
                match r {
                    Ok(reply) if reply.status == 200 => {
                        if sent >= from {
                            t.ok += 1;
                            t.latencies.record(sent.elapsed());
                        }
                    }
                    Ok(reply) => t.fail(describe(&reply)),
                    Err(e) => t.fail(format!("{e:#}")),
                }
            }
            (t, exhausted)
        });
    }
    let (u0, u1, window) = sample_window(server.pid, from, until).await?;
    let mut total = Tally::default();
    let mut exhausted = false;
    while let Some(r) = tasks.join_next().await {
        let (t, e) = r?;
        total.merge(t);
        exhausted |= e;
    }
    let instances = server.ready.instances;
    server.stop().await?;
    let phase = Phase::measured(total, window, u1.cpu.saturating_sub(u0.cpu));
    let failed = phase.failed;
    Ok(json!({
        "scenario": "enroll",
        "store": opts.store,
        "concurrency": workers,
        "duration_s": opts.duration.as_secs_f64(),
        "enroll": phase,
        "csr_pool_exhausted": exhausted,
        "instances_before": instances,
        "failed": failed,
        "goals": [
            goal("enrollments per second", "≥ 1,500", phase.rate, phase.rate >= 1500.0),
            goal("failed requests", "0", failed as f64, failed == 0),
        ],
    }))
}

/// `reconnect`: N agents on keep-alive connections; the server restarts; all reconnect at once
/// (full mutual-TLS handshakes) and heartbeat. Also the server's memory per idle connection.
pub async fn reconnect(opts: &Options) -> Result<Report> {
    if opts.store == StoreKind::Memory {
        bail!(
            "reconnect restarts the server and needs a persistent store: --store sled or postgres"
        );
    }
    let dir = WorkDir::new(opts, Scenario::Reconnect)?;
    let n = opts.agents.unwrap_or(if opts.quick { 50 } else { 2000 });
    let server = Server::start(opts, Kind::Fleet, &dir.path, 0, false).await?;
    let agents = Arc::new(enroll_agents(&server, n).await?);
    let mut conns = connect_all(server.ready.agent_addr, &agents).await?;
    for (c, a) in conns.iter_mut().zip(agents.iter()) {
        let reply = c.send(&a.heartbeat).await?;
        if reply.status != 200 {
            bail!("heartbeat before the restart: HTTP {}", reply.status);
        }
    }
    server.stop().await?;
    drop(conns);

    let restarted = Instant::now();
    let server = Server::start(opts, Kind::Fleet, &dir.path, 0, false).await?;
    let restart_secs = restarted.elapsed().as_secs_f64();
    let before = server.usage()?;
    let addr = server.ready.agent_addr;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let agents = Arc::clone(&agents);
        tasks.spawn(async move {
            let a = &agents[i];
            let sent = Instant::now();
            let r = async {
                let mut conn = wire::connect_tls(addr, Arc::clone(&a.tls)).await?;
                let reply = conn.send(&a.heartbeat).await?;
                Ok::<_, anyhow::Error>((conn, reply))
            }
            .await;
            (sent.elapsed(), r)
        });
    }
    let mut t = Tally::default();
    let mut open = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        let (latency, r) = r?;
        match r {
            Ok((conn, reply)) if reply.status == 200 => {
                t.ok += 1;
                t.latencies.record(latency);
                open.push(conn);
            }
            Ok((_, reply)) => t.fail(describe(&reply)),
            Err(e) => t.fail(format!("{e:#}")),
        }
    }
    let window = start.elapsed();
    let after = server.usage()?;
    // Let the first flush of the reconnect heartbeats happen, then read the idle footprint.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = server.usage()?;
    let per_conn = if open.is_empty() {
        0.0
    } else {
        idle.rss.saturating_sub(before.rss) as f64 / open.len() as f64
    };
    // The same figure in a steady state: connections opened one at a time, so the handshakes'
    // transient memory (which the allocator keeps after a storm) is not counted.
    let more = (n / 4).max(1);
    let before_more = server.usage()?;
    for a in agents.iter().take(more) {
        let mut conn = wire::connect_tls(addr, Arc::clone(&a.tls)).await?;
        let reply = conn.send(&a.heartbeat).await?;
        if reply.status != 200 {
            t.fail(format!("HTTP {}", reply.status));
        }
        open.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_more = server.usage()?;
    let per_conn_steady = after_more.rss.saturating_sub(before_more.rss) as f64 / more as f64;
    let held = open.len();
    drop(open);
    server.stop().await?;
    let phase = Phase::measured(t, window, after.cpu.saturating_sub(before.cpu));
    let failed = phase.failed;
    Ok(json!({
        "scenario": "reconnect",
        "store": opts.store,
        "agents": n,
        "restart_s": restart_secs,
        "reconnect": phase,
        "idle_connections": held,
        "rss_per_idle_connection_kib": per_conn / 1024.0,
        "rss_per_idle_connection_steady_kib": per_conn_steady / 1024.0,
        "steady_connections": more,
        "failed": failed,
        "goals": [
            goal("full handshakes per second", "≥ 4,000", phase.rate, phase.rate >= 4000.0),
            goal("RSS per idle connection, steady (KiB)", "≤ 32", per_conn_steady / 1024.0, per_conn_steady <= 32.0 * 1024.0),
            goal("failed requests", "0", failed as f64, failed == 0),
        ],
    }))
}

/// `query`: the operator API at `--instances` synthetic instances.
pub async fn query(opts: &Options) -> Result<Report> {
    let dir = WorkDir::new(opts, Scenario::Query)?;
    let instances = if opts.quick {
        opts.instances.min(2000)
    } else {
        opts.instances
    };
    let server = Server::start(opts, Kind::Fleet, &dir.path, instances, false).await?;
    let usage = server.usage()?;
    let addr = server.ready.operator_addr.context("no operator API")?;
    let auth = format!(
        "Bearer {}",
        server.ready.operator_token.as_deref().unwrap_or_default()
    );
    let mut conn = wire::connect_plain(addr).await?;
    // 10 % of the fleet has role=db, half of those in prod; the search needle is a hostname
    // prefix shared by 1,000 instances (at most 100 returned), found by scanning every hostname.
    let needle = format!("node-{:04}", instances / 2 / 1000);
    let search = format!("/api/v1/instances?filter=text%3A{needle}&limit=100");
    let ops = [
        ("summary", "/api/v1/summary", 1.0, "≤ 1"),
        (
            "summary_filtered",
            "/api/v1/summary?filter=role%3Ddb",
            5.0,
            "≤ 5",
        ),
        (
            "page_filtered",
            "/api/v1/instances?filter=role%3Ddb%20env%3Dprod&limit=100",
            10.0,
            "≤ 10",
        ),
        ("search", search.as_str(), 50.0, "≤ 50"),
    ];
    let per_op = opts.duration.div_f64(ops.len() as f64);
    let mut results = serde_json::Map::new();
    let mut goals = Vec::new();
    // A failed query ends the scenario with an error (and fleet-bench with a non-zero status).
    let failed = 0u64;
    for (name, path, limit_ms, target) in ops {
        let req = wire::request("GET", path, &[("authorization", &auth)], None);
        let mut client = Latencies::default();
        let mut server_ms = Latencies::default();
        let mut items = 0usize;
        let started = Instant::now();
        let mut rounds = 0;
        while rounds < 5 || (started.elapsed() < per_op && rounds < 100_000) {
            let sent = Instant::now();
            let reply = conn.send(&req).await?;
            let took = sent.elapsed();
            if reply.status != 200 {
                bail!("{name}: {}", describe(&reply));
            }
            if rounds >= 2 {
                client.record(took);
                if let Some(d) = reply
                    .server_ms
                    .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
                {
                    server_ms.record(d);
                }
            }
            if rounds == 0 {
                let v: Value = serde_json::from_slice(&reply.body)?;
                items = v.get("items").and_then(Value::as_array).map_or(0, Vec::len);
            }
            rounds += 1;
        }
        let count = client.len();
        let server_p = server_ms.summary();
        goals.push(goal(
            &format!("{name} server p50 (ms)"),
            target,
            server_p.p50_ms,
            server_p.p50_ms <= limit_ms,
        ));
        results.insert(
            name.into(),
            json!({"requests": count, "items": items, "client": client.summary(), "server": server_p}),
        );
    }
    drop(conn);
    let ready = server.ready.clone();
    server.stop().await?;
    let per_instance = |bytes: f64| {
        if ready.instances == 0 {
            0.0
        } else {
            bytes / ready.instances as f64
        }
    };
    let view_per = per_instance(ready.view_bytes.unwrap_or(0) as f64);
    goals.push(goal(
        "live view bytes per instance",
        "≤ 512",
        view_per,
        view_per <= 512.0,
    ));
    Ok(json!({
        "scenario": "query",
        "store": opts.store,
        "instances": ready.instances,
        "populate_s": ready.populate_secs,
        "open_s": ready.open_secs,
        "queries": results,
        "live_view_bytes_per_instance": view_per,
        "server_rss_mib": mib(usage.rss),
        "server_rss_bytes_per_instance": per_instance(usage.rss as f64),
        "failed": failed,
        "goals": goals,
    }))
}

/// The heaviest filter the operator API accepts, by the work it makes per instance: every value
/// the limits allow is a `text:` value (free text is what costs per instance; tag, group and
/// status terms are bitmap or integer checks), 256 values of 1,020 characters in 4 terms of 64,
/// and every term matches every synthetic instance, late in its text (`10.`, its IP address),
/// so that none is skipped and each is searched through. The other 63 values of each term
/// (`qaaa`, `qaab`, …) match nothing.
pub fn heaviest_filter() -> String {
    let letter = |n: usize| char::from(b'a' + (n % 26) as u8);
    (0..4)
        .map(|t| {
            let mut values: Vec<String> = (0..63)
                .map(|i| format!("q{}{}{}", letter(t), letter(i / 26), letter(i)))
                .collect();
            values.push("10.".into());
            format!("text:{}", values.join("|"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An operator client sending one request in a loop until `stop`; counts what was sent inside
/// `[from, until)`.
async fn query_loop(
    addr: SocketAddr,
    req: Arc<[u8]>,
    from: Instant,
    until: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Tally, Latencies) {
    let mut t = Tally::default();
    let mut server_ms = Latencies::default();
    let mut conn = match wire::connect_plain(addr).await {
        Ok(c) => c,
        Err(e) => {
            t.fail(format!("{e:#}"));
            return (t, server_ms);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let counted = sent >= from && sent < until;
        match conn.send(&req).await {
            Ok(reply) if reply.status == 200 => {
                if counted {
                    t.ok += 1;
                    t.latencies.record(sent.elapsed());
                    if let Some(d) = reply
                        .server_ms
                        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
                    {
                        server_ms.record(d);
                    }
                }
            }
            Ok(reply) => {
                t.fail(describe(&reply));
                break;
            }
            Err(e) => {
                t.fail(format!("{e:#}"));
                break;
            }
        }
    }
    (t, server_ms)
}

/// `filter`: heartbeats paced at `--rate` (default 2,000/s) over `--agents` connections at
/// `--instances` synthetic instances, idle, then while `--query-clients` (4) operators limited
/// to one tenant send `GET /api/v1/summary` with the heaviest filter the API accepts (or
/// `--filter`) in a loop, then idle again. Issue 16's goal: heartbeat p50 under that load
/// within 2× of idle, p99 under 50 ms.
pub async fn filter(opts: &Options) -> Result<Report> {
    let dir = WorkDir::new(opts, Scenario::Filter)?;
    let instances = if opts.quick {
        opts.instances.min(2000)
    } else {
        opts.instances
    };
    let server = Server::start(opts, Kind::Fleet, &dir.path, instances, false).await?;
    let n = opts.agents.unwrap_or(if opts.quick { 8 } else { 64 });
    let rate = opts.rate.unwrap_or(if opts.quick { 400.0 } else { 2000.0 });
    let agents = enroll_agents(&server, n).await?;
    let reqs: Vec<Arc<[u8]>> = agents.iter().map(|a| Arc::clone(&a.heartbeat)).collect();
    let operator = server.ready.operator_addr.context("no operator API")?;
    let auth = format!(
        "Bearer {}",
        server
            .ready
            .tenant_operator_token
            .as_deref()
            .context("no tenant operator token")?
    );
    let filter = opts.filter.clone().unwrap_or_else(heaviest_filter);
    let path = format!(
        "/api/v1/summary?filter={}",
        form_urlencoded::byte_serialize(filter.as_bytes()).collect::<String>()
    );
    let query: Arc<[u8]> = wire::request("GET", &path, &[("authorization", &auth)], None).into();

    // One query alone first: what it selects and what it costs with nothing else running.
    let mut conn = wire::connect_plain(operator).await?;
    let mut alone = Latencies::default();
    let mut alone_server = Latencies::default();
    let mut selected = 0;
    let mut refused = None;
    for i in 0..if opts.quick { 3 } else { 20 } {
        let sent = Instant::now();
        let reply = conn.send(&query).await?;
        let took = sent.elapsed();
        if reply.status != 200 {
            refused = Some(describe(&reply));
            break;
        }
        if i == 0 {
            let v: Value = serde_json::from_slice(&reply.body)?;
            selected = v.get("total").and_then(Value::as_u64).unwrap_or(0);
        }
        alone.record(took);
        if let Some(d) = reply
            .server_ms
            .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
        {
            alone_server.record(d);
        }
    }
    drop(conn);

    let conns = connect_all(server.ready.agent_addr, &agents).await?;
    let (idle, conns) = drive(
        &server,
        conns,
        reqs.clone(),
        Some(rate),
        opts.warmup,
        opts.duration,
    )
    .await?;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let from = start + opts.warmup;
    let until = from + opts.duration;
    let mut clients = JoinSet::new();
    if refused.is_none() {
        for _ in 0..opts.query_clients {
            clients.spawn(query_loop(
                operator,
                Arc::clone(&query),
                from,
                until,
                Arc::clone(&stop),
            ));
        }
    }
    let (loaded, conns) = drive(
        &server,
        conns,
        reqs.clone(),
        Some(rate),
        opts.warmup,
        opts.duration,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let mut queries = Tally::default();
    let mut query_server = Latencies::default();
    while let Some(r) = clients.join_next().await {
        let (t, s) = r?;
        queries.merge(t);
        query_server.merge(s);
    }
    if let Some(r) = refused {
        queries.fail(r);
    }

    let (idle_after, conns) = drive(
        &server,
        conns,
        reqs,
        Some(rate),
        opts.warmup.min(Duration::from_millis(500)),
        opts.duration,
    )
    .await?;
    drop(conns);
    let held = server.ready.instances;
    server.stop().await?;

    let (idle, loaded, idle_after) = (idle.phase(), loaded.phase(), idle_after.phase());
    let query_rate = queries.ok as f64 / opts.duration.as_secs_f64().max(1e-9);
    let query_failed = queries.failed;
    let query_latency = queries.latencies.summary();
    let failed = idle.failed + loaded.failed + idle_after.failed + query_failed;
    let ratio = if idle.latency.p50_ms > 0.0 {
        loaded.latency.p50_ms / idle.latency.p50_ms
    } else {
        f64::NAN
    };
    Ok(json!({
        "scenario": "filter",
        "store": opts.store,
        "instances": held,
        "tenant": BENCH_TENANT,
        "connections": n,
        "heartbeat_rate": rate,
        "query_clients": opts.query_clients,
        "filter_bytes": filter.len(),
        "filter_selects": selected,
        "duration_s": opts.duration.as_secs_f64(),
        "query_alone": {"client": alone.summary(), "server": alone_server.summary()},
        "idle": idle,
        "loaded": loaded,
        "idle_after": idle_after,
        "queries": {
            "ok": queries.ok,
            "failed": query_failed,
            "rate": query_rate,
            "client": query_latency,
            "server": query_server.summary(),
            "first_error": queries.first_error,
        },
        "p50_loaded_over_idle": ratio,
        "failed": failed,
        "goals": [
            goal("heartbeat p50 loaded ÷ idle", "≤ 2", ratio, ratio <= 2.0),
            goal("heartbeat p99 loaded (ms)", "< 50", loaded.latency.p99_ms, loaded.latency.p99_ms < 50.0),
            goal("failed requests", "0", failed as f64, failed == 0),
        ],
    }))
}

/// Runs one scenario (or all) and returns its reports.
pub async fn run(scenario: Scenario, opts: &Options) -> Result<Vec<Report>> {
    let one = |s: Scenario| async move {
        match s {
            Scenario::Baseline => baseline(opts).await,
            Scenario::Heartbeat => heartbeat(opts).await,
            Scenario::Enroll => enroll(opts).await,
            Scenario::Reconnect => reconnect(opts).await,
            Scenario::Query => query(opts).await,
            Scenario::Filter => filter(opts).await,
            Scenario::All => bail!("`all` is not one scenario"),
        }
        .with_context(|| format!("scenario {}", s.name()))
    };
    match scenario {
        Scenario::All => {
            let mut out = Vec::new();
            for s in [
                Scenario::Heartbeat,
                Scenario::Enroll,
                Scenario::Reconnect,
                Scenario::Query,
                Scenario::Filter,
            ] {
                if s == Scenario::Reconnect && opts.store == StoreKind::Memory {
                    continue;
                }
                out.push(one(s).await?);
            }
            Ok(out)
        }
        s => Ok(vec![one(s).await?]),
    }
}
