//! The server side of a benchmark, run as a child process of `fleet-bench` (hidden subcommand
//! `child`) so it can be pinned to its own core and its CPU time and memory read from `/proc`.
//!
//! Two kinds: `fleet`, the real control plane (agent server over mutual TLS, operator API,
//! maintenance) on a memory, sled or PostgreSQL store; and `baseline`, a bare hyper + rustls
//! server with the same TLS configuration that reads the request body and answers a fixed reply
//! — the floor the fleet server is compared with.
//!
//! The child prints one [`Ready`] line of JSON on stdout once it is serving, and shuts down
//! gracefully (flushing heartbeats, closing the store) when its stdin closes — which also happens
//! if the parent dies, so a child never outlives a run; a stdin closed before the ready line
//! (while synthetic instances are still being added) ends the process at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleet_agent_proto::server::{AgentServer, ServerConfig, tls_config};
use fleet_agent_proto::{DEFAULT_TLS_HANDSHAKE_TIMEOUT, MAX_HEARTBEAT_BODY};
use fleet_core::store::{FleetStore, InstanceStore};
use fleet_core::{
    CertificateAuthority, Fleet, Groups, Instance, InstanceId, MaintenanceConfig, MaintenanceEvent,
    MaxUses, MemoryStore, MetricsSample, NewToken, SystemInfo, Tags, TenantId, TenantScope,
    Timestamp,
};
use fleet_store_postgres::PgStore;
use fleet_store_sled::SledStore;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::listen;
use crate::operator::OperatorApi;

/// Which store the fleet server uses.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `MemoryStore`: nothing persisted.
    Memory,
    /// `SledStore` in the run's directory.
    Sled,
    /// `PgStore` (a throwaway server unless `--database-url` is given).
    Postgres,
}

/// Which server the child runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The fleet control plane.
    Fleet,
    /// A bare hyper + rustls server answering a fixed reply.
    Baseline,
}

/// Arguments of the hidden `child` subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct ChildArgs {
    /// Server kind.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Store of the fleet server.
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    pub store: StoreKind,
    /// Directory for the sled store and the CA files (shared by the baseline).
    #[arg(long)]
    pub dir: PathBuf,
    /// PostgreSQL URL for `--store postgres`.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Synthetic instances to add to the store before opening (query scenario).
    #[arg(long, default_value_t = 0)]
    pub instances: usize,
    /// Persist every heartbeat before answering.
    #[arg(long)]
    pub write_through: bool,
}

/// What a child prints once it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// The agent (or baseline) listener.
    pub agent_addr: SocketAddr,
    /// The operator API (fleet only).
    pub operator_addr: Option<SocketAddr>,
    /// Join string of a multi-use registration token (fleet only).
    pub join: Option<String>,
    /// Operator token (fleet only).
    pub operator_token: Option<String>,
    /// Operator token limited to tenant [`BENCH_TENANT`] (fleet only).
    pub tenant_operator_token: Option<String>,
    /// Instances in the fleet view once open.
    pub instances: usize,
    /// Seconds spent adding synthetic instances.
    pub populate_secs: f64,
    /// Seconds `Fleet::open` took (rebuilding the live view from the store).
    pub open_secs: f64,
    /// Heap bytes of the live view (`LiveView::memory`), fleet only.
    pub view_bytes: Option<usize>,
}

/// The tenant of one synthetic instance in eight, the one the tenant operator token sees.
pub const BENCH_TENANT: &str = "acme";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Set once the ready line is out; before that a closed stdin ends the process at once.
static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Completes when the parent asks for a graceful stop (after the ready line).
type Stop = tokio::sync::watch::Receiver<bool>;

async fn stopped(mut stop: Stop) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the child until its stdin closes.
pub async fn run(args: ChildArgs) -> Result<()> {
    let started = Instant::now();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stdin_closed().await;
        if !SERVING.load(std::sync::atomic::Ordering::SeqCst) {
            // Still adding synthetic instances or opening: nothing to hand back, and the
            // stores are crash-safe — leave now rather than outlive the run.
            eprintln!("fleet-bench server: stopped before serving");
            std::process::exit(1);
        }
        let _ = stop_tx.send(true);
    });
    match args.kind {
        Kind::Baseline => baseline(&args.dir, stop).await,
        Kind::Fleet => match args.store {
            StoreKind::Memory => {
                let store = Arc::new(MemoryStore::new());
                populate_each(&store, args.instances).await?;
                fleet(&args, store, started.elapsed(), stop).await
            }
            StoreKind::Sled => {
                let store = SledStore::open(args.dir.join("db"))
                    .await
                    .context("opening the sled store")?;
                let have = usize::try_from(store.count_instances().await?).unwrap_or(usize::MAX);
                populate(have, args.instances, |batch| {
                    let store = store.clone();
                    async move {
                        store.bulk_insert(batch, 10_000).await?;
                        Ok(())
                    }
                })
                .await?;
                fleet(&args, store.clone(), started.elapsed(), stop).await?;
                store.close().await.context("closing the sled store")
            }
            StoreKind::Postgres => {
                let url = args
                    .database_url
                    .as_deref()
                    .context("--store postgres needs --database-url")?;
                let store = PgStore::connect(url)
                    .await
                    .context("connecting to PostgreSQL")?;
                store.migrate().await.context("migrating")?;
                populate_each(&store, args.instances).await?;
                fleet(&args, store.clone(), started.elapsed(), stop).await?;
                store.pool().close().await;
                Ok(())
            }
        },
    }
}

