//! Policies: named compliance rules over what instances report about themselves.
//!
//! This module owns the policy model and its pure logic: a [`Policy`] is a [`PolicyName`], a
//! [`Filter`] selecting the instances it applies to, and a [`Rule`] over instance facts (agent
//! version, tags, disk and memory use, installed apps, certificate validity), combinable with
//! [`Rule::All`], [`Rule::Any`] and [`Rule::Not`]. [`Rule::evaluate`] turns one instance into a
//! [`Verdict`] with a specific, human-readable reason; [`Compliance`] aggregates verdicts across
//! the fleet. No I/O happens here: storing policies and scheduling evaluations belong elsewhere.
//!
//! # Versions
//!
//! Agent and app versions are compared as dotted numbers: `1.10.0 > 1.9.3`, missing components
//! count as zero (`v1.2 == 1.2.0`), a leading `v` is allowed, a pre-release suffix sorts before
//! the release (`1.2.0-rc1 < 1.2.0`, pre-release identifiers ordered as in SemVer), and `+build`
//! metadata is ignored.
//!
//! # Limits
//!
//! A rule nests at most [`MAX_RULE_DEPTH`] levels and holds at most [`MAX_RULES`] rules in total;
//! percentages are finite and in `(0, 100]`; `all`/`any` are non-empty.

use std::cmp::Ordering;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::instance::{MAX_APP_NAME_LEN, MAX_FACT_LEN};
use crate::store::FleetStore;
use crate::tag::string_newtype_impls;
use crate::telemetry::StoreOp;
use crate::{
    Filter, Fleet, FleetError, Instance, InstanceId, Status, TagKey, TagValue, TenantScope,
    Timestamp,
};

/// Longest policy name.
pub const MAX_POLICY_NAME_LEN: usize = 64;
/// Longest policy description, in characters.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Deepest nesting of rules (a lone rule has depth 1).
pub const MAX_RULE_DEPTH: usize = 8;
/// Most rules one policy may hold, counting every nested rule.
pub const MAX_RULES: usize = 64;

const DAY_MILLIS: i64 = 86_400_000;

/// A validated policy name: 1–64 characters of `a–z 0–9 . _ -`, beginning with a letter or
/// digit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "CompactString", into = "CompactString")]
pub struct PolicyName(CompactString);

impl PolicyName {
    /// Validates a policy name.
    pub fn new(name: impl AsRef<str>) -> Result<Self, ValidationError> {
        let name = name.as_ref();
        let b = name.as_bytes();
        let reason = if b.is_empty() {
            Some("must not be empty")
        } else if b.len() > MAX_POLICY_NAME_LEN {
            Some("is too long")
        } else if !b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        }) {
            Some("may only contain a-z, 0-9, '.', '_' and '-'")
        } else if !b[0].is_ascii_alphanumeric() {
            Some("must begin with a letter or digit")
        } else {
            None
        };
        match reason {
            None => Ok(Self(CompactString::new(name))),
            Some(reason) => Err(ValidationError::new("policy name", name, reason)),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

string_newtype_impls!(PolicyName);

/// A compliance rule over the facts an instance reports.
///
/// JSON is externally tagged: `{"agent_version_at_least": "1.4.0"}`,
/// `{"tag_equals": {"key": "env", "value": "prod"}}`, `{"not": {"app_not_installed": {…}}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// The agent version (`system.agent_version`) is at least this version.
    AgentVersionAtLeast(String),
    /// The tag is set (to any value).
    TagPresent(TagKey),
    /// The tag is set to exactly this value.
    TagEquals {
        /// Tag key.
        key: TagKey,
        /// Required value.
        value: TagValue,
    },
    /// Disk use (`disk_used_bytes / disk_total_bytes` of the latest sample) is below this
    /// percentage.
    DiskUsedBelowPercent(f64),
    /// Memory use (`memory_used_bytes / memory_total_bytes` of the latest sample) is below this
    /// percentage.
    MemoryUsedBelowPercent(f64),
    /// An app with exactly this name (case-sensitive) is installed, at least `min_version` when
    /// given.
    AppInstalled {
        /// App name, 1–256 bytes.
        name: String,
        /// Lowest acceptable version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_version: Option<String>,
    },
    /// No app with exactly this name is installed.
    AppNotInstalled {
        /// App name, 1–256 bytes.
        name: String,
    },
    /// The instance's current certificate stays valid for more than this many days.
    CertificateValidForDays(u32),
    /// Every rule passes (non-empty).
    All(Vec<Self>),
    /// At least one rule passes (non-empty).
    Any(Vec<Self>),
    /// The rule fails.
    Not(Box<Self>),
}

/// The outcome of evaluating a [`Rule`] against one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether the rule passed.
    pub pass: bool,
    /// Why, in words: the facts that decided it (e.g. `agent version 1.3.2 < 1.4.0`).
    pub reason: String,
}

impl Verdict {
    fn pass(reason: String) -> Self {
        Self { pass: true, reason }
    }

    fn fail(reason: String) -> Self {
        Self {
            pass: false,
            reason,
        }
    }

    fn new(pass: bool, reason: String) -> Self {
        Self { pass, reason }
    }
}

// ---------------------------------------------------------------------------------------------
// Versions

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PreId {
    // Variant order matters: numeric identifiers sort before alphanumeric ones.
    Num(u64),
    Alpha(String),
}

