//! Store traits: what a backend must do, and the contract of every method.
//!
//! A store is split by concern — [`InstanceStore`], [`HeartbeatStore`], [`ChangeFeed`] — and
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

use crate::error::StoreError;
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

    /// Deletes the instance.
    ///
    /// **Contract:** durable before returning; appends one [`ChangeKind::Deleted`] change
    /// atomically with the deletion and returns its sequence number; [`StoreError::NotFound`]
    /// when it does not exist. Heartbeats written later for this id are ignored (never
    /// resurrect it).
    async fn delete_instance(&self, id: InstanceId) -> StoreResult<Seq>;

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
}

/// What happened to an instance, as recorded in the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Created or changed (registration, tags, groups): re-read it.
    Upserted,
    /// Deleted.
    Deleted,
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
}

/// Everything a control plane needs from its store.
pub trait FleetStore: InstanceStore + HeartbeatStore + ChangeFeed {}

impl<T: InstanceStore + HeartbeatStore + ChangeFeed + ?Sized> FleetStore for T {}

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
            async fn delete_instance(&self, id: InstanceId) -> StoreResult<Seq> {
                (**self).delete_instance(id).await
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
        }

        #[async_trait]
        impl<T: ChangeFeed + ?Sized> ChangeFeed for $wrapper<T> {
            async fn changes_since(&self, after: Seq, limit: usize) -> StoreResult<Vec<Change>> {
                (**self).changes_since(after, limit).await
            }
            async fn latest_seq(&self) -> StoreResult<Seq> {
                (**self).latest_seq().await
            }
        }
    };
}

forward!(Arc);
forward!(Box);
