//! # fleet-agent-proto
//!
//! Protocol v1 between fleet agents and the control plane: JSON over HTTPS (HTTP/1.1 or HTTP/2),
//! `Content-Type: application/json`, versioned paths.
//!
//! | route | authentication | request | response |
//! |---|---|---|---|
//! | `POST /v1/enroll` | TLS, no client certificate; the registration token in the body | [`EnrollRequest`] (≤ 16 KiB) | [`EnrollResponse`] |
//! | `POST /v1/heartbeat` | client certificate issued by the fleet CA | [`HeartbeatRequest`] (≤ 256 KiB) | [`HeartbeatResponse`] |
//! | `POST /v1/renew` | client certificate issued by the fleet CA | [`RenewRequest`] (≤ 16 KiB) | [`RenewResponse`] |
//!
//! Every error is an [`ErrorBody`], `{"error": {"code": "...", "message": "..."}}`, with the HTTP
//! status of its [`ErrorCode`]; codes are stable snake_case strings.
//!
//! ```
//! use fleet_agent_proto::{HeartbeatRequest, HeartbeatResponse};
//!
//! // `{}` is a valid, liveness-only heartbeat.
//! let hb: HeartbeatRequest = serde_json::from_str("{}")?;
//! assert!(hb.metrics.is_none());
//! let reply = HeartbeatResponse {
//!     commands: vec![],
//!     next_heartbeat_secs: 15,
//!     ca_bundle_pem: None,
//!     renew_now: false,
//! };
//! assert_eq!(serde_json::to_string(&reply)?, r#"{"commands":[],"next_heartbeat_secs":15}"#);
//! # Ok::<(), serde_json::Error>(())
//! ```
//!
//! Feature `server`: [`server::AgentServer`], a hyper + rustls server for these routes that any
//! control plane can run. Feature `client`: [`client`], the agent side — enrollment with CA pinning
//! by fingerprint, heartbeats and renewal over mTLS, and the cadence helpers (jitter, backoff,
//! renewal time).

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod error;
mod messages;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod runner;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;

/// The only TLS version either end speaks: TLS 1.3. Under TLS 1.2 a client certificate — which
/// names the tenant, the instance and the serial — crosses the wire in clear; agents are ours, so
/// nothing older is needed.
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) const TLS_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider of both ends: `ring`, with the AES-128-GCM suites first. Their SHA-256
/// key schedule runs on the SHA extensions of current x86 and ARM cores, where SHA-384's does
/// not: a full handshake costs the server measurably less (see `fleet-bench reconnect`), and
/// AES-128 keeps the margin TLS needs.
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        let aes128 = matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        );
        (s.tls13().is_none(), !aes128)
    });
    std::sync::Arc::new(provider)
}

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use fleet_core;
pub use fleet_core::CommandOutcome;
/// Longest command output the server keeps; longer output is cut at a character boundary.
pub use fleet_core::command::MAX_COMMAND_OUTPUT;
pub use messages::{
    AgentCommand, CommandResult, EnrollRequest, EnrollResponse, HeartbeatRequest,
    HeartbeatResponse, RenewRequest, RenewResponse,
};

use std::time::Duration;

/// The protocol version, as it appears in paths.
pub const VERSION: &str = "v1";
/// Path of the enrollment route.
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Path of the heartbeat route.
pub const HEARTBEAT_PATH: &str = "/v1/heartbeat";
/// Path of the renewal route.
pub const RENEW_PATH: &str = "/v1/renew";
/// The request header in which an agent names the set of CAs it trusts ([`fleet_core::ca::set_id`]
/// of its bundle); the heartbeat reply carries the current bundle when the set differs. A header,
/// not a body field, so that servers from before rotation ignore it.
pub const CA_SET_HEADER: &str = "fleet-ca-set";
/// The one accepted request content type.
pub const CONTENT_TYPE: &str = "application/json";

/// Largest enrollment request body.
pub const MAX_ENROLL_BODY: usize = 16 * 1024;
/// Largest heartbeat request body (room for command results; see [`runner`]).
pub const MAX_HEARTBEAT_BODY: usize = 256 * 1024;
/// Largest renewal request body.
pub const MAX_RENEW_BODY: usize = 16 * 1024;

/// Default time a server gives a client to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a server gives a client to complete the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time after which a server closes a keep-alive connection: longer than two
/// heartbeat intervals, so agents keep their connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default time a server gives a request from its headers to its answer, the whole body
/// included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
