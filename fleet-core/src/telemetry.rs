//! Telemetry: what a [`Fleet`](crate::Fleet) counts about its own work — heartbeats accepted,
//! enrollments by outcome, command state transitions, how long sweeps take and how long the
//! store takes to answer — read with [`Fleet::telemetry`](crate::Fleet::telemetry) as a
//! [`TelemetrySnapshot`] (plain data, for a `/metrics` route or a log line).
//!
//! Counters and histograms are lock-free (relaxed atomics) and count since this process started:
//! with several replicas, each counts what it did and a monitoring system adds them up.
//!
//! Durations are **real elapsed time** measured with [`std::time::Instant`], not the fleet's
//! [`Clock`](crate::Clock): the clock is domain time (the instant a heartbeat is judged by, a
//! manual clock in tests), while a latency is how long the machine spent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::CommandState;
use crate::enroll::{EnrollError, Enrollment};
use crate::token::LedgerOutcome;

/// Upper bounds of the latency histogram buckets, in seconds (100 µs to 10 s). Observations above
/// the last bound count only in the implicit `+Inf` bucket.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// [`LATENCY_BUCKETS`] in nanoseconds, for comparing without floating point.
const BUCKET_NANOS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram with the fixed buckets of [`LATENCY_BUCKETS`]: one atomic count per bucket
/// (plus one for everything above the last bound) and the sum of all observations in
/// nanoseconds. Recording is two relaxed `fetch_add`s; nothing allocates.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts: `counts[i]` holds observations in `(bound[i-1], bound[i]]`, the
    /// last one those above every bound.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // The first bound at or above the observation (`le` is inclusive).
        let i = BUCKET_NANOS.partition_point(|&bound| bound < nanos);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counts so far, cumulative as Prometheus expects. The total is the sum of the buckets,
    /// so the `+Inf` bucket always equals `count`, even while other threads record; `sum` may
    /// be a moment ahead of or behind the counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0u64;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(&le, c)| {
                running = running.saturating_add(c.load(Ordering::Relaxed));
                (le, running)
            })
            .collect();
        let above = self.counts[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: running.saturating_add(above),
            sum: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, cumulative, in the order of
    /// [`LATENCY_BUCKETS`]. The `+Inf` bucket is [`count`](Self::count).
    pub buckets: Vec<(f64, u64)>,
    /// Number of observations.
    pub count: u64,
    /// Sum of all observations.
    pub sum: Duration,
}

/// How an enrollment attempt ended: the three successes of [`LedgerOutcome`] and one outcome per
/// [`EnrollError`] (named as the agent protocol's error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EnrollmentOutcome {
    /// A new instance was registered.
    Enrolled,
    /// The same key retried within the retry window and got its instance back.
    Retried,
    /// An instance with an expired certificate re-enrolled and kept its identity.
    Reenrolled,
    /// Malformed token, unknown token or wrong secret ([`EnrollError::InvalidToken`]).
    InvalidToken,
    /// The token had expired.
    TokenExpired,
    /// The token was revoked.
    TokenRevoked,
    /// The token's uses were spent.
    TokenExhausted,
    /// The CSR was refused.
    InvalidCsr,
    /// The system info was refused.
    InvalidInput,
    /// Re-enrollment was refused.
    ReenrollRefused,
    /// The store failed.
    StoreError,
    /// The CA failed to sign.
    CaError,
    /// A wrong token from a source over its failed-attempt budget.
    RateLimited,
}

impl EnrollmentOutcome {
    /// Every outcome, successes first.
    pub const ALL: [Self; 13] = [
        Self::Enrolled,
        Self::Retried,
        Self::Reenrolled,
        Self::InvalidToken,
        Self::TokenExpired,
        Self::TokenRevoked,
        Self::TokenExhausted,
        Self::InvalidCsr,
        Self::InvalidInput,
        Self::ReenrollRefused,
        Self::StoreError,
        Self::CaError,
        Self::RateLimited,
    ];

