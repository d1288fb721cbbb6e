//! Registration tokens: what lets a new instance join, how often, for how long, and where.
//!
//! A token has a public **id** (8 characters of `a–z 0–9`) and a **secret** (32 characters of
//! `a–z 0–9`, 165 bits from the OS CSPRNG). The operator sees `<id>.<secret>` once, at creation;
//! the store keeps only the SHA-256 of the secret (the secret's entropy makes a slow hash
//! unnecessary), compared in constant time. An unknown id and a wrong secret are indistinguishable
//! to the caller.
//!
//! A token may expire (absolute time; using it never extends it), is limited to
//! [`MaxUses::Limited`] uses (1 by default — unlimited must be asked for), may be revoked, and may
//! carry a tenant, tags and groups that every instance it registers receives. Each attempt that
//! names a known token id is recorded in its **ledger**.
//!
//! The **join string** `fleet1.<id>.<secret>.<ca-sha256-hex>` carries the token and the CA's
//! fingerprint, so an agent can pin the control plane on first contact with one argument.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::ValidationError;
use crate::identity::Fingerprint;
use crate::random::{RandomError, alphanumeric};
use crate::{Groups, InstanceId, Tags, TenantId, Timestamp};

/// Length of a token id.
pub const TOKEN_ID_LEN: usize = 8;
/// Length of a token secret.
pub const TOKEN_SECRET_LEN: usize = 32;
/// Longest token description.
pub const MAX_DESCRIPTION_LEN: usize = 512;
/// Prefix of a join string.
pub const JOIN_PREFIX: &str = "fleet1";

fn check_alnum(what: &'static str, s: &str, len: usize) -> Result<(), ValidationError> {
    if s.len() != len
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(ValidationError::new(
            what,
            s,
            "is not a token component this server issues",
        ));
    }
    Ok(())
}

/// A token's public id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenId(pub(crate) String);

impl TokenId {
    /// A fresh random id.
    pub fn random() -> Result<Self, RandomError> {
        alphanumeric(TOKEN_ID_LEN).map(Self)
    }

    /// Validates an id.
    pub fn new(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        check_alnum("token id", &s, TOKEN_ID_LEN)?;
        Ok(Self(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

crate::tag::string_newtype_impls!(TokenId);

/// A token secret. Its `Debug` form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret(String);

impl TokenSecret {
    /// A fresh random secret.
    pub fn random() -> Result<Self, RandomError> {
        alphanumeric(TOKEN_SECRET_LEN).map(Self)
    }

    /// The secret as text (show it to the operator once).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the secret, the only form a store keeps.
    pub fn hash(&self) -> SecretHash {
        SecretHash(*Fingerprint::of(self.0.as_bytes()).as_bytes())
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// SHA-256 of a token secret.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    /// Constant-time comparison.
    pub fn matches(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(<redacted>)")
    }
}

/// A presented token: id and secret, parsed from `<id>.<secret>` (or from a join string).
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedToken {
    /// The id.
    pub id: TokenId,
    /// The secret.
    pub secret: TokenSecret,
}

impl fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedToken({}.<redacted>)", self.id)
    }
}

impl fmt::Display for PresentedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret.0)
    }
}

impl FromStr for PresentedToken {
    type Err = ValidationError;
    /// Accepts `<id>.<secret>` or a whole join string.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with(JOIN_PREFIX) {
            return s.parse::<JoinString>().map(|j| j.token);
        }
        let (id, secret) = s
            .split_once('.')
            .ok_or_else(|| ValidationError::new("token", "<redacted>", "must be <id>.<secret>"))?;
        check_alnum("token secret", secret, TOKEN_SECRET_LEN)
            .map_err(|_| ValidationError::new("token", "<redacted>", "has a malformed secret"))?;
        Ok(Self {
            id: TokenId::new(id)?,
            secret: TokenSecret(secret.to_owned()),
        })
    }
}

/// A token together with the CA fingerprint to pin: everything an agent needs to join.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinString {
    /// The token.
    pub token: PresentedToken,
    /// SHA-256 of the CA certificate (DER).
    pub ca_sha256: Fingerprint,
}

impl fmt::Display for JoinString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{JOIN_PREFIX}.{}.{}", self.token, self.ca_sha256)
    }
}

impl fmt::Debug for JoinString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinString({:?}, ca {})", self.token, self.ca_sha256)
    }
}

