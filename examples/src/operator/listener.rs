//! The operator listener's connections: how many it holds, how long a client may take to send a
//! request, and how long an idle connection is kept — the same protections the agent listener
//! has, so that slow or never-ending clients cannot hold its file descriptors.
//!
//! # Connections
//!
//! Every connection is accepted at once, also at the cap. Up to
//! [`ListenerConfig::max_connections`] are served; one more is answered at once with a canned
//! `503` (`{"error": {"code": "busy", …}}`, `Retry-After`, `Connection: close`) and closed. It is
//! not left waiting in the kernel's backlog, where a client could only time out, and no
//! established connection is shed to make room: the connections that fill the cap are the ones
//! holding requests open, and the deadlines below free every slot such a client holds within
//! [`ListenerConfig::header_read_timeout`] or [`ListenerConfig::body_timeout`]. Shedding the
//! oldest idle connection instead would push out the browsers that keep a connection alive
//! between polls — the only idle ones — while the attacker's connections, never idle, stayed.
//!
//! # Deadlines for reading requests
//!
//! - **Headers**: a new connection must deliver its first request's headers within
//!   [`header_read_timeout`](ListenerConfig::header_read_timeout) (HTTP/1.1 and HTTP/2 alike,
//!   the HTTP/2 preface included), else it is closed. On HTTP/1.1 hyper also times each later
//!   request head with it, from the end of the previous response. On HTTP/2 a later request's
//!   headers are bounded in size by [`max_header_bytes`](ListenerConfig::max_header_bytes) and
//!   in time by the idle deadline below once nothing else of the connection is in flight (a
//!   header block's frames come back to back, so a slow one holds up the whole connection).
//! - **Body**: from the moment a request's headers have arrived, its whole body must arrive within
//!   [`body_timeout`](ListenerConfig::body_timeout). The request body is a [`RequestBody`], which
//!   fails with [`BodyError::Timeout`] once that deadline passes: the operator API answers `408
//!   request_timeout` (and closes an HTTP/1.1 connection; on HTTP/2 the stream is reset after
//!   the reply).
//! - **Idle**: a connection with no request in flight for
//!   [`idle_timeout`](ListenerConfig::idle_timeout) is shut down gracefully (an HTTP/2 client gets
//!   a GOAWAY), and dropped if it has not closed after a further `header_read_timeout`. On
//!   HTTP/1.1 the header deadline runs while a kept-alive connection waits for its next request,
//!   so such a connection is kept for the shorter of the two.
//!
//! **Responses are never cut by these deadlines.** The body deadline is a property of the request
//! body only: a handler that has read its request may stream a response for as long as it likes
//! (an event stream, a long poll), and a request counts as in flight — so its connection is not
//! idle — until its response body has been sent or dropped.
//!
//! # HTTP/2
//!
//! At most [`h2_max_concurrent_streams`](ListenerConfig::h2_max_concurrent_streams) streams per
//! connection, a header list of at most [`max_header_bytes`](ListenerConfig::max_header_bytes),
//! and a keep-alive PING every [`h2_keep_alive_interval`](ListenerConfig::h2_keep_alive_interval)
//! that must be answered within [`h2_keep_alive_timeout`](ListenerConfig::h2_keep_alive_timeout).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use fleet_agent_proto::server::DRAIN_LIMIT;
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

/// Default of [`ListenerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_024;
/// Default of [`ListenerConfig::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ListenerConfig::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`ListenerConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`ListenerConfig::h2_max_concurrent_streams`].
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 64;
/// Default of [`ListenerConfig::max_header_bytes`].
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 64 * 1024;
/// Default of [`ListenerConfig::h2_keep_alive_interval`].
pub const DEFAULT_H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// Default of [`ListenerConfig::h2_keep_alive_timeout`].
pub const DEFAULT_H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`serve`] waits for open connections after its shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Limits of the operator listener; see the module docs for what each deadline covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Connections served at once (default 1,024); one more is answered `503 busy` and closed.
    pub max_connections: usize,
    /// Time from accepting a connection until its first request's headers have arrived, and on
    /// HTTP/1.1 from the end of a response until the next request's headers have (default 10 s).
    pub header_read_timeout: Duration,
    /// Time from a request's headers until its whole body has arrived (default 30 s).
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed (default 60 s).
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once (default 64).
    pub h2_max_concurrent_streams: u32,
    /// Largest request head: the header bytes of an HTTP/1.1 request, the header list of an
    /// HTTP/2 one (default 64 KiB; at least 8 KiB).
    pub max_header_bytes: u32,
    /// How often an HTTP/2 connection is PINGed (default 20 s).
    pub h2_keep_alive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed (default 10 s).
    pub h2_keep_alive_timeout: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            h2_keep_alive_interval: DEFAULT_H2_KEEP_ALIVE_INTERVAL,
            h2_keep_alive_timeout: DEFAULT_H2_KEEP_ALIVE_TIMEOUT,
        }
    }
}

