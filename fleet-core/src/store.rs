//! Store traits: what a backend must do, and the contract of every method.
//!
//! A store is split by concern — [`InstanceStore`], [`HeartbeatStore`], [`ChangeFeed`],
//! [`TokenStore`] (tokens, ledger, the atomic enrollment), [`CertificateStore`] (CA material,
//! certificate serials, revocations), [`HistoryStore`] (the status-change log) and
//! [`CommandStore`] (the command queue), [`PolicyStore`] (compliance policies) — and
//! [`FleetStore`] is their sum, implemented automatically for any type that implements all of
//! them. The traits are object-safe (`Arc<dyn FleetStore>` works) and forwarded through `Arc<T>`.
//!
//! Stores never read a clock: every time they record is passed in. Every mutation that an
//! operator or an enrollment makes is **durable before the method returns**; heartbeats are the
//! one exception, written behind in batches by [`Fleet`](crate::Fleet).
//!
//! The [`testing`](crate::testing) module (feature `testing`) holds the conformance suite every
//! store must pass.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use std::net::SocketAddr;

use crate::alert::{FleetAlert, FleetAlertQuery};
use crate::ca::{CaMaterial, CertificateRecord, RevokedCertificate};
use crate::command::{
    Command, CommandId, CommandOutcome, CommandQuery, CommandResult, Delivery, Enqueued,
};
use crate::error::StoreError;
use crate::identity::{Fingerprint, Serial};
use crate::live::StatusChange;
use crate::policy::{Policy, PolicyName};
use crate::token::{LedgerEntry, RegistrationToken, TokenId, TokenState};
use crate::trend::TrendBucket;
use crate::{App, Groups, Instance, InstanceId, MetricsSample, Tags, Timestamp};

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// A position in the change feed. Sequence numbers start at 1; 0 means "before everything".
pub type Seq = u64;

/// Durable instance records.
#[async_trait]
pub trait InstanceStore: Debug + Send + Sync + 'static {
    /// Creates `instance`.
    ///
    /// **Contract:** durable before returning; appends one [`ChangeKind::Upserted`] change to the
    /// feed atomically with the record and returns its sequence number. Returns
    /// [`StoreError::AlreadyExists`] — and changes nothing — when the id is taken.
    async fn insert_instance(&self, instance: &Instance) -> StoreResult<Seq>;

    /// The instance with this id, if any. Reads see every acknowledged write.
    async fn get_instance(&self, id: InstanceId) -> StoreResult<Option<Instance>>;

    /// Up to `limit` instances with ids greater than `after` (all when `None`), in ascending id
    /// order. Paging through with the last id returned visits every instance that existed for the
    /// whole scan exactly once.
    async fn list_instances(
        &self,
        after: Option<InstanceId>,
        limit: usize,
    ) -> StoreResult<Vec<Instance>>;

    /// Replaces the instance's tags.
    ///
    /// **Contract:** durable before returning; appends one [`ChangeKind::Upserted`] change
    /// atomically with the write and returns its sequence number; [`StoreError::NotFound`] (and no
    /// change) when the instance does not exist.
    async fn set_tags(&self, id: InstanceId, tags: &Tags) -> StoreResult<Seq>;

    /// Replaces the instance's groups; the same contract as [`set_tags`](Self::set_tags).
    async fn set_groups(&self, id: InstanceId, groups: &Groups) -> StoreResult<Seq>;

    /// Deletes the instance and revokes its certificates.
    ///
    /// **Contract:** durable before returning; atomically with the deletion, records its current
    /// and staged certificates as revoked at `now` (see [`CertificateStore`]) and appends one
    /// [`ChangeKind::Deleted`] change, returning its sequence number; [`StoreError::NotFound`]
    /// when it does not exist. Heartbeats written later for this id are ignored (never
    /// resurrect it).
    async fn delete_instance(&self, id: InstanceId, now: Timestamp) -> StoreResult<Seq>;

    /// Number of instances.
    async fn count_instances(&self) -> StoreResult<u64>;
}

