//! Tags: validated key → value labels on an instance.
//!
//! # Rules
//!
//! A **key** is an optional prefix and a name, separated by `/` (`env`, `example.com/team`):
//!
//! - the *name* is 1–63 characters of `A–Z a–z 0–9 . _ -`, beginning and ending with a letter or
//!   digit;
//! - the *prefix*, when present, is a DNS subdomain: at most 253 characters of lowercase labels
//!   (`a–z 0–9 -`, 1–63 characters each, not beginning or ending with `-`) joined by `.`.
//!
//! A **value** is 0–63 characters of `A–Z a–z 0–9 . _ -`; a non-empty value begins and ends with a
//! letter or digit.
//!
//! These are the Kubernetes label rules, so tags move between the two systems unchanged.
//!
//! # Reserved prefixes
//!
//! Keys whose prefix is `fleet.io` or ends in `.fleet.io` (e.g. `fleet.io/owner`,
//! `policy.fleet.io/exempt`) are **reserved for operators**: the operator API and registration
//! tokens (which operators create) may set them, anything an agent reports may not. A compromised
//! instance therefore cannot label itself into a group of machines that receive special treatment.
//!
//! An instance carries at most [`MAX_TAGS`] tags.

use std::collections::BTreeMap;
use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Most tags one instance may carry.
pub const MAX_TAGS: usize = 64;
/// Longest tag name (the part after the optional prefix), group name, or tenant id.
pub const MAX_NAME_LEN: usize = 63;
/// Longest tag key prefix.
pub const MAX_PREFIX_LEN: usize = 253;
/// Longest tag value.
pub const MAX_VALUE_LEN: usize = 63;
/// The reserved tag key prefix domain; see the module docs.
pub const RESERVED_PREFIX_DOMAIN: &str = "fleet.io";

/// Who is setting a tag; decides whether reserved prefixes are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagAuthority {
    /// An operator, through the operator API or a registration token.
    Operator,
    /// An agent, reporting about itself.
    Agent,
}

/// A validated tag key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct TagKey(pub(crate) CompactString);

/// A validated tag value (possibly empty).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct TagValue(pub(crate) CompactString);

pub(crate) fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Checks a "name": 1..=max chars, alnum at both ends, alnum or `._-` inside; `lower` restricts
/// letters to lowercase.
pub(crate) fn check_name(s: &str, max: usize, lower: bool) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("must not be empty");
    }
    if b.len() > max {
        return Err("is too long");
    }
    let letter_ok = |c: u8| if lower { !c.is_ascii_uppercase() } else { true };
    for &c in b {
        if !(is_alnum(c) || matches!(c, b'.' | b'_' | b'-')) || !letter_ok(c) {
            return Err(if lower {
                "may only contain a-z, 0-9, '.', '_' and '-'"
            } else {
                "may only contain A-Z, a-z, 0-9, '.', '_' and '-'"
            });
        }
    }
    if !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return Err("must begin and end with a letter or digit");
    }
    Ok(())
}

fn check_prefix(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("prefix must not be empty");
    }
    if p.len() > MAX_PREFIX_LEN {
        return Err("prefix is too long");
    }
    for label in p.split('.') {
        let b = label.as_bytes();
        if b.is_empty() || b.len() > 63 {
            return Err("prefix labels must be 1-63 characters");
        }
        if !b
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err("prefix may only contain a-z, 0-9, '-' and '.'");
        }
        if b[0] == b'-' || b[b.len() - 1] == b'-' {
            return Err("prefix labels must not begin or end with '-'");
        }
    }
    Ok(())
}

impl TagKey {
    /// Validates a tag key (see the module docs for the rules).
    pub fn new(key: impl AsRef<str>) -> Result<Self, ValidationError> {
        let key = key.as_ref();
        let res = match key.split_once('/') {
            Some((prefix, name)) => {
                check_prefix(prefix).and_then(|()| check_name(name, MAX_NAME_LEN, false))
            }
            None => check_name(key, MAX_NAME_LEN, false),
        };
        match res {
            Ok(()) => Ok(Self(CompactString::new(key))),
            Err(reason) => Err(ValidationError::new("tag key", key, reason)),
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix before `/`, if any.
    pub fn prefix(&self) -> Option<&str> {
        self.0.split_once('/').map(|(p, _)| p)
    }

    /// Whether the key's prefix is reserved for operators.
    pub fn is_reserved(&self) -> bool {
        self.prefix().is_some_and(|p| {
            p == RESERVED_PREFIX_DOMAIN
                || p.strip_suffix(RESERVED_PREFIX_DOMAIN)
                    .is_some_and(|rest| rest.ends_with('.'))
        })
    }

    /// Checks that `authority` may set this key.
    pub fn check_authority(&self, authority: TagAuthority) -> Result<(), ValidationError> {
        if authority == TagAuthority::Agent && self.is_reserved() {
            return Err(ValidationError::new(
                "tag key",
                self.0.as_str(),
                "uses a prefix reserved for operators",
            ));
        }
        Ok(())
    }
}

impl TagValue {
    /// Validates a tag value (see the module docs for the rules).
    pub fn new(value: impl AsRef<str>) -> Result<Self, ValidationError> {
        let value = value.as_ref();
        if value.is_empty() {
            return Ok(Self(CompactString::default()));
        }
        match check_name(value, MAX_VALUE_LEN, false) {
            Ok(()) => Ok(Self(CompactString::new(value))),
            Err(reason) => Err(ValidationError::new("tag value", value, reason)),
        }
    }

    /// The value as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }
        impl TryFrom<&str> for $t {
            type Error = ValidationError;
            fn try_from(s: &str) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }
        impl TryFrom<compact_str::CompactString> for $t {
            type Error = ValidationError;
            fn try_from(s: compact_str::CompactString) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0.into()
            }
        }
        impl From<$t> for compact_str::CompactString {
            fn from(v: $t) -> compact_str::CompactString {
                v.0.into()
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(&self.0, f)
            }
        }
        impl std::str::FromStr for $t {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    };
}
pub(crate) use string_newtype_impls;

string_newtype_impls!(TagKey);
string_newtype_impls!(TagValue);

/// An instance's tags: at most [`MAX_TAGS`] validated key → value pairs, ordered by key.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<TagKey, TagValue>",
    into = "BTreeMap<TagKey, TagValue>"
)]
pub struct Tags(pub(crate) BTreeMap<TagKey, TagValue>);

