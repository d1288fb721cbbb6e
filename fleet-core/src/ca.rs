//! The fleet certificate authority (rcgen, ECDSA P-256).
//!
//! It signs instances' CSRs into client certificates whose contents the CA alone decides:
//!
//! - subject `CN=<instance id>`, one URI SAN naming tenant and instance ([`crate::identity`]);
//! - an explicit random 16-byte serial (never derived from the key, so re-issuing for the same key
//!   gives a new serial that can be revoked on its own);
//! - `extendedKeyUsage = clientAuth`, `keyUsage = digitalSignature`, not a CA;
//! - valid for [`IssuancePolicy::client_validity`] (default 30 days), `notBefore` backdated by
//!   [`IssuancePolicy::backdate`] (default 5 minutes) for agents whose clocks run slow.
//!
//! It also issues the control plane's own TLS server certificate and signs CRLs for consumers that
//! want one. The CA key is ECDSA P-256; stores keep it sealed ([`CaSet::seal`], [`crate::seal`]),
//! never in the clear.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};

use crate::csr::ValidatedCsr;
use crate::identity::{Fingerprint, Serial, instance_uri};
use crate::{InstanceId, TenantId, Timestamp};

/// Longest client-certificate validity accepted in an [`IssuancePolicy`] (1 year).
pub const MAX_CLIENT_VALIDITY: Duration = Duration::from_secs(366 * 24 * 3600);

/// How client certificates are issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuancePolicy {
    /// Lifetime of a client certificate (default 30 days).
    pub client_validity: Duration,
    /// How far `notBefore` is set before the signing time (default 5 minutes).
    pub backdate: Duration,
}

impl Default for IssuancePolicy {
    fn default() -> Self {
        Self {
            client_validity: Duration::from_secs(30 * 24 * 3600),
            backdate: Duration::from_secs(300),
        }
    }
}

impl IssuancePolicy {
    /// Checks: validity from 10 minutes to 1 year; backdate at most 1 hour.
    pub fn validate(&self) -> Result<(), crate::ValidationError> {
        if self.client_validity < Duration::from_secs(600)
            || self.client_validity > MAX_CLIENT_VALIDITY
        {
            return Err(crate::ValidationError::new(
                "client_validity",
                format!("{}s", self.client_validity.as_secs()),
                "must be from 10 minutes to 1 year",
            ));
        }
        if self.backdate > Duration::from_secs(3600) {
            return Err(crate::ValidationError::new(
                "backdate",
                format!("{}s", self.backdate.as_secs()),
                "must be at most 1 hour",
            ));
        }
        Ok(())
    }
}

/// A CA operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CA certificate or key PEM could not be loaded, or they do not belong together.
    #[error("cannot load the CA: {0}")]
    Load(String),
    /// rcgen failed to build or sign a certificate.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    /// A time outside what X.509 can carry.
    #[error("time {0} is outside the range a certificate can carry")]
    TimeOutOfRange(Timestamp),
    /// A server certificate name that is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    InvalidName(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// A CA key could not be sealed or unsealed.
    #[error("sealed CA key")]
    Sealed(#[source] crate::seal::SealError),
    /// The store holds sealed CA keys (or would have to store one) and no key-encryption key
    /// was given.
    #[error(
        "the CA keys in the store are sealed: give the key-encryption key \
         (FleetBuilder::key_encryption_key)"
    )]
    KeyEncryptionKeyRequired,
    /// The store holds the CA key in the clear (written before keys were sealed) and no
    /// key-encryption key was given to seal it with.
    #[error(
        "the store holds the CA key in the clear (written by an earlier version): give a \
         key-encryption key (FleetBuilder::key_encryption_key) and it is sealed at once"
    )]
    ClearKeyInStore,
    /// The fleet's CA was given to the builder, not kept in the store, so the store's cannot
    /// be rotated or re-sealed here.
    #[error("this fleet's CA is not kept in its store (FleetBuilder::ca); rotate it yourself")]
    NotInStore,
    /// No CA with this fingerprint in the set (or, for retiring, it is the signing one).
    #[error("CA {0} is not a CA of this fleet that this step can take")]
    NotInSet(Fingerprint),
}

/// The fleet's CAs as a store keeps them: certificates in PEM, keys **sealed** ([`crate::seal`]).
///
/// A store holds one of these and treats both fields as opaque text. `cert_pem` is a bundle of
/// one or more CA certificates, the signing CA first, the others trusted during a rotation
/// ([`CaSet`]); `key_pem` holds their sealed keys, one line each, in the same order. (The field
/// keeps its old name so stores written before keys were sealed still read; a `key_pem` that is
/// a PEM private key in the clear is such a store, and [`Fleet`](crate::Fleet) seals it when it
/// opens.)
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaMaterial {
    /// The CA certificates, PEM, the signing CA first.
    pub cert_pem: String,
    /// Their keys, sealed, one line each (or, in stores from before sealing, one PEM key in the
    /// clear).
    pub key_pem: String,
}

