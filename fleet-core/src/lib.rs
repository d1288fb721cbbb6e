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
//!   together;
//! - what makes a fleet manageable over time: the [`command`] queue (delivered in heartbeat
//!   replies, surviving offline instances), [`alert`]s with the start-up grace and the
//!   mass-staleness guard, exact uptime [`history`], fleet [`trend`]s, [`recent`] metrics for
//!   graphs, and [`policy`] compliance;
//! - [`telemetry`]: counters and latency histograms of the fleet's own work, for `/metrics`.
//!
//! Time comes only from a [`Clock`]; tests use [`ManualClock`]. (The [`telemetry`] latencies
//! are real elapsed time, measured with `std::time::Instant`.)
//!
//! ## From token to heartbeat
//!
//! ```
//! use fleet_core::{EnrollRequest, Filter, Fleet, Heartbeat, InstanceIdentity, MemoryStore,
//!                  NewToken, SystemInfo, TenantScope};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! // A control plane: a store, and a CA generated into it on first open.
//! let fleet = Fleet::builder(MemoryStore::new()).open().await?;
//!
//! // An operator creates a one-use token and hands the join string to the new machine.
//! let token = fleet.create_token(&TenantScope::All, NewToken::default()).await?;
//! let join = token.join.to_string();
//!
//! // The agent makes a key and a CSR, and enrolls (normally over TLS, see fleet-agent-proto).
//! let key = rcgen::KeyPair::generate()?;
//! let csr = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
//! let enrolled = fleet
//!     .enroll(EnrollRequest {
//!         token: join,
//!         csr_pem: csr,
//!         system: SystemInfo::with_hostname("web-01"),
//!         ..EnrollRequest::default()
//!     })
//!     .await?;
//!
//! // Later requests arrive over mutual TLS: the verified certificate is the identity.
//! let identity = InstanceIdentity::from_certificate_der(&enrolled.certificate.der)?;
//! fleet.heartbeat_as(&identity, Heartbeat::default()).await?;
//! assert_eq!(fleet.summary(&Filter::parse("status:online")?, &TenantScope::All).online, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! Stores implement the traits of [`store`]; [`MemoryStore`] is the reference implementation
//! and `fleet_core::testing` (feature `testing`) the suite every store passes.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod alert;
pub mod ca;
mod clock;
pub mod command;
pub mod csr;
mod enroll;
pub mod error;
pub mod filter;
mod fleet;
pub mod group;
pub mod history;
pub mod identity;
pub mod instance;
pub mod ledger;
pub mod limiter;
pub mod live;
mod maintenance;
pub mod memory;
pub mod metrics;
pub mod policy;
mod random;
pub mod recent;
pub mod rotation;
pub mod seal;
pub mod staleness;
pub mod store;
pub mod summary;
pub mod tag;
pub mod telemetry;
pub mod tenant;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod timestamp;
pub mod token;
pub mod trend;

pub use alert::{AlertPolicy, FleetAlert, FleetAlertKind, FleetAlertQuery};
pub use ca::{CaSet, CertificateAuthority, IssuancePolicy};
pub use clock::{Clock, ManualClock, SystemClock};
pub use command::{
    BatchId, Command, CommandId, CommandKind, CommandOutcome, CommandResult, CommandState,
    CommandTarget, EnqueueReport, Exchange, NewCommand, Payload, ReportedResult,
};
pub use enroll::{AuthError, EnrollError, EnrollRequest, Enrollment, EnrollmentPolicy, RenewError};
pub use error::{FleetError, StoreError, ValidationError};
pub use filter::{Filter, FilterLimit, FilterParseError, TagSelector, Term};
pub use fleet::{
    Fleet, FleetBuilder, Heartbeat, HeartbeatAck, InstanceDetail, MAX_PAGE_SIZE, SweepReport,
};
pub use group::{GroupName, Groups};
pub use identity::{Fingerprint, InstanceIdentity, Serial};
pub use instance::{App, Instance, InstanceId, NewInstance, SystemInfo};
pub use live::{CertificateCheck, Cursor, InstanceView, LiveMetrics, LiveView, Page, StatusChange};
pub use maintenance::{Maintenance, MaintenanceConfig, MaintenanceEvent};
pub use memory::MemoryStore;
pub use metrics::{MetricsSample, NetworkRates};
pub use policy::{Compliance, NewPolicy, Policy, PolicyName, PolicyResult, Rule, Verdict};
pub use random::RandomError;
pub use recent::{MetricsPoint, RecentMetricsConfig, RecentMetricsStats};
pub use staleness::{StalenessPolicy, StalenessState, Status, Transition};
pub use store::FleetStore;
pub use summary::FleetSummary;
pub use tag::{TagAuthority, TagKey, TagValue, Tags};
pub use telemetry::{EnrollmentOutcome, Histogram, HistogramSnapshot, StoreOp, TelemetrySnapshot};
pub use tenant::{TenantId, TenantScope};
pub use timestamp::Timestamp;
pub use token::{JoinString, MaxUses, NewToken, RegistrationToken, TokenId};
pub use trend::TrendBucket;
