//! Identity: who a certificate says its holder is, and the small values that pin it down.
//!
//! Every client certificate the fleet CA issues names its holder in a URI subject alternative
//! name:
//!
//! ```text
//! spiffe://fleet/instances/<instance-uuid>                      (no tenant)
//! spiffe://fleet/tenants/<tenant>/instances/<instance-uuid>     (tenant-scoped)
//! ```
//!
//! A transport that has verified a client certificate against the fleet CA turns it into an
//! [`InstanceIdentity`] with [`InstanceIdentity::from_certificate_der`]; the fleet then checks the
//! certificate's [`Serial`] against the instance's current one, so a superseded or revoked
//! certificate is refused on the next request even though it still chains to the CA.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::{InstanceId, TenantId};

/// The trust domain in certificate URIs.
pub const TRUST_DOMAIN: &str = "fleet";

/// A certificate serial number: 16 random bytes, the first in `0x40..=0x7f` so that the DER
/// encoding is exactly these bytes (positive, no leading zero).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(pub(crate) [u8; 16]);

impl Serial {
    /// A fresh random serial from the operating system's CSPRNG.
    pub fn random() -> Result<Self, crate::ca::CaError> {
        let mut b = [0u8; 16];
        crate::random::fill(&mut b).map_err(|_| crate::ca::CaError::Random)?;
        b[0] = (b[0] & 0x3f) | 0x40;
        Ok(Self(b))
    }

    /// A serial from its bytes as they appear in a certificate (leading zero bytes ignored);
    /// `None` when longer than 16 significant bytes.
    pub fn from_der_bytes(bytes: &[u8]) -> Option<Self> {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        let significant = &bytes[start..];
        if significant.len() > 16 {
            return None;
        }
        let mut b = [0u8; 16];
        b[16 - significant.len()..].copy_from_slice(significant);
        Some(Self(b))
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

fn parse_hex<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], ValidationError> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    if clean.len() != N * 2 {
        return Err(ValidationError::new(what, s, "has the wrong length"));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&clean[i * 2..i * 2 + 2], 16)
            .map_err(|_| ValidationError::new(what, s, "is not hexadecimal"))?;
    }
    Ok(out)
}

impl FromStr for Serial {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<16>("serial", s).map(Self)
    }
}

impl Serialize for Serial {
    /// Hex text in human-readable formats (JSON), the raw bytes in binary ones.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Serial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return <[u8; 16]>::deserialize(d).map(Self);
        }
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// SHA-256 of a DER structure: a public key (SubjectPublicKeyInfo) or a certificate. Printed as
/// lowercase hex, the form `openssl ... -outform DER | sha256sum` prints.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub(crate) [u8; 32]);

impl Fingerprint {
    /// SHA-256 of `der`.
    pub fn of(der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex::<32>("fingerprint", s).map(Self)
    }
}

impl Serialize for Fingerprint {
    /// Hex text in human-readable formats (JSON), the raw bytes in binary ones.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return <[u8; 32]>::deserialize(d).map(Self);
        }
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The identity a verified client certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceIdentity {
    /// The instance.
    pub instance: InstanceId,
    /// Its tenant, as written in the certificate.
    pub tenant: Option<TenantId>,
    /// The certificate's serial.
    pub serial: Serial,
}

/// Why a certificate does not carry a fleet identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not a parseable X.509 certificate.
    #[error("not a valid X.509 certificate")]
    Malformed,
    /// No `spiffe://fleet/...` URI naming an instance (or more than one).
    #[error("the certificate does not name exactly one fleet instance")]
    NoInstanceUri,
    /// The serial number is longer than the 16 bytes the fleet CA issues.
    #[error("the certificate serial is not one the fleet CA issues")]
    BadSerial,
}

/// The URI naming `instance` of `tenant` in its certificate.
pub fn instance_uri(instance: InstanceId, tenant: Option<&TenantId>) -> String {
    match tenant {
        Some(t) => format!("spiffe://{TRUST_DOMAIN}/tenants/{t}/instances/{instance}"),
        None => format!("spiffe://{TRUST_DOMAIN}/instances/{instance}"),
    }
}

/// Parses a URI written by [`instance_uri`].
pub fn parse_instance_uri(uri: &str) -> Option<(InstanceId, Option<TenantId>)> {
    let path = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(TRUST_DOMAIN)?
        .strip_prefix('/')?;
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["instances", id] => Some((id.parse().ok()?, None)),
        ["tenants", t, "instances", id] => Some((id.parse().ok()?, Some(TenantId::new(*t).ok()?))),
        _ => None,
    }
}

impl InstanceIdentity {
    /// Reads the identity from a client certificate (DER) that the transport has **already
    /// verified** against the fleet CA. This does not verify anything itself.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Malformed)?;
        let serial = Serial::from_der_bytes(cert.raw_serial()).ok_or(IdentityError::BadSerial)?;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::Malformed)?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && let Some(id) = parse_instance_uri(uri)
            {
                if found.is_some() {
                    return Err(IdentityError::NoInstanceUri);
                }
                found = Some(id);
            }
        }
        let (instance, tenant) = found.ok_or(IdentityError::NoInstanceUri)?;
        Ok(Self {
            instance,
            tenant,
            serial,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = InstanceId::from_u128(42);
        let t = TenantId::new("acme").unwrap();
        assert_eq!(
            parse_instance_uri(&instance_uri(id, Some(&t))),
            Some((id, Some(t)))
        );
        assert_eq!(
            parse_instance_uri(&instance_uri(id, None)),
            Some((id, None))
        );
        assert_eq!(
            parse_instance_uri("spiffe://other/instances/00000000-0000-0000-0000-00000000002a"),
            None
        );
        assert_eq!(parse_instance_uri("spiffe://fleet/instances/nope"), None);
    }

    #[test]
    fn serial_forms() {
        let s = Serial::random().unwrap();
        assert!((0x40..=0x7f).contains(&s.0[0]));
        assert_eq!(s.to_string().parse::<Serial>().unwrap(), s);
        let mut padded = vec![0u8];
        padded.extend_from_slice(&s.0);
        assert_eq!(Serial::from_der_bytes(&padded), Some(s));
        assert_eq!(Serial::from_der_bytes(&[1; 17]), None);
    }

    #[test]
    fn fingerprint_is_sha256() {
        assert_eq!(
            Fingerprint::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
