//! Protocol errors: stable codes, their HTTP statuses, and the mapping from fleet-core's errors.

use std::fmt;

use fleet_core::{AuthError, EnrollError, FleetError, RenewError, StoreError};
use serde::{Deserialize, Serialize};

/// Every error the protocol reports. The snake_case names are stable; new codes may be added.
///
/// **Forward compatibility.** A code this build does not know (sent by a newer server)
/// deserializes as [`ErrorCode::Unknown`] instead of failing, so a deployed agent still reports
/// the server's refusal — with its HTTP status and message — rather than "unexpected reply".
/// Servers never send `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not valid JSON for the route, or breaks a documented rule (400).
    MalformedRequest,
    /// The instance's system info, metrics or apps break a documented limit (400).
    InvalidInput,
    /// The CSR was refused: not PEM, malformed, unsupported key, CA rights, bad signature (400).
    InvalidCsr,
    /// No client certificate on a route that needs one (401).
    Unauthenticated,
    /// Unknown, malformed or wrong registration token (401).
    InvalidToken,
    /// The registration token expired (401).
    TokenExpired,
    /// The registration token was revoked (403).
    TokenRevoked,
    /// The registration token has no uses left (403).
    TokenExhausted,
    /// Re-enrollment refused (403).
    ReenrollRefused,
    /// The client certificate was revoked or superseded, or its instance deregistered (403).
    CertificateRevoked,
    /// No such route (404).
    NotFound,
    /// The route exists but not for this method (405).
    MethodNotAllowed,
    /// The body is larger than the route allows (413).
    BodyTooLarge,
    /// The request is not `application/json` (415).
    UnsupportedMediaType,
    /// Too many failed attempts from this address; retry later (429).
    RateLimited,
    /// The store is unavailable; retry later (503).
    StoreUnavailable,
    /// Anything else; the server logged it (500).
    Internal,
    /// A code this build does not know, from a newer peer (read only; never sent). Its HTTP
    /// status is the one the response carried; [`ErrorCode::http_status`] says 500.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status that carries this code.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::MalformedRequest | Self::InvalidInput | Self::InvalidCsr => 400,
            Self::Unauthenticated | Self::InvalidToken | Self::TokenExpired => 401,
            Self::TokenRevoked
            | Self::TokenExhausted
            | Self::ReenrollRefused
            | Self::CertificateRevoked => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::BodyTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::RateLimited => 429,
            Self::StoreUnavailable => 503,
            Self::Internal | Self::Unknown => 500,
        }
    }

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed_request",
            Self::InvalidInput => "invalid_input",
            Self::InvalidCsr => "invalid_csr",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidToken => "invalid_token",
            Self::TokenExpired => "token_expired",
            Self::TokenRevoked => "token_revoked",
            Self::TokenExhausted => "token_exhausted",
            Self::ReenrollRefused => "reenroll_refused",
            Self::CertificateRevoked => "certificate_revoked",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BodyTooLarge => "body_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited => "rate_limited",
            Self::StoreUnavailable => "store_unavailable",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }

    /// Every code a server sends, for documentation and tests ([`ErrorCode::Unknown`] is only
    /// ever read).
    pub const ALL: [Self; 17] = [
        Self::MalformedRequest,
        Self::InvalidInput,
        Self::InvalidCsr,
        Self::Unauthenticated,
        Self::InvalidToken,
        Self::TokenExpired,
        Self::TokenRevoked,
        Self::TokenExhausted,
        Self::ReenrollRefused,
        Self::CertificateRevoked,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::BodyTooLarge,
        Self::UnsupportedMediaType,
        Self::RateLimited,
        Self::StoreUnavailable,
        Self::Internal,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error response: `{"error":{"code","message","field"?}}`.
///
/// Readers accept fields they do not know (a newer server may add some), so the shape can grow
/// without breaking deployed agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The code, a human-readable message and, where one input caused it, that input's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: ErrorCode,
    /// What went wrong, for people; not to be parsed.
    pub message: String,
    /// The request field that was refused (e.g. `metrics.load_1m`), when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorBody {
    /// An error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                field: None,
            },
        }
    }

    /// The same error, naming the request field that caused it.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.error.field = Some(field.into());
        self
    }
}