impl ListenerConfig {
    /// Checks: at least one connection and one stream, every time above zero and at most a day,
    /// a header limit from 8 KiB to 16 MiB.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError {
                field: "max_connections",
                reason: "must be at least 1",
            });
        }
        if self.h2_max_concurrent_streams == 0 {
            return Err(ConfigError {
                field: "h2_max_concurrent_streams",
                reason: "must be at least 1",
            });
        }
        if !(8 * 1024..=16 * 1024 * 1024).contains(&self.max_header_bytes) {
            return Err(ConfigError {
                field: "max_header_bytes",
                reason: "must be from 8 KiB to 16 MiB",
            });
        }
        for (field, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_timeout", self.body_timeout),
            ("idle_timeout", self.idle_timeout),
            ("h2_keep_alive_interval", self.h2_keep_alive_interval),
            ("h2_keep_alive_timeout", self.h2_keep_alive_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(86_400) {
                return Err(ConfigError {
                    field,
                    reason: "must be above zero and at most a day",
                });
            }
        }
        Ok(())
    }
}

/// A [`ListenerConfig`] value that makes no sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The address a request's connection came from, in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Why a [`RequestBody`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The whole body did not arrive within the body deadline.
    #[error("the request body did not arrive within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The connection failed while the body was read (the client reset it, for one).
    #[error("reading the request body")]
    Read(#[source] hyper::Error),
}

/// A request body with a deadline: frames pass through until the deadline, then it fails with
/// [`BodyError::Timeout`]. The deadline concerns reading this body only — what the handler
/// answers, and for how long, is not timed by it.
///
/// A handler that answers without reading the body to its end (a refusal) drops it; the rest
/// goes back to the listener, which reads and drops up to [`DRAIN_LIMIT`] bytes of it, under the
/// same deadline, before the answer goes out. An HTTP/2 answer that comes before the body's end
/// resets the stream, and clients such as curl 7.88 then lose the answer ("(92) Stream error").
#[derive(Debug)]
pub struct RequestBody {
    /// `None` only once the rest went back to the listener, in `drop`.
    inner: Option<Incoming>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    until: Instant,
    timeout: Duration,
    rest: Option<tokio::sync::oneshot::Sender<Unread>>,
}

/// What a handler left of a request body.
#[derive(Debug)]
struct Unread {
    body: Incoming,
    until: Instant,
}

impl RequestBody {
    fn new(inner: Incoming, timeout: Duration, rest: tokio::sync::oneshot::Sender<Unread>) -> Self {
        let until = Instant::now() + timeout;
        Self {
            inner: Some(inner),
            deadline: Box::pin(tokio::time::sleep_until(until)),
            until,
            timeout,
            rest: Some(rest),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let (Some(body), Some(rest)) = (self.inner.take(), self.rest.take())
            && !body.is_end_stream()
        {
            let _ = rest.send(Unread {
                body,
                until: self.until,
            });
        }
    }
}

/// Reads and drops what a handler left of a request body: at most [`DRAIN_LIMIT`] bytes, none
/// when the declared length is larger than that, and only until the body's deadline.
async fn drain(unread: Unread, declared: Option<u64>) {
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return;
    }
    let Unread { mut body, until } = unread;
    let read = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > DRAIN_LIMIT {
                return;
            }
        }
    };
    let _ = tokio::time::timeout_at(until, read).await;
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(BodyError::Read))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Timeout(this.timeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What a connection's watcher needs to know: when it began, how many requests it has started,
/// how many are in flight and since when none is.
#[derive(Debug)]
struct ConnState {
    began: Instant,
    requests: AtomicU64,
    in_flight: AtomicU64,
    /// Milliseconds after `began` at which the last request in flight finished.
    idle_since_ms: AtomicU64,
    changed: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            began: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }
}

/// A request in flight, from the call of the handler until its response body is dropped.
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(state: &Arc<ConnState>) -> Self {
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.changed.notify_one();
        Self(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.began.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped, so
/// that a long response is never taken for an idle connection.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a connection's watcher ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// No request arrived within the header deadline: drop it.
    Silent,
    /// Nothing in flight for the idle timeout: shut it down gracefully.
    Idle,
}

/// Completes when the connection should end; never while a request is in flight.
async fn watch(state: &ConnState, header_read: Duration, idle: Duration) -> Verdict {
    loop {
        // `notify_one` stores a permit when nobody waits, so no change is missed between the
        // look at the counters and the wait.
        let changed = state.changed.notified();
        if state.requests.load(Ordering::Relaxed) == 0 {
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(state.began + header_read) => {
                    if state.requests.load(Ordering::Relaxed) == 0 {
                        return Verdict::Silent;
                    }
                }
            }
        } else if state.in_flight.load(Ordering::Acquire) > 0 {
            changed.await;
        } else {
            let since = state.idle_since_ms.load(Ordering::Acquire);
            let at = state.began + Duration::from_millis(since) + idle;
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(at) => {
                    if state.in_flight.load(Ordering::Acquire) == 0
                        && state.idle_since_ms.load(Ordering::Acquire) == since
                    {
                        return Verdict::Idle;
                    }
                }
            }
        }
    }
}

