//! One connection: the TLS handshake under its deadline, HTTP/1.1 or HTTP/2 with their limits,
//! and the watchdog that closes a connection which stops making progress.
//!
//! The watchdog is one sleeping future per connection, waking when the deadline that applies
//! passes (or after the shortest deadline, whichever is first); the request path only records
//! the time of its progress (a clock read and a relaxed store, no timer per request). Which
//! deadline applies, counted from the last progress:
//!
//! | state | deadline |
//! |---|---|
//! | a request in flight (headers in, answer not yet out) | `request_timeout` |
//! | idle, connection not verified | `header_read_timeout` (also the first request's) |
//! | idle, connection verified | `idle_timeout` |
//!
//! Progress is a request starting or finishing — never a byte, so a trickle keeps nothing
//! alive. A shutdown lets a connection's current request finish; a shed connection is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use fleet_core::store::FleetStore;
use fleet_core::{Fingerprint, InstanceId, InstanceIdentity};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::admission::Ticket;
use super::{AgentServer, Peer, ServerConfig};

/// What the watchdog and the request path share about one connection.
#[derive(Debug)]
pub(super) struct Conn {
    ticket: Ticket,
    /// When the connection was accepted: `last_progress` counts from here.
    born: Instant,
    in_flight: AtomicU32,
    /// Nanoseconds from `born` to the last progress (a request starting or finishing).
    last_progress: AtomicU64,
    verified: AtomicBool,
}

/// A request in flight on a [`Conn`]; dropping it marks the request finished.
pub(super) struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.progress();
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Conn {
    fn new(ticket: Ticket, born: Instant) -> Self {
        Self {
            ticket,
            born,
            in_flight: AtomicU32::new(0),
            last_progress: AtomicU64::new(0),
            verified: AtomicBool::new(false),
        }
    }

    fn progress(&self) {
        let since_born = Instant::now().saturating_duration_since(self.born);
        self.last_progress.store(
            u64::try_from(since_born.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.progress();
        InFlight(Arc::clone(self))
    }

    /// A request on this connection authenticated as `instance`: move it to the verified
    /// budget (once; later requests only read a flag).
    pub(super) fn authenticated(&self, instance: InstanceId) {
        if !self.verified.load(Relaxed) && self.ticket.promote(instance) {
            self.verified.store(true, Relaxed);
        }
    }

    fn deadline(&self, cfg: &ServerConfig) -> Duration {
        if self.in_flight.load(Relaxed) > 0 {
            cfg.request_timeout
        } else if self.verified.load(Relaxed) {
            cfg.idle_timeout
        } else {
            cfg.header_read_timeout
        }
    }

    /// When the deadline that applies now passes, unless there is progress first.
    fn due(&self, cfg: &ServerConfig) -> Instant {
        self.born + Duration::from_nanos(self.last_progress.load(Relaxed)) + self.deadline(cfg)
    }
}

/// Completes once `conn` has made no progress for the deadline that applies to it. It sleeps
/// until that deadline, but never longer than the shortest deadline at a time: a request that
/// ends can move a connection to a shorter one (an unverified connection goes from
/// `request_timeout` to `header_read_timeout`), and since that shorter deadline counts from the
/// request's end, the next wake-up is still in time for it. A verified agent's connection costs
/// one wake-up per `min(deadlines)`, and nothing per request but two clock reads.
async fn watchdog(conn: &Conn, cfg: &ServerConfig) {
    let longest_sleep = cfg
        .header_read_timeout
        .min(cfg.request_timeout)
        .min(cfg.idle_timeout)
        .max(Duration::from_millis(1));
    loop {
        let now = Instant::now();
        let due = conn.due(cfg);
        if now >= due {
            return;
        }
        tokio::time::sleep_until(due.min(now + longest_sleep)).await;
    }
}

impl<S: FleetStore> AgentServer<S> {
    /// Which CA of the fleet's set signed `leaf` (a certificate the handshake verified). With one
    /// CA there is nothing to check; during a rotation, one signature check per connection.
    fn issuer_of(&self, leaf: &[u8]) -> Option<Fingerprint> {
        let set = self.fleet.ca_set();
        match set.all() {
            [only] => Some(only.fingerprint()),
            all => all
                .iter()
                .find(|ca| ca.verify_issued_ignoring_time(leaf).is_some())
                .map(|ca| ca.fingerprint()),
        }
    }

    /// Serves one accepted connection until it ends, its deadline passes or it is shed.
    pub(super) async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        addr: SocketAddr,
        ticket: Ticket,
        mut shed: oneshot::Receiver<()>,
        watcher: Watcher,
    ) {
        let accepted = Instant::now();
        // Replies are written whole; Nagle would only hold them back.
        let _ = tcp.set_nodelay(true);
        let cfg = &self.config;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls());
        let tls = tokio::select! {
            accepted = tokio::time::timeout(cfg.tls_handshake_timeout, acceptor.accept(tcp)) => {
                match accepted {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                }
            }
            _ = &mut shed => return,
        };
        self.handshakes.fetch_add(1, Relaxed);
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first());
        let identity = leaf.and_then(|leaf| InstanceIdentity::from_certificate_der(leaf).ok());
        let issuer = match (&identity, leaf) {
            (Some(_), Some(leaf)) => self.issuer_of(leaf),
            _ => None,
        };
        let identity_known = identity.is_some();
        let peer = Arc::new(Peer {
            addr,
            identity,
            issuer,
        });
        let conn = Arc::new(Conn::new(ticket, accepted));
        // The first request's deadline counts from the end of the handshake.
        conn.progress();
        let service = {
            let (server, conn) = (Arc::clone(&self), Arc::clone(&conn));
            hyper::service::service_fn(move |req| {
                let in_flight = conn.begin();
                let (server, peer, conn) =
                    (Arc::clone(&server), Arc::clone(&peer), Arc::clone(&conn));
                async move {
                    let resp = server.respond(req, &peer, Some(&conn)).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // hyper times the wait for the next request on a kept-alive HTTP/1.1 connection
            // with the header-read timer, so a connection with a certificate gets the idle
            // timeout there; the watchdog still holds it to `header_read_timeout` until a
            // request has authenticated it.
            .header_read_timeout(if identity_known {
                cfg.header_read_timeout.max(cfg.idle_timeout)
            } else {
                cfg.header_read_timeout
            })
            .max_buf_size(cfg.max_header_bytes.max(8 * 1024) + 8 * 1024);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.http2_max_concurrent_streams.max(1))
            .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
            // What one connection may make the server buffer: one heartbeat per stream window,
            // four across the connection.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(4 * STREAM_WINDOW)
            .keep_alive_interval(cfg.http2_keep_alive_interval)
            .keep_alive_timeout(cfg.http2_keep_alive_timeout);
        let served = builder
            .serve_connection(TokioIo::new(tls), service)
            .into_owned();
        tokio::select! {
            _ = watcher.watch(served) => {}
            () = watchdog(&conn, cfg) => {}
            _ = &mut shed => {}
        }
    }
}

/// The HTTP/2 flow-control window per stream: the largest heartbeat body.
const STREAM_WINDOW: u32 = crate::MAX_HEARTBEAT_BODY as u32;