fn announce(ready: &Ready) -> Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(ready)?;
    SERVING.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Completes when stdin closes (the parent asked us to stop, or died).
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 256];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}

fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca-key.pem"))
}

fn load_ca(dir: &Path) -> Result<Option<CertificateAuthority>> {
    let (cert, key) = ca_paths(dir);
    if !cert.exists() {
        return Ok(None);
    }
    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(&cert)?,
        &std::fs::read_to_string(&key)?,
    )
    .context("loading the bench CA")?;
    Ok(Some(ca))
}

fn server_tls(ca: &CertificateAuthority, now: Timestamp) -> Result<Arc<rustls::ServerConfig>> {
    let names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let cert = ca.issue_server(&names, now, Duration::from_secs(86_400))?;
    Ok(tls_config(ca.cert_der(), &cert)?)
}

/// A synthetic instance `n` of a large fleet: 10 % `role=db`, three environments, four data
/// centres, a metrics sample.
pub fn synthetic_instance(n: usize, now: Timestamp) -> Result<Instance> {
    let roles = [
        "web", "web", "web", "worker", "worker", "cache", "queue", "batch", "edge", "db",
    ];
    let envs = ["prod", "prod", "staging", "dev"];
    let tags = Tags::from_pairs([
        ("role", roles[n % roles.len()]),
        ("env", envs[(n / 10) % envs.len()]),
        (
            "region",
            if n.is_multiple_of(3) {
                "eu-west"
            } else {
                "us-east"
            },
        ),
    ])?;
    let groups = Groups::from_names([format!("dc{}", n % 4)])?;
    let tenant = match n % 8 {
        0 => Some(TenantId::new(BENCH_TENANT)?),
        1 => Some(TenantId::new("globex")?),
        _ => None,
    };
    let b = n.to_be_bytes();
    Ok(Instance {
        id: InstanceId::random(),
        tenant,
        system: SystemInfo {
            hostname: format!("node-{n:07}.dc{}.example.net", n % 4),
            ip_addresses: vec![std::net::IpAddr::from([10, b[5], b[6], b[7]])],
            os: Some("Debian GNU/Linux".into()),
            os_version: Some("12".into()),
            arch: Some("x86_64".into()),
            agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        },
        tags,
        groups,
        registered_at: now,
        last_seen: now,
        metrics: Some(MetricsSample {
            cpu_percent: Some((n % 97) as f64),
            memory_used_bytes: Some(((n % 13) as u64 + 1) << 30),
            memory_total_bytes: Some(16 << 30),
            disk_used_bytes: Some(((n % 71) as u64 + 5) << 30),
            disk_total_bytes: Some(100 << 30),
            network_rx_bytes: Some(n as u64 * 1000),
            network_tx_bytes: Some(n as u64 * 300),
            uptime_secs: Some(86_400),
            load_1m: Some(0.5),
            ..MetricsSample::default()
        }),
        apps: Vec::new(),
        certificate: None,
        next_certificate: None,
    })
}

/// Synthetic instances `from..to`, in chunks of 10,000, handed to `insert`.
async fn populate<F, Fut>(from: usize, to: usize, mut insert: F) -> Result<()>
where
    F: FnMut(Vec<Instance>) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    const CHUNK: usize = 10_000;
    let now = fleet_core::Clock::now(&fleet_core::SystemClock);
    let mut n = from;
    while n < to {
        let end = (n + CHUNK).min(to);
        let batch = (n..end)
            .map(|i| synthetic_instance(i, now))
            .collect::<Result<Vec<_>>>()?;
        insert(batch).await?;
        n = end;
    }
    Ok(())
}

/// Adds synthetic instances one by one until `store` holds `want` (the sled store has a faster
/// import path, used instead).
async fn populate_each<S: FleetStore>(store: &S, want: usize) -> Result<()> {
    let have = usize::try_from(store.count_instances().await?).unwrap_or(usize::MAX);
    populate(have, want, |batch| async move {
        for inst in &batch {
            store.insert_instance(inst).await?;
        }
        Ok(())
    })
    .await
}

