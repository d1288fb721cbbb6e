//! Errors: one enum per concern, with meaning-based variants that keep their source.
//!
//! - [`ValidationError`]: input that breaks a documented rule (a tag key, a hostname, a policy).
//! - [`StoreError`]: what a store reports; adapters map their engine's errors into it.
//! - [`FleetError`]: what [`Fleet`](crate::Fleet) operations return.
//!
//! Bad input never changes anything: every operation validates before it writes.

use std::error::Error as StdError;

use crate::InstanceId;
use crate::filter::FilterParseError;

/// A value broke one of the documented validation rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct ValidationError {
    /// What was being validated ("tag key", "hostname", …).
    pub what: &'static str,
    /// The offending value (truncated to 128 characters).
    pub value: String,
    /// Which rule it broke.
    pub reason: &'static str,
}

impl ValidationError {
    pub(crate) fn new(what: &'static str, value: impl Into<String>, reason: &'static str) -> Self {
        let mut value = value.into();
        if value.len() > 128 {
            let mut cut = 128;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        Self {
            what,
            value,
            reason,
        }
    }
}

/// The kind of record a [`StoreError::NotFound`] or [`StoreError::AlreadyExists`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordKind {
    /// An instance.
    Instance,
    /// A registration token.
    Token,
    /// A command.
    Command,
    /// A compliance policy.
    Policy,
    /// The fleet's CA material.
    Ca,
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Instance => "instance",
            Self::Token => "token",
            Self::Command => "command",
            Self::Policy => "policy",
            Self::Ca => "CA",
        })
    }
}

/// An error reported by a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record does not exist.
    #[error("{kind} {id} not found")]
    NotFound {
        /// What kind of record.
        kind: RecordKind,
        /// Its id, as text.
        id: String,
    },
    /// A record with this id already exists.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// What kind of record.
        kind: RecordKind,
        /// Its id, as text.
        id: String,
    },
    /// The write's precondition no longer holds (e.g. promoting a certificate that is not the
    /// staged one); nothing was written.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The change feed no longer holds changes after the requested sequence number; the reader
    /// must rebuild from a full listing.
    #[error("change feed truncated: changes after {requested} are gone (oldest kept is {oldest})")]
    FeedTruncated {
        /// The sequence number the reader asked to continue from.
        requested: u64,
        /// The oldest sequence number still held.
        oldest: u64,
    },
    /// The store is temporarily unreachable (database down, pool exhausted); retrying later may
    /// succeed and nothing was written.
    #[error("store unavailable")]
    Unavailable {
        /// Why.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// Stored data could not be decoded: corruption, or a file written by something else.
    #[error("stored data is corrupt: {detail}")]
    Corrupt {
        /// What was wrong, naming the record or path.
        detail: String,
        /// The decoding error, if any.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },
    /// Any other failure of the storage engine.
    #[error("{backend} store error")]
    Backend {
        /// Which engine ("sled", "postgres", …).
        backend: &'static str,
        /// The engine's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl StoreError {
    /// `NotFound` for an instance.
    pub fn instance_not_found(id: InstanceId) -> Self {
        Self::NotFound {
            kind: RecordKind::Instance,
            id: id.to_string(),
        }
    }

    /// `AlreadyExists` for an instance.
    pub fn instance_exists(id: InstanceId) -> Self {
        Self::AlreadyExists {
            kind: RecordKind::Instance,
            id: id.to_string(),
        }
    }
}

/// An error from a [`Fleet`](crate::Fleet) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// Input broke a validation rule; nothing was changed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A filter expression did not parse; nothing was changed.
    #[error(transparent)]
    Filter(#[from] FilterParseError),
    /// The instance does not exist (or is not visible in the caller's tenant scope).
    #[error("instance {0} not found")]
    InstanceNotFound(InstanceId),
    /// An instance with this id already exists.
    #[error("instance {0} already exists")]
    InstanceExists(InstanceId),
    /// No registration token with this id (or not visible in the caller's tenant scope).
    #[error("registration token {0} not found")]
    TokenNotFound(crate::TokenId),
    /// No command with this id (or not visible in the caller's tenant scope).
    #[error("command {0} not found")]
    CommandNotFound(crate::CommandId),
    /// Only a queued command can be cancelled; this one is already further along.
    #[error("command {id} is {state}; only a queued command can be cancelled")]
    CommandNotCancellable {
        /// Which command.
        id: crate::CommandId,
        /// Its state.
        state: crate::CommandState,
    },
    /// The certificate authority failed.
    #[error("certificate authority error")]
    Ca(#[source] crate::ca::CaError),
    /// The system random number generator failed.
    #[error(transparent)]
    Random(#[from] crate::RandomError),
    /// The store failed; for writes, nothing was acknowledged.
    #[error("store error")]
    Store(#[source] StoreError),
}

impl From<StoreError> for FleetError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound {
                kind: RecordKind::Instance,
                id,
            } => match id.parse() {
                Ok(id) => Self::InstanceNotFound(id),
                Err(_) => Self::Store(StoreError::NotFound {
                    kind: RecordKind::Instance,
                    id,
                }),
            },
            StoreError::AlreadyExists {
                kind: RecordKind::Instance,
                id,
            } => match id.parse() {
                Ok(id) => Self::InstanceExists(id),
                Err(_) => Self::Store(StoreError::AlreadyExists {
                    kind: RecordKind::Instance,
                    id,
                }),
            },
            other => Self::Store(other),
        }
    }
}

impl FleetError {
    /// Whether the failure is temporary (the store is unavailable) and the caller may retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Store(StoreError::Unavailable { .. }))
    }
}
