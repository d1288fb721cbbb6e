//! `Fleet`: the façade transports and operator APIs call.
//!
//! A `Fleet` owns the [`LiveView`] and talks to a store. Reads (summary, list, search, get) are
//! answered from the live view and never touch the store; durable writes (registration, tags,
//! groups, deregistration) go to the store first and reach the live view once acknowledged;
//! heartbeats update the live view at once and are written behind in batches by
//! [`flush_heartbeats`](Fleet::flush_heartbeats) — at most one record per instance per flush, the
//! latest winning.
//!
//! Time comes from the [`Clock`] given to the builder. `Fleet` is a cheap handle: clone it to share
//! one fleet between tasks.
//!
//! ```
//! use std::time::Duration;
//! use fleet_core::{Filter, Fleet, Heartbeat, ManualClock, MemoryStore, NewInstance, Status,
//!                  SystemInfo, TenantScope, Timestamp};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let clock = ManualClock::new(Timestamp::from_unix_secs(1_700_000_000));
//! let fleet = Fleet::builder(MemoryStore::new()).clock(clock.clone()).open().await?;
//!
//! let web = fleet
//!     .register(NewInstance { system: SystemInfo::with_hostname("web-01"), ..Default::default() })
//!     .await?;
//! fleet.heartbeat(web.id, Heartbeat::default())?;
//!
//! clock.advance(Duration::from_secs(61));
//! let changes = fleet.sweep();
//! assert_eq!(changes[0].transition.to, Status::Warning);
//!
//! let summary = fleet.summary(&Filter::parse("status:warning")?, &TenantScope::All);
//! assert_eq!(summary.total, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::alert::{AlertPolicy, FleetAlert, FleetAlertQuery, MassGuard};
use crate::ca::{CaSet, CertificateAuthority};
use crate::enroll::EnrollmentPolicy;
use crate::error::{FleetError, StoreError};
use crate::history::History;
use crate::instance::validate_apps;
use crate::live::{Cursor, InstanceView, LiveView, Page, StatusChange, query};
use crate::recent::{MetricsPoint, RecentMetrics, RecentMetricsConfig, RecentMetricsStats};
use crate::staleness::{StalenessPolicy, Status, Transitions};
use crate::store::{ChangeKind, FleetStore, HeartbeatRecord, Seq, StatusChangeQuery};
use crate::summary::FleetSummary;
use crate::tag::TagAuthority;
use crate::telemetry::{StoreOp, Telemetry, TelemetrySnapshot};
use crate::trend::TrendBucket;
use crate::{
    App, Clock, Filter, Groups, Instance, InstanceId, MetricsSample, NewInstance, SystemClock,
    SystemInfo, Tags, TenantScope, Timestamp,
};

/// Page size used when reading the store to build or reconcile the live view.
const REBUILD_PAGE: usize = 4096;
/// How far back `open` looks for the last trend sample (the previous control plane's last sweep).
const HORIZON_LOOKBACK: Duration = Duration::from_secs(7 * 24 * 3600);
/// Up to this many selected instances, scoped or filtered alerts are read instance by instance
/// (indexed); beyond, the store's history is paged newest first.
const PER_INSTANCE_READS: usize = 64;

/// Largest page a list call returns.
pub const MAX_PAGE_SIZE: usize = 1000;

/// What a heartbeat carries besides the caller's identity. `Heartbeat::default()` is a
/// liveness-only heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// A metrics sample.
    pub metrics: Option<MetricsSample>,
    /// The installed-apps list, when the agent reports it (typically only when it changed).
    pub apps: Option<Vec<App>>,
}

/// The control plane's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatAck {
    /// The instance's status after the heartbeat.
    pub status: Status,
    /// Status changes the heartbeat caused (catching up on a silence, then the recovery).
    pub transitions: Transitions,
    /// When the agent should send its next heartbeat.
    pub next_heartbeat: Duration,
}

/// An instance's full detail: the live view plus what only the store holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceDetail {
    /// Live state (status, last seen, latest figures, tags, groups).
    #[serde(flatten)]
    pub live: InstanceView,
    /// System info as reported.
    pub system: SystemInfo,
    /// Installed apps, as last reported.
    pub apps: Vec<App>,
}

/// Builds a [`Fleet`]; see [`Fleet::builder`].
#[derive(Debug)]
pub struct FleetBuilder<S> {
    store: S,
    clock: Arc<dyn Clock>,
    policy: StalenessPolicy,
    enrollment: EnrollmentPolicy,
    ca: Option<CertificateAuthority>,
    kek: Option<crate::seal::KeyEncryptionKey>,
    command_lease: Duration,
    alerts: AlertPolicy,
    trend_bucket: Duration,
    recent: RecentMetricsConfig,
    sweep_lag: Duration,
    write_through: bool,
}

impl<S: FleetStore> FleetBuilder<S> {
    /// Makes this fleet a replica of others sharing its store: it records sweep results only
    /// while it holds the sweeper lease ([`Fleet::claim_sweeper`]), and sweeps `lag` behind the
    /// clock, so the heartbeats other replicas received (flushed, then followed through the
    /// heartbeat log) are in its view before it judges anyone silent — a few seconds: flush plus
    /// sync interval plus margin. Default: zero, a single control plane that always records.
    pub fn sweep_lag(mut self, lag: Duration) -> Self {
        self.sweep_lag = lag;
        self
    }

    /// Persists every heartbeat that arrives through [`Fleet::exchange`] (or
    /// [`Fleet::exchange_as`]) before answering, one store write per heartbeat, instead of
    /// batching them into the next [`Fleet::flush_heartbeats`]. Default: off. Batching is what
    /// lets one core take tens of thousands of heartbeats a second (`fleet-bench heartbeat
    /// --write-through` shows the difference on your store); turn this on only when losing the
    /// last second of liveness data in a crash is not acceptable — as durable as the store's
    /// `write_heartbeats` is (the sled store fsyncs its journal, PostgreSQL commits; the memory
    /// store keeps nothing). Write-through heartbeats and flushes take turns. A failed write
    /// answers the heartbeat with the store's error and keeps the record for the next flush.
    pub fn write_through(mut self, on: bool) -> Self {
        self.write_through = on;
        self
    }

    /// How much recent metrics history to keep in memory for graphs (default
    /// [`RecentMetricsConfig::default`]: the last hour at 15 s, at most 512 MiB).
    pub fn recent_metrics(mut self, config: RecentMetricsConfig) -> Self {
        self.recent = config;
        self
    }

