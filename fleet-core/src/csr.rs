//! Certificate signing requests: what the fleet CA accepts, checked cheapest first.
//!
//! 1. At most [`MAX_CSR_BYTES`] of PEM, labelled `CERTIFICATE REQUEST`.
//! 2. A well-formed PKCS#10 structure.
//! 3. A public key of an accepted type: ECDSA P-256, Ed25519, or RSA with a 2048–4096-bit
//!    modulus. Anything else (P-384, RSA-1024, DSA, …) is refused.
//! 4. No request for CA rights (`basicConstraints` with `cA` true) and no extension other than
//!    key usage, extended key usage, subject alternative names and basic constraints.
//! 5. Only then the signature, proving possession of the private key.
//!
//! Whatever subject, names or usages a CSR asks for are ignored: the CA decides them
//! ([`crate::ca`]). The CSR contributes only its public key.

use rcgen::CertificateSigningRequestParams;
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

use crate::identity::Fingerprint;

/// Largest accepted CSR, in bytes of PEM.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Smallest accepted RSA modulus, bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest accepted RSA modulus, bits.
pub const MAX_RSA_BITS: usize = 4096;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// The type of key a CSR carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256.
    EcdsaP256,
    /// Ed25519.
    Ed25519,
    /// RSA with this modulus size.
    Rsa {
        /// Modulus bits.
        bits: usize,
    },
}

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Larger than [`MAX_CSR_BYTES`].
    #[error("CSR is {size} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not a PEM `CERTIFICATE REQUEST` block.
    #[error("not a PEM-encoded CERTIFICATE REQUEST")]
    NotPem,
    /// The PKCS#10 structure did not parse.
    #[error("malformed certificate request")]
    Malformed,
    /// A key type the CA does not accept.
    #[error("unsupported key type {0}: use ECDSA P-256, Ed25519 or RSA 2048-4096")]
    UnsupportedKey(String),
    /// An RSA key outside 2048–4096 bits.
    #[error("RSA key of {bits} bits: only 2048-4096 bits are accepted")]
    RsaKeySize {
        /// Its size.
        bits: usize,
    },
    /// The CSR asks to be a CA.
    #[error("the CSR requests CA rights")]
    RequestsCa,
    /// The CSR asks for an extension the CA does not understand.
    #[error("the CSR requests an unsupported extension")]
    UnsupportedExtension,
    /// The signature does not verify with the CSR's own key.
    #[error("the CSR signature does not verify")]
    BadSignature,
}

/// A CSR that passed every check.
#[derive(Debug)]
pub struct ValidatedCsr {
    pub(crate) params: CertificateSigningRequestParams,
    key_fingerprint: Fingerprint,
    algorithm: KeyAlgorithm,
}

impl ValidatedCsr {
    /// SHA-256 of the CSR's SubjectPublicKeyInfo (DER).
    pub fn key_fingerprint(&self) -> Fingerprint {
        self.key_fingerprint
    }

    /// The key type.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }
}

fn key_algorithm(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyAlgorithm, CsrError> {
    let oid = spki.algorithm.algorithm.to_id_string();
    match oid.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            if curve == OID_P256 {
                Ok(KeyAlgorithm::EcdsaP256)
            } else {
                Err(CsrError::UnsupportedKey(format!("EC curve {curve}")))
            }
        }
        OID_ED25519 => Ok(KeyAlgorithm::Ed25519),
        OID_RSA => match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                let bits = rsa.key_size();
                if (MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                    Ok(KeyAlgorithm::Rsa { bits })
                } else {
                    Err(CsrError::RsaKeySize { bits })
                }
            }
            _ => Err(CsrError::Malformed),
        },
        other => Err(CsrError::UnsupportedKey(other.to_string())),
    }
}

/// Checks a PEM CSR as described in the module docs.
pub fn validate_csr(pem: &str) -> Result<ValidatedCsr, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge { size: pem.len() });
    }
    let (_, block) = parse_x509_pem(pem.as_bytes()).map_err(|_| CsrError::NotPem)?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(CsrError::NotPem);
    }
    let der = block.contents;
    let (rest, req) = X509CertificationRequest::from_der(&der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let info = &req.certification_request_info;
    let algorithm = key_algorithm(&info.subject_pki)?;
    let key_fingerprint = Fingerprint::of(info.subject_pki.raw);
    if let Some(extensions) = req.requested_extensions() {
        for ext in extensions {
            match ext {
                ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::RequestsCa),
                ParsedExtension::BasicConstraints(_)
                | ParsedExtension::KeyUsage(_)
                | ParsedExtension::ExtendedKeyUsage(_)
                | ParsedExtension::SubjectAlternativeName(_) => {}
                _ => return Err(CsrError::UnsupportedExtension),
            }
        }
    }
    // The expensive part, last: rcgen verifies the signature while building its parameters.
    let params =
        CertificateSigningRequestParams::from_der(&der.as_slice().into()).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
            rcgen::Error::UnsupportedExtension => CsrError::UnsupportedExtension,
            rcgen::Error::UnsupportedSignatureAlgorithm => {
                CsrError::UnsupportedKey("signature algorithm".into())
            }
            _ => CsrError::Malformed,
        })?;
    Ok(ValidatedCsr {
        params,
        key_fingerprint,
        algorithm,
    })
}
