//! # fleet-core
//!
//! The heart of **fleet**, a library for embedding fleet management in a control plane:
//! instances join, send heartbeats, and appear in a fleet view with a status
//! (online / warning / offline), tags, groups and aggregated metrics.
//!
//! This crate knows no network and no database. It holds:
//!
//! - the domain: [`Instance`], [`SystemInfo`], [`Tags`], [`Groups`], [`TenantId`],
//!   [`MetricsSample`];
//! - the rules: the [`staleness`] state machine, the [`filter`] language, the [`summary`]
//!   definitions;
//! - the store contracts ([`store`]) with [`MemoryStore`], the reference implementation, and the
//!   conformance suite every store must pass (`testing`, feature `testing`);
//! - the [`LiveView`], an in-memory index answering summaries, filters and search over a million
//!   instances without touching the store, and [`Fleet`], the façade that ties view and store
//!   together.
//!
//! Time comes only from a [`Clock`]; tests use [`ManualClock`].
//!
//! ## A store of your own
//!
//! Stores implement three small traits; [`FleetStore`] is their sum. A wrapper that counts
//! writes, for instance:
//!
//! ```
//! use async_trait::async_trait;
//! use fleet_core::store::*;
//! use fleet_core::{Groups, Instance, InstanceId, MemoryStore, Tags};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! #[derive(Debug, Default)]
//! struct Counting { inner: MemoryStore, writes: AtomicU64 }
//!
//! #[async_trait]
//! impl InstanceStore for Counting {
//!     async fn insert_instance(&self, i: &Instance) -> StoreResult<Seq> {
//!         self.writes.fetch_add(1, Ordering::Relaxed);
//!         self.inner.insert_instance(i).await
//!     }
//!     async fn get_instance(&self, id: InstanceId) -> StoreResult<Option<Instance>> {
//!         self.inner.get_instance(id).await
//!     }
//!     async fn list_instances(&self, after: Option<InstanceId>, n: usize) -> StoreResult<Vec<Instance>> {
//!         self.inner.list_instances(after, n).await
//!     }
//!     async fn set_tags(&self, id: InstanceId, t: &Tags) -> StoreResult<Seq> {
//!         self.inner.set_tags(id, t).await
//!     }
//!     async fn set_groups(&self, id: InstanceId, g: &Groups) -> StoreResult<Seq> {
//!         self.inner.set_groups(id, g).await
//!     }
//!     async fn delete_instance(&self, id: InstanceId) -> StoreResult<Seq> {
//!         self.inner.delete_instance(id).await
//!     }
//!     async fn count_instances(&self) -> StoreResult<u64> { self.inner.count_instances().await }
//! }
//! #[async_trait]
//! impl HeartbeatStore for Counting {
//!     async fn write_heartbeats(&self, b: &[HeartbeatRecord]) -> StoreResult<()> {
//!         self.inner.write_heartbeats(b).await
//!     }
//! }
//! #[async_trait]
//! impl ChangeFeed for Counting {
//!     async fn changes_since(&self, after: Seq, n: usize) -> StoreResult<Vec<Change>> {
//!         self.inner.changes_since(after, n).await
//!     }
//!     async fn latest_seq(&self) -> StoreResult<Seq> { self.inner.latest_seq().await }
//! }
//!
//! fn assert_store<S: FleetStore>() {}
//! assert_store::<Counting>();
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
pub mod error;
pub mod filter;
mod fleet;
pub mod group;
pub mod instance;
pub mod live;
pub mod memory;
pub mod metrics;
pub mod staleness;
pub mod store;
pub mod summary;
pub mod tag;
pub mod tenant;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod timestamp;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{FleetError, StoreError, ValidationError};
pub use filter::{Filter, FilterParseError, TagSelector, Term};
pub use fleet::{Fleet, FleetBuilder, Heartbeat, HeartbeatAck, InstanceDetail, MAX_PAGE_SIZE};
pub use group::{GroupName, Groups};
pub use instance::{App, Instance, InstanceId, NewInstance, SystemInfo};
pub use live::{Cursor, InstanceView, LiveMetrics, LiveView, Page, StatusChange};
pub use memory::MemoryStore;
pub use metrics::{MetricsSample, NetworkRates};
pub use staleness::{StalenessPolicy, StalenessState, Status, Transition};
pub use store::FleetStore;
pub use summary::FleetSummary;
pub use tag::{TagAuthority, TagKey, TagValue, Tags};
pub use tenant::{TenantId, TenantScope};
pub use timestamp::Timestamp;
