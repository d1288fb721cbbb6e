//! The operator listener under abuse (issue 16), through the real `control-panel` binary unless
//! said otherwise: a flood of never-ending logins under a low `ulimit -n` stops neither the agent
//! listener nor, once the deadline has passed, the operator listener; slow bodies are cut at
//! their deadline on HTTP/1.1 and HTTP/2; a long response is not cut (through the listener
//! itself: no route streams yet); wrong operator tokens are rate limited while a right one is
//! not; and forwarded headers count only from a trusted proxy, with the `Origin` check comparing
//! schemes.
//!
//! Every attack is bounded in count and time, on loopback only, and every server is stopped.

#[path = "support/http.rs"]
mod http;
#[path = "support/panel.rs"]
mod panel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fleet_agent_proto::HeartbeatRequest;
use fleet_agent_proto::client::{self, AgentClient, Endpoint};
use fleet_core::{JoinString, SystemInfo};
use fleet_examples::operator::listener::{self, ListenerConfig, RequestBody};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use panel::{Options, free_port, send, start, start_with, stop, wait_up};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Room for a loaded two-core machine on top of a deadline.
const SLACK: Duration = Duration::from_secs(3);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn operator_token(data: &std::path::Path) -> String {
    std::fs::read_to_string(data.join("operator-token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// What a raw connection received until the server closed it.
#[derive(Debug)]
struct Ended {
    /// Everything read.
    bytes: Vec<u8>,
    /// Whether it ended with a reset rather than a clean close.
    reset: bool,
    /// When, from the test's clock.
    at: Duration,
}

impl Ended {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status of the HTTP/1.1 reply read, if any.
    fn status(&self) -> Option<u16> {
        let text = self.text();
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// `error.code` of the JSON body of the reply read.
    fn code(&self) -> Option<String> {
        let text = self.text();
        let (_, body) = text.split_once("\r\n\r\n")?;
        let v: Value = serde_json::from_str(body).ok()?;
        v["error"]["code"].as_str().map(str::to_owned)
    }
}

/// Reads until the server closes the connection (or resets it); `None` if it is still open
/// after `limit`.
async fn until_closed(tcp: &mut TcpStream, since: Instant, limit: Duration) -> Option<Ended> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) => {
                return Some(Ended {
                    bytes,
                    reset: false,
                    at: since.elapsed(),
                });
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => {
                return Some(Ended {
                    bytes,
                    reset: true,
                    at: since.elapsed(),
                });
            }
        }
    }
}

/// The head of a login whose body (`token=` of a promised 100,000 bytes) never finishes.
fn endless_login(port: u16) -> Vec<u8> {
    format!(
        "POST /login HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\
         content-type: application/x-www-form-urlencoded\r\ncontent-length: 100000\r\n\r\ntoken="
    )
    .into_bytes()
}

/// A request body that sends one frame and then never another, nor its end.
#[derive(Debug)]
struct Endless(Option<Bytes>);

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// Under `ulimit -n 256` (soft 128, raised by the binary to the hard 256), 300 logins whose
/// bodies never end — more than the process may open files — take at most the operator
/// listener's cap (48 of the 256 descriptors); every other one is refused at once. Meanwhile an
/// agent enrolls and heartbeats over mutual TLS on the agent listener, and once the body
/// deadline has passed every held login has been answered 408 and the operator listener serves
/// again. The other way round, 300 silent connections to the agent listener do not stop the
/// operator listener either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_endless_logins_stops_neither_listener() {
    const FLOOD: usize = 300;
    const CAP: usize = 48;
    let deadline = Duration::from_secs(6);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("control-panel.log");
    let port = free_port();
    let agent_listen = format!("127.0.0.1:{}", free_port());
    let mut child = start_with(
        &data,
        &log,
        port,
        Options {
            extra: &[
                "--agent-listen",
                &agent_listen,
                "--operator-header-timeout",
                "6",
                "--operator-body-timeout",
                "6",
            ],
            log_filter: "info",
            open_files: Some((128, 256)),
        },
    );
    wait_up(port, &mut child).await;
    // The line is written just after the listeners start.
    let mut text = String::new();
    for _ in 0..50 {
        text = std::fs::read_to_string(&log).unwrap();
        if text.contains("control panel running") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running = text
        .lines()
        .find(|l| l.contains("control panel running"))
        .unwrap_or_else(|| panic!("log: {text:?}"));
    assert!(
        running.contains("open_files=Some(256)")
            && running.contains(&format!("operator_connections={CAP}")),
        "the soft limit is raised to the hard one and the caps fit under it: {running}"
    );

    // A join string for the agent, made before the flood.
    let bearer = format!("Bearer {}", operator_token(&data));
    let (status, _, body) = send(
        port,
        "POST",
        "/api/v1/tokens",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        r#"{"max_uses": 1}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 201);
    let join: JoinString = serde_json::from_slice::<Value>(&body).unwrap()["join"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let t0 = Instant::now();
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let mut tcp = TcpStream::connect(local(port)).await.unwrap();
        // A refused connection may already be closed: what it answers is read below.
        let _ = tcp.write_all(&endless_login(port)).await;
        flood.push(tokio::spawn(async move {
            until_closed(&mut tcp, t0, Duration::from_secs(30)).await
        }));
    }

    // The agent listener is not starved: an agent enrolls and heartbeats over mutual TLS.
    let endpoint = Endpoint {
        server_name: "localhost".into(),
        address: agent_listen.clone(),
    };
    let identity = tokio::time::timeout(
        Duration::from_secs(20),
        client::enroll(
            &endpoint,
            &join,
            SystemInfo::with_hostname("during-the-flood"),
            None,
        ),
    )
    .await
    .expect("enrollment finished in time")
    .expect("enrolled during the flood");
    let agent = AgentClient::new(endpoint, identity).unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        agent.heartbeat(&HeartbeatRequest::default()),
    )
    .await
    .expect("heartbeat finished in time")
    .expect("heartbeat accepted during the flood");
    let held = flood.iter().filter(|t| !t.is_finished()).count();
    assert!(
        t0.elapsed() < deadline,
        "the agent must have been served while the flood was held ({:?})",
        t0.elapsed()
    );
    assert!(
        (CAP - 8..=CAP).contains(&held),
        "{held} endless logins held: the operator listener holds its cap, no more"
    );

    // At the cap a new connection is answered at once, not left waiting.
    let mut probe = TcpStream::connect(local(port)).await.unwrap();
    let asked = Instant::now();
    let busy = until_closed(&mut probe, asked, Duration::from_secs(5))
        .await
        .expect("a connection over the cap is closed at once");
    assert_eq!(busy.status(), Some(503), "{}", busy.text());
    assert_eq!(busy.code().as_deref(), Some("busy"), "{}", busy.text());
    assert!(busy.at < Duration::from_secs(2), "{:?}", busy.at);

    // Every held login is answered 408 at its deadline and closed; the others were refused at
    // once.
    let (mut timed_out, mut refused) = (0, 0);
    for t in flood {
        let ended = t.await.unwrap().expect("every flood connection ends");
        if ended.status() == Some(408) {
            assert_eq!(ended.code().as_deref(), Some("request_timeout"));
            assert!(
                ended.at >= deadline - Duration::from_millis(500)
                    && ended.at <= deadline + SLACK + Duration::from_secs(2),
                "cut at {:?}",
                ended.at
            );
            timed_out += 1;
        } else {
            assert!(
                ended.status() == Some(503) || ended.bytes.is_empty(),
                "{} (reset: {})",
                ended.text(),
                ended.reset
            );
            assert!(ended.at < deadline, "refused at {:?}", ended.at);
            refused += 1;
        }
    }
    eprintln!("flood of {FLOOD}: {held} held, {timed_out} answered 408, {refused} refused");
    assert!(
        timed_out <= CAP && timed_out >= held,
        "{timed_out} answered 408"
    );
    assert_eq!(timed_out + refused, FLOOD);
    let (status, _, _) = send(port, "GET", "/login", &[], "").await.unwrap();
    assert_eq!(status, 200, "the operator listener serves again");

    // The other way round: 300 connections to the agent listener that never begin their TLS
    // handshake take at most its cap (144 here); the rest wait in the kernel's backlog, holding
    // no descriptor of the process, and the operator listener keeps answering.
    let agent_addr: SocketAddr = agent_listen.parse().unwrap();
    let mut silent = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        silent.push(TcpStream::connect(agent_addr).await.unwrap());
    }
    // Time for the agent listener to take what it will.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered =
        tokio::time::timeout(Duration::from_secs(5), send(port, "GET", "/login", &[], ""))
            .await
            .ok()
            .flatten()
            .map(|(status, _, _)| status);
    assert_eq!(
        answered,
        Some(200),
        "the operator listener answers during a flood of the agent listener"
    );
    drop(silent);
    stop(child).await;
}

