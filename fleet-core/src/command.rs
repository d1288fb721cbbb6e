//! Commands: work queued for an instance and delivered in its heartbeat replies.
//!
//! An operator enqueues a command for one instance, a filter or a group (one command per
//! instance, sharing a [`BatchId`]). A command has a [`CommandKind`], a JSON payload, a
//! time-to-live (default [`DEFAULT_COMMAND_TTL`]) and an optional idempotency key — enqueueing
//! the same key for the same instance twice yields one command. Its life:
//!
//! ```text
//! queued ──deliver──▶ delivered ──result──▶ succeeded | failed
//!   │  ▲                 │
//!   │  └──lease expires──┘ (delivered again: at-least-once; the agent de-duplicates by id)
//!   ├──cancel──▶ cancelled
//!   └──TTL passes (queued or delivered)──▶ expired
//! ```
//!
//! Commands wait in the store, so one queued while its instance is offline (or while the control
//! plane restarts) is delivered with the first heartbeat after it reconnects. Finished commands
//! keep their result (exit code and output, truncated to [`MAX_COMMAND_OUTPUT`] bytes) and
//! timestamps; the per-instance history lists them newest first.
//!
//! Command ids are time-ordered UUIDs (version 7 layout, built from the fleet's clock), so "newest
//! first" is "highest id first" and pages are cut by id.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use compact_str::CompactString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use rustc_hash::FxHashMap;

use crate::error::{StoreError, ValidationError};
use crate::fleet::HeartbeatAck;
use crate::store::FleetStore;
use crate::tag::string_newtype_impls;
use crate::telemetry::StoreOp;
use crate::{Fleet, FleetError, InstanceId, RandomError, TenantId, TenantScope, Timestamp};

/// A command's time-to-live when the operator gives none (24 hours).
pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest time-to-live a command may have (30 days).
pub const MAX_COMMAND_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a delivered command waits for its result before it is delivered again (120 s: longer
/// than the default heartbeat interval plus a command's run time).
pub const DEFAULT_COMMAND_LEASE: Duration = Duration::from_secs(120);
/// Largest payload, as compact JSON (64 KiB).
pub const MAX_COMMAND_PAYLOAD: usize = 64 * 1024;
/// Largest output kept with a result (16 KiB); longer output is cut at a character boundary and
/// marked [`truncated`](CommandResult::truncated).
pub const MAX_COMMAND_OUTPUT: usize = 16 * 1024;
/// Longest idempotency key (128 bytes).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Most commands handed to one heartbeat.
pub const MAX_COMMANDS_PER_DELIVERY: usize = 16;

/// A command's id: a UUID whose first 48 bits are its creation time in milliseconds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(Uuid);

/// Shared by the commands of one enqueue that targeted a filter or a group.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BatchId(Uuid);

/// The last (millisecond, counter) handed out, so ids made by one process are strictly
/// increasing even within a millisecond or when the clock steps back.
static LAST_ID: std::sync::Mutex<(u64, u32)> = std::sync::Mutex::new((0, 0));

fn time_ordered(at: Timestamp) -> Result<Uuid, RandomError> {
    let mut random = [0u8; 10];
    crate::random::fill(&mut random)?;
    let wanted = u64::try_from(at.as_unix_millis()).unwrap_or(0);
    let (millis, counter) = {
        let mut last = LAST_ID
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = if wanted > last.0 || (last.1 >= (1 << 26) - 1) {
            (wanted.max(last.0 + u64::from(wanted <= last.0)), 0)
        } else {
            (last.0, last.1 + 1)
        };
        *last
    };
    // A 26-bit counter in the version-7 layout's first random bits (12 of `rand_a`, then 14 of
    // `rand_b` around the variant bits), the rest random.
    random[0] = ((counter >> 22) & 0x0f) as u8;
    random[1] = (counter >> 14) as u8;
    random[2] = ((counter >> 8) & 0x3f) as u8;
    random[3] = counter as u8;
    Ok(uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid())
}

macro_rules! uuid_id {
    ($t:ident, $what:literal) => {
        impl $t {
            /// A fresh id ordered by `at`; ids made by one process are strictly increasing, even
            /// within a millisecond or when the clock steps back.
            pub fn new(at: Timestamp) -> Result<Self, RandomError> {
                time_ordered(at).map(Self)
            }

            /// An id from its 16 bytes.
            pub const fn from_bytes(b: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(b))
            }

            /// An id from a `u128` (handy in tests).
            pub const fn from_u128(v: u128) -> Self {
                Self(Uuid::from_u128(v))
            }

            /// The 16 bytes (big-endian: byte order is id order).
            pub const fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $t {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| ValidationError::new($what, s, "is not a UUID"))
            }
        }
    };
}

