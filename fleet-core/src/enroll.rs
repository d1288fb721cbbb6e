//! Enrollment and identity on [`Fleet`]: tokens, enroll, retry, re-enroll, renew, authenticate,
//! revocation lists.
//!
//! # Enroll
//!
//! Checked cheapest first, so that bad requests cost little:
//!
//! 1. the token's syntax; then its id and secret (SHA-256, constant-time compare; an unknown id
//!    and a wrong secret give the same [`EnrollError::InvalidToken`]);
//! 2. a revoked token is refused;
//! 3. the system info and the CSR ([`crate::csr`]);
//! 4. a **retry** — the same token and the same CSR public key succeeded within
//!    [`EnrollmentPolicy::retry_window`] (default 10 minutes) — gets the same instance back with
//!    its current certificate re-signed (same serial, same end of validity), consumes no use and
//!    changes nothing in the store (an agent that lost the response to its first attempt is not
//!    stranded, and a replayed request revokes nothing);
//! 5. an expired or used-up token is refused;
//! 6. the certificate is signed, then the store commits token use, instance and serial in **one
//!    transaction** ([`TokenStore::enroll`](crate::store::TokenStore::enroll)), which re-checks
//!    the token: of any number of concurrent attempts with a `max_uses = k` token, at most `k`
//!    commit. A certificate whose commit fails is never handed out, and a failed enrollment
//!    consumes nothing.
//!
//! Every attempt naming a known token is recorded in the token's ledger with its outcome, peer
//! address and CSR key fingerprint.
//!
//! # Re-enrollment after expiry
//!
//! An instance whose certificate expired while it was offline cannot complete a TLS handshake
//! with it, so it enrolls again with a token that allows re-enrollment
//! ([`NewToken::allow_reenroll`]) and sends its expired certificate along. If the fleet CA signed
//! that certificate, it is still the instance's current one, and the CSR carries the **same public
//! key** (the CSR signature proves possession of it), the instance keeps its identity, tags, groups
//! and history. It consumes one use of the token.
//!
//! # Renewal
//!
//! An instance presenting its current certificate gets a new one for a new CSR. The new
//! certificate is *staged*: the old serial stays valid **until the new one is first used**, at
//! which point the old one is recorded as revoked. An agent that never received its renewed
//! certificate therefore keeps working with the old one.
//!
//! # Authentication and revocation
//!
//! [`Fleet::authenticate`] checks the serial of a verified client certificate against the
//! instance's current (or staged) serial in the live view, which follows the store: deregistering
//! an instance revokes its serials, and its next request is refused. Revoked serials are kept,
//! for the CRL, until the certificate would have expired ([`Fleet::prune_revoked`]).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ca::{CaError, IssuancePolicy, IssuedCertificate};
use crate::csr::{CsrError, validate_csr};
use crate::error::{FleetError, StoreError, ValidationError};
use crate::fleet::{Fleet, Heartbeat, HeartbeatAck};
use crate::identity::{Fingerprint, InstanceIdentity};
use crate::limiter::{Attempt, AttemptLimit};
use crate::live::CertificateCheck;
use crate::store::{CertificateChange, EnrollCommit, EnrollResult, EnrollTarget, FleetStore};
use crate::telemetry::{EnrollmentOutcome, StoreOp};
use crate::token::{
    CreatedToken, JoinString, LedgerEntry, LedgerOutcome, NewToken, PresentedToken,
    RegistrationToken, SecretHash, TokenId, TokenSecret, TokenState,
};
use crate::{Instance, InstanceId, SystemInfo, TenantId, TenantScope};

/// Enrollment settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentPolicy {
    /// How long after a successful enrollment the same token and key may retry and get the same
    /// instance back (default 10 minutes).
    pub retry_window: Duration,
    /// How client certificates are issued.
    pub issuance: IssuancePolicy,
    /// Failed attempts per source before wrong tokens are answered "rate limited" (see
    /// [`crate::limiter`]: a correct token is never refused by it).
    pub failed_attempts: AttemptLimit,
    /// Certificate renewals one instance may make per hour (default 6; an agent renews once per
    /// two-thirds of its certificate's lifetime). More are refused with
    /// [`RenewError::RateLimited`]. Counted per control-plane process.
    pub renewals_per_hour: u32,
}

