//! The control panel: the whole product on one machine.
//!
//! ```text
//! cargo run --release -p fleet-examples --bin control-panel -- serve --demo-agents 25
//! ```
//!
//! Keeps the fleet in a SledStore under `--data-dir` (created 0700 on first start, with the CA
//! certificates in `ca.pem`, the key-encryption key that seals the CA key in the store in
//! `ca.kek` (0600) and an operator token in `operator-token` (0600); see
//! `fleet_examples::datadir`), or with `--store postgres --database-url URL` in PostgreSQL
//! (migrations run on start; the CA lives sealed in the database, so every replica on it shares
//! one — give them all the same `FLEET_CA_KEK`), serves agents over mutual TLS on
//! `--agent-listen`, and the web dashboard, the operator API and `/metrics` on
//! `--operator-listen` (loopback by default; open `http://127.0.0.1:8080/` and log in with the
//! operator token). `--tenant-token acme` adds an operator token limited to tenant `acme`.
//! SIGINT/SIGTERM flush batched heartbeats and close the store before exiting.
//!
//! At start the soft limit on open files is raised to the hard limit and both listeners'
//! connection caps are fitted under it, so that a flood on one listener never stops the other.
//! The operator listener's cap, request deadlines and HTTP/2 limits are the `--operator-…` flags
//! (see `fleet_examples::operator::listener`); `--trusted-proxy` names the reverse proxies whose
//! `X-Forwarded-Proto` and `X-Forwarded-For` count; `--login-max-failures` and `--login-window`
//! limit wrong operator tokens per address.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fleet_agent_proto::client::Endpoint;
use fleet_agent_proto::server::{AgentServer, ServerConfig};
use fleet_core::FleetStore;
use fleet_core::limiter::AttemptLimit;
use fleet_core::token::TokenSecret;
use fleet_core::{
    Fleet, MaintenanceConfig, MaintenanceEvent, MaxUses, NewToken, StalenessPolicy, TenantId,
    TenantScope,
};
use fleet_examples::datadir::connection_budget;
use fleet_examples::operator::OperatorApi;
use fleet_examples::operator::listener::{self, ListenerConfig};
use fleet_examples::operator::proxy::{Cidr, TrustedProxies};
use fleet_examples::{listen, write_private};
use fleet_store_postgres::PgStore;
use fleet_store_sled::SledStore;

#[derive(Parser, Debug)]
#[command(
    name = "control-panel",
    version,
    about = "Fleet management control panel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control panel.
    Serve(Box<Serve>),
    /// Seal the stored CA keys under a new key-encryption key (stop the control panel first;
    /// with PostgreSQL, then give every replica the new key and restart them).
    ResealCa(ResealCa),
}

/// `control-panel reseal-ca`: rotates the key-encryption key that seals the CA in the store.
#[derive(clap::Args, Debug)]
struct ResealCa {
    /// The control panel's data directory (the sled store lives in `db` there).
    #[arg(long, default_value = "./fleet-data")]
    data_dir: PathBuf,
    /// The store.
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    store: StoreKind,
    /// PostgreSQL URL for `--store postgres`.
    #[arg(long, env = "FLEET_DATABASE_URL")]
    database_url: Option<String>,
    /// The key the CA is sealed with now (`FLEET_CA_KEK` takes precedence). Default:
    /// `<data-dir>/ca.kek`.
    #[arg(long)]
    ca_kek_file: Option<PathBuf>,
    /// Where the new key goes: made (0600) if missing, read if present. After success, point
    /// `--ca-kek-file` (or `FLEET_CA_KEK`) of every replica at it; the old key no longer opens
    /// the store.
    #[arg(long)]
    new_ca_kek_file: PathBuf,
    /// Proceed even if group or others can read the data directory.
    #[arg(long)]
    insecure_permissions: bool,
}

/// Which store keeps the fleet.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    /// sled, embedded, in `--data-dir` (one control-plane process).
    Sled,
    /// PostgreSQL at `--database-url` (any number of replicas).
    Postgres,
}