/// The canned reply to a connection over the cap.
fn busy_reply() -> String {
    let body = r#"{"error":{"code":"busy","message":"the operator listener is at its connection limit; try again shortly"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         cache-control: no-store\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Answers a connection over the cap and closes it, without waiting: what the client has sent
/// so far is read (so that the close is a FIN, not a reset that could destroy the reply) and
/// the reply is written if the socket takes it at once.
fn refuse(tcp: TcpStream) {
    let mut scratch = [0u8; 4096];
    for _ in 0..4 {
        if !matches!(tcp.try_read(&mut scratch), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = tcp.try_write(busy_reply().as_bytes());
}

/// Serves plain HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` with `handler`, under
/// `config`'s limits, until `shutdown` completes; then stops accepting and waits up to 10 s for
/// open connections. Each request carries its [`PeerAddr`] in its extensions.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    config: &ListenerConfig,
    shutdown: impl Future<Output = ()>,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = u32::try_from(config.max_connections.max(1)).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(max as usize));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // hyper keeps at most this much unparsed input: a longer head is answered 431.
        .max_buf_size(config.max_header_bytes as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .max_header_list_size(config.max_header_bytes)
        .keep_alive_interval(config.h2_keep_alive_interval)
        .keep_alive_timeout(config.h2_keep_alive_timeout);
    let builder = Arc::new(builder);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                // Transient accept errors (too many open files, for one): keep serving.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refuse(tcp);
            continue;
        };
        let builder = Arc::clone(&builder);
        let handler = handler.clone();
        let mut stopping = stopping.clone();
        let (header_read, body_timeout, idle) = (
            config.header_read_timeout,
            config.body_timeout,
            config.idle_timeout,
        );
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let state = Arc::new(ConnState::new());
            let counted = Arc::clone(&state);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let in_flight = InFlight::begin(&counted);
                let declared = req
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let (rest, mut unread) = tokio::sync::oneshot::channel();
                let mut req = req.map(|b| RequestBody::new(b, body_timeout, rest));
                req.extensions_mut().insert(PeerAddr(addr));
                let handler = handler.clone();
                async move {
                    let resp = handler(req).await;
                    // The handler has dropped the request: what it did not read came back.
                    if let Ok(unread) = unread.try_recv() {
                        drain(unread, declared).await;
                    }
                    Ok::<_, Infallible>(resp.map(|inner| Tracked {
                        inner,
                        _in_flight: in_flight,
                    }))
                }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            let verdict = tokio::select! {
                _ = conn.as_mut() => return,
                v = watch(&state, header_read, idle) => Some(v),
                _ = stopping.wait_for(|s| *s) => None,
            };
            if verdict == Some(Verdict::Silent) {
                return;
            }
            conn.as_mut().graceful_shutdown();
            match verdict {
                // Idle: a client that does not close after the GOAWAY is dropped.
                Some(_) => {
                    let _ = tokio::time::timeout(header_read, conn).await;
                }
                // Shutting down: the current requests may finish (bounded by `serve`).
                None => {
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stopping_tx.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(max)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_nonsense_is_refused() {
        assert_eq!(ListenerConfig::default().validate(), Ok(()));
        let bad = [
            ListenerConfig {
                max_connections: 0,
                ..ListenerConfig::default()
            },
            ListenerConfig {
                body_timeout: Duration::ZERO,
                ..ListenerConfig::default()
            },
            ListenerConfig {
                max_header_bytes: 100,
                ..ListenerConfig::default()
            },
            ListenerConfig {
                h2_max_concurrent_streams: 0,
                ..ListenerConfig::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn the_busy_reply_is_one_complete_http_response() {
        let reply = busy_reply();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(reply.as_bytes()) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(resp.code, Some(503));
        let body: serde_json::Value = serde_json::from_str(&reply[head..]).unwrap();
        assert_eq!(body["error"]["code"], "busy");
        let len = resp
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .map(|h| {
                std::str::from_utf8(h.value)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            });
        assert_eq!(len, Some(reply.len() - head));
    }
}