impl Default for EnrollmentPolicy {
    fn default() -> Self {
        Self {
            retry_window: Duration::from_secs(600),
            issuance: IssuancePolicy::default(),
            failed_attempts: AttemptLimit::default(),
            renewals_per_hour: 6,
        }
    }
}

impl EnrollmentPolicy {
    /// Checks the issuance policy and a retry window of at most one day.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.retry_window > Duration::from_secs(86_400) {
            return Err(ValidationError::new(
                "retry_window",
                format!("{}s", self.retry_window.as_secs()),
                "must be at most one day",
            ));
        }
        self.failed_attempts.validate()?;
        if self.renewals_per_hour == 0 {
            return Err(ValidationError::new(
                "renewals_per_hour",
                "0",
                "must be at least 1 (agents must be able to renew)",
            ));
        }
        self.issuance.validate()
    }
}

/// An enrollment attempt, as a transport received it.
#[derive(Debug, Clone, Default)]
pub struct EnrollRequest {
    /// The token as presented: `<id>.<secret>` or a join string.
    pub token: String,
    /// The instance's CSR, PEM.
    pub csr_pem: String,
    /// What the instance reports about itself.
    pub system: SystemInfo,
    /// The caller's address, for the ledger.
    pub peer: Option<SocketAddr>,
    /// For re-enrollment: the instance's expired certificate, PEM.
    pub previous_certificate_pem: Option<String>,
}

/// A successful enrollment.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The instance (new, or the existing one on a retry or re-enrollment).
    pub instance: InstanceId,
    /// Its tenant.
    pub tenant: Option<TenantId>,
    /// Its client certificate.
    pub certificate: IssuedCertificate,
    /// The fleet CA certificate, PEM.
    pub ca_pem: String,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// `Enrolled`, `Retried` or `Reenrolled`.
    pub outcome: LedgerOutcome,
}

