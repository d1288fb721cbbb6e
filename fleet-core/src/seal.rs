//! Sealing the CA's private keys: no store holds them in the clear.
//!
//! A store keeps each CA key **sealed** with AES-256-GCM (ring) under a [`KeyEncryptionKey`] that
//! lives outside the store — a 0600 file beside the data directory, or an environment variable
//! shared by replicas — so a copy of the sled directory or a `pg_dump` alone cannot sign. The
//! additional authenticated data is the SHA-256 of the CA certificate, so a sealed key cannot be
//! swapped onto another certificate.
//!
//! A sealed key is one line of text:
//!
//! ```text
//! fleet-sealed-key-v1:<key-encryption key id, 16 hex>:<nonce, 24 hex>:<ciphertext and tag, hex>
//! ```
//!
//! The id is the first 8 bytes of the SHA-256 of the key-encryption key: a store sealed under
//! another key is refused with both ids named, never mistaken for corruption.
//!
//! # Rotating the key-encryption key
//!
//! [`Fleet::reseal_ca`](crate::Fleet::reseal_ca) seals the stored CA keys under a new
//! key-encryption key in one atomic store update; start every replica with the new key
//! afterwards. To rotate: generate a new key (`KeyEncryptionKey::generate`), open the fleet with
//! the old one, call `reseal_ca(new)`, then replace the key file (or variable) of every replica
//! and restart them. Until they restart, replicas still holding the old key keep signing with the
//! CA they unsealed at start-up.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Prefix of a sealed key's text.
pub const SEALED_PREFIX: &str = "fleet-sealed-key-v1";

/// Why a key could not be sealed or unsealed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The key was sealed under another key-encryption key.
    #[error("the CA key is sealed with key-encryption key {sealed_with}; this process has {have}")]
    WrongKey {
        /// Id of the key that sealed it.
        sealed_with: String,
        /// Id of the key given.
        have: String,
    },
    /// Not a sealed key of this format.
    #[error("malformed sealed key: {0}")]
    Malformed(&'static str),
    /// Authentication failed: the sealed key or its certificate was altered.
    #[error("the sealed CA key does not authenticate (altered, or sealed for another certificate)")]
    Tampered,
    /// A key-encryption key's text is not 64 hex digits.
    #[error("a key-encryption key is 64 hex digits (32 bytes)")]
    BadKeyText,
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// A 256-bit key-encryption key; see the module docs. Its `Debug` shows only its id.
#[derive(Clone)]
pub struct KeyEncryptionKey {
    key: [u8; 32],
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEncryptionKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

impl KeyEncryptionKey {
    /// A new random key.
    pub fn generate() -> Result<Self, SealError> {
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| SealError::Random)?;
        Ok(Self { key })
    }

    /// The key with these bytes.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Reads a key from its text form: 64 hex digits, surrounding whitespace ignored (what
    /// [`expose_hex`](Self::expose_hex) writes, e.g. into a 0600 file).
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let bytes = unhex(text.trim()).ok_or(SealError::BadKeyText)?;
        let key = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| SealError::BadKeyText)?;
        Ok(Self { key })
    }

    /// The key as 64 hex digits — the secret itself: write it only where it is to be kept.
    pub fn expose_hex(&self) -> String {
        hex(&self.key)
    }

    /// The key's public id: the first 8 bytes of its SHA-256, hex.
    pub fn id(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.key);
        hex(&digest.as_ref()[..8])
    }

    fn aead(&self) -> Result<LessSafeKey, SealError> {
        UnboundKey::new(&AES_256_GCM, &self.key)
            .map(LessSafeKey::new)
            .map_err(|_| SealError::Malformed("key length"))
    }

    /// Seals `secret`, bound to `aad`, into one line of text.
    pub fn seal(&self, secret: &[u8], aad: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut data = secret.to_vec();
        self.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .map_err(|_| SealError::Malformed("sealing failed"))?;
        Ok(format!(
            "{SEALED_PREFIX}:{}:{}:{}",
            self.id(),
            hex(&nonce),
            hex(&data)
        ))
    }

    /// Opens text that [`seal`](Self::seal) made with this key for the same `aad`.
    pub fn unseal(&self, sealed: &str, aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut parts = sealed.trim().split(':');
        if parts.next() != Some(SEALED_PREFIX) {
            return Err(SealError::Malformed("not a sealed key"));
        }
        let (Some(id), Some(nonce), Some(data), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError::Malformed("expected four fields"));
        };
        if id != self.id() {
            return Err(SealError::WrongKey {
                sealed_with: id.to_owned(),
                have: self.id(),
            });
        }
        let nonce = unhex(nonce)
            .and_then(|n| <[u8; NONCE_LEN]>::try_from(n.as_slice()).ok())
            .ok_or(SealError::Malformed("nonce"))?;
        let mut data = unhex(data).ok_or(SealError::Malformed("ciphertext"))?;
        let plain = self
            .aead()?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .map_err(|_| SealError::Tampered)?;
        Ok(plain.to_vec())
    }
}

/// Whether `text` is a sealed key (rather than, say, a PEM private key in the clear).
pub fn is_sealed(text: &str) -> bool {
    text.trim_start().starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_refusals() {
        let kek = KeyEncryptionKey::generate().unwrap();
        let sealed = kek.seal(b"private key", b"cert-a").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("private key"));
        assert_eq!(kek.unseal(&sealed, b"cert-a").unwrap(), b"private key");
        // Another certificate, another key, a flipped byte: refused.
        assert!(matches!(
            kek.unseal(&sealed, b"cert-b"),
            Err(SealError::Tampered)
        ));
        let other = KeyEncryptionKey::generate().unwrap();
        match other.unseal(&sealed, b"cert-a") {
            Err(SealError::WrongKey { sealed_with, have }) => {
                assert_eq!(sealed_with, kek.id());
                assert_eq!(have, other.id());
            }
            r => panic!("{r:?}"),
        }
        let mut flipped = sealed.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            kek.unseal(std::str::from_utf8(&flipped).unwrap(), b"cert-a"),
            Err(SealError::Tampered)
        ));
        assert!(kek.unseal("-----BEGIN PRIVATE KEY-----", b"").is_err());
        // Text form.
        assert_eq!(
            KeyEncryptionKey::parse(&format!(" {}\n", kek.expose_hex()))
                .unwrap()
                .id(),
            kek.id()
        );
        assert!(KeyEncryptionKey::parse("abc").is_err());
        assert!(!format!("{kek:?}").contains(&kek.expose_hex()));
    }
}
