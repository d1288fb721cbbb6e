//! The agent server (feature `server`): protocol v1 over HTTPS with hyper 1.x and rustls.
//!
//! One listener serves both enrollment (TLS without a client certificate; the token authenticates)
//! and the mTLS routes (the client certificate authenticates). rustls verifies any client
//! certificate presented against the fleet CA during the handshake — a certificate from another
//! CA fails the handshake — and each route enforces its own authentication: the heartbeat and
//! renewal routes answer `401 unauthenticated` without a certificate and check the certificate's
//! serial against the instance's current one, so revocation applies to the next request.
//!
//! Protections, each configurable in [`ServerConfig`] with defaults that hold: every connection
//! is accepted and admitted to one of two budgets — *pending* (handshaking or not yet verified,
//! capped per source with IPv6 counted by /64) and *verified* (a request authenticated its
//! certificate, capped per instance) — so that when full the unauthenticated are shed first and
//! an agent is never locked out by an attacker's connections; deadlines for the TLS handshake,
//! the first and every next request, the whole request body and idle connections, on HTTP/1.1
//! and HTTP/2 alike, counted in progress rather than bytes; HTTP/2 stream, header and window
//! limits; body limits per route. Refusals are delivered on HTTP/2 too (see [`DRAIN_LIMIT`]).
//! Failed token attempts are limited per source by the fleet itself ([`fleet_core::limiter`],
//! answering `429 rate_limited` with `Retry-After`; a valid token is never refused by it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::ca::{CaSet, ServerCertificate};
use fleet_core::identity::Fingerprint;
use fleet_core::store::FleetStore;
use fleet_core::{
    EnrollError, Fleet, FleetError, Heartbeat, InstanceIdentity, RenewError, ValidationError,
};
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Serialize;
use std::sync::PoisonError;
use tokio::net::TcpListener;

mod admission;
mod body;
mod conn;

pub use admission::AdmissionCounts;
use admission::{Admission, Budgets};
pub use body::DRAIN_LIMIT;
use body::read_json;
use conn::Conn;

use crate::{
    AgentCommand, CA_SET_HEADER, CONTENT_TYPE as JSON, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TLS_HANDSHAKE_TIMEOUT, ENROLL_PATH,
    EnrollRequest, EnrollResponse, ErrorBody, ErrorCode, HEARTBEAT_PATH, HeartbeatRequest,
    HeartbeatResponse, MAX_ENROLL_BODY, MAX_HEARTBEAT_BODY, MAX_RENEW_BODY, RENEW_PATH,
    RenewRequest, RenewResponse,
};

/// Server limits and deadlines. Every field has a default that holds against the attacks
/// described in `SECURITY.md`; [`ServerConfig::default`] documents them.
///
/// Deadlines count *progress* — a request starting, a request answered — not bytes, so a client
/// trickling one byte a second does not keep a connection alive. One watchdog per connection
/// enforces them, on time (no timer per request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Time a client has to complete the TLS handshake, counted from the accept.
    pub tls_handshake_timeout: Duration,
    /// Time a connection without a verified certificate may go without progress: its first
    /// request must arrive within it after the handshake (on HTTP/1.1 and HTTP/2 alike), and so
    /// must each next one. HTTP/1.1 request headers must also arrive within it.
    pub header_read_timeout: Duration,
    /// Time a request may take from its headers to its answer — the whole body included — on
    /// every connection (the whole-body deadline). Refusals read the rest of a body of at most
    /// 1 MiB within it so that HTTP/2 clients receive them (see `SECURITY.md`).
    pub request_timeout: Duration,
    /// Time a verified connection (an agent's) may stay idle between requests (keep it above two
    /// heartbeat intervals so agents keep their connections).
    pub idle_timeout: Duration,
    /// Connections handshaking or not yet verified, in total. When full, the oldest connection of
    /// the source holding the most is closed to admit a new one.
    pub max_pending_connections: usize,
    /// Pending connections per source (an IPv4 address or an IPv6 /64); at the cap the
    /// source's own oldest is closed. The default, a quarter of the pending budget, lets a site
    /// behind one NAT address enroll 256 machines at the same instant; beyond that its oldest
    /// handshakes are closed and its agents retry with backoff.
    pub max_pending_per_source: usize,
    /// Verified connections (a request authenticated with a current certificate), in total.
    /// When full, a verified connection is served as a pending one until a slot frees.
    pub max_connections: usize,
    /// Verified connections per instance; an instance at its cap loses its oldest.
    pub max_connections_per_instance: usize,
    /// HTTP/2 streams a client may open at once on one connection.
    pub http2_max_concurrent_streams: u32,
    /// Largest request header section, in bytes, HTTP/1.1 and HTTP/2 alike.
    pub max_header_bytes: usize,
    /// HTTP/2 ping interval on a connection that received nothing for that long (a dead peer is
    /// found without waiting for the idle deadline); `None` sends no pings.
    pub http2_keep_alive_interval: Option<Duration>,
    /// Time a ping has to be answered before the connection is closed.
    pub http2_keep_alive_timeout: Duration,
}