    /// The outcome's label, snake case (`"enrolled"`, `"token_exhausted"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enrolled => "enrolled",
            Self::Retried => "retried",
            Self::Reenrolled => "reenrolled",
            Self::InvalidToken => "invalid_token",
            Self::TokenExpired => "token_expired",
            Self::TokenRevoked => "token_revoked",
            Self::TokenExhausted => "token_exhausted",
            Self::InvalidCsr => "invalid_csr",
            Self::InvalidInput => "invalid_input",
            Self::ReenrollRefused => "reenroll_refused",
            Self::StoreError => "store_error",
            Self::CaError => "ca_error",
            Self::RateLimited => "rate_limited",
        }
    }

    /// Whether an instance was registered (or re-registered).
    pub const fn is_success(self) -> bool {
        matches!(self, Self::Enrolled | Self::Retried | Self::Reenrolled)
    }

    /// The outcome of a finished [`Fleet::enroll`](crate::Fleet::enroll).
    pub(crate) fn of(result: &Result<Enrollment, EnrollError>) -> Self {
        match result {
            Ok(e) => match e.outcome {
                LedgerOutcome::Retried => Self::Retried,
                LedgerOutcome::Reenrolled => Self::Reenrolled,
                // A success reports one of the three; `Enrolled` is the rest.
                _ => Self::Enrolled,
            },
            Err(EnrollError::InvalidToken) => Self::InvalidToken,
            Err(EnrollError::TokenExpired) => Self::TokenExpired,
            Err(EnrollError::TokenRevoked) => Self::TokenRevoked,
            Err(EnrollError::TokenExhausted) => Self::TokenExhausted,
            Err(EnrollError::Csr(_)) => Self::InvalidCsr,
            Err(EnrollError::Invalid(_)) => Self::InvalidInput,
            Err(EnrollError::ReenrollRefused(_)) => Self::ReenrollRefused,
            Err(EnrollError::Store(_)) => Self::StoreError,
            Err(EnrollError::Ca(_)) => Self::CaError,
            Err(EnrollError::RateLimited { .. }) => Self::RateLimited,
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// A store call the [`Fleet`](crate::Fleet) times; the label is the store method's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreOp {
    /// `insert_instance` (direct registration).
    InsertInstance,
    /// `get_instance` (re-reading an instance after a change, instance detail, feed sync).
    GetInstance,
    /// `set_tags`.
    SetTags,
    /// `set_groups`.
    SetGroups,
    /// `delete_instance` (deregistration).
    DeleteInstance,
    /// `write_heartbeats` (the heartbeat flush, and write-through heartbeats).
    WriteHeartbeats,
    /// `record_status_changes` (with the heartbeat flush).
    RecordStatusChanges,
    /// `changes_since` (following the change feed).
    ChangesSince,
    /// `heartbeats_since` (following other replicas' heartbeats).
    HeartbeatsSince,
    /// `insert_token` (token creation).
    InsertToken,
    /// `get_token` (enrollment, token reads).
    GetToken,
    /// `revoke_token`.
    RevokeToken,
    /// `append_ledger` (refused and retried enrollments).
    AppendLedger,
    /// `find_enrollment` (the retry check of an enrollment).
    FindEnrollment,
    /// `enroll` (the enrollment commit).
    Enroll,
    /// `set_certificate` (renewal, retry, promotion of a renewed certificate).
    SetCertificate,
    /// `enqueue_commands`.
    EnqueueCommands,
    /// `deliver_commands` (heartbeats of instances with open commands).
    DeliverCommands,
    /// `complete_command` (command results).
    CompleteCommand,
    /// `cancel_command`.
    CancelCommand,
    /// `expire_commands` (upkeep).
    ExpireCommands,
    /// `get_command` (one command, for operators).
    GetCommand,
    /// `list_commands` (command lists and histories).
    ListCommands,
    /// `list_tokens`.
    ListTokens,
    /// `ledger` (a token's usage history).
    Ledger,
    /// `status_changes` (alerts, uptime).
    StatusChanges,
    /// `fleet_alerts`.
    FleetAlerts,
    /// `trend_buckets` (the fleet trend).
    TrendBuckets,
    /// `list_policies` (policy lists and compliance).
    ListPolicies,
    /// `insert_policy`.
    InsertPolicy,
    /// `delete_policy`.
    DeletePolicy,
    /// `list_instances` (a page of stored instances, for policy compliance).
    ListInstances,
}

impl StoreOp {
    /// Every timed operation.
    pub const ALL: [Self; 32] = [
        Self::InsertInstance,
        Self::GetInstance,
        Self::SetTags,
        Self::SetGroups,
        Self::DeleteInstance,
        Self::WriteHeartbeats,
        Self::RecordStatusChanges,
        Self::ChangesSince,
        Self::HeartbeatsSince,
        Self::InsertToken,
        Self::GetToken,
        Self::RevokeToken,
        Self::AppendLedger,
        Self::FindEnrollment,
        Self::Enroll,
        Self::SetCertificate,
        Self::EnqueueCommands,
        Self::DeliverCommands,
        Self::CompleteCommand,
        Self::CancelCommand,
        Self::ExpireCommands,
        Self::GetCommand,
        Self::ListCommands,
        Self::ListTokens,
        Self::Ledger,
        Self::StatusChanges,
        Self::FleetAlerts,
        Self::TrendBuckets,
        Self::ListPolicies,
        Self::InsertPolicy,
        Self::DeletePolicy,
        Self::ListInstances,
    ];

    /// The store method's name (`"write_heartbeats"`, `"enroll"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InsertInstance => "insert_instance",
            Self::GetInstance => "get_instance",
            Self::SetTags => "set_tags",
            Self::SetGroups => "set_groups",
            Self::DeleteInstance => "delete_instance",
            Self::WriteHeartbeats => "write_heartbeats",
            Self::RecordStatusChanges => "record_status_changes",
            Self::ChangesSince => "changes_since",
            Self::HeartbeatsSince => "heartbeats_since",
            Self::InsertToken => "insert_token",
            Self::GetToken => "get_token",
            Self::RevokeToken => "revoke_token",
            Self::AppendLedger => "append_ledger",
            Self::FindEnrollment => "find_enrollment",
            Self::Enroll => "enroll",
            Self::SetCertificate => "set_certificate",
            Self::EnqueueCommands => "enqueue_commands",
            Self::DeliverCommands => "deliver_commands",
            Self::CompleteCommand => "complete_command",
            Self::CancelCommand => "cancel_command",
            Self::ExpireCommands => "expire_commands",
            Self::GetCommand => "get_command",
            Self::ListCommands => "list_commands",
            Self::ListTokens => "list_tokens",
            Self::Ledger => "ledger",
            Self::StatusChanges => "status_changes",
            Self::FleetAlerts => "fleet_alerts",
            Self::TrendBuckets => "trend_buckets",
            Self::ListPolicies => "list_policies",
            Self::InsertPolicy => "insert_policy",
            Self::DeletePolicy => "delete_policy",
            Self::ListInstances => "list_instances",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Every command state, in the order of [`CommandState`]'s declaration.
const COMMAND_STATES: [CommandState; 6] = [
    CommandState::Queued,
    CommandState::Delivered,
    CommandState::Succeeded,
    CommandState::Failed,
    CommandState::Expired,
    CommandState::Cancelled,
];

const fn command_index(state: CommandState) -> usize {
    match state {
        CommandState::Queued => 0,
        CommandState::Delivered => 1,
        CommandState::Succeeded => 2,
        CommandState::Failed => 3,
        CommandState::Expired => 4,
        CommandState::Cancelled => 5,
    }
}

/// A counter alone on its cache line, so the heartbeat path's increments do not make other
/// threads' reads of neighbouring data miss.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// The counters and histograms of one [`Fleet`](crate::Fleet); read them with
/// [`snapshot`](Self::snapshot).
#[derive(Debug, Default)]
pub(crate) struct Telemetry {
    heartbeats: Padded,
    enrollments: [AtomicU64; EnrollmentOutcome::ALL.len()],
    commands: [AtomicU64; COMMAND_STATES.len()],
    sweep: Histogram,
    store: [Histogram; StoreOp::ALL.len()],
}

impl Telemetry {
    /// One heartbeat accepted (the heartbeat path's only telemetry cost).
    pub(crate) fn heartbeat(&self) {
        self.heartbeats.0.fetch_add(1, Ordering::Relaxed);
    }

    /// One enrollment attempt ended with `outcome`.
    pub(crate) fn enrollment(&self, outcome: EnrollmentOutcome) {
        self.enrollments[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// `n` commands entered `state`.
    pub(crate) fn commands(&self, state: CommandState, n: usize) {
        if n > 0 {
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            self.commands[command_index(state)].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// One sweep took `elapsed`.
    pub(crate) fn sweep(&self, elapsed: Duration) {
        self.sweep.observe(elapsed);
    }

    /// One store call `op` took `elapsed`.
    pub(crate) fn store(&self, op: StoreOp, elapsed: Duration) {
        self.store[op.index()].observe(elapsed);
    }

    /// Everything counted so far.
    pub(crate) fn snapshot(&self) -> TelemetrySnapshot {
        TelemetrySnapshot {
            heartbeats_total: self.heartbeats.0.load(Ordering::Relaxed),
            enrollments: EnrollmentOutcome::ALL
                .iter()
                .map(|&o| (o, self.enrollments[o.index()].load(Ordering::Relaxed)))
                .collect(),
            commands: COMMAND_STATES
                .iter()
                .map(|&s| (s, self.commands[command_index(s)].load(Ordering::Relaxed)))
                .collect(),
            sweep_duration: self.sweep.snapshot(),
            store_operations: StoreOp::ALL
                .iter()
                .map(|&op| (op, self.store[op.index()].snapshot()))
                .collect(),
        }
    }
}

/// What a [`Fleet`](crate::Fleet) has counted since it was opened; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySnapshot {
    /// Heartbeats accepted ([`Fleet::heartbeat`](crate::Fleet::heartbeat), and through it
    /// `heartbeat_as`, `exchange` and `exchange_as`); refused ones are not counted. A rate of
    /// this counter is heartbeats per second.
    pub heartbeats_total: u64,
    /// Enrollment attempts by outcome, every outcome of [`EnrollmentOutcome::ALL`] in that order
    /// (zeros included).
    pub enrollments: Vec<(EnrollmentOutcome, u64)>,
    /// Command state transitions by the state entered, every [`CommandState`] in declaration
    /// order: `queued` per command created by an enqueue (not for an idempotency key's existing
    /// command), `delivered` per delivery (a redelivery after the lease counts again),
    /// `succeeded` / `failed` per result that finished a command (a result repeated within the
    /// same millisecond as the first may count twice), `cancelled` per cancel, `expired` per
    /// command the upkeep expired (commands the store expires while delivering are not
    /// reported to the fleet and are not counted).
    pub commands: Vec<(CommandState, u64)>,
    /// How long sweeps took ([`Fleet::sweep_report`](crate::Fleet::sweep_report), which the
    /// maintenance runs on its timer).
    pub sweep_duration: HistogramSnapshot,
    /// How long store calls took, by operation, every [`StoreOp::ALL`] in that order.
    pub store_operations: Vec<(StoreOp, HistogramSnapshot)>,
}

impl TelemetrySnapshot {
    /// Enrollment attempts that ended with `outcome`.
    pub fn enrollments(&self, outcome: EnrollmentOutcome) -> u64 {
        self.enrollments
            .iter()
            .find(|(o, _)| *o == outcome)
            .map_or(0, |(_, n)| *n)
    }

    /// Commands that entered `state`.
    pub fn commands(&self, state: CommandState) -> u64 {
        self.commands
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n)
    }

    /// The latency histogram of store operation `op`.
    pub fn store_operation(&self, op: StoreOp) -> Option<&HistogramSnapshot> {
        self.store_operations
            .iter()
            .find(|(o, _)| *o == op)
            .map(|(_, h)| h)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{DynStore, key_and_csr, open_fleet, request};
    use crate::{
        CommandKind, CommandOutcome, CommandResult, CommandTarget, Heartbeat, MemoryStore,
        NewCommand, NewToken, Payload, ReportedResult, TenantScope,
    };

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn observations_land_in_the_first_bucket_at_or_above_them() {
        let h = Histogram::new();
        h.observe(Duration::ZERO); // le 0.0001
        h.observe(us(100)); // exactly on the bound: le 0.0001
        h.observe(us(101)); // le 0.00025
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(10)); // le 10
        h.observe(Duration::from_secs(11)); // +Inf only
        let s = h.snapshot();
        let at = |le: f64| s.buckets.iter().find(|b| b.0 == le).map(|b| b.1);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS.len());
        assert_eq!(at(0.0001), Some(2));
        assert_eq!(at(0.00025), Some(3));
        assert_eq!(at(0.0025), Some(3));
        assert_eq!(at(0.005), Some(4));
        assert_eq!(at(5.0), Some(4));
        assert_eq!(at(10.0), Some(5));
        assert_eq!(s.count, 6, "+Inf counts everything");
    }

    #[test]
    fn buckets_are_cumulative_and_the_sum_is_exact() {
        let h = Histogram::new();
        let mut total = Duration::ZERO;
        for n in 0..1000u64 {
            let d = Duration::from_nanos(n * 7_919_123);
            total += d;
            h.observe(d);
        }
        let s = h.snapshot();
        assert!(
            s.buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        );
        assert!(s.buckets.last().is_some_and(|b| b.1 <= s.count));
        assert_eq!(s.count, 1000);
        assert_eq!(s.sum, total);
        // Bounds in nanoseconds and seconds agree.
        for (le, nanos) in LATENCY_BUCKETS.iter().zip(BUCKET_NANOS) {
            assert_eq!(Duration::from_secs_f64(*le), Duration::from_nanos(nanos));
        }
    }

    #[test]
    fn labels_are_distinct_snake_case() {
        let mut seen = std::collections::HashSet::new();
        let labels = EnrollmentOutcome::ALL
            .iter()
            .map(|o| o.as_str())
            .chain(StoreOp::ALL.iter().map(|o| o.as_str()));
        for l in labels {
            assert!(
                l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
            assert!(seen.insert(l), "{l} twice");
        }
        for (i, o) in EnrollmentOutcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
        for (i, o) in StoreOp::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
        for (i, s) in COMMAND_STATES.iter().enumerate() {
            assert_eq!(command_index(*s), i);
        }
    }

    #[tokio::test]
    async fn fleet_counts_enrollments_heartbeats_and_commands() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let (fleet, clock) = open_fleet(&store).await;
        let before = fleet.telemetry();
        assert_eq!(before.heartbeats_total, 0);
        assert!(before.enrollments.iter().all(|(_, n)| *n == 0));

        let token = fleet
            .create_token(&TenantScope::All, NewToken::default())
            .await
            .unwrap();
        let (_key, csr) = key_and_csr();
        let enrolled = fleet
            .enroll(request(&token.join.to_string(), &csr, "web-01"))
            .await
            .unwrap();
        // The one use is spent: a second machine is refused.
        let (_key2, csr2) = key_and_csr();
        let refused = fleet
            .enroll(request(&token.join.to_string(), &csr2, "web-02"))
            .await;
        assert!(matches!(refused, Err(EnrollError::TokenExhausted)));
        assert!(matches!(
            fleet.enroll(request("nonsense", &csr2, "web-03")).await,
            Err(EnrollError::InvalidToken)
        ));

        let id = enrolled.instance;
        for _ in 0..3 {
            fleet.heartbeat(id, Heartbeat::default()).unwrap();
        }
        assert!(
            fleet
                .heartbeat(crate::InstanceId::random(), Heartbeat::default())
                .is_err()
        );
        let report = fleet
            .enqueue(
                &TenantScope::All,
                NewCommand {
                    target: CommandTarget::Instance(id),
                    kind: CommandKind::new("ping").unwrap(),
                    payload: Payload::null(),
                    ttl_secs: None,
                    idempotency_key: Some("ping-1".into()),
                },
            )
            .await
            .unwrap();
        assert_eq!(report.created, 1);
        let exchange = fleet
            .exchange(id, Heartbeat::default(), Vec::new())
            .await
            .unwrap();
        assert_eq!(exchange.commands.len(), 1);
        assert_eq!(fleet.flush_heartbeats().await.unwrap(), 1);
        fleet.sweep();

        let t = fleet.telemetry();
        assert_eq!(t.heartbeats_total, 4, "three heartbeats and one exchange");
        assert_eq!(t.enrollments(EnrollmentOutcome::Enrolled), 1);
        assert_eq!(t.enrollments(EnrollmentOutcome::TokenExhausted), 1);
        assert_eq!(t.enrollments(EnrollmentOutcome::InvalidToken), 1);
        assert_eq!(t.enrollments(EnrollmentOutcome::Retried), 0);
        assert_eq!(t.commands(CommandState::Queued), 1);
        assert_eq!(t.commands(CommandState::Delivered), 1);
        assert_eq!(t.commands(CommandState::Succeeded), 0);
        assert_eq!(t.sweep_duration.count, 1);
        let count = |op| t.store_operation(op).map_or(0, |h| h.count);
        assert_eq!(count(StoreOp::InsertToken), 1);
        assert_eq!(
            count(StoreOp::Enroll),
            1,
            "only the attempt that got to commit"
        );
        assert_eq!(count(StoreOp::EnqueueCommands), 1);
        assert_eq!(count(StoreOp::DeliverCommands), 1);
        assert_eq!(count(StoreOp::WriteHeartbeats), 1);
        assert_eq!(count(StoreOp::SetTags), 0);

        // The result finishes the command; the same result again (a later heartbeat) does not
        // count twice. A cancel and an expiry by the upkeep count once each.
        let result = ReportedResult {
            id: exchange.commands[0].id,
            outcome: CommandOutcome::Succeeded,
            result: CommandResult::new(Some(0), "pong"),
        };
        for _ in 0..2 {
            fleet
                .exchange(id, Heartbeat::default(), vec![result.clone()])
                .await
                .unwrap();
            clock.advance(Duration::from_secs(1));
        }
        let ping = |key: &str, ttl_secs| NewCommand {
            target: CommandTarget::Instance(id),
            kind: CommandKind::new("ping").unwrap(),
            payload: Payload::null(),
            ttl_secs,
            idempotency_key: Some(key.into()),
        };
        let queued = fleet
            .enqueue(&TenantScope::All, ping("ping-2", None))
            .await
            .unwrap();
        fleet
            .cancel_command(&TenantScope::All, queued.commands[0].id)
            .await
            .unwrap();
        fleet
            .enqueue(&TenantScope::All, ping("ping-3", Some(1)))
            .await
            .unwrap();
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            fleet
                .command_upkeep(Duration::from_secs(3600))
                .await
                .unwrap(),
            (1, 0)
        );
        let t = fleet.telemetry();
        assert_eq!(t.commands(CommandState::Queued), 3);
        assert_eq!(t.commands(CommandState::Succeeded), 1);
        assert_eq!(t.commands(CommandState::Failed), 0);
        assert_eq!(t.commands(CommandState::Cancelled), 1);
        assert_eq!(t.commands(CommandState::Expired), 1);
        assert_eq!(t.heartbeats_total, 6);
        let count = |op| t.store_operation(op).map_or(0, |h| h.count);
        assert_eq!(count(StoreOp::CompleteCommand), 2);
        assert_eq!(count(StoreOp::CancelCommand), 1);
    }
}