#[derive(Debug, Clone)]
struct Version {
    core: Vec<u64>,
    pre: Option<Vec<PreId>>,
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

impl Version {
    fn parse(s: &str) -> Option<Self> {
        if s.len() > MAX_FACT_LEN {
            return None;
        }
        let s = s.strip_prefix(['v', 'V']).unwrap_or(s);
        let s = match s.split_once('+') {
            Some((v, build)) => {
                if !build.split('.').all(is_ident) {
                    return None;
                }
                v
            }
            None => s,
        };
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (s, None),
        };
        let core = core
            .split('.')
            .map(|c| {
                if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) {
                    c.parse::<u64>().ok()
                } else {
                    None
                }
            })
            .collect::<Option<Vec<_>>>()?;
        let pre = match pre {
            None => None,
            Some(p) => Some(
                p.split('.')
                    .map(|id| {
                        if !is_ident(id) {
                            None
                        } else if id.bytes().all(|b| b.is_ascii_digit()) {
                            id.parse().ok().map(PreId::Num)
                        } else {
                            Some(PreId::Alpha(id.to_owned()))
                        }
                    })
                    .collect::<Option<Vec<_>>>()?,
            ),
        };
        Some(Self { core, pre })
    }

    fn compare(&self, other: &Self) -> Ordering {
        let len = self.core.len().max(other.core.len());
        for i in 0..len {
            let a = self.core.get(i).copied().unwrap_or(0);
            let b = other.core.get(i).copied().unwrap_or(0);
            match a.cmp(&b) {
                Ordering::Equal => {}
                unequal => return unequal,
            }
        }
        match (&self.pre, &other.pre) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => a.cmp(b),
        }
    }
}

/// Compares two version strings by the rules in the module docs; `None` if either is not a
/// version.
fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    Some(Version::parse(a)?.compare(&Version::parse(b)?))
}

// ---------------------------------------------------------------------------------------------
// Formatting helpers

/// Formats `v` with the fewest decimals (at least `min_prec`, at most 6) such that the printed
/// number still falls on the same side of the rule's threshold (`holds`) as `v` itself.
fn fmt_decimal(v: f64, min_prec: usize, holds: impl Fn(f64) -> bool) -> String {
    let want = holds(v);
    for prec in min_prec..=6 {
        let s = format!("{v:.prec$}");
        if s.parse::<f64>().is_ok_and(|r| holds(r) == want) {
            return s;
        }
    }
    format!("{v}")
}

