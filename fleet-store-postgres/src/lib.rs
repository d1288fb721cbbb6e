//! # fleet-store-postgres
//!
//! The PostgreSQL store of fleet, on sqlx: several control-plane replicas share one database,
//! each keeping its live view current from the store's change feed.
//!
//! ```no_run
//! use fleet_core::Fleet;
//! use fleet_store_postgres::PgStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::connect("postgres://fleet@db.internal/fleet").await?;
//! store.migrate().await?; // embedded migrations; safe to run on every start, from every replica
//! // Every replica gets the same key-encryption key, which seals the CA key in the database.
//! let kek = fleet_core::seal::KeyEncryptionKey::parse(&std::env::var("FLEET_CA_KEK")?)?;
//! let fleet = Fleet::builder(store).key_encryption_key(kek).open().await?;
//! # Ok(()) }
//! ```
//!
//! ## How it keeps the contracts
//!
//! - Every durable write is one transaction. Writes that the change feed records take the single
//!   `fleet_feed_head` row's lock to number their changes, so sequence numbers are handed out in
//!   commit order (a reader that saw change *n* never misses a smaller one committed later).
//! - Enrollment locks the token row (`SELECT … FOR UPDATE`), so concurrent enrollments with one
//!   token behave as if run one at a time, across any number of replicas and pools.
//! - Command delivery reads the instance's open commands `FOR UPDATE SKIP LOCKED`: two
//!   concurrent deliveries never hand out the same command, and a cancel waits for (and loses to)
//!   a delivery holding the row, or wins and the delivery skips it.
//! - Heartbeats are persisted in batches: one statement per flush upserts them (`INSERT … SELECT
//!   FROM UNNEST(…) ON CONFLICT DO UPDATE`) into `fleet_heartbeats`, whose only index is its key
//!   and whose fillfactor leaves room on each page, so updates stay HOT — and logs the batch
//!   (ids, last-seen times, metrics) in `fleet_hb_log`, numbered in commit order, from which every
//!   other replica's `Fleet::sync` applies the heartbeats that reached this one (kept ten
//!   minutes).
//! - Records are the fleet-core types as JSON (`jsonb`), with the columns that queries filter on
//!   (tenant, tags as `jsonb` with a GIN index, groups as `text[]` with a GIN index, the
//!   searchable text — hostname folded by Rust's `to_lowercase` and IP addresses, exactly as the
//!   live view holds them — with a trigram index, command state) beside them. Every write of an
//!   instance rewrites them from the record. Times are Unix milliseconds.
//!
//! - Replicas poll the change feed and the heartbeat log; writers also `NOTIFY fleet_writes` at
//!   commit, and `wait_for_writes` (a `LISTEN` that holds one of the pool's connections) wakes
//!   them sooner — a hint only, never the source of truth.
//!
//! ## Several replicas
//!
//! Open each replica's `Fleet` with [`FleetBuilder::sweep_lag`] (a few seconds) and run its
//! maintenance (`Fleet::spawn_maintenance`): every replica follows the change feed and the
//! heartbeat log, so all views agree within about a second; one replica at a time holds the
//! sweeper lease (`fleet_leases`, with an epoch that grows at each change of hands) and records
//! status changes, fleet alerts and trends; when it dies another takes over once the lease
//! (10 s by default) runs out and records what its own view found meanwhile. Status changes are
//! keyed by instance, time and statuses, so a change two replicas record is kept once. Replicas'
//! clocks must agree to well within the lease (NTP).
//!
//! [`FleetBuilder::sweep_lag`]: fleet_core::FleetBuilder::sweep_lag
//!
//! Errors: a pool that cannot reach the database reports [`StoreError::Unavailable`] (the caller
//! may retry; nothing was written); everything else is [`StoreError::Backend`] with the sqlx
//! error as its source.
//!
//! Tests read `FLEET_TEST_DATABASE_URL`, or start a throwaway server themselves; see
//! `testing` (feature `testing`).

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod pushdown;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleet_core::StoreError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};

pub use fleet_core;
pub use pushdown::PushdownError;
pub use sqlx;

