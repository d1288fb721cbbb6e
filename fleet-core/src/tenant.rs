//! Tenants: the client an instance belongs to in a multi-tenant (MSP) control plane.
//!
//! A tenant id follows the group-name rules: 1–63 characters of lowercase `a–z 0–9 . _ -`,
//! beginning and ending with a letter or digit. An instance has at most one tenant, fixed when it
//! registers. Every read API takes a [`TenantScope`], so isolation is a typed argument rather than
//! a filter a caller might forget.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::tag::{MAX_NAME_LEN, check_name, string_newtype_impls};

/// A validated tenant id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct TenantId(pub(crate) CompactString);

impl TenantId {
    /// Validates a tenant id.
    pub fn new(id: impl AsRef<str>) -> Result<Self, ValidationError> {
        let id = id.as_ref();
        match check_name(id, MAX_NAME_LEN, true) {
            Ok(()) => Ok(Self(CompactString::new(id))),
            Err(reason) => Err(ValidationError::new("tenant id", id, reason)),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

string_newtype_impls!(TenantId);

/// Which instances a caller may see and change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TenantScope {
    /// Every instance, of every tenant and of none (a global operator).
    #[default]
    All,
    /// Only instances of this tenant.
    Tenant(TenantId),
}

impl TenantScope {
    /// Whether an instance with tenant `tenant` is visible in this scope.
    pub fn allows(&self, tenant: Option<&TenantId>) -> bool {
        match self {
            Self::All => true,
            Self::Tenant(t) => tenant == Some(t),
        }
    }
}