    /// Alert rules: the mass-staleness guard and the start-up grace (default
    /// [`AlertPolicy::default`]).
    pub fn alerts(mut self, policy: AlertPolicy) -> Self {
        self.alerts = policy;
        self
    }

    /// Width of the fleet trend buckets (default one hour), in whole seconds (at least one).
    pub fn trend_bucket(mut self, width: Duration) -> Self {
        self.trend_bucket = Duration::from_secs(width.as_secs().max(1));
        self
    }

    /// How long a delivered command waits for its result before it is delivered again (default
    /// [`DEFAULT_COMMAND_LEASE`](crate::command::DEFAULT_COMMAND_LEASE)).
    pub fn command_lease(mut self, lease: Duration) -> Self {
        self.command_lease = lease;
        self
    }

    /// The clock (default: [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The staleness policy (default: [`StalenessPolicy::default`]).
    pub fn policy(mut self, policy: StalenessPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Enrollment settings (default: [`EnrollmentPolicy::default`]).
    pub fn enrollment(mut self, policy: EnrollmentPolicy) -> Self {
        self.enrollment = policy;
        self
    }

    /// Use this CA instead of the store's. By default the CA is loaded from the store, or
    /// generated and stored on first open (replicas opening at once agree on one).
    pub fn ca(mut self, ca: CertificateAuthority) -> Self {
        self.ca = Some(ca);
        self
    }

    /// The key-encryption key that seals the CA keys in the store ([`crate::seal`]). Required
    /// for every store but a volatile one
    /// ([`CertificateStore::volatile_key_encryption_key`]); keep it outside the store (a 0600
    /// file, or an environment variable for replicas).
    ///
    /// [`CertificateStore::volatile_key_encryption_key`]:
    ///     crate::store::CertificateStore::volatile_key_encryption_key
    pub fn key_encryption_key(mut self, kek: crate::seal::KeyEncryptionKey) -> Self {
        self.kek = Some(kek);
        self
    }

    /// Validates the settings, loads (or creates) the CA, rebuilds the live view from the store
    /// and returns the fleet.
    pub async fn open(self) -> Result<Fleet<S>, FleetError> {
        let view = LiveView::new(self.policy)?;
        self.enrollment.validate()?;
        self.alerts.validate()?;
        let started = self.clock.now();
        let explicit_ca = self.ca.is_some();
        let mut kek = self.kek;
        let (set, material) = match self.ca {
            Some(ca) => (
                CaSet::single(ca),
                crate::ca::CaMaterial {
                    cert_pem: String::new(),
                    key_pem: String::new(),
                },
            ),
            None => {
                if kek.is_none() {
                    // Nothing a volatile store seals outlives this process.
                    kek = self.store.volatile_key_encryption_key();
                }
                crate::rotation::load_or_create(&self.store, kek.as_ref(), self.clock.now()).await?
            }
        };
        let fleet = Fleet {
            inner: Arc::new(Inner {
                store: self.store,
                clock: self.clock,
                cas: RwLock::new(CaState {
                    set: Arc::new(set),
                    material,
                }),
                ca_generation: std::sync::atomic::AtomicU64::new(1),
                kek: Mutex::new(kek),
                explicit_ca,
                attempts: crate::limiter::AttemptLimiter::new(self.enrollment.failed_attempts),
                renewals: crate::limiter::RenewalLimiter::new(self.enrollment.renewals_per_hour),
                ledger: crate::ledger::LedgerWriter::default(),
                enrollment: self.enrollment,
                view: RwLock::new(view),
                pending: Mutex::new(FxHashMap::default()),
                changes: Mutex::new(Vec::new()),
                feed: tokio::sync::Mutex::new(0),
                flush: tokio::sync::Mutex::new(()),
                command_lease: self.command_lease,
                alerts: self.alerts,
                trend_bucket: self.trend_bucket,
                trend: Mutex::new(TrendState::default()),
                fleet_alerts: Mutex::new(Vec::new()),
                recent: Mutex::new(RecentMetrics::new(self.recent)),
                guard: Mutex::new(MassGuard::default()),
                hb_position: std::sync::atomic::AtomicU64::new(0),
                holder: format!("fleet-{}", InstanceId::random()),
                lease: Mutex::new(LeaseState::default()),
                sweep_lag: self.sweep_lag,
                write_through: self.write_through,
                command_hint: Mutex::new(FxHashMap::default()),
                hint_generation: std::sync::atomic::AtomicU64::new(0),
                telemetry: Telemetry::default(),
            }),
        };
        {
            let mut cursor = fleet.inner.feed.lock().await;
            fleet.reconcile(&mut cursor).await?;
        }
        fleet.sync().await?;
        // The trend buckets of the last week say when a control plane last swept this fleet.
        let recent = fleet
            .inner
            .store
            .trend_buckets(
                started.saturating_sub(HORIZON_LOOKBACK),
                started.saturating_add(Duration::from_millis(1)),
            )
            .await?;
        let horizon = recent.iter().map(|b| b.last_sample_at).max();
        let grace = fleet
            .inner
            .alerts
            .startup_grace
            .unwrap_or(fleet.policy().offline_after);
        if !grace.is_zero() {
            fleet
                .view_mut()
                .begin_grace(started, started.saturating_add(grace), horizon);
        }
        let current = fleet.bucket_at(started, recent);
        fleet.trend().resume(Some(current));
        Ok(fleet)
    }
}

#[derive(Debug)]
pub(crate) struct Inner<S> {
    pub(crate) store: S,
    pub(crate) clock: Arc<dyn Clock>,
    /// The CAs and the material they were opened from (see [`crate::rotation`]).
    pub(crate) cas: RwLock<CaState>,
    pub(crate) ca_generation: std::sync::atomic::AtomicU64,
    /// Seals CA keys in the store; `None` only with a CA given to the builder.
    pub(crate) kek: Mutex<Option<crate::seal::KeyEncryptionKey>>,
    /// The CA came from [`FleetBuilder::ca`]: the store's is neither read nor changed.
    pub(crate) explicit_ca: bool,
    pub(crate) enrollment: EnrollmentPolicy,
    /// Failed enrollment attempts per source (see [`crate::limiter`]).
    pub(crate) attempts: crate::limiter::AttemptLimiter,
    /// Renewals per instance per hour.
    pub(crate) renewals: crate::limiter::RenewalLimiter,
    /// Ledger rows written off the response path (see [`crate::ledger`]).
    pub(crate) ledger: crate::ledger::LedgerWriter,
    view: RwLock<LiveView>,
    pending: Mutex<FxHashMap<InstanceId, HeartbeatRecord>>,
    /// Status changes not yet recorded in the store (written with the heartbeat batch).
    changes: Mutex<Vec<StatusChange>>,
    /// Change-feed cursor; the lock also serializes `sync`.
    feed: tokio::sync::Mutex<Seq>,
    /// Serializes `flush_heartbeats`.
    flush: tokio::sync::Mutex<()>,
    pub(crate) command_lease: Duration,
    /// Instances that may have deliverable commands, with the generation of the last enqueue
    /// (so a delivery that found nothing does not drop a hint an enqueue just set).
    pub(crate) command_hint: Mutex<FxHashMap<InstanceId, u64>>,
    pub(crate) hint_generation: std::sync::atomic::AtomicU64,
    alerts: AlertPolicy,
    trend_bucket: Duration,
    trend: Mutex<TrendState>,
    /// Fleet alerts not yet recorded in the store (written with the heartbeat batch).
    fleet_alerts: Mutex<Vec<FleetAlert>>,
    recent: Mutex<RecentMetrics>,
    guard: Mutex<MassGuard>,
    /// Position in the store's heartbeat log (other replicas' heartbeats); moved under `feed`.
    hb_position: std::sync::atomic::AtomicU64,
    /// This replica's name in leases.
    holder: String,
    /// The sweeper role (replicas only; see `claim_sweeper`).
    lease: Mutex<LeaseState>,
    sweep_lag: Duration,
    /// Persist each exchanged heartbeat before answering (see `FleetBuilder::write_through`).
    pub(crate) write_through: bool,
    /// Counters and latencies (see [`crate::telemetry`]).
    pub(crate) telemetry: Telemetry,
}

/// The fleet's CAs, with the stored material they came from (to notice a change cheaply).
#[derive(Debug)]
pub(crate) struct CaState {
    pub(crate) set: Arc<CaSet>,
    pub(crate) material: crate::ca::CaMaterial,
}

/// A replica's sweeper role: until when its lease holds, and what it found while it did not
/// hold it (recorded if it takes the lease over; the store keeps each change once).
#[derive(Debug, Default)]
struct LeaseState {
    until: Option<Timestamp>,
    ttl: Duration,
    unrecorded: std::collections::VecDeque<(Timestamp, StatusChange)>,
}

/// The trend bucket being filled, and finished ones not yet written.
#[derive(Debug, Default)]
struct TrendState {
    current: Option<TrendBucket>,
    unwritten: Vec<TrendBucket>,
    dirty: bool,
}

impl TrendState {
    /// Starts over from `current` (the stored bucket, or none), with nothing to write.
    fn resume(&mut self, current: Option<TrendBucket>) {
        self.current = current;
        self.unwritten.clear();
        self.dirty = false;
    }
}

/// What one sweep found; see [`Fleet::sweep_report`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SweepReport {
    /// Every status change this sweep applied (all recorded in the history).
    pub changes: Vec<StatusChange>,
    /// Per-instance alerts for observers: changes of earlier sweeps whose hold (the guard's
    /// window) is over and that were not part of a storm.
    pub alerts: Vec<StatusChange>,
    /// Set when a storm began: observers raise this one alert instead of one per change.
    pub fleet_alert: Option<FleetAlert>,
}

