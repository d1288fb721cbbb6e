//! The agent server (feature `server`): protocol v1 over HTTPS with hyper 1.x and rustls.
//!
//! One listener serves both enrollment (TLS without a client certificate; the token authenticates)
//! and the mTLS routes (the client certificate authenticates). rustls verifies any client
//! certificate presented against the fleet CA during the handshake — a certificate from another
//! CA fails the handshake — and each route enforces its own authentication: the heartbeat and
//! renewal routes answer `401 unauthenticated` without a certificate and check the certificate's
//! serial against the instance's current one, so revocation applies to the next request.
//!
//! Protections, each configurable in [`ServerConfig`] with safe defaults: a TLS handshake timeout,
//! a header read timeout, body limits per route and a connection cap. Failed token attempts are
//! limited per source by the fleet itself ([`fleet_core::limiter`], answering `429
//! rate_limited` with `Retry-After`; a valid token is never refused by it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::ca::ServerCertificate;
use fleet_core::store::FleetStore;
use fleet_core::{EnrollError, Fleet, Heartbeat, InstanceIdentity};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{
    AgentCommand, CONTENT_TYPE as JSON, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT, ENROLL_PATH, EnrollRequest, EnrollResponse, ErrorBody,
    ErrorCode, HEARTBEAT_PATH, HeartbeatRequest, HeartbeatResponse, MAX_ENROLL_BODY,
    MAX_HEARTBEAT_BODY, MAX_RENEW_BODY, RENEW_PATH, RenewRequest, RenewResponse,
};

/// Server limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Time a client has to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time a client has to send a request's headers. hyper also runs this timer while a
    /// kept-alive connection waits for its next request, so on connections with a verified
    /// client certificate (agents) the server uses the larger of this and `idle_timeout`: an
    /// agent heartbeating every 15 s keeps its connection. Connections without one (enrollment)
    /// keep this timeout.
    pub header_read_timeout: Duration,
    /// A connection with no traffic for this long is closed, at the latest a quarter of it later
    /// (keep it above two heartbeat intervals so agents keep their connections).
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: 10_000,
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
}

/// Builds the rustls server configuration: the server certificate and key, client certificates
/// optional but verified against the fleet CA when presented, ALPN h2 and http/1.1, the `ring`
/// provider with the AES-128-GCM suites preferred.
pub fn tls_config(
    ca_der: &[u8],
    server: &ServerCertificate,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = crate::crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
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
                CertificateDer::from(ca_der.to_vec()),
            ],
            key,
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Our order (AES-128-GCM first, see `crypto_provider`), whatever the client prefers.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// The agent server over a [`Fleet`].
#[derive(Debug)]
pub struct AgentServer<S> {
    fleet: Fleet<S>,
    tls: Arc<rustls::ServerConfig>,
    config: ServerConfig,
    handshakes: std::sync::atomic::AtomicU64,
}

/// Who is calling: the transport's view of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The identity of a verified client certificate, if one was presented.
    pub identity: Option<InstanceIdentity>,
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

fn error(code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &ErrorBody::new(code, message));
    if code == ErrorCode::StoreUnavailable || code == ErrorCode::RateLimited {
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("5"),
        );
    }
    resp
}

enum BodyError {
    TooLarge,
    Unreadable,
}

/// Reads a whole body of at most `limit` bytes. A body that arrives as one frame (a heartbeat
/// does) is handed on without a copy.
async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    // The first frame as it came; once a second one arrives, everything so far in `joined`.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Unreadable)?.into_data() else {
            continue; // trailers
        };
        let so_far = joined
            .as_ref()
            .map_or_else(|| first.as_ref().map_or(0, Bytes::len), Vec::len);
        if so_far + data.len() > limit {
            return Err(BodyError::TooLarge);
        }
        match (&mut joined, first.take()) {
            (Some(j), _) => j.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(f)) => {
                let mut j = Vec::with_capacity(f.len() + data.len());
                j.extend_from_slice(&f);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
        }
    }
    Ok(match joined {
        Some(j) => Bytes::from(j),
        None => first.unwrap_or_default(),
    })
}

async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, Response<Body>> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(JSON))
        });
    if !is_json {
        return Err(error(
            ErrorCode::UnsupportedMediaType,
            "send Content-Type: application/json",
        ));
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(error(
            ErrorCode::BodyTooLarge,
            format!("the body limit of this route is {limit} bytes"),
        ));
    }
    let bytes = match read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return Err(error(
                ErrorCode::BodyTooLarge,
                format!("the body limit of this route is {limit} bytes"),
            ));
        }
        Err(BodyError::Unreadable) => {
            return Err(error(
                ErrorCode::MalformedRequest,
                "the request body could not be read",
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            ErrorCode::MalformedRequest,
            format!("invalid JSON body: {e}"),
        )
    })
}