/// The last known state a heartbeat leaves behind, as written behind in batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    /// Which instance.
    pub id: InstanceId,
    /// Server time the heartbeat was received.
    pub last_seen: Timestamp,
    /// The newest metrics sample, if the heartbeat (or an earlier one in the batch) carried one;
    /// `None` leaves the stored sample as it is.
    pub metrics: Option<MetricsSample>,
    /// The newest installed-apps list, if reported; `None` leaves the stored list as it is.
    pub apps: Option<Vec<App>>,
}

/// Batched, write-behind persistence of heartbeats.
#[async_trait]
pub trait HeartbeatStore: Debug + Send + Sync + 'static {
    /// Writes the last known state of each instance in `batch` (at most one record per
    /// instance).
    ///
    /// **Contract:** each record is applied atomically (last seen, metrics and apps together);
    /// records for instances that do not exist are skipped, never creating or resurrecting one;
    /// heartbeats append nothing to the change feed. The write does not have to be flushed to
    /// stable storage before returning — a crash may lose the last batch, which is the documented
    /// price of write-behind — but it must not be lost once a later durable write has returned.
    async fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()>;

    /// The end of the heartbeat log (see [`heartbeats_since`](Self::heartbeats_since)); 0 for a
    /// store that keeps none.
    async fn heartbeat_log_head(&self) -> StoreResult<u64> {
        Ok(0)
    }

    /// The heartbeat records written — by any replica — after log position `after`, at most
    /// `limit` batches' worth, with the position they end at. This is how replicas see the
    /// heartbeats that reached the others (their last-seen times and metrics; apps are re-read
    /// from the store).
    ///
    /// **Contract:** positions follow commit order (a reader that saw position *n* never misses a
    /// batch committed later with a smaller one); a store may forget old batches and then
    /// returns [`StoreError::FeedTruncated`] (the reader reconciles from a full listing). A store
    /// that serves one process only may keep no log: the default returns nothing.
    async fn heartbeats_since(&self, after: u64, limit: usize) -> StoreResult<HeartbeatLog> {
        let _ = limit;
        Ok(HeartbeatLog {
            position: after,
            records: Vec::new(),
        })
    }
}

/// A page of the heartbeat log; see [`HeartbeatStore::heartbeats_since`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeartbeatLog {
    /// The position the page ends at (pass it as `after` next time).
    pub position: u64,
    /// The records, in log order (apps are not carried).
    pub records: Vec<HeartbeatRecord>,
}

/// What happened to an instance, as recorded in the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Created or changed (registration, tags, groups): re-read it.
    Upserted,
    /// Deleted.
    Deleted,
    /// A command was queued for the instance (nothing to re-read): every replica delivers it on
    /// the instance's next heartbeat, whichever replica that reaches.
    CommandQueued,
}

/// One entry of the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Position in the feed; strictly increasing.
    pub seq: Seq,
    /// Which instance.
    pub instance: InstanceId,
    /// What happened.
    pub kind: ChangeKind,
}

/// An ordered log of durable instance changes, so that every live view (one per control-plane
/// replica) can follow writes made elsewhere.
#[async_trait]
pub trait ChangeFeed: Debug + Send + Sync + 'static {
    /// Up to `limit` changes with `seq > after`, in ascending `seq` order.
    ///
    /// **Contract:** sequence numbers are unique and strictly increasing in commit order — once a
    /// caller has seen change `n`, no change with a smaller number commits later. A store may
    /// forget old changes; when changes after `after` are gone it returns
    /// [`StoreError::FeedTruncated`] and the caller rebuilds from a full listing.
    async fn changes_since(&self, after: Seq, limit: usize) -> StoreResult<Vec<Change>>;

    /// The highest sequence number assigned so far (0 when none).
    async fn latest_seq(&self) -> StoreResult<Seq>;

    /// Takes or renews the lease `name` for `holder` until `now + ttl` — if it is free, has
    /// expired, or is `holder`'s already — and returns its epoch (a fencing number that grows
    /// each time the lease changes hands); `None` while another holder has it. Replicas use it so
    /// that one of them at a time does singleton work (the sweep that records status changes).
    ///
    /// **Contract:** atomic; at any time at most one holder's lease is unexpired. A store that
    /// serves one process only may grant every request (the default, epoch 1).
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        ttl: std::time::Duration,
    ) -> StoreResult<Option<u64>> {
        let _ = (name, holder, now, ttl);
        Ok(Some(1))
    }

    /// Gives up `holder`'s lease `name` (another holder may take it at once); a no-op when
    /// `holder` does not hold it.
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        let _ = (name, holder);
        Ok(())
    }

    /// Completes when another process may have written (a change, a heartbeat batch) — a
    /// wake-up hint so replicas follow each other sooner than their polling interval, never the
    /// source of truth: callers still read [`changes_since`](Self::changes_since). It may complete
    /// spuriously or miss a write. The default never completes (polling alone).
    async fn wait_for_writes(&self) {
        std::future::pending::<()>().await;
    }
}