async fn fleet<S: FleetStore + Clone>(
    args: &ChildArgs,
    store: S,
    populate: Duration,
    stop: Stop,
) -> Result<()> {
    let populate_secs = populate.as_secs_f64();

    // The bench's store lives in a throwaway directory: a key of this run's seals the CA in it.
    let mut builder = Fleet::builder(store.clone())
        .write_through(args.write_through)
        .key_encryption_key(fleet_core::seal::KeyEncryptionKey::generate()?);
    let ca = load_ca(&args.dir)?;
    let had_ca = ca.is_some();
    if let Some(ca) = ca {
        builder = builder.ca(ca);
    }
    let opened = Instant::now();
    let fleet = builder.open().await.context("opening the fleet")?;
    let open_secs = opened.elapsed().as_secs_f64();
    if !had_ca {
        // The baseline child builds the same TLS configuration from these files.
        let (cert, key) = ca_paths(&args.dir);
        let (cert_pem, key_pem) = fleet.ca().export_pem();
        std::fs::write(&cert, &cert_pem)?;
        crate::write_private(&key, &key_pem)?;
    }
    let tls = server_tls(&fleet.ca(), fleet.now())?;
    let token = fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Unlimited,
                expires_in: Some(Duration::from_secs(86_400)),
                description: "fleet-bench".into(),
                ..NewToken::default()
            },
        )
        .await?;
    let operator_token = fleet_core::token::TokenSecret::random()?
        .expose()
        .to_owned();
    let tenant_operator_token = fleet_core::token::TokenSecret::random()?
        .expose()
        .to_owned();

    let agent_listener = listen(loopback())?;
    let operator_listener = listen(loopback())?;
    let ready = Ready {
        agent_addr: agent_listener.local_addr()?,
        operator_addr: Some(operator_listener.local_addr()?),
        join: Some(token.join.to_string()),
        operator_token: Some(operator_token.clone()),
        tenant_operator_token: Some(tenant_operator_token.clone()),
        instances: fleet.view().len(),
        populate_secs,
        open_secs,
        view_bytes: Some({
            let m = fleet.view().memory();
            m.slots_bytes + m.text_bytes + m.wheel_bytes + m.postings_bytes
        }),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let agents = Arc::new(AgentServer::new(
        fleet.clone(),
        tls,
        ServerConfig::default(),
    ));
    let agent_task = tokio::spawn(agents.serve(agent_listener, stopped(stop_rx.clone())));
    let api = Arc::new(
        OperatorApi::new(fleet.clone(), &operator_token)
            .tenant_token(TenantId::new(BENCH_TENANT)?, &tenant_operator_token),
    );
    let api_task = tokio::spawn(api.serve(operator_listener, stopped(stop_rx.clone())));
    let upkeep = fleet.spawn_maintenance(MaintenanceConfig::default(), |event| match event {
        MaintenanceEvent::FlushFailed(e)
        | MaintenanceEvent::SyncFailed(e)
        | MaintenanceEvent::LeaseFailed(e)
        | MaintenanceEvent::UpkeepFailed(e) => eprintln!("fleet-bench server: {e}"),
        _ => {}
    });
    announce(&ready)?;

    stopped(stop).await;
    let _ = stop_tx.send(true);
    let _ = agent_task.await;
    let _ = api_task.await;
    upkeep.shutdown().await;
    fleet.flush_heartbeats().await.context("final flush")?;
    Ok(())
}

/// The reply the fleet server gives a heartbeat with nothing queued, byte for byte.
const FIXED_REPLY: &[u8] = br#"{"commands":[],"next_heartbeat_secs":15}"#;

async fn baseline(dir: &Path, stop: Stop) -> Result<()> {
    let Some(ca) = load_ca(dir)? else {
        bail!(
            "the baseline needs the CA files a fleet child writes to {}",
            dir.display()
        );
    };
    let tls = server_tls(&ca, fleet_core::Clock::now(&fleet_core::SystemClock))?;
    let listener = listen(loopback())?;
    announce(&Ready {
        agent_addr: listener.local_addr()?,
        operator_addr: None,
        join: None,
        operator_token: None,
        tenant_operator_token: None,
        instances: 0,
        populate_secs: 0.0,
        open_secs: 0.0,
        view_bytes: None,
    })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stop = stopped(stop);
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, _) = tokio::select! {
            () = &mut stop => return Ok(()),
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(Ok(tls)) =
                tokio::time::timeout(DEFAULT_TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let ok = Limited::new(req.into_body(), MAX_HEARTBEAT_BODY)
                        .collect()
                        .await
                        .is_ok();
                    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(FIXED_REPLY)));
                    if !ok {
                        *resp.status_mut() = hyper::StatusCode::BAD_REQUEST;
                    }
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                },
            );
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(
                    fleet_agent_proto::DEFAULT_HEADER_READ_TIMEOUT
                        .max(fleet_agent_proto::DEFAULT_IDLE_TIMEOUT),
                );
            builder.http2().timer(TokioTimer::new());
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}