/// How many change-feed entries the store keeps (older ones are pruned; a replica that fell
/// further behind rebuilds its view from a full listing).
pub const FEED_RETENTION: i64 = 1 << 20;

/// Why a store could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgStoreError {
    /// The database could not be reached or refused the connection.
    #[error("connecting to PostgreSQL failed")]
    Connect(#[source] sqlx::Error),
    /// The embedded migrations failed.
    #[error("migrating the fleet schema failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Filling in the folded search text of existing instances (after migration 0002) failed.
    #[error("filling in the search text of existing instances failed")]
    Backfill(#[source] StoreError),
}

/// The channel writers notify (at commit) and replicas listen on, as a wake-up hint.
pub const NOTIFY_CHANNEL: &str = "fleet_writes";

/// The PostgreSQL store; cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    wake: Arc<Wake>,
}

/// The LISTEN side of the wake-up hint: one listener task per store, started on first use.
#[derive(Debug, Default)]
struct Wake {
    notify: tokio::sync::Notify,
    started: AtomicBool,
}

/// Listens on [`NOTIFY_CHANNEL`] and wakes the waiters; reconnects after errors; ends when the
/// store is gone or its pool closed.
async fn listen(pool: PgPool, wake: std::sync::Weak<Wake>) {
    while !pool.is_closed() {
        if let Ok(mut listener) = PgListener::connect_with(&pool).await
            && listener.listen(NOTIFY_CHANNEL).await.is_ok()
        {
            loop {
                let next = tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await;
                let Some(w) = wake.upgrade() else { return };
                match next {
                    Ok(Ok(Some(_))) => w.notify.notify_waiters(),
                    // The connection dropped (sqlx reconnects on the next call): writes may
                    // have been missed, so wake everyone to poll.
                    Ok(Ok(None)) => w.notify.notify_waiters(),
                    Ok(Err(_)) => break,
                    Err(_) if pool.is_closed() => return,
                    Err(_) => {}
                }
            }
        }
        if wake.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl PgStore {
    /// Connects a pool (16 connections, 5 s to acquire one) to `url`.
    pub async fn connect(url: &str) -> Result<Self, PgStoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(PgStoreError::Connect)?;
        Ok(Self::new(pool))
    }

    /// A store over a pool you configured.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            wake: Arc::default(),
        }
    }

    /// Waits for a notification on [`NOTIFY_CHANNEL`] (starting the listener on first use).
    pub(crate) async fn notified(&self) {
        let notified = self.wake.notify.notified();
        if !self.wake.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(listen(self.pool.clone(), Arc::downgrade(&self.wake)));
        }
        notified.await;
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations that are not applied yet (PostgreSQL's advisory lock keeps
    /// replicas starting at once from racing), then fills in, from Rust, the folded search text
    /// of every instance that lacks it — rows from before layout 2, or written since by an older
    /// binary — in batches of 1,000 rows (replicas starting at once share the batches). Cheap when
    /// there is nothing to fill in (a partial index finds the rows).
    pub async fn migrate(&self) -> Result<(), PgStoreError> {
        sqlx::migrate!("./migrations")
            .run(&self.pool)
            .await
            .map_err(PgStoreError::Migrate)?;
        store::backfill_search_text(self)
            .await
            .map(|_filled| ())
            .map_err(PgStoreError::Backfill)
    }
}

/// Maps a sqlx error: unreachable database → `Unavailable`, anything else → `Backend`.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable {
            source: Box::new(e),
        },
        sqlx::Error::Database(ref d)
            if d.code().is_some_and(|c| {
                // admin_shutdown, crash_shutdown, cannot_connect_now
                c == "57P01" || c == "57P02" || c == "57P03"
            }) =>
        {
            StoreError::Unavailable {
                source: Box::new(e),
            }
        }
        e => StoreError::Backend {
            backend: "postgres",
            source: Box::new(e),
        },
    }
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::Backend {
        backend: "postgres",
        source: Box::new(e),
    })
}

pub(crate) fn from_json<T: DeserializeOwned>(
    v: serde_json::Value,
    what: &str,
) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt {
        detail: format!("{what}: {e}"),
        source: Some(Box::new(e)),
    })
}