uuid_id!(CommandId, "command id");
uuid_id!(BatchId, "batch id");

/// What a command does: 1–63 characters of `a–z 0–9 -`, beginning with a letter or digit
/// (`ping`, `collect-inventory`). The agent decides what a kind means and refuses kinds it does
/// not know.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct CommandKind(CompactString);

impl CommandKind {
    /// Validates a kind.
    pub fn new(kind: impl AsRef<str>) -> Result<Self, ValidationError> {
        let kind = kind.as_ref();
        let ok = (1..=63).contains(&kind.len())
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !kind.starts_with('-');
        if ok {
            Ok(Self(CompactString::new(kind)))
        } else {
            Err(ValidationError::new(
                "command kind",
                kind,
                "must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'",
            ))
        }
    }

    /// The kind as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

string_newtype_impls!(CommandKind);

/// A command's JSON payload, kept as compact JSON text.
///
/// In human-readable formats (JSON) it is the JSON value itself; in binary formats (the stores'
/// encoding) it is the text, so stores need no self-describing format.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(String);

impl Payload {
    /// `null`.
    pub fn null() -> Self {
        Self("null".into())
    }

    /// Parses JSON text and checks the size limit ([`MAX_COMMAND_PAYLOAD`], measured compact).
    pub fn from_json(text: &str) -> Result<Self, ValidationError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ValidationError::new("payload", e.to_string(), "is not valid JSON"))?;
        Self::from_value(&value)
    }

    /// A payload from a JSON value; checks the size limit.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, ValidationError> {
        let text = value.to_string();
        if text.len() > MAX_COMMAND_PAYLOAD {
            return Err(ValidationError::new(
                "payload",
                format!("{} bytes", text.len()),
                "exceeds the limit of 65536 bytes",
            ));
        }
        Ok(Self(text))
    }

    /// The payload as a JSON value.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Payload {
    fn default() -> Self {
        Self::null()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            self.value().serialize(s)
        } else {
            s.serialize_str(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let v = serde_json::Value::deserialize(d)?;
            Self::from_value(&v).map_err(serde::de::Error::custom)
        } else {
            Ok(Self(String::deserialize(d)?))
        }
    }
}

/// Where a command is in its life; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Waiting for the instance's next heartbeat.
    Queued,
    /// Handed to a heartbeat; waiting for the result (delivered again when the lease runs out).
    Delivered,
    /// The agent reported success.
    Succeeded,
    /// The agent reported failure, or refused the kind.
    Failed,
    /// Its time-to-live passed before a result arrived.
    Expired,
    /// Cancelled by an operator before delivery.
    Cancelled,
}

impl CommandState {
    /// Whether the command is finished (no further change will happen).
    pub const fn is_finished(self) -> bool {
        !matches!(self, Self::Queued | Self::Delivered)
    }

    /// The state's name as used in JSON and query strings.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandState {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => Self::Queued,
            "delivered" => Self::Delivered,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            _ => {
                return Err(ValidationError::new(
                    "command state",
                    s,
                    "must be queued, delivered, succeeded, failed, expired or cancelled",
                ));
            }
        })
    }
}