impl Tags {
    /// No tags.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates a map of tags: every key and value, and the count.
    pub fn from_map(map: BTreeMap<TagKey, TagValue>) -> Result<Self, ValidationError> {
        if map.len() > MAX_TAGS {
            return Err(ValidationError::new(
                "tags",
                format!("{} tags", map.len()),
                "exceeds the limit of 64 tags per instance",
            ));
        }
        Ok(Self(map))
    }

    /// Parses and validates `(key, value)` string pairs.
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ValidationError> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            map.insert(TagKey::new(k.as_ref())?, TagValue::new(v.as_ref())?);
        }
        Self::from_map(map)
    }

    /// Checks that `authority` may set every key.
    pub fn check_authority(&self, authority: TagAuthority) -> Result<(), ValidationError> {
        self.0.keys().try_for_each(|k| k.check_authority(authority))
    }

    /// Sets one tag, replacing an existing value. Fails if this would exceed [`MAX_TAGS`].
    pub fn insert(&mut self, key: TagKey, value: TagValue) -> Result<(), ValidationError> {
        if self.0.len() >= MAX_TAGS && !self.0.contains_key(&key) {
            return Err(ValidationError::new(
                "tags",
                key.0,
                "exceeds the limit of 64 tags per instance",
            ));
        }
        self.0.insert(key, value);
        Ok(())
    }

    /// Removes a tag, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<TagValue> {
        self.0.remove(key)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&TagValue> {
        self.0.get(key)
    }

    /// Tags in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&TagKey, &TagValue)> {
        self.0.iter()
    }

    /// Number of tags.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no tags.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every tag of `other`, overriding existing keys (used when a token's tags are applied).
    pub fn merged_with(&self, other: &Self) -> Result<Self, ValidationError> {
        let mut map = self.0.clone();
        map.extend(other.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        Self::from_map(map)
    }

    /// The underlying map.
    pub fn as_map(&self) -> &BTreeMap<TagKey, TagValue> {
        &self.0
    }
}

impl TryFrom<BTreeMap<TagKey, TagValue>> for Tags {
    type Error = ValidationError;
    fn try_from(map: BTreeMap<TagKey, TagValue>) -> Result<Self, Self::Error> {
        Self::from_map(map)
    }
}

impl From<Tags> for BTreeMap<TagKey, TagValue> {
    fn from(t: Tags) -> Self {
        t.0
    }
}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "env",
            "a",
            "example.com/team",
            "fleet.io/owner",
            "A_b-c.9",
            &"x".repeat(63),
        ] {
            assert!(TagKey::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-env",
            "env-",
            "e nv",
            "Example.com/x",
            "a/",
            "/a",
            "a//b",
            "ex..com/x",
            "-a.com/x",
            "env=x",
            "é",
            &"x".repeat(64),
            "a:b",
        ] {
            assert!(TagKey::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values() {
        for ok in ["", "prod", "us-east.1", "A_1"] {
            assert!(TagValue::new(ok).is_ok(), "{ok}");
        }
        for bad in ["-x", "x-", "a b", "a,b", &"v".repeat(64)] {
            assert!(TagValue::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserved_prefixes_only_for_operators() {
        let k = TagKey::new("fleet.io/owner").unwrap();
        assert!(k.is_reserved());
        assert!(k.check_authority(TagAuthority::Operator).is_ok());
        let err = k.check_authority(TagAuthority::Agent).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        assert!(TagKey::new("policy.fleet.io/x").unwrap().is_reserved());
        assert!(!TagKey::new("notfleet.io/x").unwrap().is_reserved());
        assert!(!TagKey::new("env").unwrap().is_reserved());
    }

    #[test]
    fn tag_limit_enforced() {
        let pairs: Vec<_> = (0..64)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let mut tags = Tags::from_pairs(pairs).unwrap();
        assert!(
            tags.insert(TagKey::new("k65").unwrap(), TagValue::new("v").unwrap())
                .is_err()
        );
        assert_eq!(tags.len(), 64);
        // Replacing an existing key is fine at the limit.
        tags.insert(TagKey::new("k1").unwrap(), TagValue::new("w").unwrap())
            .unwrap();
        assert_eq!(tags.get("k1").map(TagValue::as_str), Some("w"));
    }

    #[test]
    fn serde_validates() {
        let ok: Tags = serde_json::from_str(r#"{"env":"prod"}"#).unwrap();
        assert_eq!(ok.get("env").map(TagValue::as_str), Some("prod"));
        assert!(serde_json::from_str::<Tags>(r#"{"bad key":"prod"}"#).is_err());
    }
}