/// What an enrollment registers.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrollTarget {
    /// A new instance (its `certificate` set to the one just issued).
    New(Box<Instance>),
    /// An existing instance re-enrolling after its certificate expired: it keeps its identity,
    /// tags and history and gets `certificate` as its current one.
    Existing {
        /// Which instance.
        instance: InstanceId,
        /// The serial its expired certificate carries; must still be its current one.
        expected_serial: Serial,
        /// The new certificate.
        certificate: CertificateRecord,
    },
}

/// Everything [`TokenStore::enroll`] commits atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollCommit {
    /// The token (its secret already checked by the caller).
    pub token: TokenId,
    /// Server time.
    pub now: Timestamp,
    /// SHA-256 of the CSR's public key.
    pub key_fingerprint: Fingerprint,
    /// A successful enrollment with this token and key at or after this time makes this attempt a
    /// retry.
    pub retry_since: Timestamp,
    /// The caller's address, for the ledger.
    pub peer: Option<SocketAddr>,
    /// What to register.
    pub target: EnrollTarget,
}

/// The result of [`TokenStore::enroll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollResult {
    /// Registered (or re-enrolled); the change's sequence number.
    Enrolled {
        /// Change-feed position of the new or updated instance.
        seq: Seq,
    },
    /// The same key already enrolled with this token within the window; that instance is
    /// returned and no use was consumed.
    Retry {
        /// The instance registered by the earlier attempt.
        instance: InstanceId,
    },
    /// The token cannot be used (never [`TokenState::Active`]); only the ledger changed.
    Rejected(TokenState),
    /// The token id is unknown; nothing changed.
    UnknownToken,
    /// Re-enrollment refused: the token does not allow it, the instance is gone, or its current
    /// serial is not the expected one. Only the ledger changed.
    ReenrollRefused,
}

/// Registration tokens, their ledger, and the atomic enrollment.
#[async_trait]
pub trait TokenStore: Debug + Send + Sync + 'static {
    /// Creates a token. **Contract:** durable before returning; [`StoreError::AlreadyExists`]
    /// (and no change) when the id is taken.
    async fn insert_token(&self, token: &RegistrationToken) -> StoreResult<()>;

    /// The token with this id, if any.
    async fn get_token(&self, id: &TokenId) -> StoreResult<Option<RegistrationToken>>;

    /// Every token, oldest first (by creation time, then id).
    async fn list_tokens(&self) -> StoreResult<Vec<RegistrationToken>>;

    /// Revokes a token at `now` (revoking again keeps the first time) and returns it.
    /// **Contract:** durable before returning; [`StoreError::NotFound`] when unknown.
    async fn revoke_token(&self, id: &TokenId, now: Timestamp) -> StoreResult<RegistrationToken>;

    /// Records a use attempt that failed before [`enroll`](Self::enroll) (wrong secret, bad
    /// CSR). **Contract:** durable before returning; [`StoreError::NotFound`] for an unknown
    /// token.
    async fn append_ledger(&self, entry: &LedgerEntry) -> StoreResult<()>;

    /// Up to `limit` ledger entries of a token, newest first.
    async fn ledger(&self, id: &TokenId, limit: usize) -> StoreResult<Vec<LedgerEntry>>;

    /// The instance an enrollment (or re-enrollment, not a retry) with this token and key
    /// registered at or after `since`, if it still exists. A cheap, non-atomic pre-check; [`enroll`](Self::enroll)
    /// decides.
    async fn find_enrollment(
        &self,
        id: &TokenId,
        key: &Fingerprint,
        since: Timestamp,
    ) -> StoreResult<Option<InstanceId>>;

    /// Enrolls, **atomically** (one transaction; concurrent calls behave as if run one at a
    /// time):
    ///
    /// 1. unknown token → [`EnrollResult::UnknownToken`], nothing written;
    /// 2. revoked token → ledger `revoked`, [`EnrollResult::Rejected`];
    /// 3. an enrollment (or re-enrollment, not a retry) of this token with this key at or after
    ///    `retry_since` whose instance still exists → ledger `retried`, [`EnrollResult::Retry`], no use consumed;
    /// 4. expired or exhausted → ledger entry, [`EnrollResult::Rejected`];
    /// 5. for [`EnrollTarget::Existing`]: the token must allow re-enrollment and the instance
    ///    must exist with `expected_serial` as its current serial, else ledger
    ///    `reenroll_refused`, [`EnrollResult::ReenrollRefused`]; on success its certificate is
    ///    replaced (the old serial recorded as revoked) and ledger `reenrolled`;
    /// 6. for [`EnrollTarget::New`]: the instance is inserted (its certificate recorded) and
    ///    ledger `enrolled`;
    /// 7. in both success cases `uses` grows by one and one [`ChangeKind::Upserted`] change is
    ///    appended.
    ///
    /// With `max_uses = k`, any number of concurrent calls register at most `k` instances. Durable
    /// before returning.
    async fn enroll(&self, commit: &EnrollCommit) -> StoreResult<EnrollResult>;
}

