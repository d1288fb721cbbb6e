//! Background upkeep of a [`Fleet`]: flushing batched heartbeats, sweeping for status changes,
//! following the store's change feed, and (less often) expiring commands, applying retention and
//! forgetting revocations of certificates that have expired ([`Fleet::prune_revoked`]), each on
//! its own timer.
//!
//! Timers only pace the work; every decision still takes its time from the fleet's [`Clock`]
//! (a sweep computes transitions at their threshold-crossing times, whenever it runs).
//!
//! [`Clock`]: crate::Clock

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alert::FleetAlert;
use crate::live::StatusChange;
use crate::store::FleetStore;
use crate::{Fleet, FleetError};

/// How often each chore runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// Heartbeat write-behind interval: the most last-seen time a crash can lose.
    pub flush_every: Duration,
    /// Sweep interval: how late a status change may be noticed (its recorded time is exact).
    pub sweep_every: Duration,
    /// Change-feed polling interval: how far behind other replicas this view may be (stores
    /// with a wake-up hint, like PostgreSQL's LISTEN/NOTIFY, are followed sooner).
    pub sync_every: Duration,
    /// Interval of the slower chores: expiring commands, applying the retentions below and
    /// pruning revocations of expired certificates.
    pub upkeep_every: Duration,
    /// How long status changes, fleet alerts and trend buckets are kept (default 400 days, so a
    /// year of uptime can be computed).
    pub history_retention: Duration,
    /// How long finished commands are kept (default 30 days).
    pub command_retention: Duration,
    /// Time-to-live of the sweeper lease, renewed at every sweep (default 10 s): how long a
    /// failed sweeper replica goes unreplaced.
    pub sweeper_lease: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            flush_every: Duration::from_secs(1),
            sweep_every: Duration::from_secs(1),
            sync_every: Duration::from_secs(1),
            upkeep_every: Duration::from_secs(60),
            history_retention: Duration::from_secs(400 * 24 * 3600),
            command_retention: Duration::from_secs(30 * 24 * 3600),
            sweeper_lease: Duration::from_secs(10),
        }
    }
}

/// What the upkeep reports to its observer.
#[derive(Debug)]
#[non_exhaustive]
pub enum MaintenanceEvent {
    /// Per-instance alerts: status changes found by sweeps, released after the mass-staleness
    /// guard's window (see [`crate::alert`]).
    StatusChanges(Vec<StatusChange>),
    /// Many instances went stale within one window: one alert for all of them (their status
    /// changes are recorded in the history all the same, and not reported one by one).
    MassStaleness(FleetAlert),
    /// Commands expired and old records were dropped by retention.
    Upkeep {
        /// Commands whose time-to-live passed.
        expired_commands: usize,
        /// Finished commands dropped.
        pruned_commands: usize,
        /// Status changes, fleet alerts and trend buckets dropped.
        pruned_history: usize,
        /// Revocations forgotten because their certificates have expired (no TLS handshake
        /// accepts them any more, so the CRL need not list them).
        pruned_revocations: usize,
    },
    /// Claiming or renewing the sweeper lease failed (a replica could not reach the store): this
    /// sweep's status changes were not recorded by this replica; its view still moved, and what
    /// it found is recorded once it holds the lease again.
    LeaseFailed(FleetError),
    /// The upkeep chores failed; retried at the next tick.
    UpkeepFailed(FleetError),
    /// A heartbeat flush failed; the records are kept for the next one.
    FlushFailed(FleetError),
    /// Following the change feed failed; it is retried at the next tick.
    SyncFailed(FleetError),
}

/// The running upkeep; stop it with [`Maintenance::shutdown`].
#[derive(Debug)]
pub struct Maintenance {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Maintenance {
    /// Stops the timers, gives up the sweeper lease and waits for the task; the caller then does
    /// a final [`Fleet::flush_heartbeats`].
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl<S: FleetStore> Fleet<S> {
    /// Starts the upkeep on the current tokio runtime; `observe` receives what it finds.
    pub fn spawn_maintenance(
        &self,
        config: MaintenanceConfig,
        observe: impl Fn(MaintenanceEvent) + Send + Sync + 'static,
    ) -> Maintenance {
        let (stop, mut stopped) = watch::channel(false);
        let fleet = self.clone();
        let task = tokio::spawn(async move {
            let mut flush = tokio::time::interval(config.flush_every);
            let mut sweep = tokio::time::interval(config.sweep_every);
            let mut sync = tokio::time::interval(config.sync_every);
            let mut upkeep = tokio::time::interval(config.upkeep_every);
            for t in [&mut flush, &mut sweep, &mut sync, &mut upkeep] {
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = flush.tick() => {
                        if let Err(e) = fleet.flush_heartbeats().await {
                            observe(MaintenanceEvent::FlushFailed(e));
                        }
                    }
                    _ = sweep.tick() => {
                        // With replicas, one of them at a time records what sweeps find.
                        if let Err(e) = fleet.claim_sweeper(config.sweeper_lease).await {
                            observe(MaintenanceEvent::LeaseFailed(e));
                        }
                        let report = fleet.sweep_report();
                        if let Some(alert) = report.fleet_alert {
                            observe(MaintenanceEvent::MassStaleness(alert));
                        }
                        if !report.alerts.is_empty() {
                            observe(MaintenanceEvent::StatusChanges(report.alerts));
                        }
                    }
                    _ = upkeep.tick() => {
                        let done = async {
                            let (expired, pruned) =
                                fleet.command_upkeep(config.command_retention).await?;
                            let history = fleet.prune_history(config.history_retention).await?;
                            let revocations = fleet.prune_revoked().await?;
                            // Another replica may have rotated the CA.
                            fleet.reload_ca().await?;
                            Ok::<_, FleetError>((expired, pruned, history, revocations))
                        };
                        match done.await {
                            Ok((expired_commands, pruned_commands, pruned_history, pruned_revocations)) => {
                                if expired_commands + pruned_commands + pruned_history + pruned_revocations > 0 {
                                    observe(MaintenanceEvent::Upkeep {
                                        expired_commands,
                                        pruned_commands,
                                        pruned_history,
                                        pruned_revocations,
                                    });
                                }
                            }
                            Err(e) => observe(MaintenanceEvent::UpkeepFailed(e)),
                        }
                    }
                    // Another replica wrote (a hint from the store): follow it now.
                    () = fleet.store().wait_for_writes() => {
                        if let Err(e) = fleet.sync().await {
                            observe(MaintenanceEvent::SyncFailed(e));
                        }
                    }
                    _ = sync.tick() => {
                        if let Err(e) = fleet.sync().await {
                            observe(MaintenanceEvent::SyncFailed(e));
                        }
                    }
                }
            }
            // Hand the sweep over at once rather than after the lease runs out.
            if fleet.is_sweeper() {
                let _ = fleet.release_sweeper().await;
            }
        });
        Maintenance { stop, task }
    }
}