impl FromStr for JoinString {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ValidationError::new(
                "join string",
                "<redacted>",
                "must be fleet1.<id>.<secret>.<ca-sha256>",
            )
        };
        let mut parts = s.split('.');
        if parts.next() != Some(JOIN_PREFIX) {
            return Err(bad());
        }
        let (Some(id), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let token: PresentedToken = format!("{id}.{secret}").parse().map_err(|_| bad())?;
        Ok(Self {
            token,
            ca_sha256: fp.parse().map_err(|_| bad())?,
        })
    }
}

/// How many instances a token may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxUses {
    /// At most this many (≥ 1).
    Limited(u32),
    /// Any number, until it expires or is revoked. Must be asked for explicitly.
    Unlimited,
}

impl Default for MaxUses {
    fn default() -> Self {
        Self::Limited(1)
    }
}

/// A registration token as the store keeps it (no secret, only its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationToken {
    /// Public id.
    pub id: TokenId,
    /// SHA-256 of the secret.
    pub secret_hash: SecretHash,
    /// Creation time.
    pub created_at: Timestamp,
    /// Absolute expiry, if any.
    pub expires_at: Option<Timestamp>,
    /// Use limit.
    pub max_uses: MaxUses,
    /// Successful registrations so far (retries within the window do not count).
    pub uses: u32,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
    /// Tenant of the instances it registers.
    pub tenant: Option<TenantId>,
    /// Tags every instance it registers receives.
    pub tags: Tags,
    /// Groups every instance it registers joins.
    pub groups: Groups,
    /// Free text for operators.
    pub description: String,
    /// Whether an instance whose certificate expired may use it to re-enroll and keep its identity.
    pub allow_reenroll: bool,
}

/// Why a token cannot be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked by an operator.
    Revoked,
    /// All its uses are spent.
    Exhausted,
}

impl RegistrationToken {
    /// Whether the token can register another instance at `now` (revocation is checked first,
    /// then expiry, then the use count).
    pub fn state(&self, now: Timestamp) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.expires_at.is_some_and(|e| now >= e) {
            TokenState::Expired
        } else if matches!(self.max_uses, MaxUses::Limited(n) if self.uses >= n) {
            TokenState::Exhausted
        } else {
            TokenState::Active
        }
    }
}

/// What an operator asks for when creating a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewToken {
    /// Lifetime from creation; `None` never expires.
    pub expires_in: Option<Duration>,
    /// Use limit (default: one use).
    #[serde(default)]
    pub max_uses: MaxUses,
    /// Tenant.
    #[serde(default)]
    pub tenant: Option<TenantId>,
    /// Tags for registered instances.
    #[serde(default)]
    pub tags: Tags,
    /// Groups for registered instances.
    #[serde(default)]
    pub groups: Groups,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Allow re-enrollment of instances with an expired certificate.
    #[serde(default)]
    pub allow_reenroll: bool,
}

impl NewToken {
    /// Checks: `max_uses` ≥ 1 when limited; description ≤ 512 characters without control
    /// characters; expiry at least one second and at most ten years away.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.max_uses == MaxUses::Limited(0) {
            return Err(ValidationError::new(
                "max_uses",
                "0",
                "must be at least 1 (or unlimited)",
            ));
        }
        if self.description.chars().count() > MAX_DESCRIPTION_LEN
            || self.description.chars().any(char::is_control)
        {
            return Err(ValidationError::new(
                "description",
                self.description.clone(),
                "must be at most 512 characters without control characters",
            ));
        }
        if let Some(e) = self.expires_in
            && (e < Duration::from_secs(1) || e > Duration::from_secs(10 * 366 * 24 * 3600))
        {
            return Err(ValidationError::new(
                "expires_in",
                format!("{}s", e.as_secs()),
                "must be from 1 second to 10 years",
            ));
        }
        Ok(())
    }
}

/// A token just created: the record, and the secret to show once.
#[derive(Debug, Clone)]
pub struct CreatedToken {
    /// The stored record.
    pub token: RegistrationToken,
    /// `<id>.<secret>`.
    pub presented: PresentedToken,
    /// The join string (token + CA fingerprint).
    pub join: JoinString,
}

/// What happened at one use attempt of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LedgerOutcome {
    /// A new instance was registered.
    Enrolled,
    /// The same key retried within the window and got its instance back; no use consumed.
    Retried,
    /// An instance with an expired certificate re-enrolled and kept its identity.
    Reenrolled,
    /// The secret was wrong.
    WrongSecret,
    /// The token had expired.
    Expired,
    /// The token was revoked.
    Revoked,
    /// The token's uses were spent.
    Exhausted,
    /// The CSR or system info was refused.
    BadRequest,
    /// Re-enrollment was refused (not allowed by the token, or the old certificate did not match).
    ReenrollRefused,
}