/// A change to an instance's certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateChange {
    /// Make this the current certificate at once; the previous current and any staged one are
    /// recorded as revoked (used when a retried enrollment gets a fresh certificate).
    Replace(CertificateRecord),
    /// Stage a renewed certificate: it becomes current when first used. A previously staged one
    /// is recorded as revoked. The current one stays valid until then.
    Stage(CertificateRecord),
    /// The staged certificate with this serial was used: it becomes current and the old current
    /// is recorded as revoked. [`StoreError::Conflict`] if it is not the staged one.
    Promote(Serial),
}

/// What [`CertificateChange::apply`] did to an instance record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateUpdate {
    /// A certificate newly attached (to index by serial).
    pub added: Option<CertificateRecord>,
    /// Certificates taken off the instance, to record as revoked.
    pub retired: [Option<CertificateRecord>; 2],
}

impl CertificateChange {
    /// Applies the change to an instance record — the rule every store shares.
    /// [`StoreError::Conflict`] (and no change) when promoting a serial that is not the staged
    /// one.
    pub fn apply(self, inst: &mut Instance) -> StoreResult<CertificateUpdate> {
        Ok(match self {
            Self::Replace(c) => CertificateUpdate {
                added: Some(c),
                retired: [inst.certificate.replace(c), inst.next_certificate.take()],
            },
            Self::Stage(c) => CertificateUpdate {
                added: Some(c),
                retired: [inst.next_certificate.replace(c), None],
            },
            Self::Promote(serial) => {
                let Some(next) = inst.next_certificate.filter(|n| n.serial == serial) else {
                    return Err(StoreError::Conflict(format!(
                        "certificate {serial} is not the staged one"
                    )));
                };
                inst.next_certificate = None;
                CertificateUpdate {
                    added: None,
                    retired: [inst.certificate.replace(next), None],
                }
            }
        })
    }
}