/// How a command ended on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// It ran and succeeded.
    Succeeded,
    /// It failed, or the agent refused it.
    Failed,
}

/// What the agent reported.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandResult {
    /// Exit code, if it ran a process.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Output, at most [`MAX_COMMAND_OUTPUT`] bytes.
    #[serde(default)]
    pub output: String,
    /// Whether `output` was cut to the limit.
    #[serde(default)]
    pub truncated: bool,
}

impl CommandResult {
    /// A result with `output` cut to [`MAX_COMMAND_OUTPUT`] bytes at a character boundary.
    pub fn new(exit_code: Option<i32>, output: impl Into<String>) -> Self {
        let mut output = output.into();
        let truncated = output.len() > MAX_COMMAND_OUTPUT;
        if truncated {
            let mut cut = MAX_COMMAND_OUTPUT;
            while !output.is_char_boundary(cut) {
                cut -= 1;
            }
            output.truncate(cut);
        }
        Self {
            exit_code,
            output,
            truncated,
        }
    }
}

/// A command and everything known about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Its id (time-ordered).
    pub id: CommandId,
    /// The batch it belongs to, when it was enqueued for a filter or a group.
    pub batch: Option<BatchId>,
    /// The instance it is for.
    pub instance: InstanceId,
    /// That instance's tenant.
    pub tenant: Option<TenantId>,
    /// What to do.
    pub kind: CommandKind,
    /// Arguments.
    pub payload: Payload,
    /// The operator's idempotency key, if one was given.
    pub idempotency_key: Option<String>,
    /// Where it is in its life.
    pub state: CommandState,
    /// When it was enqueued.
    pub created_at: Timestamp,
    /// When it expires unless finished.
    pub expires_at: Timestamp,
    /// When it was first delivered.
    pub delivered_at: Option<Timestamp>,
    /// While delivered: when it will be delivered again if no result arrives.
    pub lease_until: Option<Timestamp>,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// When it finished (succeeded, failed, expired, cancelled).
    pub finished_at: Option<Timestamp>,
    /// The agent's result.
    pub result: Option<CommandResult>,
}

impl Command {
    /// Whether a delivery at `now` may hand it out: open, not expired, and queued or with its
    /// lease run out.
    pub fn deliverable(&self, now: Timestamp) -> bool {
        now < self.expires_at
            && match self.state {
                CommandState::Queued => true,
                CommandState::Delivered => self.lease_until.is_none_or(|l| l <= now),
                _ => false,
            }
    }

    /// Whether it is open and due to expire at `now`: its time-to-live has passed and, if it was
    /// delivered, its lease has run out too (an agent that got it just before the deadline has
    /// its lease to report).
    pub fn expired_at(&self, now: Timestamp) -> bool {
        match self.state {
            CommandState::Queued => now >= self.expires_at,
            CommandState::Delivered => {
                now >= self.expires_at && self.lease_until.is_none_or(|l| l <= now)
            }
            _ => false,
        }
    }

    /// Marks it expired (the rule every store shares).
    pub fn expire(&mut self, now: Timestamp) {
        self.state = CommandState::Expired;
        self.lease_until = None;
        self.finished_at = Some(now);
    }

    /// Cancels it if it is still queued (the rule every store shares);
    /// [`StoreError::Conflict`] and no change otherwise.
    pub fn cancel(&mut self, now: Timestamp) -> Result<(), StoreError> {
        if self.state != CommandState::Queued {
            return Err(StoreError::Conflict(format!(
                "command {} is {}, only a queued command can be cancelled",
                self.id, self.state
            )));
        }
        self.state = CommandState::Cancelled;
        self.finished_at = Some(now);
        Ok(())
    }