impl Default for ServerConfig {
    /// | field | default |
    /// |---|---|
    /// | `tls_handshake_timeout` | 10 s |
    /// | `header_read_timeout` | 10 s |
    /// | `request_timeout` | 30 s |
    /// | `idle_timeout` | 90 s |
    /// | `max_pending_connections` | 1,024 |
    /// | `max_pending_per_source` | 256 |
    /// | `max_connections` | 16,384 |
    /// | `max_connections_per_instance` | 4 |
    /// | `http2_max_concurrent_streams` | 16 |
    /// | `max_header_bytes` | 16 KiB |
    /// | `http2_keep_alive_interval` | 30 s |
    /// | `http2_keep_alive_timeout` | 10 s |
    fn default() -> Self {
        Self {
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_pending_connections: 1_024,
            max_pending_per_source: 256,
            max_connections: 16_384,
            max_connections_per_instance: 4,
            http2_max_concurrent_streams: 16,
            max_header_bytes: 16 * 1024,
            http2_keep_alive_interval: Some(Duration::from_secs(30)),
            http2_keep_alive_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the server could not be set up or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The TLS configuration was refused by rustls.
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Accepting connections failed.
    #[error("listener")]
    Io(#[from] std::io::Error),
    /// The server certificate could not be issued.
    #[error("issuing the server certificate")]
    Certificate(#[source] fleet_core::ca::CaError),
}

/// Builds the rustls server configuration: the server certificate and key, client certificates
/// optional but verified against the fleet CA when presented, ALPN h2 and http/1.1, the `ring`
/// provider with the AES-128-GCM suites preferred.
pub fn tls_config(
    ca_der: &[u8],
    server: &ServerCertificate,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    tls_config_trusting(&[ca_der], ca_der, server)
}

/// [`tls_config`] for a set of CAs: client certificates of any CA of `set` pass the handshake
/// (during a rotation, both the old and the new), and the signing CA follows the leaf.
pub fn tls_config_for_set(
    set: &CaSet,
    server: &ServerCertificate,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let trusted: Vec<&[u8]> = set.all().iter().map(|c| c.cert_der()).collect();
    tls_config_trusting(&trusted, set.active().cert_der(), server)
}

fn tls_config_trusting(
    trusted: &[&[u8]],
    chain_ca: &[u8],
    server: &ServerCertificate,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = crate::crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in trusted {
        roots.add(CertificateDer::from(ca.to_vec()))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(crate::TLS_VERSIONS)?
        .with_client_cert_verifier(verifier)
        // The CA follows the leaf so that agents can pin it by fingerprint on first contact.
        .with_single_cert(
            vec![
                CertificateDer::from(server.cert_der.clone()),
                CertificateDer::from(chain_ca.to_vec()),
            ],
            key,
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Our order (AES-128-GCM first, see `crypto_provider`), whatever the client prefers.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// Validity of the server certificates [`AgentServer::issuing`] makes.
pub const SERVER_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(90 * 86_400);

/// Where the server's TLS configuration comes from.
#[derive(Debug)]
enum TlsSource {
    /// Given by the embedder, used as is.
    Fixed(Arc<rustls::ServerConfig>),
    /// Issued from the fleet's signing CA for these names, and issued again when the fleet's CA
    /// set changes or the certificate is two-thirds through its life.
    Issuing {
        names: Vec<String>,
        current: std::sync::RwLock<IssuedTls>,
    },
}

#[derive(Debug)]
struct IssuedTls {
    generation: u64,
    renew_at: fleet_core::Timestamp,
    config: Arc<rustls::ServerConfig>,
}

/// The agent server over a [`Fleet`].
#[derive(Debug)]
pub struct AgentServer<S> {
    fleet: Fleet<S>,
    tls: TlsSource,
    config: ServerConfig,
    admission: Arc<Admission>,
    handshakes: std::sync::atomic::AtomicU64,
}

/// Who is calling: the transport's view of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The identity of a verified client certificate, if one was presented.
    pub identity: Option<InstanceIdentity>,
    /// The fingerprint of the CA that signed that certificate, when known: a heartbeat reply
    /// tells an agent whose CA no longer signs to renew at once.
    pub issuer: Option<Fingerprint>,
}

type Body = Full<Bytes>;

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(JSON));
    resp
}

fn error_body(body: &ErrorBody) -> Response<Body> {
    let code = body.error.code;
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, body);
    if code == ErrorCode::StoreUnavailable || code == ErrorCode::RateLimited {
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("5"),
        );
    }
    resp
}

/// `resp` telling the client to retry in `after` (whole seconds, at least one).
fn retry_after(mut resp: Response<Body>, after: Duration) -> Response<Body> {
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(after.as_secs().max(1)),
    );
    resp
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    error_body(&ErrorBody::new(code, message))
}

/// The error response of a fleet error: its code, its message and, for refused input, the field.
fn fleet_error<E>(e: &E, invalid: Option<&ValidationError>) -> Response<Body>
where
    E: std::error::Error,
    for<'e> ErrorCode: From<&'e E>,
{
    let body = ErrorBody::new(ErrorCode::from(e), e.to_string());
    error_body(&match invalid {
        Some(v) => body.with_field(v.what),
        None => body,
    })
}

impl<S: FleetStore> AgentServer<S> {
    /// A server for `fleet` with TLS configuration `tls` (see [`tls_config`]), used as is: a CA
    /// rotation needs a new configuration, which [`AgentServer::issuing`] makes by itself.
    pub fn new(fleet: Fleet<S>, tls: Arc<rustls::ServerConfig>, config: ServerConfig) -> Self {
        Self::with_source(fleet, TlsSource::Fixed(tls), config)
    }