fn store_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::Unavailable { .. } => ErrorCode::StoreUnavailable,
        _ => ErrorCode::Internal,
    }
}

impl From<&EnrollError> for ErrorCode {
    fn from(e: &EnrollError) -> Self {
        match e {
            EnrollError::InvalidToken => Self::InvalidToken,
            EnrollError::TokenExpired => Self::TokenExpired,
            EnrollError::TokenRevoked => Self::TokenRevoked,
            EnrollError::TokenExhausted => Self::TokenExhausted,
            EnrollError::Csr(_) => Self::InvalidCsr,
            EnrollError::Invalid(_) => Self::InvalidInput,
            EnrollError::ReenrollRefused(_) => Self::ReenrollRefused,
            EnrollError::RateLimited { .. } => Self::RateLimited,
            EnrollError::Store(s) => store_code(s),
            _ => Self::Internal,
        }
    }
}

impl From<&AuthError> for ErrorCode {
    fn from(e: &AuthError) -> Self {
        match e {
            AuthError::UnknownInstance | AuthError::CertificateRevoked => Self::CertificateRevoked,
            AuthError::Store(s) => store_code(s),
            _ => Self::Internal,
        }
    }
}

impl From<&RenewError> for ErrorCode {
    fn from(e: &RenewError) -> Self {
        match e {
            RenewError::Auth(a) => a.into(),
            RenewError::Csr(_) => Self::InvalidCsr,
            RenewError::RateLimited { .. } => Self::RateLimited,
            RenewError::Store(s) => store_code(s),
            _ => Self::Internal,
        }
    }
}

impl From<&FleetError> for ErrorCode {
    fn from(e: &FleetError) -> Self {
        match e {
            FleetError::Invalid(_) | FleetError::Filter(_) => Self::InvalidInput,
            FleetError::InstanceNotFound(_) => Self::CertificateRevoked,
            FleetError::Store(s) => store_code(s),
            _ => Self::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names_and_map_to_statuses() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
            assert!((400..600).contains(&code.http_status()));
        }
        let body = ErrorBody::new(
            ErrorCode::TokenExpired,
            "the registration token has expired",
        );
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":{"code":"token_expired","message":"the registration token has expired"}}"#
        );
    }

    #[test]
    fn a_newer_peers_codes_and_fields_are_read_not_refused() {
        // What a newer server might send: a code this build has never heard of, a field in the
        // detail and one beside it.
        let newer = r#"{"error":{"code":"quota_exceeded","message":"slow down","field":"metrics","hint":"x"},"trace":"abc"}"#;
        let body: ErrorBody = serde_json::from_str(newer).unwrap();
        assert_eq!(body.error.code, ErrorCode::Unknown);
        assert_eq!(body.error.message, "slow down");
        assert_eq!(body.error.field.as_deref(), Some("metrics"));
        assert!(!ErrorCode::ALL.contains(&ErrorCode::Unknown));
        let named =
            ErrorBody::new(ErrorCode::InvalidInput, "too big").with_field("metrics.load_1m");
        assert_eq!(
            serde_json::to_string(&named).unwrap(),
            r#"{"error":{"code":"invalid_input","message":"too big","field":"metrics.load_1m"}}"#
        );
    }

    #[test]
    fn core_errors_map_to_codes() {
        assert_eq!(
            ErrorCode::from(&EnrollError::TokenExhausted).http_status(),
            403
        );
        assert_eq!(
            ErrorCode::from(&EnrollError::InvalidToken),
            ErrorCode::InvalidToken
        );
        let down = StoreError::Unavailable {
            source: "down".into(),
        };
        assert_eq!(
            ErrorCode::from(&EnrollError::Store(down)),
            ErrorCode::StoreUnavailable
        );
        assert_eq!(
            ErrorCode::from(&AuthError::CertificateRevoked).http_status(),
            403
        );
    }
}
