//! On-disk encoding: every value is one format-version byte followed by a postcard body; keys
//! that are scanned in order are big-endian.

use fleet_core::StoreError;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Version of the value encoding. A store written with another version is refused at open.
pub(crate) const VALUE_VERSION: u8 = 1;

/// Encodes a value.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(value, vec![VALUE_VERSION]).map_err(|e| StoreError::Backend {
        backend: "sled",
        source: Box::new(e),
    })
}

/// Decodes a value, naming `what` (tree and key) in the error.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| StoreError::Corrupt {
                detail: format!("cannot decode {}", what()),
                source: Some(Box::new(e)),
            })
        }
        Some((v, _)) => Err(StoreError::Corrupt {
            detail: format!(
                "{} has value format version {v}, this build reads {VALUE_VERSION}",
                what()
            ),
            source: None,
        }),
        None => Err(StoreError::Corrupt {
            detail: format!("{} is empty", what()),
            source: None,
        }),
    }
}

/// A big-endian `u64` key.
pub(crate) fn u64_key(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Reads a big-endian `u64` (a missing or short value reads as 0).
pub(crate) fn read_u64(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let v = (1u64, "x".to_string());
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[0], VALUE_VERSION);
        let back: (u64, String) = decode(&bytes, || "test".into()).unwrap();
        assert_eq!(back, v);
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        let err = decode::<(u64, String)>(&wrong, || "instances/abc".into()).unwrap_err();
        assert!(err.to_string().contains("instances/abc"), "{err}");
        assert!(decode::<(u64, String)>(&[], || "k".into()).is_err());
        assert!(decode::<(u64, String)>(&[VALUE_VERSION, 0xff], || "k".into()).is_err());
    }
}