/// A body that does not finish within `--operator-body-timeout` is answered 408
/// `request_timeout` at the deadline — on HTTP/1.1 (then the connection is closed) and on
/// HTTP/2 (prior knowledge; the reply arrives while the client is still sending) — a head over
/// `--operator-max-header-bytes` is answered 431 on both, and a connection that sends nothing,
/// or half a head, is closed at the header deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_is_cut_at_its_deadline_on_http1_and_http2() {
    let deadline = Duration::from_secs(2);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let mut child = start(
        &data,
        &tmp.path().join("control-panel.log"),
        port,
        &[
            "--operator-header-timeout",
            "2",
            "--operator-body-timeout",
            "2",
            "--operator-max-header-bytes",
            "16384",
        ],
    );
    wait_up(port, &mut child).await;
    let within =
        |at: Duration| at >= deadline - Duration::from_millis(300) && at <= deadline + SLACK;

    // HTTP/1.1: a login whose body stops half way.
    let mut tcp = TcpStream::connect(local(port)).await.unwrap();
    let t0 = Instant::now();
    tcp.write_all(&endless_login(port)).await.unwrap();
    let ended = until_closed(&mut tcp, t0, deadline + SLACK)
        .await
        .expect("the slow body is cut and the connection closed");
    assert_eq!(ended.status(), Some(408), "{}", ended.text());
    assert_eq!(ended.code().as_deref(), Some("request_timeout"));
    assert!(
        ended
            .text()
            .to_ascii_lowercase()
            .contains("connection: close")
    );
    assert!(!ended.reset, "closed, not reset");
    assert!(within(ended.at), "cut at {:?}", ended.at);

    // HTTP/2: a JSON API write and a login, each with a body that never ends.
    let bearer = format!("Bearer {}", operator_token(&data));
    let tcp = TcpStream::connect(local(port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    for (path, auth, kind) in [
        ("/api/v1/tokens", bearer.as_str(), "application/json"),
        ("/login", "", "application/x-www-form-urlencoded"),
    ] {
        let mut req = Request::post(format!("http://127.0.0.1:{port}{path}"))
            .header("content-type", kind)
            .header("content-length", "100000");
        if !auth.is_empty() {
            req = req.header("authorization", auth);
        }
        let req = req
            .body(Endless(Some(Bytes::from_static(b"{\"description\": \""))))
            .unwrap();
        let t0 = Instant::now();
        let resp = tokio::time::timeout(deadline + SLACK, sender.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("HTTP/2 {path}: no reply by the deadline"))
            .unwrap();
        let at = t0.elapsed();
        assert_eq!(resp.status(), 408, "HTTP/2 {path}");
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "request_timeout", "{v}");
        assert!(within(at), "HTTP/2 {path} cut at {at:?}");
    }
    drop(sender);
    conn.abort();

    // A head over `--operator-max-header-bytes` is refused with 431 on both protocols.
    let big = "a".repeat(20_000);
    let mut tcp = TcpStream::connect(local(port)).await.unwrap();
    let t0 = Instant::now();
    tcp.write_all(
        format!("GET /login HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let ended = until_closed(&mut tcp, t0, SLACK)
        .await
        .expect("refused and closed");
    assert_eq!(ended.status(), Some(431), "HTTP/1.1: {}", ended.text());
    let tcp = TcpStream::connect(local(port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(format!("http://127.0.0.1:{port}/login"))
        .header("x-big", big.as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(SLACK, sender.send_request(req))
        .await
        .expect("HTTP/2: an answer")
        .unwrap();
    assert_eq!(resp.status(), 431, "HTTP/2");
    drop(sender);
    conn.abort();

    // A connection that says nothing, and one that stops in the middle of its head.
    for opening in [&b""[..], &b"GET /login HTTP/1.1\r\nhost: 127.0.0.1\r\n"[..]] {
        let mut tcp = TcpStream::connect(local(port)).await.unwrap();
        let t0 = Instant::now();
        tcp.write_all(opening).await.unwrap();
        let ended = until_closed(&mut tcp, t0, deadline + SLACK)
            .await
            .unwrap_or_else(|| panic!("{opening:?}: still open after the header deadline"));
        assert!(within(ended.at), "{opening:?} closed at {:?}", ended.at);
    }
    stop(child).await;
}

/// A response body that sends a chunk every `every`, `left` times.
#[derive(Debug)]
struct Ticker {
    left: u32,
    every: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Body for Ticker {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.left -= 1;
                let next = tokio::time::Instant::now() + self.every;
                self.sleep.as_mut().reset(next);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"tick\n")))))
            }
        }
    }
}