/// CA material, instance certificates and revocations.
#[async_trait]
pub trait CertificateStore: Debug + Send + Sync + 'static {
    /// The stored CA, if one was initialised.
    async fn load_ca(&self) -> StoreResult<Option<CaMaterial>>;

    /// Stores `material` as the CA unless one is already stored, and returns the stored one —
    /// so replicas starting at once agree on one CA. **Contract:** atomic and durable. The
    /// material's keys are sealed ([`crate::seal`]); the store keeps both fields as opaque text.
    async fn init_ca(&self, material: &CaMaterial) -> StoreResult<CaMaterial>;

    /// Replaces the stored CA material with `new` if it is still `expected` (a rotation step, or
    /// sealing a key stored in the clear), and returns the material stored afterwards: `new`, or
    /// what another replica wrote first. **Contract:** atomic (compare and swap) and durable;
    /// [`StoreError::NotFound`] when no CA is stored.
    async fn replace_ca(&self, expected: &CaMaterial, new: &CaMaterial) -> StoreResult<CaMaterial>;

    /// For a store that forgets everything when the process ends (like [`MemoryStore`]): a
    /// key-encryption key it keeps in memory beside the sealed CA, which fleets opened over it
    /// without a key of their own use — nothing it seals outlives the process anyway. A store
    /// that persists must return `None` (the default): its key lives outside it.
    ///
    /// [`MemoryStore`]: crate::MemoryStore
    fn volatile_key_encryption_key(&self) -> Option<crate::seal::KeyEncryptionKey> {
        None
    }

    /// Applies a certificate change to an instance. **Contract:** durable before returning;
    /// atomic with the revocation records it implies and one [`ChangeKind::Upserted`] change,
    /// whose sequence number it returns; [`StoreError::NotFound`] for an unknown instance.
    async fn set_certificate(
        &self,
        id: InstanceId,
        change: CertificateChange,
        now: Timestamp,
    ) -> StoreResult<Seq>;

    /// Every revoked certificate not yet pruned.
    async fn revoked_certificates(&self) -> StoreResult<Vec<RevokedCertificate>>;

    /// Forgets revocations of certificates that expired before `before`; returns how many.
    async fn prune_revoked(&self, before: Timestamp) -> StoreResult<usize>;
}

/// Which recorded status changes to read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusChangeQuery {
    /// Only this instance's.
    pub instance: Option<InstanceId>,
    /// Only changes at or after this time.
    pub since: Option<Timestamp>,
    /// Only changes before this time.
    pub until: Option<Timestamp>,
    /// At most this many (0 means none).
    pub limit: usize,
}

impl StatusChangeQuery {
    /// Whether `c` matches the instance and time filters.
    pub fn matches(&self, c: &StatusChange) -> bool {
        self.instance.is_none_or(|i| i == c.instance)
            && self.since.is_none_or(|s| c.transition.at >= s)
            && self.until.is_none_or(|u| c.transition.at < u)
    }
}

/// What happened over time: the log of status changes (alerts, and the history uptime is
/// computed from), fleet-level alerts, and fleet trend buckets.
#[async_trait]
pub trait HistoryStore: Debug + Send + Sync + 'static {
    /// Appends status changes (each instance's in order). **Contract:** durable before
    /// returning; a change already recorded (same instance, time and statuses) is not recorded
    /// twice.
    async fn record_status_changes(&self, changes: &[StatusChange]) -> StoreResult<()>;

    /// The recorded changes matching `query`, newest first (by transition time, then recording
    /// order).
    async fn status_changes(&self, query: &StatusChangeQuery) -> StoreResult<Vec<StatusChange>>;

    /// Records a fleet-level alert. **Contract:** durable before returning; recording the same
    /// alert (same time and kind) again changes nothing.
    async fn record_fleet_alert(&self, alert: &FleetAlert) -> StoreResult<()>;

    /// Fleet-level alerts in the window, newest first.
    async fn fleet_alerts(&self, query: &FleetAlertQuery) -> StoreResult<Vec<FleetAlert>>;

    /// Writes trend buckets, replacing any stored bucket with the same start. **Contract:**
    /// durable before returning.
    async fn record_trend_buckets(&self, buckets: &[TrendBucket]) -> StoreResult<()>;

    /// The trend buckets starting in `[from, until)`, oldest first.
    async fn trend_buckets(
        &self,
        from: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<TrendBucket>>;

    /// Retention: forgets status changes, fleet alerts and trend buckets from before `before`;
    /// returns how many records went. **Contract:** durable before returning.
    async fn prune_history(&self, before: Timestamp) -> StoreResult<usize>;
}