    /// A server that issues its own certificate for `names` (DNS names or IP addresses) from the
    /// fleet's signing CA, valid [`SERVER_CERTIFICATE_VALIDITY`], and issues a new one — trusting
    /// the fleet's current CA set for client certificates — when that set changes (a CA rotation
    /// step, here or on another replica) or the certificate is two-thirds through its life.
    pub fn issuing(
        fleet: Fleet<S>,
        names: Vec<String>,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        let current = Self::issue(&fleet, &names)?;
        Ok(Self::with_source(
            fleet,
            TlsSource::Issuing {
                names,
                current: std::sync::RwLock::new(current),
            },
            config,
        ))
    }

    fn issue(fleet: &Fleet<S>, names: &[String]) -> Result<IssuedTls, ServerError> {
        // The generation first: a change racing with this issue is seen next time.
        let generation = fleet.ca_generation();
        let set = fleet.ca_set();
        let now = fleet.now();
        let cert = set
            .active()
            .issue_server(names, now, SERVER_CERTIFICATE_VALIDITY)
            .map_err(ServerError::Certificate)?;
        Ok(IssuedTls {
            generation,
            renew_at: now.saturating_add(SERVER_CERTIFICATE_VALIDITY * 2 / 3),
            config: tls_config_for_set(&set, &cert)?,
        })
    }

    /// The TLS configuration for the next connection.
    fn tls(&self) -> Arc<rustls::ServerConfig> {
        match &self.tls {
            TlsSource::Fixed(c) => Arc::clone(c),
            TlsSource::Issuing { names, current } => {
                let read = current.read().unwrap_or_else(PoisonError::into_inner);
                let fresh = read.generation == self.fleet.ca_generation()
                    && self.fleet.now() < read.renew_at;
                let config = Arc::clone(&read.config);
                drop(read);
                if fresh {
                    return config;
                }
                match Self::issue(&self.fleet, names) {
                    Ok(issued) => {
                        let config = Arc::clone(&issued.config);
                        *current.write().unwrap_or_else(PoisonError::into_inner) = issued;
                        config
                    }
                    // Keep serving with the certificate we have; the next connection retries.
                    Err(e) => {
                        tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "could not issue a new agent-listener certificate; keeping the current one");
                        config
                    }
                }
            }
        }
    }