fn plural(n: &str, unit: &str) -> String {
    if n == "1" {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

fn quoted(v: &TagValue) -> String {
    format!("{:?}", v.as_str())
}

// ---------------------------------------------------------------------------------------------
// Rules

fn check_percent(what: &'static str, p: f64) -> Result<(), ValidationError> {
    if p.is_finite() && p > 0.0 && p <= 100.0 {
        Ok(())
    } else {
        Err(ValidationError::new(
            what,
            p.to_string(),
            "must be a finite number above 0 and at most 100",
        ))
    }
}

fn check_version(what: &'static str, v: &str) -> Result<(), ValidationError> {
    if Version::parse(v).is_some() {
        Ok(())
    } else {
        Err(ValidationError::new(
            what,
            v,
            "is not a dotted numeric version like 1.4.0, v1.4 or 1.4.0-rc1",
        ))
    }
}

fn check_app_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::new("app name", name, "must not be empty"));
    }
    if name.len() > MAX_APP_NAME_LEN {
        return Err(ValidationError::new(
            "app name",
            name,
            "is too long (at most 256 bytes)",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "app name",
            name,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl Rule {
    /// Checks the documented limits: percentages finite and in `(0, 100]`, versions parse, app
    /// names 1–256 bytes without control characters, `all`/`any` non-empty, nesting at most
    /// [`MAX_RULE_DEPTH`] levels and at most [`MAX_RULES`] rules in total.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut count = 0;
        self.validate_at(1, &mut count)
    }

    fn validate_at(&self, depth: usize, count: &mut usize) -> Result<(), ValidationError> {
        if depth > MAX_RULE_DEPTH {
            return Err(ValidationError::new(
                "rule",
                format!("depth {depth}"),
                "nests deeper than 8 levels",
            ));
        }
        *count += 1;
        if *count > MAX_RULES {
            return Err(ValidationError::new(
                "rule",
                format!("more than {MAX_RULES} rules"),
                "exceeds the limit of 64 rules per policy",
            ));
        }
        match self {
            Self::AgentVersionAtLeast(v) => check_version("agent_version_at_least", v),
            Self::TagPresent(_) | Self::TagEquals { .. } | Self::CertificateValidForDays(_) => {
                Ok(())
            }
            Self::DiskUsedBelowPercent(p) => check_percent("disk_used_below_percent", *p),
            Self::MemoryUsedBelowPercent(p) => check_percent("memory_used_below_percent", *p),
            Self::AppInstalled { name, min_version } => {
                check_app_name(name)?;
                match min_version {
                    Some(v) => check_version("app_installed min_version", v),
                    None => Ok(()),
                }
            }
            Self::AppNotInstalled { name } => check_app_name(name),
            Self::All(rules) | Self::Any(rules) => {
                if rules.is_empty() {
                    return Err(ValidationError::new(
                        if matches!(self, Self::All(_)) {
                            "all"
                        } else {
                            "any"
                        },
                        "[]",
                        "must hold at least one rule",
                    ));
                }
                rules
                    .iter()
                    .try_for_each(|r| r.validate_at(depth + 1, count))
            }
            Self::Not(rule) => rule.validate_at(depth + 1, count),
        }
    }

    /// Evaluates the rule against one instance at server time `now`.
    ///
    /// Every verdict carries a reason naming the facts that decided it. `all` stops at the first
    /// failing rule and reports its reason; `any` stops at the first passing rule and reports its
    /// reason; `not` keeps the inner rule's reason (the facts) and inverts the outcome.
    pub fn evaluate(&self, instance: &Instance, now: Timestamp) -> Verdict {
        match self {
            Self::AgentVersionAtLeast(min) => agent_version(instance, min),
            Self::TagPresent(key) => match instance.tags.get(key.as_str()) {
                Some(v) => Verdict::pass(format!("tag {key} is set to {}", quoted(v))),
                None => Verdict::fail(format!("tag {key} is not set")),
            },
            Self::TagEquals { key, value } => match instance.tags.get(key.as_str()) {
                Some(v) if v == value => Verdict::pass(format!("tag {key} is {}", quoted(v))),
                Some(v) => Verdict::fail(format!(
                    "tag {key} is {} (needs {})",
                    quoted(v),
                    quoted(value)
                )),
                None => Verdict::fail(format!("tag {key} is not set (needs {})", quoted(value))),
            },
            Self::DiskUsedBelowPercent(limit) => {
                let m = instance.metrics.as_ref();
                used_below(
                    "disk",
                    m.and_then(|m| m.disk_used_bytes),
                    m.and_then(|m| m.disk_total_bytes),
                    *limit,
                )
            }
            Self::MemoryUsedBelowPercent(limit) => {
                let m = instance.metrics.as_ref();
                used_below(
                    "memory",
                    m.and_then(|m| m.memory_used_bytes),
                    m.and_then(|m| m.memory_total_bytes),
                    *limit,
                )
            }
            Self::AppInstalled { name, min_version } => {
                app_installed(instance, name, min_version.as_deref())
            }
            Self::AppNotInstalled { name } => {
                match instance.apps.iter().find(|a| a.name == *name) {
                    None => Verdict::pass(format!("app {name} not installed")),
                    Some(app) => Verdict::fail(match &app.version {
                        Some(v) => format!("app {name} {v} is installed"),
                        None => format!("app {name} is installed"),
                    }),
                }
            }
            Self::CertificateValidForDays(days) => certificate_valid(instance, *days, now),
            Self::All(rules) => {
                let mut reasons = Vec::with_capacity(rules.len());
                for rule in rules {
                    let v = rule.evaluate(instance, now);
                    if !v.pass {
                        return v;
                    }
                    reasons.push(v.reason);
                }
                if reasons.is_empty() {
                    Verdict::pass("no rules to check".to_owned())
                } else {
                    Verdict::pass(reasons.join("; "))
                }
            }
            Self::Any(rules) => {
                let mut reasons = Vec::with_capacity(rules.len());
                for rule in rules {
                    let v = rule.evaluate(instance, now);
                    if v.pass {
                        return v;
                    }
                    reasons.push(v.reason);
                }
                if reasons.is_empty() {
                    Verdict::fail("no alternatives to check".to_owned())
                } else {
                    Verdict::fail(reasons.join("; "))
                }
            }
            Self::Not(rule) => {
                let v = rule.evaluate(instance, now);
                Verdict::new(!v.pass, v.reason)
            }
        }
    }
}

fn agent_version(instance: &Instance, min: &str) -> Verdict {
    let Some(have) = instance.system.agent_version.as_deref() else {
        return Verdict::fail("agent version unknown".to_owned());
    };
    match compare_versions(have, min) {
        Some(Ordering::Less) => Verdict::fail(format!("agent version {have} < {min}")),
        Some(_) => Verdict::pass(format!("agent version {have} ≥ {min}")),
        None if Version::parse(have).is_none() => Verdict::fail(format!(
            "agent version {have:?} is not a comparable version (needs ≥ {min})"
        )),
        None => Verdict::fail(format!("required version {min:?} is not a version")),
    }
}

fn used_below(what: &str, used: Option<u64>, total: Option<u64>, limit: f64) -> Verdict {
    let (Some(used), Some(total)) = (used, total) else {
        return Verdict::fail(format!("no {what} figures reported"));
    };
    if total == 0 {
        return Verdict::fail(format!("{what} size reported as 0 bytes"));
    }
    #[allow(clippy::cast_precision_loss)] // a percentage needs no more than f64's 53 bits
    let pct = used as f64 * 100.0 / total as f64;
    let shown = fmt_decimal(pct, 1, |p| p < limit);
    if pct < limit {
        Verdict::pass(format!("{what} {shown}% used (below {limit}%)"))
    } else {
        Verdict::fail(format!("{what} {shown}% used (limit {limit}%)"))
    }
}

fn app_installed(instance: &Instance, name: &str, min: Option<&str>) -> Verdict {
    let mut first_failure = None;
    for app in instance.apps.iter().filter(|a| a.name == name) {
        let v = match (min, app.version.as_deref()) {
            (None, Some(have)) => Verdict::pass(format!("app {name} {have} is installed")),
            (None, None) => Verdict::pass(format!("app {name} is installed")),
            (Some(min), None) => Verdict::fail(format!(
                "app {name} is installed but its version is unknown (needs ≥ {min})"
            )),
            (Some(min), Some(have)) => match compare_versions(have, min) {
                Some(Ordering::Less) => Verdict::fail(format!("app {name} {have} < {min}")),
                Some(_) => Verdict::pass(format!("app {name} {have} ≥ {min}")),
                None => Verdict::fail(format!(
                    "app {name} version {have:?} is not comparable (needs ≥ {min})"
                )),
            },
        };
        if v.pass {
            return v;
        }
        first_failure.get_or_insert(v);
    }
    first_failure.unwrap_or_else(|| Verdict::fail(format!("app {name} not installed")))
}

fn certificate_valid(instance: &Instance, days: u32, now: Timestamp) -> Verdict {
    let Some(cert) = &instance.certificate else {
        return Verdict::fail("instance has no certificate".to_owned());
    };
    let remaining = cert
        .not_after
        .as_unix_millis()
        .saturating_sub(now.as_unix_millis());
    let needed = i64::from(days) * DAY_MILLIS;
    let pass = remaining > needed;
    if remaining <= 0 {
        return Verdict::fail(format!(
            "certificate expired at {} (needs > {})",
            cert.not_after,
            plural(&days.to_string(), "day")
        ));
    }
    let left = if remaining < DAY_MILLIS {
        // Under a day: passes only when `days` is 0, whatever the exact figure.
        let hours = remaining / 3_600_000;
        let minutes = remaining / 60_000;
        if hours > 0 {
            plural(&hours.to_string(), "hour")
        } else if minutes > 0 {
            plural(&minutes.to_string(), "minute")
        } else {
            "less than a minute".to_owned()
        }
    } else {
        // Whole days, rounded down; when that alone would hide why the rule passed (just over
        // `days` days), the remaining hours too.
        let whole = remaining / DAY_MILLIS;
        let rest = remaining % DAY_MILLIS;
        let day_text = plural(&whole.to_string(), "day");
        if whole == i64::from(days) && rest > 0 {
            let hours = rest / 3_600_000;
            if hours > 0 {
                format!("{day_text} {}", plural(&hours.to_string(), "hour"))
            } else {
                format!("just over {day_text}")
            }
        } else {
            day_text
        }
    };
    Verdict::new(
        pass,
        format!("certificate expires in {left} (needs > {days})"),
    )
}

// ---------------------------------------------------------------------------------------------
// Policies

/// A stored policy: which instances it applies to and the rule they must satisfy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Unique name.
    pub name: PolicyName,
    /// Free text for operators, at most [`MAX_DESCRIPTION_LEN`] characters.
    #[serde(default)]
    pub description: String,
    /// The instances the policy applies to (serialized in the filter syntax).
    pub filter: Filter,
    /// The rule applicable instances must satisfy.
    pub rule: Rule,
    /// When the policy was created (server time).
    pub created_at: Timestamp,
}

fn check_description(d: &str) -> Result<(), ValidationError> {
    if d.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(ValidationError::new(
            "policy description",
            d,
            "is too long (at most 1024 characters)",
        ));
    }
    Ok(())
}