impl CaMaterial {
    /// Whether the key is held in the clear (a store written before keys were sealed).
    pub fn is_clear(&self) -> bool {
        !crate::seal::is_sealed(&self.key_pem)
    }
}

/// The fleet's CAs: the one that signs, and the others its listeners still trust — the next CA
/// of a rotation before it is promoted, or the previous one until it is retired. Agents trust the
/// whole set, announced in heartbeat replies ([`CaSet::bundle_pem`]).
#[derive(Debug, Clone)]
pub struct CaSet {
    cas: Vec<Arc<CertificateAuthority>>,
    /// [`set_id`] of `cas`, computed once (heartbeat replies compare it).
    id: String,
}

/// The id of a trusted set of CAs, from their certificate fingerprints in order (signing CA
/// first): the first 8 bytes of the SHA-256 of the fingerprints, hex. What [`CaSet::id`] says,
/// and what an agent computes from the bundle it trusts.
pub fn set_id(fingerprints: impl IntoIterator<Item = Fingerprint>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for f in fingerprints {
        ctx.update(f.as_bytes());
    }
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl CaSet {
    fn of(cas: Vec<Arc<CertificateAuthority>>) -> Self {
        let id = set_id(cas.iter().map(|c| c.fingerprint()));
        Self { cas, id }
    }

    /// A set of one CA.
    pub fn single(ca: CertificateAuthority) -> Self {
        Self::of(vec![Arc::new(ca)])
    }

    /// The CA that signs.
    pub fn active(&self) -> &Arc<CertificateAuthority> {
        &self.cas[0]
    }

    /// Every CA of the set, the signing one first.
    pub fn all(&self) -> &[Arc<CertificateAuthority>] {
        &self.cas
    }

    /// The certificates of every CA, PEM, the signing one first: what agents and listeners trust.
    pub fn bundle_pem(&self) -> String {
        let mut out = String::new();
        for c in &self.cas {
            out.push_str(c.cert_pem().trim_end());
            out.push('\n');
        }
        out
    }

    /// The CA with this certificate fingerprint, if it is in the set.
    pub fn get(&self, fingerprint: &Fingerprint) -> Option<&Arc<CertificateAuthority>> {
        self.cas.iter().find(|c| c.fingerprint() == *fingerprint)
    }

    /// An id of the set's membership (the first 8 bytes of the SHA-256 of its fingerprints, in
    /// order, hex): agents send the id of the set they trust, and the heartbeat reply carries the
    /// bundle only when it changed.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The set with `next` added as trusted, not signing (a rotation begins).
    pub fn with_next(&self, next: CertificateAuthority) -> Self {
        let mut cas = self.cas.clone();
        cas.retain(|c| c.fingerprint() != next.fingerprint());
        cas.push(Arc::new(next));
        Self::of(cas)
    }

    /// The set with the CA `fingerprint` signing and the former signer trusted; `None` if it is
    /// not in the set.
    pub fn promoted(&self, fingerprint: &Fingerprint) -> Option<Self> {
        let i = self
            .cas
            .iter()
            .position(|c| c.fingerprint() == *fingerprint)?;
        let mut cas = self.cas.clone();
        let ca = cas.remove(i);
        cas.insert(0, ca);
        Some(Self::of(cas))
    }

    /// The set without the CA `fingerprint`; `None` if it is the signing CA or not in the set.
    pub fn retired(&self, fingerprint: &Fingerprint) -> Option<Self> {
        let i = self
            .cas
            .iter()
            .position(|c| c.fingerprint() == *fingerprint)?;
        if i == 0 {
            return None;
        }
        let mut cas = self.cas.clone();
        cas.remove(i);
        Some(Self::of(cas))
    }

    /// The material a store keeps: certificates in PEM, keys sealed under `kek`.
    pub fn seal(&self, kek: &crate::seal::KeyEncryptionKey) -> Result<CaMaterial, CaError> {
        let mut keys = String::new();
        for ca in &self.cas {
            let line = kek
                .seal(
                    &ca.issuer.key().serialize_der(),
                    ca.fingerprint().as_bytes(),
                )
                .map_err(CaError::Sealed)?;
            keys.push_str(&line);
            keys.push('\n');
        }
        Ok(CaMaterial {
            cert_pem: self.bundle_pem(),
            key_pem: keys,
        })
    }

    /// Opens stored material with `kek`. Material in the clear (from before keys were sealed)
    /// opens without it; [`CaMaterial::is_clear`] says so, so that the caller seals it.
    pub fn open(
        m: &CaMaterial,
        kek: Option<&crate::seal::KeyEncryptionKey>,
    ) -> Result<Self, CaError> {
        if m.is_clear() {
            return Ok(Self::single(CertificateAuthority::from_pem(
                &m.cert_pem,
                &m.key_pem,
            )?));
        }
        let kek = kek.ok_or(CaError::KeyEncryptionKeyRequired)?;
        let certs: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(m.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| CaError::Load("the CA bundle is not PEM".into()))?;
        let keys: Vec<&str> = m.key_pem.lines().filter(|l| !l.trim().is_empty()).collect();
        if certs.is_empty() || certs.len() != keys.len() {
            return Err(CaError::Load(format!(
                "{} CA certificates but {} sealed keys",
                certs.len(),
                keys.len()
            )));
        }
        let mut cas = Vec::with_capacity(certs.len());
        for (cert, sealed) in certs.iter().zip(keys) {
            let der = kek
                .unseal(sealed, Fingerprint::of(&cert.contents).as_bytes())
                .map_err(CaError::Sealed)?;
            let key = KeyPair::try_from(der.as_slice())
                .map_err(|e| CaError::Load(format!("private key: {e}")))?;
            cas.push(Arc::new(CertificateAuthority::from_parts(
                &cert.contents,
                key,
            )?));
        }
        Ok(Self::of(cas))
    }
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// PEM text of one DER object (RFC 7468: base64 in lines of 64).
fn pem_of(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A certificate as the store records it for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Serial number.
    pub serial: Serial,
    /// End of validity.
    pub not_after: Timestamp,
}

/// A revoked (or superseded) certificate, kept until it would have expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCertificate {
    /// Serial number.
    pub serial: Serial,
    /// End of validity; the entry can be pruned after it.
    pub not_after: Timestamp,
    /// When it was revoked.
    pub revoked_at: Timestamp,
    /// Which instance it belonged to.
    pub instance: InstanceId,
}

/// A freshly issued certificate.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// DER encoding.
    pub der: Vec<u8>,
    /// PEM encoding.
    pub pem: String,
    /// What the store records.
    pub record: CertificateRecord,
    /// Start of validity.
    pub not_before: Timestamp,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// A server certificate with its freshly generated key.
#[derive(Clone)]
pub struct ServerCertificate {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Certificate DER.
    pub cert_der: Vec<u8>,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The fleet CA; see the module docs.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    cert_pem: String,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn odt(t: Timestamp) -> Result<time::OffsetDateTime, CaError> {
    t.to_offset_date_time().ok_or(CaError::TimeOutOfRange(t))
}

/// A DNS name: labels of 1–63 letters, digits and inner hyphens, at most 253 characters, with an
/// optional leading `*.` wildcard.
fn is_dns_name(name: &str) -> bool {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    !bare.is_empty()
        && name.len() <= 253
        && bare.split('.').all(|l| {
            let b = l.as_bytes();
            (1..=63).contains(&b.len())
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

fn serial_number(s: Serial) -> SerialNumber {
    SerialNumber::from_slice(s.as_bytes())
}

impl CertificateAuthority {
    /// Generates a new CA: a P-256 key and a self-signed certificate valid from `now` (backdated
    /// 5 minutes) for `validity`.
    pub fn generate(
        common_name: &str,
        now: Timestamp,
        validity: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "fleet");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(serial_number(Serial::random()?));
        params.not_before = odt(now.saturating_sub(Duration::from_secs(300)))?;
        params.not_after = odt(now.saturating_add(validity))?;
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let cert_der = cert.der().to_vec();
        let cert_pem = cert.pem();
        Ok(Self {
            fingerprint: Fingerprint::of(&cert_der),
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem,
        })
    }

    /// Loads a CA from its certificate and PKCS#8 private key (PEM). Fails if the key does not
    /// belong to the certificate or the certificate is not a CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CaError::Load(format!("private key: {e}")))?;
        let (_, block) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|_| CaError::Load("certificate is not PEM".into()))?;
        Self::from_parts(&block.contents, key)
    }

    /// A CA from its certificate (DER) and key, checked to belong together.
    fn from_parts(cert_der: &[u8], key: KeyPair) -> Result<Self, CaError> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|_| CaError::Load("certificate does not parse".into()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Load(
                "the private key does not belong to the certificate".into(),
            ));
        }
        if !cert.is_ca() {
            return Err(CaError::Load(
                "the certificate is not a CA certificate".into(),
            ));
        }
        let cert_der = cert_der.to_vec();
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| CaError::Load(format!("certificate: {e}")))?;
        let cert_pem = pem_of("CERTIFICATE", &cert_der);
        Ok(Self {
            fingerprint: Fingerprint::of(&cert_der),
            issuer,
            cert_pem,
            cert_der,
        })
    }

    /// The certificate and the private key in PEM, **the key in the clear**: for exporting the
    /// CA to a file or an offline backup of your own. Stores are given [`CaSet::seal`]'s sealed
    /// form instead.
    pub fn export_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.issuer.key().serialize_pem())
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate (DER): what agents pin on first contact.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Signs `csr` into a client certificate for `instance` of `tenant`; see the module docs.
    pub fn issue_client(
        &self,
        csr: &ValidatedCsr,
        instance: InstanceId,
        tenant: Option<&TenantId>,
        now: Timestamp,
        policy: &IssuancePolicy,
    ) -> Result<IssuedCertificate, CaError> {
        let record = CertificateRecord {
            serial: Serial::random()?,
            not_after: now.saturating_add(policy.client_validity),
        };
        self.sign_client(
            csr,
            instance,
            tenant,
            record,
            now.saturating_sub(policy.backdate),
        )
    }

    /// Signs `csr` again into the certificate `record` describes — the same serial and end of
    /// validity, so to the fleet it *is* that certificate — starting at `now` less the backdate.
    /// A retried enrollment gets its certificate this way: nothing in the store changes, so no
    /// certificate in use is retired.
    pub fn reissue_client(
        &self,
        csr: &ValidatedCsr,
        instance: InstanceId,
        tenant: Option<&TenantId>,
        record: CertificateRecord,
        now: Timestamp,
        policy: &IssuancePolicy,
    ) -> Result<IssuedCertificate, CaError> {
        let not_before = now.saturating_sub(policy.backdate).min(record.not_after);
        self.sign_client(csr, instance, tenant, record, not_before)
    }

    fn sign_client(
        &self,
        csr: &ValidatedCsr,
        instance: InstanceId,
        tenant: Option<&TenantId>,
        record: CertificateRecord,
        not_before: Timestamp,
    ) -> Result<IssuedCertificate, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, instance.to_string());
        let uri = instance_uri(instance, tenant);
        params.subject_alt_names = vec![SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| CaError::InvalidName(uri))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(serial_number(record.serial));
        params.not_before = odt(not_before)?;
        params.not_after = odt(record.not_after)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.params.public_key, &self.issuer)
            .map_err(CaError::Generate)?;
        Ok(IssuedCertificate {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            record,
            not_before,
        })
    }

    /// Issues a TLS server certificate (with a new P-256 key) for `names`: each a DNS name or an
    /// IP address. [`CaError::InvalidName`] for anything else.
    pub fn issue_server(
        &self,
        names: &[String],
        now: Timestamp,
        validity: Duration,
    ) -> Result<ServerCertificate, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("fleet control plane", |n| n),
        );
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(name) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|_| CaError::InvalidName(name.clone()))?,
                ),
                Err(_) => return Err(CaError::InvalidName(name.clone())),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(serial_number(Serial::random()?));
        params.not_before = odt(now.saturating_sub(Duration::from_secs(300)))?;
        params.not_after = odt(now.saturating_add(validity))?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        Ok(ServerCertificate {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        })
    }

    /// A CRL (PEM) listing `revoked`, numbered `number`, valid from `now` until `next_update`.
    pub fn crl(
        &self,
        revoked: &[RevokedCertificate],
        number: u64,
        now: Timestamp,
        next_update: Timestamp,
    ) -> Result<String, CaError> {
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: serial_number(r.serial),
                    revocation_time: odt(r.revoked_at)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let params = CertificateRevocationListParams {
            this_update: odt(now)?,
            next_update: odt(next_update)?,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(CaError::Generate)?;
        crl.pem().map_err(CaError::Generate)
    }

    /// Checks that `cert_der` was signed by this CA, **ignoring its validity period** (used to
    /// recognise an expired certificate on re-enrollment). Returns the certificate's public key
    /// fingerprint and serial.
    pub fn verify_issued_ignoring_time(&self, cert_der: &[u8]) -> Option<(Fingerprint, Serial)> {
        let (_, ca) = x509_parser::parse_x509_certificate(&self.cert_der).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
        cert.verify_signature(Some(ca.public_key())).ok()?;
        Some((
            Fingerprint::of(cert.public_key().raw),
            Serial::from_der_bytes(cert.raw_serial())?,
        ))
    }
}