/// The fleet: live view + store; see the module docs.
#[derive(Debug)]
pub struct Fleet<S> {
    pub(crate) inner: Arc<Inner<S>>,
}

impl<S> Clone for Fleet<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// [`merge`] in place (one hash lookup on the heartbeat path instead of a remove and an insert).
fn merge_into(older: &mut HeartbeatRecord, newer: HeartbeatRecord) {
    older.last_seen = newer.last_seen;
    if newer.metrics.is_some() {
        older.metrics = newer.metrics;
    }
    if newer.apps.is_some() {
        older.apps = newer.apps;
    }
}

/// Merges a newer heartbeat record into an older one: the newer time wins, fields the newer one
/// lacks are kept from the older.
fn merge(mut older: HeartbeatRecord, newer: HeartbeatRecord) -> HeartbeatRecord {
    merge_into(&mut older, newer);
    older
}

impl<S: FleetStore> Fleet<S> {
    /// A builder over `store`.
    pub fn builder(store: S) -> FleetBuilder<S> {
        FleetBuilder {
            store,
            clock: Arc::new(SystemClock),
            policy: StalenessPolicy::default(),
            enrollment: EnrollmentPolicy::default(),
            ca: None,
            kek: None,
            command_lease: crate::command::DEFAULT_COMMAND_LEASE,
            alerts: AlertPolicy::default(),
            trend_bucket: crate::trend::DEFAULT_TREND_BUCKET,
            recent: RecentMetricsConfig::default(),
            sweep_lag: Duration::ZERO,
            write_through: false,
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The clock.
    pub fn clock(&self) -> &dyn Clock {
        &*self.inner.clock
    }

    /// The current time by the fleet's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// What this fleet has counted since it was opened: heartbeats, enrollments by outcome,
    /// command state transitions, sweep durations and store latencies (see
    /// [`crate::telemetry`]). Cheap: a few hundred relaxed atomic loads.
    pub fn telemetry(&self) -> TelemetrySnapshot {
        self.inner.telemetry.snapshot()
    }

    /// Awaits the store call `fut` and records how long it took (real time, [`Instant`], not the
    /// fleet's clock) under `op`, whatever its result.
    pub(crate) async fn timed<T>(&self, op: StoreOp, fut: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = fut.await;
        self.inner.telemetry.store(op, started.elapsed());
        out
    }

    /// Read access to the live view (hold it briefly: heartbeats wait for it). A query made on
    /// the guard ([`LiveView::summary`], [`LiveView::list`]) runs to the end under it; the
    /// `Fleet` methods of the same names release the lock between steps.
    pub fn view(&self) -> RwLockReadGuard<'_, LiveView> {
        // The view is only mutated by methods that cannot panic midway through an update of its
        // invariants, so a poisoned lock still guards a consistent view.
        self.inner
            .view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn view_mut(&self) -> RwLockWriteGuard<'_, LiveView> {
        self.inner
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pending(&self) -> MutexGuard<'_, FxHashMap<InstanceId, HeartbeatRecord>> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The staleness policy.
    pub fn policy(&self) -> StalenessPolicy {
        self.view().policy().clone()
    }

    /// Registers an instance directly, for trusted callers (imports, pre-provisioning, tests).
    /// Agents join through enrollment with a registration token instead.
    ///
    /// Validates everything first; on any error nothing is written. Durable before returning.
    pub async fn register(&self, new: NewInstance) -> Result<Instance, FleetError> {
        new.system.validate()?;
        let now = self.now();
        let instance = Instance {
            id: new.id.unwrap_or_else(InstanceId::random),
            tenant: new.tenant,
            system: new.system,
            tags: new.tags,
            groups: new.groups,
            registered_at: now,
            last_seen: now,
            metrics: None,
            apps: Vec::new(),
            certificate: None,
            next_certificate: None,
        };
        let seq = self
            .timed(
                StoreOp::InsertInstance,
                self.inner.store.insert_instance(&instance),
            )
            .await?;
        self.view_mut().upsert(&instance, seq, now);
        Ok(instance)
    }

    /// Records a heartbeat from instance `id` (whose identity the caller has authenticated).
    ///
    /// The live view is updated at once; the store is updated by the next
    /// [`flush_heartbeats`](Self::flush_heartbeats). Invalid metrics or apps are refused with
    /// [`FleetError::Invalid`] and change nothing.
    pub fn heartbeat(&self, id: InstanceId, hb: Heartbeat) -> Result<HeartbeatAck, FleetError> {
        if let Some(m) = &hb.metrics {
            m.validate()?;
        }
        if let Some(apps) = &hb.apps {
            validate_apps(apps)?;
        }
        let now = self.now();
        let (transitions, status, interval) = {
            let mut view = self.view_mut();
            let transitions = view
                .heartbeat(id, now, hb.metrics.as_ref())
                .ok_or(FleetError::InstanceNotFound(id))?;
            let status = view.status(id).unwrap_or(Status::Online);
            if hb.metrics.is_some() {
                self.record_point(&view, id);
            }
            (transitions, status, view.policy().heartbeat_interval())
        };
        if !transitions.is_empty() {
            self.changes()
                .extend(transitions.iter().map(|transition| StatusChange {
                    instance: id,
                    transition,
                }));
        }
        let record = HeartbeatRecord {
            id,
            last_seen: now,
            metrics: hb.metrics,
            apps: hb.apps,
        };
        let mut pending = self.pending();
        match pending.get_mut(&id) {
            Some(older) => merge_into(older, record),
            None => {
                pending.insert(id, record);
            }
        }
        drop(pending);
        self.inner.telemetry.heartbeat();
        Ok(HeartbeatAck {
            status,
            transitions,
            next_heartbeat: interval,
        })
    }

    /// Writes the heartbeats received since the last flush to the store, one record per instance.
    /// Returns how many were written. On a store error the records are kept for the next flush
    /// (merged with anything newer) and the error is returned.
    pub async fn flush_heartbeats(&self) -> Result<usize, FleetError> {
        let _serial = self.inner.flush.lock().await;
        let changes = std::mem::take(&mut *self.changes());
        if !changes.is_empty()
            && let Err(e) = self
                .timed(
                    StoreOp::RecordStatusChanges,
                    self.inner.store.record_status_changes(&changes),
                )
                .await
        {
            let mut pending = self.changes();
            let newer = std::mem::replace(&mut *pending, changes);
            pending.extend(newer);
            return Err(e.into());
        }
        let batch: Vec<HeartbeatRecord> =
            std::mem::take(&mut *self.pending()).into_values().collect();
        let written = batch.len();
        if !batch.is_empty()
            && let Err(e) = self
                .timed(
                    StoreOp::WriteHeartbeats,
                    self.inner.store.write_heartbeats(&batch),
                )
                .await
        {
            self.put_back(batch);
            return Err(e.into());
        }
        // Fleet alerts and trend buckets last: a failure there never holds heartbeats back.
        self.flush_history().await?;
        Ok(written)
    }

    /// Writes instance `id`'s waiting heartbeat record now, alone (write-through mode). On a
    /// store error the record goes back to the batch for the next flush.
    pub(crate) async fn persist_heartbeat(&self, id: InstanceId) -> Result<(), FleetError> {
        // Serialized with flushes: a flush that took this record has finished (written, or put
        // it back) before we look, and writes of one instance's records never overtake each
        // other, so the store never goes back to an older one.
        let _serial = self.inner.flush.lock().await;
        let Some(record) = self.pending().remove(&id) else {
            return Ok(());
        };
        let batch = [record];
        if let Err(e) = self
            .timed(
                StoreOp::WriteHeartbeats,
                self.inner.store.write_heartbeats(&batch),
            )
            .await
        {
            self.put_back(batch);
            return Err(e.into());
        }
        Ok(())
    }

    /// Returns records whose write failed to the write-behind map, each merged under anything
    /// newer that arrived meanwhile.
    fn put_back(&self, records: impl IntoIterator<Item = HeartbeatRecord>) {
        let mut pending = self.pending();
        for older in records {
            let merged = match pending.remove(&older.id) {
                Some(newer) => merge(older, newer),
                None => older,
            };
            pending.insert(merged.id, merged);
        }
    }

    /// Number of heartbeat records waiting for the next flush.
    pub fn pending_heartbeats(&self) -> usize {
        self.pending().len()
    }

    pub(crate) fn visible(&self, id: InstanceId, scope: &TenantScope) -> Result<(), FleetError> {
        match self.view().tenant(id) {
            Some(tenant) if scope.allows(tenant.as_ref()) => Ok(()),
            _ => Err(FleetError::InstanceNotFound(id)),
        }
    }

    /// Replaces an instance's tags (operator authority: reserved prefixes allowed). Durable
    /// before returning. [`FleetError::InstanceNotFound`] when it does not exist or is outside
    /// `scope`.
    pub async fn set_tags(
        &self,
        scope: &TenantScope,
        id: InstanceId,
        tags: Tags,
    ) -> Result<(), FleetError> {
        self.visible(id, scope)?;
        tags.check_authority(TagAuthority::Operator)?;
        let seq = self
            .timed(StoreOp::SetTags, self.inner.store.set_tags(id, &tags))
            .await?;
        self.view_mut().set_labels(id, Some(&tags), None, seq);
        Ok(())
    }

    /// Replaces an instance's groups; like [`set_tags`](Self::set_tags).
    pub async fn set_groups(
        &self,
        scope: &TenantScope,
        id: InstanceId,
        groups: Groups,
    ) -> Result<(), FleetError> {
        self.visible(id, scope)?;
        let seq = self
            .timed(StoreOp::SetGroups, self.inner.store.set_groups(id, &groups))
            .await?;
        self.view_mut().set_labels(id, None, Some(&groups), seq);
        Ok(())
    }

    /// Removes an instance from the fleet. Durable before returning.
    pub async fn deregister(&self, scope: &TenantScope, id: InstanceId) -> Result<(), FleetError> {
        self.visible(id, scope)?;
        let seq = self
            .timed(
                StoreOp::DeleteInstance,
                self.inner.store.delete_instance(id, self.now()),
            )
            .await?;
        self.view_mut().remove(id, seq);
        self.pending().remove(&id);
        self.recent().remove(id);
        Ok(())
    }

    /// Re-reads an instance from the store and applies it to the live view as of `seq`.
    /// The change-feed cursor, locked (as `sync` holds it while applying changes).
    pub(crate) async fn feed_cursor(&self) -> tokio::sync::MutexGuard<'_, Seq> {
        self.inner.feed.lock().await
    }

    pub(crate) async fn apply_stored(&self, id: InstanceId, seq: Seq) -> Result<(), StoreError> {
        let current = self
            .timed(StoreOp::GetInstance, self.inner.store.get_instance(id))
            .await?;
        let now = self.now();
        let mut view = self.view_mut();
        match current {
            Some(inst) => view.upsert(&inst, seq, now),
            None => view.remove(id, seq),
        };
        Ok(())
    }

    /// Adds the instance's current figures to its ring. Called with the view locked, so a
    /// deregistration (view first, then the rings) cannot slip in between and leave a ring.
    fn record_point(&self, view: &LiveView, id: InstanceId) {
        if let Some(p) = view.point(id) {
            self.recent().record(id, &p);
        }
    }

    fn recent(&self) -> MutexGuard<'_, RecentMetrics> {
        self.inner
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An instance's recent metrics (graph points) at or after `since`, oldest first; empty when
    /// it sent none since this control plane started or is beyond the memory budget (see
    /// [`crate::recent`]).
    pub fn recent_metrics(
        &self,
        scope: &TenantScope,
        id: InstanceId,
        since: Timestamp,
    ) -> Result<Vec<MetricsPoint>, FleetError> {
        self.visible(id, scope)?;
        Ok(self.recent().points(id, since))
    }

    /// Figures about the recent-metrics rings.
    pub fn recent_metrics_stats(&self) -> RecentMetricsStats {
        self.recent().stats()
    }

    /// Applies every status change due now (see [`LiveView::sweep`]) and queues them to be
    /// recorded in the store with the next [`flush_heartbeats`](Self::flush_heartbeats); see
    /// [`sweep_report`](Self::sweep_report) for the mass-staleness guard.
    pub fn sweep(&self) -> Vec<StatusChange> {
        self.sweep_report().changes
    }

    /// [`sweep`](Self::sweep), with the mass-staleness guard (see [`crate::alert`]): `changes`
    /// are all the status changes applied (and queued for the history); `alerts` are the
    /// per-instance alerts whose hold is over; `fleet_alert` is set when a storm began (it is
    /// queued for recording too). Also adds a sample to the current trend bucket.
    pub fn sweep_report(&self) -> SweepReport {
        let started = Instant::now();
        let report = self.sweep_once();
        self.inner.telemetry.sweep(started.elapsed());
        report
    }

    /// [`sweep_report`](Self::sweep_report) without the timing.
    fn sweep_once(&self) -> SweepReport {
        let sweeper = self.is_sweeper();
        // Replicas sweep a little behind the clock, so heartbeats other replicas received have
        // reached the view before anyone is judged silent.
        let now = self.now().saturating_sub(self.inner.sweep_lag);
        let (changes, fleet_size, offline, summary, interval) = {
            let mut view = self.view_mut();
            let changes = view.sweep(now);
            let summary = view.summary(&Filter::all(), &TenantScope::All);
            let interval = view.policy().heartbeat_interval();
            (
                changes,
                view.len() as u64,
                view.count(Status::Offline),
                summary,
                interval,
            )
        };
        if !sweeper {
            // Another replica records status changes, alerts and trends; this view keeps its
            // statuses current and remembers what it found in case it takes the sweep over.
            self.keep_unrecorded(&changes);
            return SweepReport {
                changes,
                ..SweepReport::default()
            };
        }
        self.sample_trend(now, &summary);
        if !changes.is_empty() {
            self.changes().extend(changes.iter().copied());
        }
        let window = self.inner.alerts.mass_window.unwrap_or(interval * 2);
        let outcome = self.guard().observe(
            &self.inner.alerts,
            window,
            now,
            &changes,
            fleet_size,
            offline,
        );
        if let Some(a) = &outcome.alert {
            self.pending_fleet_alerts().push(a.clone());
        }
        SweepReport {
            changes,
            alerts: outcome.released,
            fleet_alert: outcome.alert,
        }
    }

    fn guard(&self) -> MutexGuard<'_, MassGuard> {
        self.inner
            .guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lease name replicas use for the sweeper.
    pub const SWEEPER_LEASE: &'static str = "sweeper";

    /// Takes or renews the sweeper lease for `ttl` (see [`ChangeFeed::acquire_lease`]): with
    /// replicas sharing a store, one at a time records the status changes sweeps find, the fleet
    /// alerts and the trends; the others keep their views current without recording (and record
    /// what they found in the meantime if they take over). Returns whether this replica holds
    /// the lease now. On a store error the role lasts until the lease it last took runs out.
    /// Replicas' clocks must agree to well within `ttl` (NTP). A single control plane (no
    /// [`sweep_lag`](FleetBuilder::sweep_lag)) always records, whether or not it calls this.
    ///
    /// [`ChangeFeed::acquire_lease`]: crate::store::ChangeFeed::acquire_lease
    pub async fn claim_sweeper(&self, ttl: Duration) -> Result<bool, FleetError> {
        if !self.is_replica() {
            return Ok(true);
        }
        let now = self.now();
        let was = self.is_sweeper();
        let held = self
            .inner
            .store
            .acquire_lease(Self::SWEEPER_LEASE, &self.inner.holder, now, ttl)
            .await?
            .is_some();
        let takeover = {
            let mut lease = self.lease();
            lease.ttl = ttl;
            lease.until = held.then(|| now.saturating_add(ttl));
            if held && !was {
                std::mem::take(&mut lease.unrecorded)
            } else {
                Default::default()
            }
        };
        if held && !was {
            // Taking over: what this view found while another replica swept is recorded now (the
            // store keeps each change once), and the trend bucket continues the stored one.
            self.changes().extend(takeover.into_iter().map(|(_, c)| c));
            let start = TrendBucket::containing(now, self.inner.trend_bucket).start;
            let stored = self
                .inner
                .store
                .trend_buckets(start, start.saturating_add(Duration::from_millis(1)))
                .await?;
            let current = self.bucket_at(now, stored);
            self.trend().resume(Some(current));
        } else if !held && was {
            // Deposed: the trend bucket belongs to the new sweeper now.
            self.trend().resume(None);
        }
        Ok(held)
    }

    /// Gives the sweeper lease up (at shutdown), so another replica takes over at once.
    pub async fn release_sweeper(&self) -> Result<(), FleetError> {
        self.lease().until = None;
        Ok(self
            .inner
            .store
            .release_lease(Self::SWEEPER_LEASE, &self.inner.holder)
            .await?)
    }

    /// Whether this fleet is a replica (see [`FleetBuilder::sweep_lag`]).
    fn is_replica(&self) -> bool {
        !self.inner.sweep_lag.is_zero()
    }

    /// Whether this fleet records sweep results: always for a single control plane; for a
    /// replica, while the sweeper lease it last took holds (a replica that cannot renew it loses
    /// the role when it runs out, whatever the store says).
    pub fn is_sweeper(&self) -> bool {
        if !self.is_replica() {
            return true;
        }
        let now = self.now();
        self.lease().until.is_some_and(|until| now < until)
    }

    fn lease(&self) -> MutexGuard<'_, LeaseState> {
        self.inner
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers changes this replica applied without recording them, for as long as a takeover
    /// could still need them (the lease's time-to-live plus the lag, and a margin).
    fn keep_unrecorded(&self, changes: &[StatusChange]) {
        let now = self.now();
        let mut lease = self.lease();
        let keep = lease.ttl + self.inner.sweep_lag + Duration::from_secs(30);
        let cutoff = now.saturating_sub(keep);
        while lease.unrecorded.front().is_some_and(|(t, _)| *t < cutoff) {
            lease.unrecorded.pop_front();
        }
        lease.unrecorded.extend(changes.iter().map(|c| (now, *c)));
    }

    fn pending_fleet_alerts(&self) -> MutexGuard<'_, Vec<FleetAlert>> {
        self.inner
            .fleet_alerts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn trend(&self) -> MutexGuard<'_, TrendState> {
        self.inner
            .trend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The trend bucket containing `at`: the stored one among `stored` if any, else a new one.
    fn bucket_at(&self, at: Timestamp, stored: Vec<TrendBucket>) -> TrendBucket {
        let fresh = TrendBucket::containing(at, self.inner.trend_bucket);
        stored
            .into_iter()
            .find(|b| b.start == fresh.start)
            .unwrap_or(fresh)
    }

    fn sample_trend(&self, now: Timestamp, summary: &FleetSummary) {
        let width = self.inner.trend_bucket;
        let mut t = self.trend();
        let current = match t.current.take() {
            Some(b) if b.contains(now) => b,
            Some(b) => {
                if b.samples > 0 {
                    t.unwritten.push(b);
                }
                TrendBucket::containing(now, width)
            }
            None => TrendBucket::containing(now, width),
        };
        let mut current = current;
        current.add(now, summary);
        t.current = Some(current);
        t.dirty = true;
    }

    /// Writes queued fleet alerts and trend buckets; on failure they are queued again.
    async fn flush_history(&self) -> Result<(), FleetError> {
        let alerts = std::mem::take(&mut *self.pending_fleet_alerts());
        for (i, a) in alerts.iter().enumerate() {
            if let Err(e) = self.inner.store.record_fleet_alert(a).await {
                let mut pending = self.pending_fleet_alerts();
                let newer = std::mem::take(&mut *pending);
                pending.extend(alerts[i..].iter().cloned());
                pending.extend(newer);
                return Err(e.into());
            }
        }
        let buckets = {
            let mut t = self.trend();
            let mut out = std::mem::take(&mut t.unwritten);
            if t.dirty {
                out.extend(t.current.clone());
                t.dirty = false;
            }
            out
        };
        if !buckets.is_empty()
            && let Err(e) = self.inner.store.record_trend_buckets(&buckets).await
        {
            let mut t = self.trend();
            let current_start = t.current.as_ref().map(|c| c.start);
            let mut restore: Vec<TrendBucket> = buckets
                .into_iter()
                .filter(|b| Some(b.start) != current_start)
                .collect();
            restore.append(&mut t.unwritten);
            t.unwritten = restore;
            t.dirty = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// Fleet-level alerts in the window, newest first (including those not yet flushed).
    pub async fn fleet_alerts(
        &self,
        query: &FleetAlertQuery,
    ) -> Result<Vec<FleetAlert>, FleetError> {
        let mut wide = query.clone();
        wide.limit = usize::MAX;
        let mut all = self
            .timed(StoreOp::FleetAlerts, self.inner.store.fleet_alerts(&wide))
            .await?;
        for a in self
            .pending_fleet_alerts()
            .iter()
            .filter(|a| query.matches(a))
        {
            if !all.contains(a) {
                all.push(a.clone());
            }
        }
        all.sort_by_key(|a| std::cmp::Reverse(a.at));
        all.truncate(query.limit);
        Ok(all)
    }

    /// Fleet trend buckets starting in `[from, until)`, oldest first, including the one being
    /// filled now.
    pub async fn trends(
        &self,
        from: Timestamp,
        until: Timestamp,
    ) -> Result<Vec<TrendBucket>, FleetError> {
        let mut stored = self
            .timed(
                StoreOp::TrendBuckets,
                self.inner.store.trend_buckets(from, until),
            )
            .await?;
        let t = self.trend();
        for b in t.unwritten.iter().chain(t.current.iter()) {
            if b.start >= from && b.start < until && b.samples > 0 {
                stored.retain(|s| s.start != b.start);
                stored.push(b.clone());
            }
        }
        stored.sort_by_key(|b| b.start);
        Ok(stored)
    }

    /// Retention: forgets status changes, fleet alerts and trend buckets older than `keep`.
    /// Returns how many records went.
    pub async fn prune_history(&self, keep: Duration) -> Result<usize, FleetError> {
        let before = self.now().saturating_sub(keep);
        Ok(self.inner.store.prune_history(before).await?)
    }

    fn changes(&self) -> MutexGuard<'_, Vec<StatusChange>> {
        self.inner
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Recorded status changes (alerts) matching `query`, newest first, including those not yet
    /// flushed. Within a tenant scope, only changes of that tenant's current instances.
    pub async fn status_changes(
        &self,
        scope: &TenantScope,
        query: &StatusChangeQuery,
    ) -> Result<Vec<StatusChange>, FleetError> {
        self.status_changes_matching(scope, query, &Filter::all())
            .await
    }

    /// [`status_changes`](Self::status_changes) of the instances `filter` selects now (by tags,
    /// groups, tenant, status or text, as in the fleet view).
    pub async fn status_changes_matching(
        &self,
        scope: &TenantScope,
        query: &StatusChangeQuery,
        filter: &Filter,
    ) -> Result<Vec<StatusChange>, FleetError> {
        if filter.is_all() && *scope == TenantScope::All {
            // Unfiltered, the store's newest `limit` plus the unflushed ones hold the answer.
            let mut all = self
                .timed(
                    StoreOp::StatusChanges,
                    self.inner.store.status_changes(query),
                )
                .await?;
            let stored: HashSet<StatusChange> = all.iter().copied().collect();
            all.extend(
                self.changes()
                    .iter()
                    .filter(|c| query.matches(c) && !stored.contains(c))
                    .copied(),
            );
            all.sort_by_key(|c| std::cmp::Reverse(c.transition.at));
            all.truncate(query.limit);
            return Ok(all);
        }
        let mut selected: HashSet<InstanceId> = self.matching(filter, scope).into_iter().collect();
        if let Some(i) = query.instance {
            selected.retain(|s| *s == i);
        }
        if selected.is_empty() || query.limit == 0 {
            return Ok(Vec::new());
        }
        let mut seen: HashSet<StatusChange> = HashSet::new();
        let mut all: Vec<StatusChange> = self
            .changes()
            .iter()
            .filter(|c| query.matches(c) && selected.contains(&c.instance))
            .copied()
            .collect();
        seen.extend(all.iter().copied());
        // A few instances: ask for each one's newest (an indexed read in the stores).
        if selected.len() <= PER_INSTANCE_READS {
            for id in &selected {
                let one = StatusChangeQuery {
                    instance: Some(*id),
                    ..query.clone()
                };
                let page = self
                    .timed(
                        StoreOp::StatusChanges,
                        self.inner.store.status_changes(&one),
                    )
                    .await?;
                all.extend(page.into_iter().filter(|c| seen.insert(*c)));
            }
            all.sort_by_key(|c| std::cmp::Reverse(c.transition.at));
            all.truncate(query.limit);
            return Ok(all);
        }
        // Many: read the store newest first, a page at a time, until `limit` matching changes
        // are found or the window is exhausted — never the whole history at once.
        let page_size = query.limit.saturating_mul(4).clamp(1_000, 50_000);
        let mut page_query = StatusChangeQuery {
            limit: page_size,
            ..query.clone()
        };
        loop {
            let page = self
                .timed(
                    StoreOp::StatusChanges,
                    self.inner.store.status_changes(&page_query),
                )
                .await?;
            let full = page.len() == page_size;
            let oldest = page.last().map(|c| c.transition.at);
            let mut take = |changes: Vec<StatusChange>, all: &mut Vec<StatusChange>| {
                for c in changes {
                    if selected.contains(&c.instance) && seen.insert(c) {
                        all.push(c);
                    }
                }
            };
            take(page, &mut all);
            let (true, Some(oldest)) = (full, oldest) else {
                break;
            };
            // The page may have cut the oldest millisecond in two: read that one in full.
            let edge = StatusChangeQuery {
                since: Some(oldest),
                until: Some(oldest.saturating_add(Duration::from_millis(1))),
                limit: usize::MAX,
                ..query.clone()
            };
            take(
                self.timed(
                    StoreOp::StatusChanges,
                    self.inner.store.status_changes(&edge),
                )
                .await?,
                &mut all,
            );
            // Everything not read yet is older than `oldest`: once `limit` changes at or after
            // it are found (unflushed ones may be older), the answer is complete.
            if all.iter().filter(|c| c.transition.at >= oldest).count() >= query.limit {
                break;
            }
            page_query.until = Some(oldest);
        }
        all.sort_by_key(|c| std::cmp::Reverse(c.transition.at));
        all.truncate(query.limit);
        Ok(all)
    }

    /// An instance's uptime in percent over `[from, to)` (capped at now), from its exact status
    /// history; `None` when the window lies before its registration. See [`crate::history`].
    pub async fn uptime(
        &self,
        scope: &TenantScope,
        id: InstanceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Option<f64>, FleetError> {
        let view = self
            .get(scope, id)
            .ok_or(FleetError::InstanceNotFound(id))?;
        let query = StatusChangeQuery {
            instance: Some(id),
            since: None,
            until: None,
            limit: usize::MAX,
        };
        let mut changes = self.status_changes(scope, &query).await?;
        // Oldest first; at equal times the store's order (newest first) reversed is recording order.
        changes.reverse();
        let mut history = History::new(view.registered_at, Status::Online);
        for c in changes {
            // A change that does not continue the history is skipped rather than failing the
            // whole computation.
            let _ = history.record(c.transition);
        }
        Ok(history.uptime_percent(from, to.min(self.now())))
    }

    /// Summary of the instances `filter` selects within `scope` (from the live view).
    ///
    /// Evaluated a bounded step at a time, the view's lock released between steps, so heartbeats
    /// never wait for more than one step (≈ 50 µs of work); a scoped summary evaluates only the
    /// tenant's instances. Each instance is counted once, as of the step that reached it; see
    /// [`crate::live::query`] for what a query evaluated in steps answers.
    pub fn summary(&self, filter: &Filter, scope: &TenantScope) -> FleetSummary {
        query::summary(&self.inner.view, filter, scope, query::Tuning::DEFAULT)
    }

    /// A page of instances (from the live view), in slot order after `after`. `limit` is capped
    /// at [`MAX_PAGE_SIZE`]. Evaluated in steps like [`summary`](Self::summary); pages continue
    /// exactly after the previous page's last row.
    pub fn list(
        &self,
        filter: &Filter,
        scope: &TenantScope,
        after: Option<Cursor>,
        limit: usize,
    ) -> Page<InstanceView> {
        query::list(
            &self.inner.view,
            filter,
            scope,
            after,
            limit.min(MAX_PAGE_SIZE),
            query::Tuning::DEFAULT,
        )
    }

    /// Ids of the instances `filter` selects within `scope`, in list order; evaluated in steps
    /// like [`summary`](Self::summary).
    pub(crate) fn matching(&self, filter: &Filter, scope: &TenantScope) -> Vec<InstanceId> {
        query::matching(&self.inner.view, filter, scope, query::Tuning::DEFAULT)
    }

    /// The live view of one instance, if it exists within `scope`.
    pub fn get(&self, scope: &TenantScope, id: InstanceId) -> Option<InstanceView> {
        self.view().get(id, scope)
    }

    /// An instance's full detail: live state plus system info and apps from the store (apps from
    /// a heartbeat not yet flushed win).
    pub async fn detail(
        &self,
        scope: &TenantScope,
        id: InstanceId,
    ) -> Result<InstanceDetail, FleetError> {
        let (live, stored) = self.live_and_stored(scope, id).await?;
        Ok(InstanceDetail {
            live,
            system: stored.system,
            apps: stored.apps,
        })
    }

    /// An instance's live view and its stored record with the unflushed heartbeat state laid
    /// over it; [`FleetError::InstanceNotFound`] when it does not exist within `scope`.
    pub(crate) async fn live_and_stored(
        &self,
        scope: &TenantScope,
        id: InstanceId,
    ) -> Result<(InstanceView, Instance), FleetError> {
        let live = self
            .get(scope, id)
            .ok_or(FleetError::InstanceNotFound(id))?;
        let stored = self
            .timed(StoreOp::GetInstance, self.inner.store.get_instance(id))
            .await?
            .ok_or(FleetError::InstanceNotFound(id))?;
        Ok((live, self.with_live_state(stored)))
    }

    /// A stored instance with the heartbeat state not yet flushed laid over it (latest metrics
    /// and apps).
    pub(crate) fn with_live_state(&self, mut inst: Instance) -> Instance {
        if let Some(r) = self.pending().get(&inst.id) {
            inst.last_seen = inst.last_seen.max(r.last_seen);
            if let Some(m) = &r.metrics {
                inst.metrics = Some(m.clone());
            }
            if let Some(a) = &r.apps {
                inst.apps = a.clone();
            }
        }
        inst
    }

    /// Follows the store's change feed: applies changes made since the last call (by this
    /// process or another replica). Returns how many were applied. When the feed was truncated
    /// past our position, reconciles the whole view with a full listing instead.
    pub async fn sync(&self) -> Result<usize, FleetError> {
        let mut cursor = self.inner.feed.lock().await;
        let mut applied = 0;
        loop {
            let changes = match self
                .timed(
                    StoreOp::ChangesSince,
                    self.inner.store.changes_since(*cursor, REBUILD_PAGE),
                )
                .await
            {
                Ok(c) => c,
                Err(StoreError::FeedTruncated { .. }) => {
                    applied += self.reconcile(&mut cursor).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(last) = changes.last().map(|c| c.seq) else {
                break;
            };
            for change in changes {
                let current = match change.kind {
                    ChangeKind::Deleted => None,
                    ChangeKind::CommandQueued => {
                        let generation = self.next_hint_generation();
                        self.command_hint().insert(change.instance, generation);
                        continue;
                    }
                    _ => {
                        self.timed(
                            StoreOp::GetInstance,
                            self.inner.store.get_instance(change.instance),
                        )
                        .await?
                    }
                };
                let now = self.now();
                let gone = current.is_none();
                let done = {
                    let mut view = self.view_mut();
                    match current {
                        Some(inst) => view.upsert(&inst, change.seq, now),
                        None => view.remove(change.instance, change.seq),
                    }
                };
                if gone {
                    self.recent().remove(change.instance);
                }
                applied += usize::from(done);
            }
            *cursor = last;
        }
        self.follow_heartbeats(&mut cursor).await?;
        Ok(applied)
    }

    /// Applies the heartbeats other replicas received (the store's heartbeat log) to the view,
    /// queueing the transitions they cause; after a truncated log, reconciles instead.
    async fn follow_heartbeats(&self, cursor: &mut Seq) -> Result<(), FleetError> {
        const BATCHES: usize = 64;
        loop {
            let after = self.inner.hb_position.load(Ordering::Acquire);
            let log = match self
                .timed(
                    StoreOp::HeartbeatsSince,
                    self.inner.store.heartbeats_since(after, BATCHES),
                )
                .await
            {
                Ok(log) => log,
                Err(StoreError::FeedTruncated { .. }) => {
                    let head = self.inner.store.heartbeat_log_head().await?;
                    self.reconcile(cursor).await?;
                    self.inner.hb_position.store(head, Ordering::Release);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if log.records.is_empty() {
                self.inner
                    .hb_position
                    .store(log.position, Ordering::Release);
                return Ok(());
            }
            let mut changes = Vec::new();
            {
                let mut view = self.view_mut();
                for r in &log.records {
                    let Some(transitions) =
                        view.observe_heartbeat(r.id, r.last_seen, r.metrics.as_ref())
                    else {
                        continue;
                    };
                    changes.extend(transitions.iter().map(|transition| StatusChange {
                        instance: r.id,
                        transition,
                    }));
                    if r.metrics.is_some() {
                        self.record_point(&view, r.id);
                    }
                }
            }
            // Changes a heartbeat received elsewhere causes here are recorded by the sweeper
            // (the receiving replica records its own view of them; the store keeps each once).
            if !changes.is_empty() {
                if self.is_sweeper() {
                    self.changes().extend(changes);
                } else {
                    self.keep_unrecorded(&changes);
                }
            }
            self.inner
                .hb_position
                .store(log.position, Ordering::Release);
        }
    }

    /// Makes the view equal the store's listing (keeping fresher live last-seen state) and moves
    /// the cursor to the feed position read before the listing.
    async fn reconcile(&self, cursor: &mut Seq) -> Result<usize, FleetError> {
        let seq = self.inner.store.latest_seq().await?;
        // Heartbeats logged from here on are followed; the listing below has the ones before.
        let hb_head = self.inner.store.heartbeat_log_head().await?;
        let mut seen = HashSet::new();
        let mut applied = 0;
        let mut page = self.inner.store.list_instances(None, REBUILD_PAGE).await?;
        // While this page goes into the view, the store already reads the next one (a store that
        // reads on a blocking thread, like sled's, does both at once).
        while let Some(last) = page.last().map(|i| i.id) {
            let apply = async {
                let now = self.now();
                let mut view = self.view_mut();
                let mut n = 0;
                for inst in &page {
                    seen.insert(inst.id);
                    n += usize::from(view.upsert(inst, 0, now));
                }
                n
            };
            let (next, n) = tokio::join!(biased; self.inner.store.list_instances(Some(last), REBUILD_PAGE), apply);
            applied += n;
            page = next?;
        }
        let stale: Vec<InstanceId> = self
            .matching(&Filter::all(), &TenantScope::All)
            .into_iter()
            .filter(|id| !seen.contains(id))
            .collect();
        {
            let mut view = self.view_mut();
            for id in stale {
                applied += usize::from(view.remove(id, 0));
            }
        }
        *cursor = seq;
        self.inner.hb_position.fetch_max(hb_head, Ordering::AcqRel);
        // Command-queued changes before `seq` may be gone: take the hints from the queue itself.
        self.load_command_hints().await?;
        Ok(applied)
    }
}