impl<S: FleetStore> AgentServer<S> {
    /// A server for `fleet` with TLS configuration `tls` (see [`tls_config`]).
    pub fn new(fleet: Fleet<S>, tls: Arc<rustls::ServerConfig>, config: ServerConfig) -> Self {
        Self {
            fleet,
            tls,
            config,
            handshakes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// TLS handshakes completed since the server started: one per connection, so with agents
    /// that keep their connections this grows with agents, not with heartbeats.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Handles one request from `peer` (exposed so that embedders can route to it themselves).
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        enum Route {
            Enroll,
            Heartbeat,
            Renew,
        }
        let route = match req.uri().path() {
            ENROLL_PATH => Route::Enroll,
            HEARTBEAT_PATH => Route::Heartbeat,
            RENEW_PATH => Route::Renew,
            other => return error(ErrorCode::NotFound, format!("no route {other}")),
        };
        if req.method() != Method::POST {
            return error(ErrorCode::MethodNotAllowed, "use POST");
        }
        match route {
            // The rare routes are boxed so that their large futures do not set the size of
            // every request's future (moved into place per request on the heartbeat path).
            Route::Enroll => Box::pin(self.enroll(req, peer)).await,
            Route::Heartbeat => self.heartbeat(req, peer).await,
            Route::Renew => Box::pin(self.renew(req, peer)).await,
        }
    }

    async fn enroll(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let body: EnrollRequest = match read_json(req, MAX_ENROLL_BODY).await {
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
            Err(EnrollError::RateLimited { retry_after }) => {
                let mut resp = error(
                    ErrorCode::RateLimited,
                    "too many failed enrollment attempts from this address",
                );
                resp.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from(retry_after.as_secs().max(1)),
                );
                resp
            }
            Err(e) => error(ErrorCode::from(&e), e.to_string()),
        }
    }

    async fn authenticated<'p>(
        &self,
        peer: &'p Peer,
    ) -> Result<&'p InstanceIdentity, Response<Body>> {
        let Some(identity) = &peer.identity else {
            return Err(error(
                ErrorCode::Unauthenticated,
                "this route needs a client certificate issued by the fleet CA",
            ));
        };
        match self.fleet.authenticate(identity).await {
            Ok(()) => Ok(identity),
            Err(e) => Err(error(ErrorCode::from(&e), e.to_string())),
        }
    }

    async fn heartbeat(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let identity = match self.authenticated(peer).await {
            Ok(i) => i,
            Err(resp) => return resp,
        };
        let body: HeartbeatRequest = match read_json(req, MAX_HEARTBEAT_BODY).await {
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
            Ok(ex) => json_response(
                StatusCode::OK,
                &HeartbeatResponse {
                    commands: ex.commands.iter().map(AgentCommand::from).collect(),
                    next_heartbeat_secs: ex.ack.next_heartbeat.as_secs(),
                },
            ),
            Err(e) => error(ErrorCode::from(&e), e.to_string()),
        }
    }

    async fn renew(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let identity = match self.authenticated(peer).await {
            Ok(i) => i,
            Err(resp) => return resp,
        };
        let body: RenewRequest = match read_json(req, MAX_RENEW_BODY).await {
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
            Err(e) => error(ErrorCode::from(&e), e.to_string()),
        }
    }

    /// Accepts connections on `listener` until `shutdown` completes, then stops accepting and
    /// lets open connections finish their current request.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.tls));
        let permits = Arc::new(Semaphore::new(self.config.max_connections.max(1)));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, addr) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    // Transient accept errors (e.g. too many open files): keep serving.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let server = Arc::clone(&self);
            let acceptor = acceptor.clone();
            let watcher = graceful.watcher();
            let handshake_timeout = self.config.tls_handshake_timeout;
            let header_timeout = self.config.header_read_timeout;
            let idle_timeout = self.config.idle_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                // Replies are written whole; Nagle would only hold them back.
                let _ = tcp.set_nodelay(true);
                let Ok(Ok(tls)) =
                    tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                else {
                    return;
                };
                server
                    .handshakes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| InstanceIdentity::from_certificate_der(leaf).ok());
                let identity_known = identity.is_some();
                let peer = Arc::new(Peer { addr, identity });
                let service = hyper::service::service_fn(move |req| {
                    let server = Arc::clone(&server);
                    let peer = Arc::clone(&peer);
                    async move { Ok::<_, Infallible>(server.handle(req, &peer).await) }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(if identity_known {
                        // hyper times the wait for the next request on a kept-alive
                        // connection with the header-read timer: an agent's connection
                        // gets the idle timeout.
                        header_timeout.max(idle_timeout)
                    } else {
                        // Enrollment (no client certificate): the short timeout stands.
                        header_timeout
                    });
                builder.http2().timer(TokioTimer::new());
                let activity = Activity::new(tls);
                let moved = activity.counter();
                let conn = builder
                    .serve_connection(TokioIo::new(activity), service)
                    .into_owned();
                // A connection quiet for `idle_timeout` is dropped (closed); one busy with traffic
                // is left alone, and a shutdown lets its current request finish.
                tokio::select! {
                    _ = watcher.watch(conn) => {}
                    () = idle(moved, idle_timeout) => {}
                }
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
        Ok(())
    }
}

/// Wraps a connection's I/O and counts the reads and writes that moved bytes (a counter, not a
/// clock: a request costs two relaxed increments instead of clock reads).
struct Activity<IO> {
    inner: IO,
    moved: Arc<std::sync::atomic::AtomicU64>,
}

impl<IO> Activity<IO> {
    fn new(inner: IO) -> Self {
        Self {
            inner,
            moved: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.moved)
    }

    fn touch(&self) {
        self.moved
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Activity<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Activity<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Checks of the activity counter per idle timeout.
const IDLE_CHECKS: u32 = 4;

/// Completes once the connection has moved no bytes for `timeout` (detected within a quarter
/// of it: the counter is looked at every `timeout / 4`, and four quiet looks in a row end it).
async fn idle(moved: Arc<std::sync::atomic::AtomicU64>, timeout: Duration) {
    let step = timeout / IDLE_CHECKS;
    let mut seen = moved.load(std::sync::atomic::Ordering::Relaxed);
    let mut quiet = 0;
    loop {
        tokio::time::sleep(step).await;
        let now = moved.load(std::sync::atomic::Ordering::Relaxed);
        if now == seen {
            quiet += 1;
            if quiet >= IDLE_CHECKS {
                return;
            }
        } else {
            seen = now;
            quiet = 0;
        }
    }
}