#[derive(Parser, Debug)]
struct Serve {
    /// Where the store (sled), the CA files and the operator token live.
    #[arg(long, default_value = "./fleet-data")]
    data_dir: PathBuf,
    /// The store.
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    store: StoreKind,
    /// PostgreSQL URL for `--store postgres`, e.g. `postgres://fleet@db/fleet`.
    #[arg(long, env = "FLEET_DATABASE_URL")]
    database_url: Option<String>,
    /// Address of the agent listener (mutual TLS).
    #[arg(long, default_value = "0.0.0.0:8443")]
    agent_listen: String,
    /// Address of the operator API (plain HTTP: keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:8080")]
    operator_listen: String,
    /// Extra DNS names or IPs the agent listener's certificate is valid for (localhost and
    /// 127.0.0.1 always are).
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// An operator token limited to this tenant, kept in `operator-token.<tenant>` (created on
    /// first start, 0600); repeat for several tenants.
    #[arg(long = "tenant-token", value_name = "TENANT")]
    tenant_tokens: Vec<String>,
    /// Simulated agents to run in-process over real TLS.
    #[arg(long, default_value_t = 0)]
    demo_agents: usize,
    /// Seconds of silence after which an instance is `warning`.
    #[arg(long, default_value_t = 60)]
    warning_after: u64,
    /// Seconds of silence after which (strictly more than) an instance is `offline`.
    #[arg(long, default_value_t = 300)]
    offline_after: u64,
    /// Start even if group or others can read the data directory or files in it.
    #[arg(long)]
    insecure_permissions: bool,
    /// The file with the key-encryption key that seals the CA key in the store (64 hex digits,
    /// 0600; made on first start). `FLEET_CA_KEK` takes precedence. Default: `<data-dir>/ca.kek`.
    #[arg(long)]
    ca_kek_file: Option<PathBuf>,
    /// Operator connections served at once; one more is answered 503 `busy` and closed at once.
    /// Lowered, with `--agent-max-connections`, to fit the limit on open files.
    #[arg(long, value_name = "N", default_value_t = listener::DEFAULT_MAX_CONNECTIONS)]
    operator_max_connections: usize,
    /// Seconds an operator client has to send a request's headers: on a new connection, and on
    /// HTTP/1.1 after each response (which also bounds its keep-alive).
    #[arg(long, value_name = "SECS", default_value_t = Secs(listener::DEFAULT_HEADER_READ_TIMEOUT))]
    operator_header_timeout: Secs,
    /// Seconds an operator client has to send a request's whole body once its headers are in;
    /// later it is answered 408 `request_timeout`. Responses are not timed.
    #[arg(long, value_name = "SECS", default_value_t = Secs(listener::DEFAULT_BODY_TIMEOUT))]
    operator_body_timeout: Secs,
    /// Seconds an operator connection with no request in flight is kept open.
    #[arg(long, value_name = "SECS", default_value_t = Secs(listener::DEFAULT_IDLE_TIMEOUT))]
    operator_idle_timeout: Secs,
    /// HTTP/2 streams one operator connection may have open at once.
    #[arg(long, value_name = "N", default_value_t = listener::DEFAULT_H2_MAX_CONCURRENT_STREAMS)]
    operator_h2_max_streams: u32,
    /// Largest request head on the operator listener, in bytes (HTTP/1.1 headers, HTTP/2 header
    /// list).
    #[arg(long, value_name = "BYTES", default_value_t = listener::DEFAULT_MAX_HEADER_BYTES)]
    operator_max_header_bytes: u32,
    /// Seconds between HTTP/2 keep-alive PINGs on the operator listener.
    #[arg(long, value_name = "SECS", default_value_t = Secs(listener::DEFAULT_H2_KEEP_ALIVE_INTERVAL))]
    operator_h2_ping_interval: Secs,
    /// Seconds an HTTP/2 PING may go unanswered before the connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = Secs(listener::DEFAULT_H2_KEEP_ALIVE_TIMEOUT))]
    operator_h2_ping_timeout: Secs,
    /// Agent-listener connections held at once, unauthenticated (pending) and verified together;
    /// lowered to fit the limit on open files. A quarter at most (1,024 by default) is the
    /// pending budget, the rest is for verified agents (see `ServerConfig`).
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_connections + ServerConfig::default().max_pending_connections)]
    agent_max_connections: usize,
    /// A reverse proxy in front of the operator listener whose `X-Forwarded-Proto` and
    /// `X-Forwarded-For` are believed: an address or a CIDR block (`10.0.0.0/8`); repeat for
    /// several. From any other peer those headers are ignored.
    #[arg(long = "trusted-proxy", value_name = "ADDR")]
    trusted_proxies: Vec<Cidr>,
    /// Wrong operator tokens (at the login page or as a bearer) one address — for IPv6 its /64 —
    /// may present per window; further wrong ones are answered 429 until the window ends, while a
    /// correct token is always accepted.
    #[arg(long, value_name = "N", default_value_t = AttemptLimit::default().max_failures)]
    login_max_failures: u32,
    /// The login limiter's window, in seconds from a source's first failure.
    #[arg(long, value_name = "SECS", default_value_t = Secs(AttemptLimit::default().window))]
    login_window: Secs,
}