/// The command queue; see [`crate::command`] for the life of a command.
///
/// Every method that changes a command is **atomic** (concurrent calls behave as if run one at a
/// time) and **durable before returning**.
#[async_trait]
pub trait CommandStore: Debug + Send + Sync + 'static {
    /// Stores each command (state [`Queued`](crate::CommandState::Queued)) unless the same
    /// instance already has a command with the same idempotency key, in which case that one is
    /// returned as [`Enqueued::Existing`] and nothing is written for it. **Contract:** atomic per
    /// command — any number of concurrent enqueues with one key store exactly one command — with
    /// one [`ChangeKind::CommandQueued`] change appended per created command in the same
    /// transaction, and durable before returning; results in input order. [`StoreError::AlreadyExists`] when a
    /// command id is taken.
    async fn enqueue_commands(&self, commands: &[Command]) -> StoreResult<Vec<Enqueued>>;

    /// The command with this id, if any.
    async fn get_command(&self, id: CommandId) -> StoreResult<Option<Command>>;

    /// The commands matching `query`, newest (highest id) first, at most `query.limit`.
    async fn list_commands(&self, query: &CommandQuery) -> StoreResult<Vec<Command>>;

    /// Hands out the instance's deliverable commands, **atomically**: its open commands due to
    /// expire ([`Command::expired_at`]: time-to-live passed and, if delivered, lease run out)
    /// become expired; no command is delivered at or after its `expires_at`; then, oldest first, up to
    /// `limit` commands that are queued, or delivered with their lease run out, become delivered
    /// with a lease until `now + lease` and are returned. Two concurrent deliveries never return
    /// the same command while its lease runs. Durable before returning.
    async fn deliver_commands(
        &self,
        instance: InstanceId,
        now: Timestamp,
        lease: std::time::Duration,
        limit: usize,
    ) -> StoreResult<Delivery>;

    /// Records an agent's result for one of its commands as [`Command::complete`] does: an open
    /// command — or one that expired after it was delivered — becomes succeeded or failed; any
    /// other finished one is returned unchanged (results are delivered at least once).
    /// [`StoreError::NotFound`] when the command does not exist or is another instance's.
    async fn complete_command(
        &self,
        instance: InstanceId,
        id: CommandId,
        outcome: CommandOutcome,
        result: &CommandResult,
        now: Timestamp,
    ) -> StoreResult<Command>;

    /// Cancels a queued command. [`StoreError::Conflict`] (and no change) when it is no longer
    /// queued — a cancel racing a delivery ends in exactly one of the two;
    /// [`StoreError::NotFound`] when unknown.
    async fn cancel_command(&self, id: CommandId, now: Timestamp) -> StoreResult<Command>;

    /// Marks every open command due to expire at `now` ([`Command::expired_at`]) expired;
    /// returns how many.
    async fn expire_commands(&self, now: Timestamp) -> StoreResult<usize>;

    /// The instances that have open (queued or delivered) commands.
    async fn instances_with_open_commands(&self) -> StoreResult<Vec<InstanceId>>;

    /// Deletes finished commands that finished before `before` (retention); returns how many.
    async fn prune_commands(&self, before: Timestamp) -> StoreResult<usize>;
}

/// Compliance policies.
#[async_trait]
pub trait PolicyStore: Debug + Send + Sync + 'static {
    /// Stores a new policy. **Contract:** durable before returning; [`StoreError::AlreadyExists`]
    /// (and no change) when the name is taken.
    async fn insert_policy(&self, policy: &Policy) -> StoreResult<()>;

    /// Every policy, by name.
    async fn list_policies(&self) -> StoreResult<Vec<Policy>>;

    /// Deletes a policy. **Contract:** durable before returning; [`StoreError::NotFound`] when
    /// unknown.
    async fn delete_policy(&self, name: &PolicyName) -> StoreResult<()>;
}

/// Everything a control plane needs from its store.
pub trait FleetStore:
    InstanceStore
    + HeartbeatStore
    + ChangeFeed
    + TokenStore
    + CertificateStore
    + HistoryStore
    + CommandStore
    + PolicyStore
{
}

impl<
    T: InstanceStore
        + HeartbeatStore
        + ChangeFeed
        + TokenStore
        + CertificateStore
        + HistoryStore
        + CommandStore
        + PolicyStore
        + ?Sized,
> FleetStore for T
{
}