/// The request deadlines time reading requests, never answering them: on a listener whose
/// header, body and idle deadlines are all 1 s, a handler that has read its request streams a
/// 4-second response to its end, over HTTP/1.1 and HTTP/2, while a slow request body on the
/// same listener is still cut at 1 s. (No operator route streams yet, so this runs
/// [`listener::serve`] with a streaming handler of its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_response_is_not_cut_by_the_request_deadlines() {
    let second = Duration::from_secs(1);
    let config = ListenerConfig {
        header_read_timeout: second,
        body_timeout: second,
        idle_timeout: second,
        ..ListenerConfig::default()
    };
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        listener::serve(
            tcp,
            &config,
            async {
                let _ = stop_rx.await;
            },
            |req: Request<RequestBody>| async move {
                match req.into_body().collect().await {
                    Ok(_) => Response::new(http_body_util::Either::Left(Ticker {
                        left: 8,
                        every: Duration::from_millis(500),
                        sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                    })),
                    Err(e) => {
                        let mut r = Response::new(http_body_util::Either::Right(Full::new(
                            Bytes::from(e.to_string()),
                        )));
                        *r.status_mut() = hyper::StatusCode::REQUEST_TIMEOUT;
                        r
                    }
                }
            },
        )
        .await
    });

    for version in [hyper::Version::HTTP_11, hyper::Version::HTTP_2] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        let resp = if version == hyper::Version::HTTP_2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender
                .send_request(
                    Request::get("http://127.0.0.1/events")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender
                .send_request(
                    Request::get("/events")
                        .header("host", addr.to_string())
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap()
        };
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
            .await
            .expect("the stream ends")
            .unwrap_or_else(|e| panic!("{version:?}: the response was cut: {e}"))
            .to_bytes();
        assert_eq!(body, "tick\n".repeat(8), "{version:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(3_400),
            "{version:?}: {:?}",
            t0.elapsed()
        );
    }

    // The same listener still cuts a slow request body at 1 s.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    tcp.write_all(b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab")
        .await
        .unwrap();
    let ended = until_closed(&mut tcp, t0, second + SLACK)
        .await
        .expect("cut and closed");
    assert_eq!(ended.status(), Some(408), "{}", ended.text());
    assert!(ended.at <= second + SLACK, "{:?}", ended.at);

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// Sixty concurrent wrong logins from one address: with the default budget (20 a minute) 20 are
/// evaluated (401) and 40 answered 429 `rate_limited` with `Retry-After` — check and count are
/// one step, so concurrency cannot overrun the budget. A correct token is still accepted, at
/// the login page and as a bearer, while a wrong bearer is refused with 429 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_operator_tokens_are_limited_and_a_right_one_never_is() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let mut child = start(&data, &tmp.path().join("control-panel.log"), port, &[]);
    wait_up(port, &mut child).await;
    let form = [("content-type", "application/x-www-form-urlencoded")];

    let guesses: Vec<_> = (0..60)
        .map(|i| {
            tokio::spawn(async move {
                let body = format!("token=wrong-guess-number-{i:03}");
                http::try_send(local(port), "POST", "/login", &form, body).await
            })
        })
        .collect();
    let (mut wrong, mut limited) = (0, 0);
    for g in guesses {
        let r = g.await.unwrap().expect("every guess is answered");
        match r.status {
            401 => wrong += 1,
            429 => {
                assert_eq!(r.code().as_deref(), Some("rate_limited"), "{}", r.text());
                let retry: u64 = r.header("retry-after").parse().unwrap();
                assert!((1..=60).contains(&retry), "Retry-After: {retry}");
                limited += 1;
            }
            s => panic!("a wrong login answered {s}: {}", r.text()),
        }
    }
    assert_eq!((wrong, limited), (20, 40), "20 evaluated, the rest refused");

    // The right token is not refused because of the others.
    let token = operator_token(&data);
    let r = http::send(
        local(port),
        "POST",
        "/login",
        &form,
        format!("token={token}"),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(r.header("set-cookie").starts_with("fleet_session="));
    let right = format!("Bearer {token}");
    let r = http::send(
        local(port),
        "GET",
        "/api/v1/session",
        &[("authorization", &right)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http::send(
        local(port),
        "GET",
        "/api/v1/session",
        &[("authorization", "Bearer wrong-bearer-guess")],
        "",
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code().as_deref(), Some("rate_limited"));
    stop(child).await;
}

/// Logs in with the operator token and `headers`; returns the reply.
async fn login(port: u16, token: &str, headers: &[(&str, &str)]) -> http::Reply {
    let mut all = vec![("content-type", "application/x-www-form-urlencoded")];
    all.extend_from_slice(headers);
    http::send(
        local(port),
        "POST",
        "/login",
        &all,
        format!("token={token}"),
    )
    .await
}

/// A cookie-authenticated write (create a token) with `headers`; returns the status and code.
async fn cookie_write(port: u16, cookie: &str, headers: &[(&str, &str)]) -> (u16, Option<String>) {
    let session = http::send(
        local(port),
        "GET",
        "/api/v1/session",
        &[("cookie", cookie)],
        "",
    )
    .await;
    let csrf = session.json()["csrf"].as_str().unwrap().to_owned();
    let mut all = vec![
        ("cookie", cookie),
        ("x-csrf-token", csrf.as_str()),
        ("content-type", "application/json"),
    ];
    all.extend_from_slice(headers);
    let r = http::send(local(port), "POST", "/api/v1/tokens", &all, "{}").await;
    (r.status, r.code())
}

/// The `Cookie` value of a login reply's `Set-Cookie`.
fn cookie_of(r: &http::Reply) -> String {
    r.header("set-cookie").split(';').next().unwrap().to_owned()
}

/// `X-Forwarded-Proto` from a peer that is not a `--trusted-proxy` changes nothing: the cookie
/// is not `Secure` and `https://` is not this site's origin. From a trusted proxy it makes the
/// cookie `Secure` and `https://` the origin. Either way an `Origin` of the other scheme is
/// refused, at the login and on a cookie-authenticated API write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_proto_counts_only_from_a_trusted_proxy_and_origins_compare_schemes() {
    let tmp = tempfile::tempdir().unwrap();
    let https = [("x-forwarded-proto", "https")];

    // No trusted proxy: the header is anyone's, and ignored.
    let data = tmp.path().join("direct");
    let port = free_port();
    let mut child = start(&data, &tmp.path().join("direct.log"), port, &[]);
    wait_up(port, &mut child).await;
    let token = operator_token(&data);
    let http_origin = format!("http://127.0.0.1:{port}");
    let https_origin = format!("https://127.0.0.1:{port}");
    let r = login(port, &token, &https).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(
        !r.header("set-cookie").contains("Secure"),
        "an untrusted peer made the cookie Secure: {}",
        r.header("set-cookie")
    );
    let cookie = cookie_of(&r);
    let r = login(port, &token, &[https[0], ("origin", &https_origin)]).await;
    assert_eq!(
        r.status,
        403,
        "an https origin on this http site: {}",
        r.text()
    );
    let r = login(port, &token, &[("origin", &http_origin)]).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(
        cookie_write(port, &cookie, &[https[0], ("origin", &https_origin)]).await,
        (403, Some("csrf_failed".into()))
    );
    assert_eq!(
        cookie_write(port, &cookie, &[("origin", &http_origin)])
            .await
            .0,
        201
    );
    stop(child).await;

    // Behind a trusted proxy on loopback: its header counts.
    let data = tmp.path().join("proxied");
    let port = free_port();
    let mut child = start(
        &data,
        &tmp.path().join("proxied.log"),
        port,
        &["--trusted-proxy", "127.0.0.0/8", "--trusted-proxy", "::1"],
    );
    wait_up(port, &mut child).await;
    let token = operator_token(&data);
    let http_origin = format!("http://127.0.0.1:{port}");
    let https_origin = format!("https://127.0.0.1:{port}");
    let r = login(port, &token, &https).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(
        r.header("set-cookie").contains("; Secure"),
        "{}",
        r.header("set-cookie")
    );
    let cookie = cookie_of(&r);
    let r = login(port, &token, &[]).await;
    assert!(
        !r.header("set-cookie").contains("Secure"),
        "not proxied: plain http"
    );
    let r = login(port, &token, &[https[0], ("origin", &http_origin)]).await;
    assert_eq!(
        r.status,
        403,
        "an http origin on this https site: {}",
        r.text()
    );
    let r = login(port, &token, &[https[0], ("origin", &https_origin)]).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(
        cookie_write(port, &cookie, &[https[0], ("origin", &http_origin)]).await,
        (403, Some("csrf_failed".into()))
    );
    assert_eq!(
        cookie_write(port, &cookie, &[https[0], ("origin", &https_origin)])
            .await
            .0,
        201
    );
    stop(child).await;
}

/// Refusals of the operator API reach curl over HTTP/2 (prior knowledge, as behind a proxy that
/// speaks h2c) and over HTTP/1.1: no credentials 401, a tenant operator on a fleet-wide route
/// 403, an invalid body 400, a body over the limit 413 (it used to be answered before the upload
/// ended, and curl lost 3 of 20 over HTTP/2: "(92) Stream error"), and a wrong bearer over the
/// source's budget 429. Each many times, each with its JSON error code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_reach_curl_over_http2_and_http1() {
    const RUNS: usize = 10;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let mut child = start(
        &data,
        &tmp.path().join("control-panel.log"),
        port,
        &["--tenant-token", "acme", "--login-max-failures", "2"],
    );
    wait_up(port, &mut child).await;
    let token = operator_token(&data);
    let tenant = std::fs::read_to_string(data.join("operator-token.acme"))
        .unwrap()
        .trim()
        .to_owned();
    let d = tmp.path().to_path_buf();
    std::fs::write(d.join("mid.json"), vec![b' '; 40 * 1024]).unwrap();
    std::fs::write(d.join("big.json"), vec![b' '; 400 * 1024]).unwrap();
    std::fs::write(d.join("bad.json"), b"{not json").unwrap();
    std::fs::write(
        d.join("policy.json"),
        br#"{"name": "p", "filter": "", "rule": {"agent_version_at_least": "1.0"}}"#,
    )
    .unwrap();
    let results = tokio::task::spawn_blocking(move || {
        let curl = |proto: &str, path: &str, bearer: Option<&str>, file: &str| {
            let mut cmd = std::process::Command::new("curl");
            cmd.current_dir(&d)
                .args(["-sS", proto, "-o", "-", "-w", "\n%{http_code}"]);
            cmd.args(["-H", "Content-Type: application/json"]);
            if let Some(b) = bearer {
                cmd.args(["-H", &format!("Authorization: Bearer {b}")]);
            }
            let out = cmd
                .args(["--data-binary", &format!("@{file}")])
                .arg(format!("http://127.0.0.1:{port}{path}"))
                .output()
                .expect("curl is part of the build image");
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let mut seen = Vec::new();
        for proto in ["--http2-prior-knowledge", "--http1.1"] {
            // (path, bearer, body file, class, status, code)
            type Class<'a> = (
                &'static str,
                Option<&'a str>,
                &'static str,
                &'static str,
                u16,
                &'static str,
            );
            let classes: [Class<'_>; 4] = [
                (
                    "/api/v1/tokens",
                    None,
                    "mid.json",
                    "no credentials",
                    401,
                    "unauthorized",
                ),
                (
                    "/api/v1/policies",
                    Some(&tenant),
                    "policy.json",
                    "tenant on a fleet-wide route",
                    403,
                    "forbidden",
                ),
                (
                    "/api/v1/tokens",
                    Some(&token),
                    "bad.json",
                    "invalid JSON",
                    400,
                    "malformed_request",
                ),
                (
                    "/api/v1/tokens",
                    Some(&token),
                    "big.json",
                    "over the body limit",
                    413,
                    "body_too_large",
                ),
            ];
            for (path, bearer, file, class, status, code) in classes {
                for _ in 0..RUNS {
                    seen.push((proto, class, curl(proto, path, bearer, file), status, code));
                }
            }
        }
        // Wrong bearers: two answered 401 (the budget, over both protocols), then 429.
        for (i, proto) in ["--http2-prior-knowledge", "--http1.1"]
            .iter()
            .cycle()
            .take(2 + 2 * RUNS)
            .enumerate()
        {
            let (status, code) = if i < 2 {
                (401, "unauthorized")
            } else {
                (429, "rate_limited")
            };
            let got = curl(
                proto,
                "/api/v1/tokens",
                Some("a-wrong-operator-token"),
                "mid.json",
            );
            seen.push((proto, "wrong bearer", got, status, code));
        }
        seen
    })
    .await
    .unwrap();
    for (proto, class, (stdout, stderr), status, code) in results {
        let (body, got) = stdout
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("{proto} {class}: no status ({stderr})"));
        assert_eq!(
            got,
            status.to_string(),
            "{proto} {class}: the client reads the status ({stderr})"
        );
        let v: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{proto} {class}: a JSON error body, not {body:?}: {e}"));
        assert_eq!(v["error"]["code"], code, "{proto} {class}: {v}");
    }
    stop(child).await;
}