impl Policy {
    /// Checks the description length and the rule (see [`Rule::validate`]).
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_description(&self.description)?;
        self.rule.validate()
    }

    /// Whether the policy applies to `instance`, whose current status is `status`.
    pub fn applies_to(&self, instance: &Instance, status: Status) -> bool {
        self.filter.matches(instance, status)
    }

    /// Evaluates the policy against `instance`: `None` when the filter does not select it,
    /// otherwise its result row.
    pub fn check(
        &self,
        instance: &Instance,
        status: Status,
        now: Timestamp,
    ) -> Option<PolicyResult> {
        self.applies_to(instance, status)
            .then(|| PolicyResult::new(self.name.clone(), self.rule.evaluate(instance, now)))
    }
}

/// What an operator submits to create a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPolicy {
    /// Unique name.
    pub name: PolicyName,
    /// Free text, at most [`MAX_DESCRIPTION_LEN`] characters; empty by default.
    #[serde(default)]
    pub description: String,
    /// The instances it applies to; all by default.
    #[serde(default)]
    pub filter: Filter,
    /// The rule.
    pub rule: Rule,
}

impl NewPolicy {
    /// Checks the description length and the rule.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_description(&self.description)?;
        self.rule.validate()
    }

    /// Validates, then makes the stored policy, created at `now`.
    pub fn into_policy(self, now: Timestamp) -> Result<Policy, ValidationError> {
        self.validate()?;
        Ok(Policy {
            name: self.name,
            description: self.description,
            filter: self.filter,
            rule: self.rule,
            created_at: now,
        })
    }
}

/// One policy's outcome for one instance (a row of the instance's detail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyResult {
    /// The policy.
    pub policy: PolicyName,
    /// Whether the instance complies.
    pub pass: bool,
    /// Why (see [`Verdict::reason`]).
    pub reason: String,
}

impl PolicyResult {
    /// The row for `policy` from a verdict.
    pub fn new(policy: PolicyName, verdict: Verdict) -> Self {
        Self {
            policy,
            pass: verdict.pass,
            reason: verdict.reason,
        }
    }
}

/// How much of the fleet a policy applies to complies with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compliance {
    /// The policy.
    pub policy: PolicyName,
    /// Instances the policy's filter selects.
    pub applicable: u64,
    /// Of those, how many pass.
    pub passing: u64,
    /// `passing / applicable` as a percentage; 100 when no instance is applicable.
    pub percent: f64,
    /// When the figures were computed (server time).
    pub evaluated_at: Timestamp,
}