/// A duration given in seconds on the command line (fractions allowed: `0.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Secs(Duration);

impl std::str::FromStr for Secs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let secs: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number of seconds"))?;
        // NaN is not above zero either.
        if secs.is_nan() || secs <= 0.0 {
            return Err(format!("{s:?}: must be above zero"));
        }
        Duration::try_from_secs_f64(secs)
            .map(Self)
            .map_err(|e| format!("{s:?}: {e}"))
    }
}

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

/// Listens on the first address `addr` (`host:port`) resolves to that can be bound, as
/// `TcpListener::bind` does, with the larger backlog of [`listen`].
async fn bind(addr: &str) -> Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
    {
        match listen(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{addr} resolves to no address")))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = ctrl_c.await;
        return;
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

async fn serve(args: Serve) -> Result<()> {
    fleet_examples::datadir::private_umask();
    let fds = fleet_examples::datadir::raise_fd_limit();
    tracing::debug!(open_files = ?fds, "file descriptor limit");
    fleet_examples::datadir::prepare(&args.data_dir, args.insecure_permissions)?;
    match args.store {
        StoreKind::Sled => {
            let store = SledStore::open(args.data_dir.join("db"))
                .await
                .context("opening the store")?;
            run(args, store.clone(), fds).await?;
            store.close().await.context("closing the store")
        }
        StoreKind::Postgres => {
            let url = args
                .database_url
                .clone()
                .context("--store postgres needs --database-url (or FLEET_DATABASE_URL)")?;
            let store = PgStore::connect(&url)
                .await
                .context("connecting to PostgreSQL")?;
            store.migrate().await.context("migrating the database")?;
            tracing::info!("database schema up to date");
            run(args, store.clone(), fds).await?;
            store.pool().close().await;
            Ok(())
        }
    }
}

async fn reseal_ca(args: ResealCa) -> Result<()> {
    fleet_examples::datadir::private_umask();
    fleet_examples::datadir::prepare(&args.data_dir, args.insecure_permissions)?;
    let old_path = args
        .ca_kek_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("ca.kek"));
    if !old_path.exists() && std::env::var_os(fleet_examples::datadir::KEK_ENV).is_none() {
        anyhow::bail!(
            "no current key-encryption key at {} (and {} is not set)",
            old_path.display(),
            fleet_examples::datadir::KEK_ENV
        );
    }
    let (old, old_source) = fleet_examples::datadir::key_encryption_key(&old_path)?;
    let new = fleet_examples::datadir::key_file(&args.new_ca_kek_file)?;
    if new.id() == old.id() {
        anyhow::bail!(
            "the new key-encryption key is the current one ({})",
            old.id()
        );
    }
    match args.store {
        StoreKind::Sled => {
            let store = SledStore::open(args.data_dir.join("db"))
                .await
                .context("opening the store (is the control panel still running?)")?;
            reseal(store.clone(), old, &old_source, new).await?;
            store.close().await.context("closing the store")
        }
        StoreKind::Postgres => {
            let url = args
                .database_url
                .clone()
                .context("--store postgres needs --database-url (or FLEET_DATABASE_URL)")?;
            let store = PgStore::connect(&url)
                .await
                .context("connecting to PostgreSQL")?;
            reseal(store.clone(), old, &old_source, new).await?;
            store.pool().close().await;
            Ok(())
        }
    }
}

async fn reseal<S: FleetStore + Clone>(
    store: S,
    old: fleet_core::seal::KeyEncryptionKey,
    old_source: &str,
    new: fleet_core::seal::KeyEncryptionKey,
) -> Result<()> {
    let new_id = new.id();
    let fleet = Fleet::builder(store)
        .key_encryption_key(old)
        .open()
        .await
        .with_context(|| format!("opening the fleet (key-encryption key from {old_source})"))?;
    fleet
        .reseal_ca(new)
        .await
        .context("sealing the CA under the new key")?;
    fleet.flush_heartbeats().await.context("flushing")?;
    tracing::info!(new_key = %new_id, "the CA is sealed under the new key-encryption key; start every control panel with it and keep the old one only until then");
    Ok(())
}

/// The agent listener's budgets within `total` connections: the pending budget is a quarter at
/// most (its default, 1,024, when there is room), the verified budget the rest.
fn agent_config(total: usize) -> ServerConfig {
    let defaults = ServerConfig::default();
    let pending = defaults.max_pending_connections.min(total / 4).max(1);
    ServerConfig {
        max_pending_connections: pending,
        max_pending_per_source: defaults.max_pending_per_source.min(pending),
        max_connections: total.saturating_sub(pending).max(1),
        ..defaults
    }
}

async fn run<S: FleetStore + Clone>(args: Serve, store: S, fds: Option<u64>) -> Result<()> {
    // Neither listener may hold the descriptors the other needs.
    let budget = connection_budget(
        fds,
        u64::try_from(args.demo_agents).unwrap_or(u64::MAX),
        args.operator_max_connections,
        args.agent_max_connections,
    );
    if budget.lowered {
        tracing::warn!(
            open_files = ?fds,
            operator_connections = budget.operator,
            agent_connections = budget.agent,
            "connection caps lowered to fit the limit on open files (raise the hard limit, `ulimit -Hn`, for more)"
        );
    }
    let listener_config = ListenerConfig {
        max_connections: budget.operator,
        header_read_timeout: args.operator_header_timeout.0,
        body_timeout: args.operator_body_timeout.0,
        idle_timeout: args.operator_idle_timeout.0,
        h2_max_concurrent_streams: args.operator_h2_max_streams,
        max_header_bytes: args.operator_max_header_bytes,
        h2_keep_alive_interval: args.operator_h2_ping_interval.0,
        h2_keep_alive_timeout: args.operator_h2_ping_timeout.0,
    };
    listener_config
        .validate()
        .context("the operator listener's limits")?;
    let login_limit = AttemptLimit {
        max_failures: args.login_max_failures,
        window: args.login_window.0,
        ..AttemptLimit::default()
    };
    login_limit
        .validate()
        .context("--login-max-failures/--login-window")?;
    let policy = StalenessPolicy::new(
        Duration::from_secs(args.warning_after),
        Duration::from_secs(args.offline_after),
    )
    .context("--warning-after/--offline-after")?;

    // The CA lives sealed in the store; the key that unseals it lives outside it.
    let kek_path = args
        .ca_kek_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("ca.kek"));
    let (kek, kek_source) = fleet_examples::datadir::key_encryption_key(&kek_path)?;
    let mut builder = Fleet::builder(store.clone())
        .policy(policy)
        .key_encryption_key(kek);
    if args.store == StoreKind::Postgres {
        // Replicas: the sweeper records only once the others' heartbeats (flushed every second,
        // followed every second) have had time to reach it.
        builder = builder.sweep_lag(Duration::from_secs(3));
    }
    let legacy_key = args.data_dir.join("ca-key.pem");
    if legacy_key.exists() {
        tracing::warn!(path = %legacy_key.display(), "this file holds the CA key in the clear, written by an earlier version; the CA is now kept sealed in the store and this file is not read: move it to offline storage or delete it");
    }
    let started = std::time::Instant::now();
    let fleet = builder
        .open()
        .await
        .with_context(|| format!("opening the fleet (key-encryption key from {kek_source})"))?;
    tracing::info!(
        instances = fleet.view().len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "fleet loaded"
    );
    // The CA certificates, for clients to trust (public).
    let ca_pem = args.data_dir.join("ca.pem");
    std::fs::write(&ca_pem, fleet.ca_set().bundle_pem())
        .with_context(|| format!("writing {}", ca_pem.display()))?;
    let token_path = args.data_dir.join("operator-token");
    if !token_path.exists() {
        write_private(&token_path, TokenSecret::random()?.expose())?;
        tracing::info!(path = %token_path.display(), "created the operator token (0600)");
    }
    let read_token = |path: &std::path::Path| -> Result<String> {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            token.len() >= 16,
            "{} holds {} characters: an operator token needs at least 16 (delete the file to \
             have a new one generated)",
            path.display(),
            token.len()
        );
        Ok(token)
    };
    let operator_token = read_token(&token_path)?;
    let mut tenant_tokens = Vec::new();
    for tenant in &args.tenant_tokens {
        let id = TenantId::new(tenant).with_context(|| format!("--tenant-token {tenant}"))?;
        let path = args
            .data_dir
            .join(format!("operator-token.{}", id.as_str()));
        if !path.exists() {
            write_private(&path, TokenSecret::random()?.expose())?;
            tracing::info!(path = %path.display(), tenant = %id, "created a tenant operator token (0600)");
        }
        tenant_tokens.push((id, read_token(&path)?));
    }

    // The agent listener issues its own certificate from the fleet's signing CA, and a new one
    // when a CA rotation step changes the set (here or on another replica).
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(args.server_names.iter().cloned());
    let agent_listener = bind(&args.agent_listen).await?;
    let agent_addr = agent_listener.local_addr()?;
    let operator_listener = bind(&args.operator_listen).await?;
    let operator_addr = operator_listener.local_addr()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let agent_server = Arc::new(AgentServer::issuing(
        fleet.clone(),
        names,
        agent_config(budget.agent),
    )?);
    let agent_task = tokio::spawn(agent_server.serve(agent_listener, stopped(stop_rx.clone())));
    let api = tenant_tokens
        .iter()
        .fold(
            OperatorApi::new(fleet.clone(), &operator_token),
            |api, (t, token)| api.tenant_token(t.clone(), token),
        )
        .listener_config(listener_config)
        .trusted_proxies(TrustedProxies::new(args.trusted_proxies.iter().copied()))
        .login_limit(login_limit);
    let api = Arc::new(api);
    let api_task = tokio::spawn(api.serve(operator_listener, stopped(stop_rx.clone())));
    let upkeep = fleet.spawn_maintenance(MaintenanceConfig::default(), |event| match event {
        MaintenanceEvent::StatusChanges(changes) => {
            for c in changes {
                tracing::info!(instance = %c.instance, from = %c.transition.from, to = %c.transition.to, at = %c.transition.at, "status change");
            }
        }
        MaintenanceEvent::MassStaleness(alert) => {
            tracing::warn!(affected = alert.affected, fleet_size = alert.fleet_size, status = %alert.status, "{}", alert.message);
        }
        MaintenanceEvent::Upkeep { expired_commands, pruned_commands, pruned_history, pruned_revocations } => {
            tracing::info!(expired_commands, pruned_commands, pruned_history, pruned_revocations, "upkeep");
        }
        MaintenanceEvent::UpkeepFailed(e) => tracing::warn!(error = %e, "upkeep failed; will retry"),
        MaintenanceEvent::FlushFailed(e) => tracing::warn!(error = %e, "heartbeat flush failed; will retry"),
        MaintenanceEvent::SyncFailed(e) => tracing::warn!(error = %e, "change-feed sync failed; will retry"),
        MaintenanceEvent::LeaseFailed(e) => tracing::warn!(error = %e, "claiming the sweeper lease failed; this replica records no status changes until it holds it again"),
        other => tracing::debug!(?other, "maintenance"),
    });
    tracing::info!(%agent_addr, open_files = ?fds, operator_connections = budget.operator, agent_connections = budget.agent, dashboard = %format!("http://{operator_addr}/"), token_file = %token_path.display(), "control panel running");

    let demo = if args.demo_agents > 0 {
        let token = fleet
            .create_token(
                &TenantScope::All,
                NewToken {
                    max_uses: MaxUses::Limited(u32::try_from(args.demo_agents).unwrap_or(u32::MAX)),
                    expires_in: Some(Duration::from_secs(3600)),
                    description: "demo agents".into(),
                    ..NewToken::default()
                },
            )
            .await?;
        let endpoint = Endpoint {
            server_name: "localhost".into(),
            address: format!("127.0.0.1:{}", agent_addr.port()),
        };
        tracing::info!(count = args.demo_agents, "starting demo agents");
        Some(tokio::spawn(fleet_examples::demo::run(
            args.demo_agents,
            endpoint,
            token.join,
            stop_rx.clone(),
        )))
    } else {
        None
    };

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(d) = demo {
        let _ = d.await;
    }
    let _ = agent_task.await;
    let _ = api_task.await;
    upkeep.shutdown().await;
    fleet
        .flush_heartbeats()
        .await
        .context("final heartbeat flush")?;
    tracing::info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::ResealCa(args) => reseal_ca(args).await,
    }
}