    /// Marks it delivered at `now` with a lease of `lease` (the rule every store shares).
    pub fn deliver(&mut self, now: Timestamp, lease: Duration) {
        self.state = CommandState::Delivered;
        self.delivered_at.get_or_insert(now);
        self.lease_until = Some(now.saturating_add(lease));
        self.deliveries = self.deliveries.saturating_add(1);
    }

    /// Records the agent's result if the command is still open — or expired after it was
    /// delivered (it did run; the result is the truth) — and returns whether it changed. A
    /// result for a finished command changes nothing (results arrive at least once).
    pub fn complete(
        &mut self,
        outcome: CommandOutcome,
        result: CommandResult,
        now: Timestamp,
    ) -> bool {
        let late = self.state == CommandState::Expired && self.delivered_at.is_some();
        if self.state.is_finished() && !late {
            return false;
        }
        self.state = match outcome {
            CommandOutcome::Succeeded => CommandState::Succeeded,
            CommandOutcome::Failed => CommandState::Failed,
        };
        self.lease_until = None;
        self.finished_at = Some(now);
        self.result = Some(result);
        true
    }
}

/// Which instances an enqueue targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandTarget {
    /// One instance.
    Instance(InstanceId),
    /// Every instance the filter selects now (one command each, sharing a batch id).
    Filter(crate::Filter),
    /// Every instance in the group now (one command each, sharing a batch id).
    Group(crate::GroupName),
}

/// What an operator enqueues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    /// Which instances.
    pub target: CommandTarget,
    /// What to do.
    pub kind: CommandKind,
    /// Arguments (default `null`).
    #[serde(default)]
    pub payload: Payload,
    /// Time-to-live in seconds (default [`DEFAULT_COMMAND_TTL`], at most [`MAX_COMMAND_TTL`]).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Enqueueing the same key again for the same instance returns the existing command.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl NewCommand {
    /// A command of `kind` for one instance, with defaults.
    pub fn for_instance(instance: InstanceId, kind: CommandKind) -> Self {
        Self {
            target: CommandTarget::Instance(instance),
            kind,
            payload: Payload::null(),
            ttl_secs: None,
            idempotency_key: None,
        }
    }

    /// The time-to-live, checked.
    pub fn ttl(&self) -> Result<Duration, ValidationError> {
        match self.ttl_secs {
            None => Ok(DEFAULT_COMMAND_TTL),
            Some(s) if s == 0 || s > MAX_COMMAND_TTL.as_secs() => Err(ValidationError::new(
                "ttl_secs",
                s.to_string(),
                "must be between 1 and 2592000 (30 days)",
            )),
            Some(s) => Ok(Duration::from_secs(s)),
        }
    }

    /// Checks the idempotency key and the time-to-live.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.ttl()?;
        if let Some(k) = &self.idempotency_key
            && (k.is_empty()
                || k.len() > MAX_IDEMPOTENCY_KEY_LEN
                || k.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "idempotency_key",
                k.as_str(),
                "must be 1-128 bytes without control characters",
            ));
        }
        Ok(())
    }
}

/// What [`CommandStore::enqueue_commands`](crate::store::CommandStore::enqueue_commands) did with
/// one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// Stored as new.
    Created(Command),
    /// A command with the same instance and idempotency key already existed; it is returned
    /// and nothing was written.
    Existing(Command),
}

impl Enqueued {
    /// The stored command.
    pub fn command(&self) -> &Command {
        match self {
            Self::Created(c) | Self::Existing(c) => c,
        }
    }
}

/// What a delivery handed out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delivery {
    /// Commands to send with the heartbeat reply, oldest first.
    pub commands: Vec<Command>,
    /// Commands of the instance still open after the delivery (including those just delivered).
    pub open: usize,
}