impl LedgerOutcome {
    /// The outcome recorded when a token in `state` refuses an attempt (an `Active` token
    /// refuses only because its last use was taken concurrently: `Exhausted`).
    pub fn refused(state: TokenState) -> Self {
        match state {
            TokenState::Expired => Self::Expired,
            TokenState::Revoked => Self::Revoked,
            TokenState::Exhausted | TokenState::Active => Self::Exhausted,
        }
    }

    /// Whether the attempt registered (or re-registered) an instance.
    pub fn is_success(self) -> bool {
        matches!(self, Self::Enrolled | Self::Retried | Self::Reenrolled)
    }

    /// Whether a later attempt with the same key may count as a retry of this one. Retries do not
    /// open a new window: the window runs from the enrollment itself and never slides.
    pub fn starts_retry_window(self) -> bool {
        matches!(self, Self::Enrolled | Self::Reenrolled)
    }
}

/// One use attempt of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Which token.
    pub token: TokenId,
    /// When (server time).
    pub at: Timestamp,
    /// What happened.
    pub outcome: LedgerOutcome,
    /// The instance registered or returned, if any.
    pub instance: Option<InstanceId>,
    /// The caller's address, as the transport saw it.
    pub peer: Option<SocketAddr>,
    /// SHA-256 of the CSR's public key, if the CSR parsed that far.
    pub key_fingerprint: Option<Fingerprint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_and_join_string_round_trip() {
        let t = PresentedToken {
            id: TokenId::random().unwrap(),
            secret: TokenSecret::random().unwrap(),
        };
        let s = t.to_string();
        assert_eq!(s.len(), TOKEN_ID_LEN + 1 + TOKEN_SECRET_LEN);
        assert_eq!(s.parse::<PresentedToken>().unwrap(), t);
        let j = JoinString {
            token: t.clone(),
            ca_sha256: Fingerprint::of(b"ca"),
        };
        let js = j.to_string();
        assert!(js.starts_with("fleet1."));
        assert_eq!(js.parse::<JoinString>().unwrap(), j);
        assert_eq!(
            js.parse::<PresentedToken>().unwrap(),
            t,
            "a join string works where a token is expected"
        );
        assert!(
            !format!("{t:?}{j:?}").contains(t.secret.expose()),
            "Debug never shows the secret"
        );
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_the_secret() {
        for bad in [
            "",
            "abc",
            "abcdefgh.short",
            "ABCDEFGH.0123456789abcdef0123456789abcdef",
            "fleet1.x.y.z",
        ] {
            let e = bad.parse::<PresentedToken>().unwrap_err();
            assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
        }
    }

    #[test]
    fn state_order_and_absolute_expiry() {
        let mut t = RegistrationToken {
            id: TokenId::new("abcdefgh").unwrap(),
            secret_hash: TokenSecret::random().unwrap().hash(),
            created_at: Timestamp::from_unix_secs(0),
            expires_at: Some(Timestamp::from_unix_secs(100)),
            max_uses: MaxUses::Limited(1),
            uses: 0,
            revoked_at: None,
            tenant: None,
            tags: Tags::new(),
            groups: Groups::new(),
            description: String::new(),
            allow_reenroll: false,
        };
        assert_eq!(t.state(Timestamp::from_unix_secs(99)), TokenState::Active);
        assert_eq!(t.state(Timestamp::from_unix_secs(100)), TokenState::Expired);
        t.uses = 1;
        assert_eq!(
            t.state(Timestamp::from_unix_secs(50)),
            TokenState::Exhausted
        );
        t.revoked_at = Some(Timestamp::from_unix_secs(1));
        assert_eq!(t.state(Timestamp::from_unix_secs(50)), TokenState::Revoked);
        t.max_uses = MaxUses::Unlimited;
        t.revoked_at = None;
        t.uses = u32::MAX;
        assert_eq!(t.state(Timestamp::from_unix_secs(50)), TokenState::Active);
    }

    #[test]
    fn secret_hash_compare() {
        let s = TokenSecret::random().unwrap();
        assert!(s.hash().matches(&s.hash()));
        assert!(!s.hash().matches(&TokenSecret::random().unwrap().hash()));
    }

    #[test]
    fn new_token_validation() {
        assert!(NewToken::default().validate().is_ok());
        assert!(
            NewToken {
                max_uses: MaxUses::Limited(0),
                ..NewToken::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            NewToken {
                description: "x".repeat(513),
                ..NewToken::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            NewToken {
                expires_in: Some(Duration::ZERO),
                ..NewToken::default()
            }
            .validate()
            .is_err()
        );
    }
}