impl Compliance {
    /// Figures for `policy`; `passing` is capped at `applicable`.
    pub fn new(policy: PolicyName, applicable: u64, passing: u64, evaluated_at: Timestamp) -> Self {
        let passing = passing.min(applicable);
        #[allow(clippy::cast_precision_loss)] // counts far below 2^53
        let percent = if applicable == 0 {
            100.0
        } else {
            passing as f64 * 100.0 / applicable as f64
        };
        Self {
            policy,
            applicable,
            passing,
            percent,
            evaluated_at,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet's policies

/// Instances read from the store per page while computing compliance.
const COMPLIANCE_PAGE: usize = 4096;

impl<S: FleetStore> Fleet<S> {
    /// Creates a policy (policies apply fleet-wide; each operator sees results within its
    /// scope). Invalid input or a taken name changes nothing.
    pub async fn create_policy(&self, new: NewPolicy) -> Result<Policy, FleetError> {
        let policy = new.into_policy(self.now())?;
        self.timed(
            StoreOp::InsertPolicy,
            self.inner.store.insert_policy(&policy),
        )
        .await?;
        Ok(policy)
    }

    /// Every policy, by name.
    pub async fn policies(&self) -> Result<Vec<Policy>, FleetError> {
        Ok(self
            .timed(StoreOp::ListPolicies, self.inner.store.list_policies())
            .await?)
    }

    /// Deletes a policy.
    pub async fn delete_policy(&self, name: &PolicyName) -> Result<(), FleetError> {
        Ok(self
            .timed(StoreOp::DeletePolicy, self.inner.store.delete_policy(name))
            .await?)
    }

    /// The instance's policies with pass/fail and the reason (policies whose filter does not
    /// select it are left out).
    pub async fn policy_results(
        &self,
        scope: &TenantScope,
        id: InstanceId,
    ) -> Result<Vec<PolicyResult>, FleetError> {
        let (live, instance) = self.live_and_stored(scope, id).await?;
        let now = self.now();
        Ok(self
            .policies()
            .await?
            .iter()
            .filter_map(|p| p.check(&instance, live.status, now))
            .collect())
    }

    /// Fleet-level compliance per policy within `scope`: how many instances each applies to and
    /// how many pass. Reads every instance from the store once (O(instances × policies)); call it
    /// for reports and dashboards, not per request on huge fleets.
    pub async fn compliance(&self, scope: &TenantScope) -> Result<Vec<Compliance>, FleetError> {
        let policies = self.policies().await?;
        let mut counts = vec![(0u64, 0u64); policies.len()];
        let now = self.now();
        if !policies.is_empty() {
            let mut after = None;
            loop {
                let page = self
                    .timed(
                        StoreOp::ListInstances,
                        self.inner.store.list_instances(after, COMPLIANCE_PAGE),
                    )
                    .await?;
                let Some(last) = page.last().map(|i| i.id) else {
                    break;
                };
                after = Some(last);
                for stored in page {
                    let Some(status) = self.get(scope, stored.id).map(|v| v.status) else {
                        continue;
                    };
                    let instance = self.with_live_state(stored);
                    for (p, c) in policies.iter().zip(counts.iter_mut()) {
                        if let Some(r) = p.check(&instance, status, now) {
                            c.0 += 1;
                            c.1 += u64::from(r.pass);
                        }
                    }
                }
            }
        }
        Ok(policies
            .into_iter()
            .zip(counts)
            .map(|(p, (applicable, passing))| Compliance::new(p.name, applicable, passing, now))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateRecord;
    use crate::identity::Serial;
    use crate::{App, Groups, InstanceId, MetricsSample, SystemInfo, Tags};

    const NOW: Timestamp = Timestamp::from_unix_secs(1_700_000_000);

    fn instance() -> Instance {
        Instance {
            id: InstanceId::from_u128(1),
            tenant: None,
            system: SystemInfo::with_hostname("web-01"),
            tags: Tags::new(),
            groups: Groups::new(),
            registered_at: Timestamp::UNIX_EPOCH,
            last_seen: NOW,
            metrics: None,
            apps: Vec::new(),
            certificate: None,
            next_certificate: None,
        }
    }

    fn with_agent(v: &str) -> Instance {
        let mut i = instance();
        i.system.agent_version = Some(v.to_owned());
        i
    }

    fn eval(rule: &Rule, i: &Instance) -> (bool, String) {
        let v = rule.evaluate(i, NOW);
        (v.pass, v.reason)
    }

    fn pass(r: &str) -> (bool, String) {
        (true, r.to_owned())
    }

    fn fail(r: &str) -> (bool, String) {
        (false, r.to_owned())
    }

    fn key(k: &str) -> TagKey {
        TagKey::new(k).unwrap()
    }

    fn app(name: &str, version: Option<&str>) -> App {
        App {
            name: name.to_owned(),
            version: version.map(str::to_owned),
        }
    }

    fn cmp(a: &str, b: &str) -> Ordering {
        compare_versions(a, b).unwrap_or_else(|| panic!("{a} or {b} did not parse"))
    }

    #[test]
    fn version_ordering() {
        assert_eq!(cmp("1.10.0", "1.9.3"), Ordering::Greater);
        assert_eq!(cmp("1.9.3", "1.10.0"), Ordering::Less);
        assert_eq!(cmp("v1.2", "1.2.0"), Ordering::Equal);
        assert_eq!(cmp("V1.2.0", "1.2"), Ordering::Equal);
        assert_eq!(cmp("1.2.0-rc1", "1.2.0"), Ordering::Less);
        assert_eq!(cmp("1.2.0", "1.2.0-rc1"), Ordering::Greater);
        assert_eq!(cmp("1.2.0-rc1", "1.1.9"), Ordering::Greater);
        assert_eq!(cmp("1.2.0-rc.2", "1.2.0-rc.10"), Ordering::Less);
        assert_eq!(cmp("1.2.0-1", "1.2.0-alpha"), Ordering::Less);
        assert_eq!(cmp("1.2.0-alpha", "1.2.0-alpha.1"), Ordering::Less);
        assert_eq!(cmp("1.2.0+build.7", "1.2.0"), Ordering::Equal);
        assert_eq!(cmp("2", "1.99.99"), Ordering::Greater);
        for bad in [
            "",
            "v",
            "abc",
            "1..2",
            "1.2.",
            ".1",
            "1.x",
            "1.2-",
            "1.2-rc..1",
            "1.2+",
            " 1.2",
            "1.2 ",
            "vv1",
            "-1",
            "1.2.3_4",
            "99999999999999999999",
        ] {
            assert!(Version::parse(bad).is_none(), "{bad:?} parsed");
            assert!(
                Rule::AgentVersionAtLeast(bad.to_owned())
                    .validate()
                    .is_err()
            );
        }
    }

    #[test]
    fn agent_version_rule() {
        let r = Rule::AgentVersionAtLeast("1.4.0".into());
        assert_eq!(
            eval(&r, &with_agent("1.3.2")),
            fail("agent version 1.3.2 < 1.4.0")
        );
        assert_eq!(
            eval(&r, &with_agent("1.4.2")),
            pass("agent version 1.4.2 ≥ 1.4.0")
        );
        assert_eq!(
            eval(&r, &with_agent("v1.4")),
            pass("agent version v1.4 ≥ 1.4.0")
        );
        assert_eq!(
            eval(&r, &with_agent("1.4.0-rc1")),
            fail("agent version 1.4.0-rc1 < 1.4.0")
        );
        let r10 = Rule::AgentVersionAtLeast("1.10.0".into());
        assert_eq!(
            eval(&r10, &with_agent("1.9.3")),
            fail("agent version 1.9.3 < 1.10.0")
        );
        assert_eq!(eval(&r, &instance()), fail("agent version unknown"));
        assert_eq!(
            eval(&r, &with_agent("nightly")),
            fail("agent version \"nightly\" is not a comparable version (needs ≥ 1.4.0)")
        );
    }

    #[test]
    fn tag_rules() {
        let mut i = instance();
        i.tags = Tags::from_pairs([("env", "staging"), ("team", "")]).unwrap();
        assert_eq!(
            eval(&Rule::TagPresent(key("env")), &i),
            pass("tag env is set to \"staging\"")
        );
        assert_eq!(
            eval(&Rule::TagPresent(key("team")), &i),
            pass("tag team is set to \"\"")
        );
        assert_eq!(
            eval(&Rule::TagPresent(key("owner")), &i),
            fail("tag owner is not set")
        );
        let eq = |k: &str, v: &str| Rule::TagEquals {
            key: key(k),
            value: TagValue::new(v).unwrap(),
        };
        assert_eq!(
            eval(&eq("env", "staging"), &i),
            pass("tag env is \"staging\"")
        );
        assert_eq!(
            eval(&eq("env", "prod"), &i),
            fail("tag env is \"staging\" (needs \"prod\")")
        );
        assert_eq!(
            eval(&eq("owner", "ops"), &i),
            fail("tag owner is not set (needs \"ops\")")
        );
        // Keys are case-sensitive.
        assert!(!eq("ENV", "staging").evaluate(&i, NOW).pass);
    }

    #[test]
    fn usage_rules() {
        let disk = Rule::DiskUsedBelowPercent(90.0);
        let mem = Rule::MemoryUsedBelowPercent(80.5);
        let mut i = instance();
        assert_eq!(eval(&disk, &i), fail("no disk figures reported"));
        assert_eq!(eval(&mem, &i), fail("no memory figures reported"));
        i.metrics = Some(MetricsSample {
            disk_used_bytes: Some(931),
            disk_total_bytes: Some(1000),
            memory_used_bytes: Some(400),
            ..MetricsSample::default()
        });
        assert_eq!(eval(&disk, &i), fail("disk 93.1% used (limit 90%)"));
        assert_eq!(eval(&mem, &i), fail("no memory figures reported"));
        let m = i.metrics.as_mut().unwrap();
        m.disk_used_bytes = Some(420);
        m.memory_total_bytes = Some(1000);
        assert_eq!(eval(&disk, &i), pass("disk 42.0% used (below 90%)"));
        assert_eq!(eval(&mem, &i), pass("memory 40.0% used (below 80.5%)"));
        // Exactly at the limit fails; just under it passes and prints enough digits to show it.
        let disk_of = |used: u64, total: u64| {
            let mut i = instance();
            i.metrics = Some(MetricsSample {
                disk_used_bytes: Some(used),
                disk_total_bytes: Some(total),
                ..MetricsSample::default()
            });
            eval(&disk, &i)
        };
        assert_eq!(disk_of(900, 1000), fail("disk 90.0% used (limit 90%)"));
        assert_eq!(
            disk_of(89_999, 100_000),
            pass("disk 89.999% used (below 90%)")
        );
        assert_eq!(disk_of(0, 0), fail("disk size reported as 0 bytes"));
    }

    #[test]
    fn app_rules() {
        let mut i = instance();
        i.apps = vec![app("nginx", Some("1.18.0")), app("redis", None)];
        let inst = |name: &str, min: Option<&str>| Rule::AppInstalled {
            name: name.to_owned(),
            min_version: min.map(str::to_owned),
        };
        assert_eq!(
            eval(&inst("nginx", None), &i),
            pass("app nginx 1.18.0 is installed")
        );
        assert_eq!(
            eval(&inst("redis", None), &i),
            pass("app redis is installed")
        );
        assert_eq!(
            eval(&inst("Nginx", None), &i),
            fail("app Nginx not installed")
        );
        assert_eq!(
            eval(&inst("nginx", Some("1.20")), &i),
            fail("app nginx 1.18.0 < 1.20")
        );
        assert_eq!(
            eval(&inst("nginx", Some("v1.18")), &i),
            pass("app nginx 1.18.0 ≥ v1.18")
        );
        assert_eq!(
            eval(&inst("redis", Some("7")), &i),
            fail("app redis is installed but its version is unknown (needs ≥ 7)")
        );
        // Any of several installed copies may satisfy the rule.
        i.apps.push(app("nginx", Some("1.25.3")));
        assert_eq!(
            eval(&inst("nginx", Some("1.20")), &i),
            pass("app nginx 1.25.3 ≥ 1.20")
        );

        let not = |name: &str| Rule::AppNotInstalled {
            name: name.to_owned(),
        };
        assert_eq!(eval(&not("telnetd"), &i), pass("app telnetd not installed"));
        assert_eq!(
            eval(&not("nginx"), &i),
            fail("app nginx 1.18.0 is installed")
        );
        assert_eq!(eval(&not("redis"), &i), fail("app redis is installed"));
    }

    #[test]
    fn certificate_rule() {
        let r = Rule::CertificateValidForDays(7);
        let mut i = instance();
        assert_eq!(eval(&r, &i), fail("instance has no certificate"));
        let mut expires = |after: Timestamp| {
            i.certificate = Some(CertificateRecord {
                serial: Serial([0x40; 16]),
                not_after: after,
            });
            eval(&r, &i)
        };
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(
            expires(NOW.saturating_add(day * 3)),
            fail("certificate expires in 3 days (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_add(day * 30)),
            pass("certificate expires in 30 days (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_add(day * 7)),
            fail("certificate expires in 7 days (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_add(day * 7 + day / 2)),
            pass("certificate expires in 7 days 12 hours (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_add(day * 7 + std::time::Duration::from_secs(60))),
            pass("certificate expires in just over 7 days (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_add(day * 3 + day / 2)),
            fail("certificate expires in 3 days (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_add(day)),
            fail("certificate expires in 1 day (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_add(std::time::Duration::from_secs(5 * 3600))),
            fail("certificate expires in 5 hours (needs > 7)")
        );
        assert_eq!(
            expires(NOW.saturating_sub(day)),
            fail("certificate expired at 2023-11-13T22:13:20.000Z (needs > 7 days)")
        );
        assert_eq!(
            expires(NOW),
            fail("certificate expired at 2023-11-14T22:13:20.000Z (needs > 7 days)")
        );
    }

    #[test]
    fn combinators() {
        let mut i = with_agent("1.4.2");
        i.apps = vec![app("nginx", Some("1.25"))];
        let version = Rule::AgentVersionAtLeast("1.4.0".into());
        let tag = Rule::TagPresent(key("env"));
        let nginx = Rule::AppInstalled {
            name: "nginx".into(),
            min_version: None,
        };

        let all = Rule::All(vec![version.clone(), nginx.clone()]);
        assert_eq!(
            eval(&all, &i),
            pass("agent version 1.4.2 ≥ 1.4.0; app nginx 1.25 is installed")
        );
        let all = Rule::All(vec![version.clone(), tag.clone(), nginx.clone()]);
        assert_eq!(eval(&all, &i), fail("tag env is not set"));

        let any = Rule::Any(vec![tag.clone(), nginx.clone()]);
        assert_eq!(eval(&any, &i), pass("app nginx 1.25 is installed"));
        let any = Rule::Any(vec![tag.clone(), Rule::TagPresent(key("team"))]);
        assert_eq!(
            eval(&any, &i),
            fail("tag env is not set; tag team is not set")
        );

        let not = Rule::Not(Box::new(tag));
        assert_eq!(eval(&not, &i), pass("tag env is not set"));
        let not = Rule::Not(Box::new(nginx));
        assert_eq!(eval(&not, &i), fail("app nginx 1.25 is installed"));
    }

    fn nested_not(depth: usize) -> Rule {
        let mut r = Rule::TagPresent(key("env"));
        for _ in 1..depth {
            r = Rule::Not(Box::new(r));
        }
        r
    }

    #[test]
    fn validate_refuses_bad_rules() {
        for bad in [
            Rule::DiskUsedBelowPercent(f64::NAN),
            Rule::DiskUsedBelowPercent(0.0),
            Rule::DiskUsedBelowPercent(-5.0),
            Rule::MemoryUsedBelowPercent(100.5),
            Rule::MemoryUsedBelowPercent(f64::INFINITY),
            Rule::All(vec![]),
            Rule::Any(vec![]),
            Rule::Not(Box::new(Rule::All(vec![]))),
            Rule::AgentVersionAtLeast("latest".into()),
            Rule::AppInstalled {
                name: String::new(),
                min_version: None,
            },
            Rule::AppInstalled {
                name: "nginx".into(),
                min_version: Some("new".into()),
            },
            Rule::AppNotInstalled {
                name: "x".repeat(257),
            },
            Rule::AppNotInstalled {
                name: "a\nb".into(),
            },
            nested_not(9),
            Rule::All(vec![Rule::TagPresent(key("env")); 64]),
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
        for ok in [
            Rule::DiskUsedBelowPercent(100.0),
            Rule::DiskUsedBelowPercent(0.5),
            Rule::AppNotInstalled {
                name: "x".repeat(256),
            },
            nested_not(8),
            Rule::All(vec![Rule::TagPresent(key("env")); 63]),
            Rule::CertificateValidForDays(0),
        ] {
            assert!(ok.validate().is_ok(), "{ok:?} refused");
        }
        let err = nested_not(9).validate().unwrap_err();
        assert!(err.to_string().contains("deeper than 8"), "{err}");
        let err = Rule::DiskUsedBelowPercent(f64::NAN).validate().unwrap_err();
        assert_eq!(err.what, "disk_used_below_percent");
        assert_eq!(err.value, "NaN");
    }

    #[test]
    fn policy_names() {
        for ok in [
            "disk-space",
            "a",
            "0",
            "agent.v2_min",
            "x-",
            &"p".repeat(64),
        ] {
            assert!(PolicyName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "Disk",
            "a b",
            "a/b",
            "é",
            &"p".repeat(65),
        ] {
            assert!(PolicyName::new(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<PolicyName>("\"Bad\"").is_err());
        let n: PolicyName = "disk-space".parse().unwrap();
        assert_eq!(n.to_string(), "disk-space");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"disk-space\"");
    }

    #[test]
    fn rule_json_shape() {
        let r = Rule::AgentVersionAtLeast("1.4.0".into());
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"agent_version_at_least":"1.4.0"}"#
        );
        let r = Rule::All(vec![
            Rule::TagEquals {
                key: key("env"),
                value: TagValue::new("prod").unwrap(),
            },
            Rule::Not(Box::new(Rule::AppInstalled {
                name: "telnetd".into(),
                min_version: None,
            })),
            Rule::DiskUsedBelowPercent(90.0),
            Rule::CertificateValidForDays(7),
        ]);
        let json = r#"{"all":[{"tag_equals":{"key":"env","value":"prod"}},{"not":{"app_installed":{"name":"telnetd"}}},{"disk_used_below_percent":90.0},{"certificate_valid_for_days":7}]}"#;
        assert_eq!(serde_json::to_string(&r).unwrap(), json);
        assert_eq!(serde_json::from_str::<Rule>(json).unwrap(), r);
        let with_min: Rule =
            serde_json::from_str(r#"{"app_installed":{"name":"nginx","min_version":"1.20"}}"#)
                .unwrap();
        assert_eq!(
            with_min,
            Rule::AppInstalled {
                name: "nginx".into(),
                min_version: Some("1.20".into())
            }
        );
        assert!(serde_json::from_str::<Rule>(r#"{"tag_present":"bad key"}"#).is_err());
        assert!(
            serde_json::from_str::<Rule>(r#"{"app_not_installed":{"name":"a","x":1}}"#).is_err()
        );
        assert!(serde_json::from_str::<Rule>(r#"{"no_such_rule":1}"#).is_err());
    }

    #[test]
    fn policy_json_round_trip() {
        let p = Policy {
            name: PolicyName::new("prod-hygiene").unwrap(),
            description: "Production machines run a current agent.".into(),
            filter: Filter::parse("env=prod").unwrap(),
            rule: Rule::Any(vec![
                Rule::AgentVersionAtLeast("1.4.0".into()),
                Rule::TagPresent(key("legacy")),
            ]),
            created_at: NOW,
        };
        p.validate().unwrap();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "prod-hygiene",
                "description": "Production machines run a current agent.",
                "filter": "env=prod",
                "rule": {"any": [{"agent_version_at_least": "1.4.0"}, {"tag_present": "legacy"}]},
                "created_at": "2023-11-14T22:13:20.000Z",
            })
        );
        let back: Policy = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);

        let mut long = p.clone();
        long.description = "d".repeat(1025);
        assert!(long.validate().is_err());
        long.description = "é".repeat(1024);
        assert!(long.validate().is_ok());
    }

    #[test]
    fn new_policy_defaults_and_unknown_fields() {
        let n: NewPolicy =
            serde_json::from_str(r#"{"name":"disk","rule":{"disk_used_below_percent":90}}"#)
                .unwrap();
        assert!(n.filter.is_all());
        assert_eq!(n.description, "");
        let p = n.into_policy(NOW).unwrap();
        assert_eq!(p.created_at, NOW);
        assert_eq!(p.rule, Rule::DiskUsedBelowPercent(90.0));
        assert!(
            serde_json::from_str::<NewPolicy>(
                r#"{"name":"disk","rule":{"disk_used_below_percent":90},"extra":1}"#
            )
            .is_err()
        );
        let bad: NewPolicy =
            serde_json::from_str(r#"{"name":"disk","rule":{"disk_used_below_percent":0}}"#)
                .unwrap();
        assert!(bad.into_policy(NOW).is_err());
    }

    #[test]
    fn policy_check_applies_filter() {
        let p = NewPolicy {
            name: PolicyName::new("agent").unwrap(),
            description: String::new(),
            filter: Filter::parse("env=prod").unwrap(),
            rule: Rule::AgentVersionAtLeast("1.4.0".into()),
        }
        .into_policy(NOW)
        .unwrap();
        let mut i = with_agent("1.3.0");
        assert_eq!(p.check(&i, Status::Online, NOW), None);
        i.tags = Tags::from_pairs([("env", "prod")]).unwrap();
        assert_eq!(
            p.check(&i, Status::Online, NOW),
            Some(PolicyResult {
                policy: PolicyName::new("agent").unwrap(),
                pass: false,
                reason: "agent version 1.3.0 < 1.4.0".into(),
            })
        );
    }

    #[test]
    fn compliance_percent() {
        let name = PolicyName::new("p").unwrap();
        let c = Compliance::new(name.clone(), 0, 0, NOW);
        assert!((c.percent - 100.0).abs() < f64::EPSILON);
        let c = Compliance::new(name.clone(), 4, 3, NOW);
        assert!((c.percent - 75.0).abs() < f64::EPSILON);
        assert_eq!((c.applicable, c.passing), (4, 3));
        let c = Compliance::new(name, 2, 5, NOW);
        assert_eq!(c.passing, 2);
        assert!((c.percent - 100.0).abs() < f64::EPSILON);
    }
}