/// Which commands to list.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommandQuery {
    /// Only this instance's.
    pub instance: Option<InstanceId>,
    /// Only this batch's.
    pub batch: Option<BatchId>,
    /// Only in this state.
    pub state: Option<CommandState>,
    /// Only this tenant's (`Some(None)`: only commands of instances without a tenant).
    pub tenant: Option<Option<TenantId>>,
    /// Only commands with a smaller id (older): the cursor of the next page.
    pub before: Option<CommandId>,
    /// At most this many.
    pub limit: usize,
}

impl CommandQuery {
    /// Whether `c` matches every filter but the limit.
    pub fn matches(&self, c: &Command) -> bool {
        self.instance.is_none_or(|i| i == c.instance)
            && self.batch.is_none_or(|b| Some(b) == c.batch)
            && self.state.is_none_or(|s| s == c.state)
            && self.tenant.as_ref().is_none_or(|t| *t == c.tenant)
            && self.before.is_none_or(|b| c.id < b)
    }
}

/// Most instances one enqueue may target (100,000); larger rollouts are split by filter.
pub const MAX_COMMAND_TARGETS: usize = 100_000;
/// Most payload bytes one enqueue may write in all (targets × payload size, 256 MiB).
pub const MAX_BATCH_PAYLOAD_BYTES: usize = 256 << 20;
/// Most commands an [`EnqueueReport`] lists (the rest are listed by batch).
pub const MAX_REPORTED_COMMANDS: usize = 100;
/// Commands are written to the store in chunks of this many.
const ENQUEUE_CHUNK: usize = 1000;

/// What [`Fleet::enqueue`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnqueueReport {
    /// The batch id, when the target was a filter or a group.
    pub batch: Option<BatchId>,
    /// Instances targeted.
    pub targeted: usize,
    /// Commands created.
    pub created: usize,
    /// Commands that already existed with the same idempotency key (returned, not created).
    pub existing: usize,
    /// The first [`MAX_REPORTED_COMMANDS`] commands (created or existing), in target order.
    pub commands: Vec<Command>,
}

/// A result an agent reports for one of its commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportedResult {
    /// Which command.
    pub id: CommandId,
    /// How it ended.
    pub outcome: CommandOutcome,
    /// Exit code and output (output longer than [`MAX_COMMAND_OUTPUT`] is cut).
    pub result: CommandResult,
}

/// The control plane's answer to a heartbeat that may carry command results:
/// the heartbeat's [`HeartbeatAck`] and the commands to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// The heartbeat's acknowledgement.
    pub ack: HeartbeatAck,
    /// Commands to run, oldest first (at least once: the agent de-duplicates by id).
    pub commands: Vec<Command>,
}

impl<S: FleetStore> Fleet<S> {
    /// Seeds the delivery hints from the store (at open).
    pub(crate) async fn load_command_hints(&self) -> Result<(), FleetError> {
        let open = self.inner.store.instances_with_open_commands().await?;
        let generation = self.next_hint_generation();
        let mut hint = self.command_hint();
        for id in open {
            hint.insert(id, generation);
        }
        Ok(())
    }

