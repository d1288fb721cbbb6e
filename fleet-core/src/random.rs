//! Random bytes from the operating system's CSPRNG (via `ring`), for token secrets, token ids and
//! certificate serials.

use ring::rand::{SecureRandom, SystemRandom};

/// The CSPRNG failed (the OS refused to provide randomness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Fills `buf` with random bytes.
pub(crate) fn fill(buf: &mut [u8]) -> Result<(), RandomError> {
    SystemRandom::new().fill(buf).map_err(|_| RandomError)
}

/// `len` characters drawn uniformly from `a–z 0–9` (5.17 bits each).
pub(crate) fn alphanumeric(len: usize) -> Result<String, RandomError> {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        fill(&mut buf)?;
        // 252 = 7 × 36: rejecting bytes ≥ 252 keeps the draw uniform.
        for &b in buf.iter().filter(|&&b| b < 252) {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(b % 36)]));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn alphanumeric_has_the_length_and_alphabet() {
        let s = super::alphanumeric(100).unwrap();
        assert_eq!(s.len(), 100);
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_ne!(s, super::alphanumeric(100).unwrap());
    }
}