macro_rules! forward {
    ($wrapper:ident) => {
        #[async_trait]
        impl<T: InstanceStore + ?Sized> InstanceStore for $wrapper<T> {
            async fn insert_instance(&self, instance: &Instance) -> StoreResult<Seq> {
                (**self).insert_instance(instance).await
            }
            async fn get_instance(&self, id: InstanceId) -> StoreResult<Option<Instance>> {
                (**self).get_instance(id).await
            }
            async fn list_instances(
                &self,
                after: Option<InstanceId>,
                limit: usize,
            ) -> StoreResult<Vec<Instance>> {
                (**self).list_instances(after, limit).await
            }
            async fn set_tags(&self, id: InstanceId, tags: &Tags) -> StoreResult<Seq> {
                (**self).set_tags(id, tags).await
            }
            async fn set_groups(&self, id: InstanceId, groups: &Groups) -> StoreResult<Seq> {
                (**self).set_groups(id, groups).await
            }
            async fn delete_instance(&self, id: InstanceId, now: Timestamp) -> StoreResult<Seq> {
                (**self).delete_instance(id, now).await
            }
            async fn count_instances(&self) -> StoreResult<u64> {
                (**self).count_instances().await
            }
        }

        #[async_trait]
        impl<T: HeartbeatStore + ?Sized> HeartbeatStore for $wrapper<T> {
            async fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
                (**self).write_heartbeats(batch).await
            }
            async fn heartbeat_log_head(&self) -> StoreResult<u64> {
                (**self).heartbeat_log_head().await
            }
            async fn heartbeats_since(
                &self,
                after: u64,
                limit: usize,
            ) -> StoreResult<HeartbeatLog> {
                (**self).heartbeats_since(after, limit).await
            }
        }

        #[async_trait]
        impl<T: ChangeFeed + ?Sized> ChangeFeed for $wrapper<T> {
            async fn changes_since(&self, after: Seq, limit: usize) -> StoreResult<Vec<Change>> {
                (**self).changes_since(after, limit).await
            }
            async fn latest_seq(&self) -> StoreResult<Seq> {
                (**self).latest_seq().await
            }
            async fn acquire_lease(
                &self,
                name: &str,
                holder: &str,
                now: Timestamp,
                ttl: std::time::Duration,
            ) -> StoreResult<Option<u64>> {
                (**self).acquire_lease(name, holder, now, ttl).await
            }
            async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
                (**self).release_lease(name, holder).await
            }
            async fn wait_for_writes(&self) {
                (**self).wait_for_writes().await
            }
        }

        #[async_trait]
        impl<T: TokenStore + ?Sized> TokenStore for $wrapper<T> {
            async fn insert_token(&self, token: &RegistrationToken) -> StoreResult<()> {
                (**self).insert_token(token).await
            }
            async fn get_token(&self, id: &TokenId) -> StoreResult<Option<RegistrationToken>> {
                (**self).get_token(id).await
            }
            async fn list_tokens(&self) -> StoreResult<Vec<RegistrationToken>> {
                (**self).list_tokens().await
            }
            async fn revoke_token(
                &self,
                id: &TokenId,
                now: Timestamp,
            ) -> StoreResult<RegistrationToken> {
                (**self).revoke_token(id, now).await
            }
            async fn append_ledger(&self, entry: &LedgerEntry) -> StoreResult<()> {
                (**self).append_ledger(entry).await
            }
            async fn ledger(&self, id: &TokenId, limit: usize) -> StoreResult<Vec<LedgerEntry>> {
                (**self).ledger(id, limit).await
            }
            async fn find_enrollment(
                &self,
                id: &TokenId,
                key: &Fingerprint,
                since: Timestamp,
            ) -> StoreResult<Option<InstanceId>> {
                (**self).find_enrollment(id, key, since).await
            }
            async fn enroll(&self, commit: &EnrollCommit) -> StoreResult<EnrollResult> {
                (**self).enroll(commit).await
            }
        }

        #[async_trait]
        impl<T: CertificateStore + ?Sized> CertificateStore for $wrapper<T> {
            async fn load_ca(&self) -> StoreResult<Option<CaMaterial>> {
                (**self).load_ca().await
            }
            async fn init_ca(&self, material: &CaMaterial) -> StoreResult<CaMaterial> {
                (**self).init_ca(material).await
            }
            async fn replace_ca(
                &self,
                expected: &CaMaterial,
                new: &CaMaterial,
            ) -> StoreResult<CaMaterial> {
                (**self).replace_ca(expected, new).await
            }
            fn volatile_key_encryption_key(&self) -> Option<crate::seal::KeyEncryptionKey> {
                (**self).volatile_key_encryption_key()
            }
            async fn set_certificate(
                &self,
                id: InstanceId,
                change: CertificateChange,
                now: Timestamp,
            ) -> StoreResult<Seq> {
                (**self).set_certificate(id, change, now).await
            }
            async fn revoked_certificates(&self) -> StoreResult<Vec<RevokedCertificate>> {
                (**self).revoked_certificates().await
            }
            async fn prune_revoked(&self, before: Timestamp) -> StoreResult<usize> {
                (**self).prune_revoked(before).await
            }
        }

        #[async_trait]
        impl<T: HistoryStore + ?Sized> HistoryStore for $wrapper<T> {
            async fn record_status_changes(&self, changes: &[StatusChange]) -> StoreResult<()> {
                (**self).record_status_changes(changes).await
            }
            async fn status_changes(
                &self,
                query: &StatusChangeQuery,
            ) -> StoreResult<Vec<StatusChange>> {
                (**self).status_changes(query).await
            }
            async fn record_fleet_alert(&self, alert: &FleetAlert) -> StoreResult<()> {
                (**self).record_fleet_alert(alert).await
            }
            async fn fleet_alerts(&self, query: &FleetAlertQuery) -> StoreResult<Vec<FleetAlert>> {
                (**self).fleet_alerts(query).await
            }
            async fn record_trend_buckets(&self, buckets: &[TrendBucket]) -> StoreResult<()> {
                (**self).record_trend_buckets(buckets).await
            }
            async fn trend_buckets(
                &self,
                from: Timestamp,
                until: Timestamp,
            ) -> StoreResult<Vec<TrendBucket>> {
                (**self).trend_buckets(from, until).await
            }
            async fn prune_history(&self, before: Timestamp) -> StoreResult<usize> {
                (**self).prune_history(before).await
            }
        }

        #[async_trait]
        impl<T: CommandStore + ?Sized> CommandStore for $wrapper<T> {
            async fn enqueue_commands(&self, commands: &[Command]) -> StoreResult<Vec<Enqueued>> {
                (**self).enqueue_commands(commands).await
            }
            async fn get_command(&self, id: CommandId) -> StoreResult<Option<Command>> {
                (**self).get_command(id).await
            }
            async fn list_commands(&self, query: &CommandQuery) -> StoreResult<Vec<Command>> {
                (**self).list_commands(query).await
            }
            async fn deliver_commands(
                &self,
                instance: InstanceId,
                now: Timestamp,
                lease: std::time::Duration,
                limit: usize,
            ) -> StoreResult<Delivery> {
                (**self).deliver_commands(instance, now, lease, limit).await
            }
            async fn complete_command(
                &self,
                instance: InstanceId,
                id: CommandId,
                outcome: CommandOutcome,
                result: &CommandResult,
                now: Timestamp,
            ) -> StoreResult<Command> {
                (**self)
                    .complete_command(instance, id, outcome, result, now)
                    .await
            }
            async fn cancel_command(&self, id: CommandId, now: Timestamp) -> StoreResult<Command> {
                (**self).cancel_command(id, now).await
            }
            async fn expire_commands(&self, now: Timestamp) -> StoreResult<usize> {
                (**self).expire_commands(now).await
            }
            async fn instances_with_open_commands(&self) -> StoreResult<Vec<InstanceId>> {
                (**self).instances_with_open_commands().await
            }
            async fn prune_commands(&self, before: Timestamp) -> StoreResult<usize> {
                (**self).prune_commands(before).await
            }
        }

        #[async_trait]
        impl<T: PolicyStore + ?Sized> PolicyStore for $wrapper<T> {
            async fn insert_policy(&self, policy: &Policy) -> StoreResult<()> {
                (**self).insert_policy(policy).await
            }
            async fn list_policies(&self) -> StoreResult<Vec<Policy>> {
                (**self).list_policies().await
            }
            async fn delete_policy(&self, name: &PolicyName) -> StoreResult<()> {
                (**self).delete_policy(name).await
            }
        }
    };
}

forward!(Arc);
forward!(Box);
