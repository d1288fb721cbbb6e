//! Groups: named sets of instances, used to target bulk operations.
//!
//! A group name is 1–63 characters of lowercase `a–z 0–9 . _ -`, beginning and ending with a letter
//! or digit (`database-servers`). Unlike a tag, a group is a single label; an instance belongs to
//! any number of groups, at most [`MAX_GROUPS`].

use std::collections::BTreeSet;
use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::tag::{MAX_NAME_LEN, check_name, string_newtype_impls};

/// Most groups one instance may belong to.
pub const MAX_GROUPS: usize = 64;

/// A validated group name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct GroupName(pub(crate) CompactString);

impl GroupName {
    /// Validates a group name.
    pub fn new(name: impl AsRef<str>) -> Result<Self, ValidationError> {
        let name = name.as_ref();
        match check_name(name, MAX_NAME_LEN, true) {
            Ok(()) => Ok(Self(CompactString::new(name))),
            Err(reason) => Err(ValidationError::new("group name", name, reason)),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

string_newtype_impls!(GroupName);

/// The groups an instance belongs to: at most [`MAX_GROUPS`] names, ordered.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "BTreeSet<GroupName>", into = "BTreeSet<GroupName>")]
pub struct Groups(pub(crate) BTreeSet<GroupName>);

impl Groups {
    /// No groups.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates a set of groups (the count; names are already valid).
    pub fn from_set(set: BTreeSet<GroupName>) -> Result<Self, ValidationError> {
        if set.len() > MAX_GROUPS {
            return Err(ValidationError::new(
                "groups",
                format!("{} groups", set.len()),
                "exceeds the limit of 64 groups per instance",
            ));
        }
        Ok(Self(set))
    }

    /// Parses and validates group names.
    pub fn from_names<S: AsRef<str>>(
        names: impl IntoIterator<Item = S>,
    ) -> Result<Self, ValidationError> {
        let set = names
            .into_iter()
            .map(|n| GroupName::new(n.as_ref()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        Self::from_set(set)
    }

    /// Whether the instance is in group `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// Group names in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &GroupName> {
        self.0.iter()
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the instance is in no group.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The union of both sets (used when a token's groups are applied).
    pub fn union(&self, other: &Self) -> Result<Self, ValidationError> {
        Self::from_set(self.0.union(&other.0).cloned().collect())
    }
}

impl TryFrom<BTreeSet<GroupName>> for Groups {
    type Error = ValidationError;
    fn try_from(set: BTreeSet<GroupName>) -> Result<Self, Self::Error> {
        Self::from_set(set)
    }
}

impl From<Groups> for BTreeSet<GroupName> {
    fn from(g: Groups) -> Self {
        g.0
    }
}

impl fmt::Debug for Groups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["database-servers", "a", "web.1", "x_y"] {
            assert!(GroupName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Database", "-a", "a-", "a b", &"g".repeat(64)] {
            assert!(GroupName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limit() {
        let many: Vec<String> = (0..65).map(|i| format!("g{i}")).collect();
        assert!(Groups::from_names(&many).is_err());
        assert_eq!(
            Groups::from_names(&many[..64]).map(|g| g.len()).ok(),
            Some(64)
        );
    }
}