    fn with_source(fleet: Fleet<S>, tls: TlsSource, config: ServerConfig) -> Self {
        let admission = Arc::new(Admission::new(Budgets {
            pending: config.max_pending_connections,
            pending_per_source: config.max_pending_per_source,
            verified: config.max_connections,
            verified_per_instance: config.max_connections_per_instance,
        }));
        Self {
            fleet,
            tls,
            config,
            admission,
            handshakes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// TLS handshakes completed since the server started: one per connection, so with agents
    /// that keep their connections this grows with agents, not with heartbeats.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The connections held now, by budget, and how many were shed to admit others.
    pub fn connections(&self) -> AdmissionCounts {
        self.admission.counts()
    }

    /// Handles one request from `peer` (exposed so that embedders can route to it themselves).
    /// A refusal reads the rest of a body of at most [`DRAIN_LIMIT`] bytes first, so that
    /// HTTP/2 clients receive it; the embedder's own deadlines bound that read.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        self.respond(req, peer, None).await
    }

    async fn respond(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        conn: Option<&Conn>,
    ) -> Response<Body> {
        let (parts, mut body) = req.into_parts();
        let resp = self.route(&parts, &mut body, peer, conn).await;
        body::drain(&parts.headers, &mut body).await;
        resp
    }

    async fn route(
        &self,
        parts: &http::request::Parts,
        body: &mut Incoming,
        peer: &Peer,
        conn: Option<&Conn>,
    ) -> Response<Body> {
        enum Route {
            Enroll,
            Heartbeat,
            Renew,
        }
        let route = match parts.uri.path() {
            ENROLL_PATH => Route::Enroll,
            HEARTBEAT_PATH => Route::Heartbeat,
            RENEW_PATH => Route::Renew,
            other => return error(ErrorCode::NotFound, format!("no route {other}")),
        };
        if parts.method != Method::POST {
            return error(ErrorCode::MethodNotAllowed, "use POST");
        }
        match route {
            // The rare routes are boxed so that their large futures do not set the size of
            // every request's future (moved into place per request on the heartbeat path).
            Route::Enroll => Box::pin(self.enroll(parts, body, peer)).await,
            Route::Heartbeat => self.heartbeat(parts, body, peer, conn).await,
            Route::Renew => Box::pin(self.renew(parts, body, peer, conn)).await,
        }
    }

    async fn enroll(
        &self,
        parts: &http::request::Parts,
        body: &mut Incoming,
        peer: &Peer,
    ) -> Response<Body> {
        let body: EnrollRequest = match read_json(&parts.headers, body, MAX_ENROLL_BODY).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let request = fleet_core::EnrollRequest {
            token: body.token,
            csr_pem: body.csr_pem,
            system: body.system,
            peer: Some(peer.addr),
            previous_certificate_pem: body.previous_certificate_pem,
        };
        match self.fleet.enroll(request).await {
            Ok(e) => json_response(
                StatusCode::OK,
                &EnrollResponse {
                    instance_id: e.instance,
                    certificate_pem: e.certificate.pem,
                    ca_pem: e.ca_pem,
                    heartbeat_interval_secs: e.heartbeat_interval.as_secs(),
                },
            ),
            Err(EnrollError::RateLimited { retry_after: after }) => retry_after(
                error(
                    ErrorCode::RateLimited,
                    "too many failed enrollment attempts from this address",
                ),
                after,
            ),
            Err(e) => {
                let invalid = match &e {
                    EnrollError::Invalid(v) => Some(v),
                    _ => None,
                };
                fleet_error(&e, invalid)
            }
        }
    }

    async fn authenticated<'p>(
        &self,
        peer: &'p Peer,
        conn: Option<&Conn>,
    ) -> Result<&'p InstanceIdentity, Response<Body>> {
        let Some(identity) = &peer.identity else {
            return Err(error(
                ErrorCode::Unauthenticated,
                "this route needs a client certificate issued by the fleet CA",
            ));
        };
        match self.fleet.authenticate(identity).await {
            Ok(()) => {
                if let Some(conn) = conn {
                    conn.authenticated(identity.instance);
                }
                Ok(identity)
            }
            Err(e) => Err(fleet_error(&e, None)),
        }
    }

    async fn heartbeat(
        &self,
        parts: &http::request::Parts,
        body: &mut Incoming,
        peer: &Peer,
        conn: Option<&Conn>,
    ) -> Response<Body> {
        let identity = match self.authenticated(peer, conn).await {
            Ok(i) => i,
            Err(resp) => return resp,
        };
        let body: HeartbeatRequest = match read_json(&parts.headers, body, MAX_HEARTBEAT_BODY).await
        {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let results = body
            .command_results
            .into_iter()
            .map(fleet_core::ReportedResult::from)
            .collect();
        match self
            .fleet
            .exchange(
                identity.instance,
                Heartbeat {
                    metrics: body.metrics,
                    apps: body.apps,
                },
                results,
            )
            .await
        {
            Ok(ex) => {
                let (ca_bundle_pem, renew_now) = self.rotation_news(parts, peer);
                json_response(
                    StatusCode::OK,
                    &HeartbeatResponse {
                        commands: ex.commands.iter().map(AgentCommand::from).collect(),
                        next_heartbeat_secs: ex.ack.next_heartbeat.as_secs(),
                        ca_bundle_pem,
                        renew_now,
                    },
                )
            }
            Err(e) => {
                let invalid = match &e {
                    FleetError::Invalid(v) => Some(v),
                    _ => None,
                };
                fleet_error(&e, invalid)
            }
        }
    }

    /// What a heartbeat reply says about the CA set: the bundle, when the agent trusts another
    /// set (it names its set in [`CA_SET_HEADER`]; agents from before rotation send nothing and
    /// get nothing), and whether the agent's certificate comes from a CA that no longer signs.
    fn rotation_news(&self, parts: &http::request::Parts, peer: &Peer) -> (Option<String>, bool) {
        let set = self.fleet.ca_set();
        let bundle = parts
            .headers
            .get(CA_SET_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|trusted| *trusted != set.id())
            .map(|_| set.bundle_pem());
        let renew_now = peer
            .issuer
            .is_some_and(|issuer| issuer != set.active().fingerprint());
        (bundle, renew_now)
    }

    async fn renew(
        &self,
        parts: &http::request::Parts,
        body: &mut Incoming,
        peer: &Peer,
        conn: Option<&Conn>,
    ) -> Response<Body> {
        let identity = match self.authenticated(peer, conn).await {
            Ok(i) => i,
            Err(resp) => return resp,
        };
        let body: RenewRequest = match read_json(&parts.headers, body, MAX_RENEW_BODY).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        match self.fleet.renew(identity, &body.csr_pem).await {
            Ok(cert) => json_response(
                StatusCode::OK,
                &RenewResponse {
                    certificate_pem: cert.pem,
                },
            ),
            Err(RenewError::RateLimited { retry_after: after }) => retry_after(
                fleet_error(&RenewError::RateLimited { retry_after: after }, None),
                after,
            ),
            Err(e) => fleet_error(&e, None),
        }
    }

    /// Accepts connections on `listener` until `shutdown` completes, then stops accepting and
    /// lets open connections finish their current request.
    ///
    /// Every connection is accepted and admitted to a budget (see [`ServerConfig`]): when one is
    /// full, a connection of the heaviest unauthenticated source is closed, never an agent's for
    /// an attacker's. When the process runs out of file descriptors, the oldest pending
    /// connection of the heaviest source is closed to make room. Give `listener` a backlog of a
    /// few thousand (the control panel listens with 4,096): a burst of connections then waits
    /// for the accept loop instead of having its SYNs dropped, which costs a client a one-second
    /// retransmission.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (tcp, addr) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    // Out of file descriptors (EMFILE, ENFILE): free one held by the heaviest
                    // unauthenticated source. Any accept error is transient: try again shortly.
                    Err(e) => {
                        if matches!(e.raw_os_error(), Some(23 | 24)) {
                            self.admission.shed_heaviest();
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let (ticket, shed) = self.admission.admit(addr.ip());
            tokio::spawn(Arc::clone(&self).connection(tcp, addr, ticket, shed, graceful.watcher()));
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
        Ok(())
    }
}