    pub(crate) fn command_hint(&self) -> MutexGuard<'_, FxHashMap<InstanceId, u64>> {
        self.inner
            .command_hint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn next_hint_generation(&self) -> u64 {
        self.inner.hint_generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Enqueues a command for one instance, or one per instance a filter or group selects now
    /// (sharing a batch id), within `scope`.
    ///
    /// Validation comes first and changes nothing on error: the time-to-live, the idempotency
    /// key, the target ([`FleetError::InstanceNotFound`] for an instance outside `scope`; at most
    /// [`MAX_COMMAND_TARGETS`] instances, and at most [`MAX_BATCH_PAYLOAD_BYTES`] of payload in
    /// all). Each command is durable before this returns; with an idempotency key, an instance
    /// that already has a command with that key gets no second one (the existing one is
    /// reported) — for as long as that command is kept (finished commands are pruned after the
    /// command retention).
    ///
    /// Commands are written in chunks of 1,000: if the store fails midway, the chunks written
    /// before stay queued and the error is returned. Give batches an idempotency key so that
    /// retrying the call completes the batch without queueing anything twice.
    pub async fn enqueue(
        &self,
        scope: &TenantScope,
        new: NewCommand,
    ) -> Result<EnqueueReport, FleetError> {
        new.validate()?;
        let ttl = new.ttl()?;
        let (targets, batch) = match &new.target {
            CommandTarget::Instance(id) => {
                self.visible(*id, scope)?;
                (vec![*id], None)
            }
            CommandTarget::Filter(f) => (self.matching(f, scope), Some(())),
            CommandTarget::Group(g) => (
                self.matching(&crate::Filter::all().group([g.clone()]), scope),
                Some(()),
            ),
        };
        if targets.len() > MAX_COMMAND_TARGETS {
            return Err(ValidationError::new(
                "command target",
                format!("{} instances", targets.len()),
                "selects more than 100000 instances; narrow the filter",
            )
            .into());
        }
        if targets.len().saturating_mul(new.payload.as_str().len()) > MAX_BATCH_PAYLOAD_BYTES {
            return Err(ValidationError::new(
                "payload",
                format!(
                    "{} bytes × {} instances",
                    new.payload.as_str().len(),
                    targets.len()
                ),
                "exceeds 256 MiB in all; use a smaller payload or fewer targets",
            )
            .into());
        }
        let now = self.now();
        let batch = batch.map(|()| BatchId::new(now)).transpose()?;
        let tenants: Vec<Option<TenantId>> = {
            let view = self.view();
            targets
                .iter()
                .map(|id| view.tenant(*id).flatten())
                .collect()
        };
        let mut report = EnqueueReport {
            batch,
            targeted: targets.len(),
            created: 0,
            existing: 0,
            commands: Vec::new(),
        };
        for (ids, tenants) in targets
            .chunks(ENQUEUE_CHUNK)
            .zip(tenants.chunks(ENQUEUE_CHUNK))
        {
            let commands = ids
                .iter()
                .zip(tenants)
                .map(|(&instance, tenant)| {
                    Ok(Command {
                        id: CommandId::new(now)?,
                        batch,
                        instance,
                        tenant: tenant.clone(),
                        kind: new.kind.clone(),
                        payload: new.payload.clone(),
                        idempotency_key: new.idempotency_key.clone(),
                        state: CommandState::Queued,
                        created_at: now,
                        expires_at: now.saturating_add(ttl),
                        delivered_at: None,
                        lease_until: None,
                        deliveries: 0,
                        finished_at: None,
                        result: None,
                    })
                })
                .collect::<Result<Vec<_>, RandomError>>()?;
            let stored = self
                .timed(
                    StoreOp::EnqueueCommands,
                    self.inner.store.enqueue_commands(&commands),
                )
                .await?;
            let created = stored
                .iter()
                .filter(|e| matches!(e, Enqueued::Created(_)))
                .count();
            self.inner.telemetry.commands(CommandState::Queued, created);
            let generation = self.next_hint_generation();
            let mut hint = self.command_hint();
            for e in stored {
                match &e {
                    Enqueued::Created(c) => {
                        report.created += 1;
                        hint.insert(c.instance, generation);
                    }
                    Enqueued::Existing(_) => report.existing += 1,
                }
                if report.commands.len() < MAX_REPORTED_COMMANDS {
                    report.commands.push(e.command().clone());
                }
            }
        }
        Ok(report)
    }

    /// A heartbeat from an authenticated instance that also reports command results and collects
    /// the commands waiting for it: records the heartbeat (as [`heartbeat`](Self::heartbeat)),
    /// then the results (durable; a result for a finished command changes nothing, one for an
    /// unknown or pruned command is ignored), then hands out up to
    /// [`MAX_COMMANDS_PER_DELIVERY`] deliverable commands. An instance with nothing queued costs
    /// no store access.
    pub async fn exchange(
        &self,
        id: InstanceId,
        hb: crate::Heartbeat,
        results: Vec<ReportedResult>,
    ) -> Result<Exchange, FleetError> {
        let ack = self.heartbeat(id, hb)?;
        if self.inner.write_through {
            self.persist_heartbeat(id).await?;
        }
        let now = self.now();
        // A result listed twice in one heartbeat is the same result: the first one counts.
        let mut reported = rustc_hash::FxHashSet::default();
        for r in results {
            if !reported.insert(r.id) {
                continue;
            }
            let result = CommandResult::new(r.result.exit_code, r.result.output);
            let result = CommandResult {
                truncated: result.truncated || r.result.truncated,
                ..result
            };
            match self
                .timed(
                    StoreOp::CompleteCommand,
                    self.inner
                        .store
                        .complete_command(id, r.id, r.outcome, &result, now),
                )
                .await
            {
                Ok(c) => {
                    // Finished by this result: a repeated one leaves the first one's time (a
                    // repeat within the same millisecond, from a retried request, would count
                    // twice).
                    let finished =
                        matches!(c.state, CommandState::Succeeded | CommandState::Failed);
                    if finished && c.finished_at == Some(now) {
                        self.inner.telemetry.commands(c.state, 1);
                    }
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some(generation) = self.command_hint().get(&id).copied() else {
            return Ok(Exchange {
                ack,
                commands: Vec::new(),
            });
        };
        let delivery = self
            .timed(
                StoreOp::DeliverCommands,
                self.inner.store.deliver_commands(
                    id,
                    now,
                    self.inner.command_lease,
                    MAX_COMMANDS_PER_DELIVERY,
                ),
            )
            .await?;
        self.inner
            .telemetry
            .commands(CommandState::Delivered, delivery.commands.len());
        if delivery.open == 0 {
            let mut hint = self.command_hint();
            if hint.get(&id) == Some(&generation) {
                hint.remove(&id);
            }
        }
        Ok(Exchange {
            ack,
            commands: delivery.commands,
        })
    }

    /// [`authenticate`](Self::authenticate), then [`exchange`](Self::exchange) as that instance.
    pub async fn exchange_as(
        &self,
        identity: &crate::InstanceIdentity,
        hb: crate::Heartbeat,
        results: Vec<ReportedResult>,
    ) -> Result<Exchange, FleetError> {
        self.authenticate_instance(identity).await?;
        self.exchange(identity.instance, hb, results).await
    }

    /// The command with this id, if it exists within `scope`.
    pub async fn command(&self, scope: &TenantScope, id: CommandId) -> Result<Command, FleetError> {
        match self
            .timed(StoreOp::GetCommand, self.inner.store.get_command(id))
            .await?
        {
            Some(c) if scope.allows(c.tenant.as_ref()) => Ok(c),
            _ => Err(FleetError::CommandNotFound(id)),
        }
    }

    /// Commands matching `query` within `scope`, newest first; `query.limit` is capped at
    /// [`MAX_PAGE_SIZE`](crate::MAX_PAGE_SIZE). Page on with `before` = the last id returned.
    pub async fn commands(
        &self,
        scope: &TenantScope,
        mut query: CommandQuery,
    ) -> Result<Vec<Command>, FleetError> {
        query.limit = query.limit.min(crate::MAX_PAGE_SIZE);
        if let TenantScope::Tenant(t) = scope {
            query.tenant = Some(Some(t.clone()));
        }
        Ok(self
            .timed(
                StoreOp::ListCommands,
                self.inner.store.list_commands(&query),
            )
            .await?)
    }

    /// Cancels a queued command within `scope`. [`FleetError::CommandNotCancellable`] (and no
    /// change) once it was delivered or finished.
    pub async fn cancel_command(
        &self,
        scope: &TenantScope,
        id: CommandId,
    ) -> Result<Command, FleetError> {
        let current = self.command(scope, id).await?;
        match self
            .timed(
                StoreOp::CancelCommand,
                self.inner.store.cancel_command(id, self.now()),
            )
            .await
        {
            Ok(c) => {
                self.inner.telemetry.commands(CommandState::Cancelled, 1);
                Ok(c)
            }
            Err(StoreError::Conflict(_)) => {
                let state = self
                    .inner
                    .store
                    .get_command(id)
                    .await?
                    .map_or(current.state, |c| c.state);
                Err(FleetError::CommandNotCancellable { id, state })
            }
            Err(StoreError::NotFound { .. }) => Err(FleetError::CommandNotFound(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Expires open commands whose time-to-live has passed, and forgets finished commands older
    /// than `retention`. Returns (expired, pruned).
    pub async fn command_upkeep(&self, retention: Duration) -> Result<(usize, usize), FleetError> {
        let now = self.now();
        let expired = self
            .timed(
                StoreOp::ExpireCommands,
                self.inner.store.expire_commands(now),
            )
            .await?;
        self.inner
            .telemetry
            .commands(CommandState::Expired, expired);
        let pruned = self
            .inner
            .store
            .prune_commands(now.saturating_sub(retention))
            .await?;
        Ok((expired, pruned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_time() {
        let a = CommandId::new(Timestamp::from_unix_millis(1_000)).unwrap();
        let b = CommandId::new(Timestamp::from_unix_millis(1_001)).unwrap();
        assert!(a < b);
        // Within one millisecond, and when the clock steps back, ids still increase.
        let mut last = b;
        for t in [1_001, 1_001, 1_001, 500, 1_002] {
            let next = CommandId::new(Timestamp::from_unix_millis(t)).unwrap();
            assert!(next > last, "{next} after {last}");
            last = next;
        }
        assert_eq!(a.to_string().parse::<CommandId>().unwrap(), a);
        assert!("nope".parse::<CommandId>().is_err());
    }

    #[test]
    fn kinds_are_validated() {
        assert!(CommandKind::new("collect-inventory").is_ok());
        for bad in ["", "-x", "Ping", "rm -rf", &"a".repeat(64)] {
            assert!(CommandKind::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn payload_is_json_in_json_and_text_in_binary() {
        let p = Payload::from_json(r#"{ "a": [1, 2] }"#).unwrap();
        assert_eq!(p.as_str(), r#"{"a":[1,2]}"#);
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"a":[1,2]}"#);
        let back: Payload = serde_json::from_str(r#"{"a":[1,2]}"#).unwrap();
        assert_eq!(back, p);
        let big = serde_json::Value::String("x".repeat(MAX_COMMAND_PAYLOAD));
        assert!(Payload::from_value(&big).is_err());
        assert!(Payload::from_json("{").is_err());
    }

    #[test]
    fn output_is_truncated_at_a_character_boundary() {
        let r = CommandResult::new(Some(0), "é".repeat(MAX_COMMAND_OUTPUT));
        assert!(r.truncated);
        assert!(r.output.len() <= MAX_COMMAND_OUTPUT);
        assert!(r.output.chars().all(|c| c == 'é'));
        assert!(!CommandResult::new(None, "ok").truncated);
    }

    #[test]
    fn ttl_and_keys_are_checked() {
        let mut c =
            NewCommand::for_instance(InstanceId::from_u128(1), CommandKind::new("ping").unwrap());
        assert_eq!(c.ttl().unwrap(), DEFAULT_COMMAND_TTL);
        c.ttl_secs = Some(0);
        assert!(c.validate().is_err());
        c.ttl_secs = Some(MAX_COMMAND_TTL.as_secs() + 1);
        assert!(c.validate().is_err());
        c.ttl_secs = Some(60);
        c.idempotency_key = Some(String::new());
        assert!(c.validate().is_err());
        c.idempotency_key = Some("deploy-42".into());
        assert!(c.validate().is_ok());
    }
}