/// Why an enrollment was refused. Nothing but the token's ledger changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// Malformed token, unknown token id, or wrong secret (deliberately indistinguishable).
    #[error("invalid registration token")]
    InvalidToken,
    /// The token expired.
    #[error("the registration token has expired")]
    TokenExpired,
    /// The token was revoked.
    #[error("the registration token was revoked")]
    TokenRevoked,
    /// The token has no uses left.
    #[error("the registration token has no uses left")]
    TokenExhausted,
    /// The CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The system info was refused.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Re-enrollment was refused.
    #[error("re-enrollment refused: {0}")]
    ReenrollRefused(&'static str),
    /// The store failed; nothing was committed.
    #[error("store error")]
    Store(#[from] StoreError),
    /// The CA failed to sign.
    #[error("certificate authority error")]
    Ca(#[from] CaError),
    /// Too many failed attempts from this source, and this one's token was not valid either
    /// (a valid token is never refused so; see [`crate::limiter`]). Nothing was recorded.
    #[error("too many failed enrollment attempts from this address; retry in {}s", retry_after.as_secs())]
    RateLimited {
        /// Until the source's window ends.
        retry_after: Duration,
    },
}

/// Why a certificate was not accepted as an instance's identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The instance does not exist (never registered, or deregistered).
    #[error("unknown instance")]
    UnknownInstance,
    /// The certificate is not the instance's current one: revoked or superseded.
    #[error("certificate revoked or superseded")]
    CertificateRevoked,
    /// The store failed while promoting a renewed certificate.
    #[error("store error")]
    Store(#[from] StoreError),
}

/// Why a renewal failed; nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewError {
    /// The presented certificate is not acceptable.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The new CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The CA failed to sign.
    #[error("certificate authority error")]
    Ca(#[from] CaError),
    /// The store failed.
    #[error("store error")]
    Store(#[from] StoreError),
    /// The instance renewed [`EnrollmentPolicy::renewals_per_hour`] times within the hour.
    #[error("too many renewals for this instance; retry in {}s", retry_after.as_secs())]
    RateLimited {
        /// When the next renewal is allowed.
        retry_after: Duration,
    },
}

/// Compared against when the token id is unknown, so both paths do the same work.
const DUMMY_HASH: SecretHash = SecretHash([0x5a; 32]);

fn state_error(state: TokenState) -> EnrollError {
    match state {
        TokenState::Expired => EnrollError::TokenExpired,
        TokenState::Revoked => EnrollError::TokenRevoked,
        TokenState::Exhausted | TokenState::Active => EnrollError::TokenExhausted,
    }
}

fn scope_allows_token(scope: &TenantScope, t: &RegistrationToken) -> bool {
    scope.allows(t.tenant.as_ref())
}

impl<S: FleetStore> Fleet<S> {
    /// Creates a registration token. A tenant-scoped operator may only create tokens for its own
    /// tenant (an unset tenant becomes its tenant). The secret is in the result and nowhere else.
    pub async fn create_token(
        &self,
        scope: &TenantScope,
        mut new: NewToken,
    ) -> Result<CreatedToken, FleetError> {
        new.validate()?;
        if let TenantScope::Tenant(t) = scope {
            match &new.tenant {
                None => new.tenant = Some(t.clone()),
                Some(x) if x == t => {}
                Some(x) => {
                    return Err(ValidationError::new(
                        "tenant",
                        x.as_str(),
                        "is outside the operator's tenant",
                    )
                    .into());
                }
            }
        }
        let now = self.now();
        let secret = TokenSecret::random()?;
        let mut attempts = 0;
        loop {
            let token = RegistrationToken {
                id: TokenId::random()?,
                secret_hash: secret.hash(),
                created_at: now,
                expires_at: new.expires_in.map(|d| now.saturating_add(d)),
                max_uses: new.max_uses,
                uses: 0,
                revoked_at: None,
                tenant: new.tenant.clone(),
                tags: new.tags.clone(),
                groups: new.groups.clone(),
                description: new.description.clone(),
                allow_reenroll: new.allow_reenroll,
            };
            match self
                .timed(StoreOp::InsertToken, self.inner.store.insert_token(&token))
                .await
            {
                Ok(()) => {
                    let presented = PresentedToken {
                        id: token.id.clone(),
                        secret,
                    };
                    let join = JoinString {
                        token: presented.clone(),
                        ca_sha256: self.ca().fingerprint(),
                    };
                    return Ok(CreatedToken {
                        token,
                        presented,
                        join,
                    });
                }
                // An id collision (1 in 2.8e12 per pair): draw another.
                Err(StoreError::AlreadyExists { .. }) if attempts < 3 => attempts += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Every token visible in `scope`, oldest first.
    pub async fn list_tokens(
        &self,
        scope: &TenantScope,
    ) -> Result<Vec<RegistrationToken>, FleetError> {
        let all = self
            .timed(StoreOp::ListTokens, self.inner.store.list_tokens())
            .await?;
        Ok(all
            .into_iter()
            .filter(|t| scope_allows_token(scope, t))
            .collect())
    }

    /// One token, if visible in `scope`.
    pub async fn get_token(
        &self,
        scope: &TenantScope,
        id: &TokenId,
    ) -> Result<RegistrationToken, FleetError> {
        match self
            .timed(StoreOp::GetToken, self.inner.store.get_token(id))
            .await?
        {
            Some(t) if scope_allows_token(scope, &t) => Ok(t),
            _ => Err(FleetError::TokenNotFound(id.clone())),
        }
    }

    /// Revokes a token (idempotent); it registers nothing from now on.
    pub async fn revoke_token(
        &self,
        scope: &TenantScope,
        id: &TokenId,
    ) -> Result<RegistrationToken, FleetError> {
        self.get_token(scope, id).await?;
        Ok(self
            .timed(
                StoreOp::RevokeToken,
                self.inner.store.revoke_token(id, self.now()),
            )
            .await?)
    }

    /// A token's ledger, newest first, if the token is visible in `scope` (after
    /// [`flush_ledger`](Self::flush_ledger), so every attempt answered so far is in it or counted
    /// in [`unrecorded_attempts`](Self::unrecorded_attempts)).
    pub async fn token_ledger(
        &self,
        scope: &TenantScope,
        id: &TokenId,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, FleetError> {
        self.get_token(scope, id).await?;
        self.flush_ledger().await;
        Ok(self
            .timed(StoreOp::Ledger, self.inner.store.ledger(id, limit))
            .await?)
    }

    /// Records an attempt on a known token in its ledger, off the response path and within the
    /// ledger's bound (see [`crate::ledger`]).
    fn record(
        &self,
        token: &TokenId,
        outcome: LedgerOutcome,
        instance: Option<InstanceId>,
        req: &EnrollRequest,
        key: Option<Fingerprint>,
    ) {
        self.record_later(LedgerEntry {
            token: token.clone(),
            at: self.now(),
            outcome,
            instance,
            peer: req.peer,
            key_fingerprint: key,
        });
    }

    /// Enrolls an instance; see the module docs for the order of checks and the guarantees.
    pub async fn enroll(&self, req: EnrollRequest) -> Result<Enrollment, EnrollError> {
        let result = self.enroll_attempt(req).await;
        self.inner
            .telemetry
            .enrollment(EnrollmentOutcome::of(&result));
        result
    }

    /// [`enroll`](Self::enroll) without counting the outcome: the limiter's verdict, then the
    /// attempt; a success gives the limiter's reservation back.
    async fn enroll_attempt(&self, req: EnrollRequest) -> Result<Enrollment, EnrollError> {
        let attempt = req
            .peer
            .map(|p| self.inner.attempts.begin(p.ip(), self.now()));
        let over_budget = match &attempt {
            Some(Attempt::OverBudget { retry_after }) => Some(*retry_after),
            _ => None,
        };
        let result = self.enroll_checked(req, over_budget).await;
        if let (Ok(_), Some(Attempt::Counted(reservation))) = (&result, attempt) {
            reservation.succeeded();
        }
        result
    }

    /// Checks the token (a source `over_budget` gets [`EnrollError::RateLimited`] for anything
    /// but a valid secret, at no further cost), then enrolls.
    async fn enroll_checked(
        &self,
        req: EnrollRequest,
        over_budget: Option<Duration>,
    ) -> Result<Enrollment, EnrollError> {
        let refused = |e: EnrollError| match over_budget {
            Some(retry_after) => EnrollError::RateLimited { retry_after },
            None => e,
        };
        let presented: PresentedToken = req
            .token
            .parse()
            .map_err(|_| refused(EnrollError::InvalidToken))?;
        let supplied = presented.secret.hash();
        let Some(token) = self
            .timed(StoreOp::GetToken, self.inner.store.get_token(&presented.id))
            .await?
        else {
            let _ = DUMMY_HASH.matches(&supplied);
            return Err(refused(EnrollError::InvalidToken));
        };
        // Both refusals answer at once; the known token's ledger row is written later, so the
        // latency says nothing about which token ids exist.
        if !token.secret_hash.matches(&supplied) {
            if over_budget.is_none() {
                self.record(&token.id, LedgerOutcome::WrongSecret, None, &req, None);
            }
            return Err(refused(EnrollError::InvalidToken));
        }
        if token.revoked_at.is_some() {
            self.record(&token.id, LedgerOutcome::Revoked, None, &req, None);
            return Err(EnrollError::TokenRevoked);
        }
        if let Err(e) = req.system.validate() {
            self.record(&token.id, LedgerOutcome::BadRequest, None, &req, None);
            return Err(e.into());
        }
        let csr = match validate_csr(&req.csr_pem) {
            Ok(csr) => csr,
            Err(e) => {
                self.record(&token.id, LedgerOutcome::BadRequest, None, &req, None);
                return Err(e.into());
            }
        };
        let key = csr.key_fingerprint();
        let now = self.now();
        let retry_since = now.saturating_sub(self.inner.enrollment.retry_window);

        if let Some(existing) = self
            .timed(
                StoreOp::FindEnrollment,
                self.inner
                    .store
                    .find_enrollment(&token.id, &key, retry_since),
            )
            .await?
        {
            self.record(
                &token.id,
                LedgerOutcome::Retried,
                Some(existing),
                &req,
                Some(key),
            );
            return self.reissue(existing, &csr).await;
        }
        let state = token.state(now);
        if state != TokenState::Active {
            self.record(
                &token.id,
                LedgerOutcome::refused(state),
                None,
                &req,
                Some(key),
            );
            return Err(state_error(state));
        }

        let issuance = &self.inner.enrollment.issuance;
        let (target, instance, tenant, certificate) = match &req.previous_certificate_pem {
            Some(prev) => {
                let (identity, old_serial) = match self.check_reenroll(&token, prev, key) {
                    Ok(v) => v,
                    Err(why) => {
                        self.record(
                            &token.id,
                            LedgerOutcome::ReenrollRefused,
                            None,
                            &req,
                            Some(key),
                        );
                        return Err(EnrollError::ReenrollRefused(why));
                    }
                };
                let cert = self.ca().issue_client(
                    &csr,
                    identity.instance,
                    identity.tenant.as_ref(),
                    now,
                    issuance,
                )?;
                let target = EnrollTarget::Existing {
                    instance: identity.instance,
                    expected_serial: old_serial,
                    certificate: cert.record,
                };
                (target, identity.instance, identity.tenant, cert)
            }
            None => {
                let id = InstanceId::random();
                let cert =
                    self.ca()
                        .issue_client(&csr, id, token.tenant.as_ref(), now, issuance)?;
                let instance = Instance {
                    id,
                    tenant: token.tenant.clone(),
                    system: req.system.clone(),
                    tags: token.tags.clone(),
                    groups: token.groups.clone(),
                    registered_at: now,
                    last_seen: now,
                    metrics: None,
                    apps: Vec::new(),
                    certificate: Some(cert.record),
                    next_certificate: None,
                };
                (
                    EnrollTarget::New(Box::new(instance)),
                    id,
                    token.tenant.clone(),
                    cert,
                )
            }
        };
        let reenroll = matches!(target, EnrollTarget::Existing { .. });
        let commit = EnrollCommit {
            token: token.id.clone(),
            now,
            key_fingerprint: key,
            retry_since,
            peer: req.peer,
            target,
        };
        match self
            .timed(StoreOp::Enroll, self.inner.store.enroll(&commit))
            .await?
        {
            EnrollResult::Enrolled { seq } => {
                match &commit.target {
                    // The store holds exactly the record it was given: show it without reading
                    // it back (one store round trip less per enrollment) — unless the change
                    // feed already went past it (a replica may have changed or removed it
                    // since), under the feed's lock so a sync cannot slip in between.
                    EnrollTarget::New(new) => {
                        let cursor = self.feed_cursor().await;
                        if *cursor < seq {
                            let now = self.now();
                            self.view_mut().upsert(new, seq, now);
                        }
                    }
                    EnrollTarget::Existing { .. } => self.apply_stored(instance, seq).await?,
                }
                Ok(Enrollment {
                    instance,
                    tenant,
                    certificate,
                    ca_pem: self.ca_set().bundle_pem(),
                    heartbeat_interval: self.policy().heartbeat_interval(),
                    outcome: if reenroll {
                        LedgerOutcome::Reenrolled
                    } else {
                        LedgerOutcome::Enrolled
                    },
                })
            }
            EnrollResult::Retry { instance } => self.reissue(instance, &csr).await,
            EnrollResult::Rejected(state) => Err(state_error(state)),
            EnrollResult::UnknownToken => Err(EnrollError::InvalidToken),
            EnrollResult::ReenrollRefused => Err(EnrollError::ReenrollRefused(
                "the previous certificate is no longer the instance's current one",
            )),
        }
    }

    /// The checks of a re-enrollment that need no I/O: the token allows it, the previous
    /// certificate was issued by this CA (its validity period aside) for the same key as the CSR's,
    /// names an instance, and matches the token's tenant. Returns the identity and old serial.
    fn check_reenroll(
        &self,
        token: &RegistrationToken,
        previous_pem: &str,
        key: Fingerprint,
    ) -> Result<(InstanceIdentity, crate::Serial), &'static str> {
        if !token.allow_reenroll {
            return Err("the token does not allow re-enrollment");
        }
        let der = x509_parser::pem::parse_x509_pem(previous_pem.as_bytes())
            .map(|(_, p)| p.contents)
            .map_err(|_| "the previous certificate is not PEM")?;
        // Any CA the fleet trusts: during a rotation the certificate may be the old CA's.
        let (old_key, old_serial) = self
            .ca_set()
            .all()
            .iter()
            .find_map(|ca| ca.verify_issued_ignoring_time(&der))
            .ok_or("the previous certificate was not issued by this fleet's CA")?;
        if old_key != key {
            return Err("the CSR key differs from the previous certificate's key");
        }
        let identity = InstanceIdentity::from_certificate_der(&der)
            .map_err(|_| "the previous certificate names no instance")?;
        if token.tenant.is_some() && token.tenant != identity.tenant {
            return Err("the token belongs to another tenant");
        }
        Ok((identity, old_serial))
    }

    /// A retried enrollment: the instance the first attempt registered gets its **current**
    /// certificate again — re-signed for the same key with the same serial and end of validity
    /// ([`CertificateAuthority::reissue_client`](crate::ca::CertificateAuthority::reissue_client)).
    /// Nothing in the store changes, so a replayed enrollment request (which anyone who saw it
    /// can send) retires no certificate an agent is using, and costs no token use.
    async fn reissue(
        &self,
        instance: InstanceId,
        csr: &crate::csr::ValidatedCsr,
    ) -> Result<Enrollment, EnrollError> {
        let stored = self
            .timed(
                StoreOp::GetInstance,
                self.inner.store.get_instance(instance),
            )
            .await?
            .ok_or(EnrollError::InvalidToken)?;
        let current = stored.certificate.ok_or(EnrollError::ReenrollRefused(
            "the instance has no current certificate",
        ))?;
        let cert = self.ca().reissue_client(
            csr,
            instance,
            stored.tenant.as_ref(),
            current,
            self.now(),
            &self.inner.enrollment.issuance,
        )?;
        Ok(Enrollment {
            instance,
            tenant: stored.tenant,
            certificate: cert,
            ca_pem: self.ca_set().bundle_pem(),
            heartbeat_interval: self.policy().heartbeat_interval(),
            outcome: LedgerOutcome::Retried,
        })
    }

    /// Accepts a verified client certificate's identity if its serial is the instance's current
    /// one, or its staged renewal (which then becomes current, durably). Refuses superseded and
    /// revoked certificates, certificates of deregistered instances, and a tenant that does not
    /// match the instance's.
    pub async fn authenticate(&self, identity: &InstanceIdentity) -> Result<(), AuthError> {
        let check = self.view().check_certificate(
            identity.instance,
            identity.serial,
            identity.tenant.as_ref(),
        );
        match check {
            CertificateCheck::Current => Ok(()),
            CertificateCheck::UnknownInstance => Err(AuthError::UnknownInstance),
            CertificateCheck::Refused => Err(AuthError::CertificateRevoked),
            CertificateCheck::Staged => {
                let now = self.now();
                match self
                    .timed(
                        StoreOp::SetCertificate,
                        self.inner.store.set_certificate(
                            identity.instance,
                            CertificateChange::Promote(identity.serial),
                            now,
                        ),
                    )
                    .await
                {
                    Ok(seq) => {
                        self.apply_stored(identity.instance, seq).await?;
                        Ok(())
                    }
                    // Promoted concurrently by another request (or replica): re-check.
                    Err(StoreError::Conflict(_)) => {
                        let seq = self.inner.store.latest_seq().await?;
                        self.apply_stored(identity.instance, seq).await?;
                        match self.view().check_certificate(
                            identity.instance,
                            identity.serial,
                            identity.tenant.as_ref(),
                        ) {
                            CertificateCheck::Current => Ok(()),
                            _ => Err(AuthError::CertificateRevoked),
                        }
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// [`authenticate`](Self::authenticate), then [`heartbeat`](Self::heartbeat) as that
    /// instance: the one call a transport needs per heartbeat.
    pub async fn heartbeat_as(
        &self,
        identity: &InstanceIdentity,
        hb: Heartbeat,
    ) -> Result<HeartbeatAck, FleetError> {
        self.authenticate_instance(identity).await?;
        self.heartbeat(identity.instance, hb)
    }

    /// [`authenticate`](Self::authenticate) with the refusals folded into
    /// [`FleetError::InstanceNotFound`] (store failures kept), for the calls that act as the
    /// instance.
    pub(crate) async fn authenticate_instance(
        &self,
        identity: &InstanceIdentity,
    ) -> Result<(), FleetError> {
        self.authenticate(identity).await.map_err(|e| match e {
            AuthError::Store(s) => FleetError::from(s),
            _ => FleetError::InstanceNotFound(identity.instance),
        })
    }

    /// Issues a renewed certificate to an authenticated instance for `csr_pem`. The new
    /// certificate is staged; see the module docs.
    pub async fn renew(
        &self,
        identity: &InstanceIdentity,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, RenewError> {
        self.authenticate(identity).await?;
        self.inner
            .renewals
            .check(identity.instance, self.now())
            .map_err(|retry_after| RenewError::RateLimited { retry_after })?;
        let csr = validate_csr(csr_pem)?;
        self.issue_and_apply(
            &csr,
            identity.instance,
            identity.tenant.as_ref(),
            CertificateChange::Stage,
        )
        .await
    }

    /// Issues a certificate for an existing instance, records it with `change` (replace or
    /// stage) and brings the live view up to date.
    async fn issue_and_apply<E: From<CaError> + From<StoreError>>(
        &self,
        csr: &crate::csr::ValidatedCsr,
        instance: InstanceId,
        tenant: Option<&TenantId>,
        change: fn(crate::ca::CertificateRecord) -> CertificateChange,
    ) -> Result<IssuedCertificate, E> {
        let now = self.now();
        let cert =
            self.ca()
                .issue_client(csr, instance, tenant, now, &self.inner.enrollment.issuance)?;
        let seq = self
            .timed(
                StoreOp::SetCertificate,
                self.inner
                    .store
                    .set_certificate(instance, change(cert.record), now),
            )
            .await?;
        self.apply_stored(instance, seq).await?;
        Ok(cert)
    }

    /// A CRL (PEM) of every revoked certificate not yet expired, valid for `validity`.
    pub async fn crl(&self, validity: Duration) -> Result<String, FleetError> {
        let now = self.now();
        let revoked: Vec<_> = self
            .inner
            .store
            .revoked_certificates()
            .await?
            .into_iter()
            .filter(|r| r.not_after >= now)
            .collect();
        let number = u64::try_from(now.as_unix_millis()).unwrap_or(0);
        self.ca()
            .crl(&revoked, number, now, now.saturating_add(validity))
            .map_err(FleetError::Ca)
    }

    /// Forgets revocations of certificates that have expired; returns how many.
    pub async fn prune_revoked(&self) -> Result<usize, FleetError> {
        Ok(self.inner.store.prune_revoked(self.now()).await?)
    }
}
