//! The agent server end to end, over real TLS on 127.0.0.1 with an ephemeral port: enrollment,
//! heartbeats over mTLS, staleness with a manual clock, renewal, deregistration, a foreign CA at
//! the handshake, and every documented refusal changing nothing.

use std::sync::Arc;
use std::time::Duration;

use fleet_agent_proto::server::ServerConfig;
use fleet_agent_proto::{ErrorBody, ErrorCode};
use fleet_core::store::InstanceStore;
use fleet_core::{
    CertificateAuthority, Clock, MaxUses, NewToken, Status, SystemClock, TenantScope,
};
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

mod support;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_heartbeat_staleness_renew_deregister() {
    let h = Harness::start(ServerConfig::default()).await;
    let token = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let (id, resp) = enroll(&h, &token.join.to_string(), "web-01").await;
    assert_eq!(resp.heartbeat_interval_secs, 15);
    assert_eq!(pem_to_der(&resp.ca_pem), h.ca_der);

    // Heartbeats over mTLS keep it online.
    let (status, body) = post(
        &h,
        Some(&id),
        "/v1/heartbeat",
        serde_json::json!({"sequence": 1, "metrics": {"cpu_percent": 12.5}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["next_heartbeat_secs"], 15);
    assert_eq!(body["commands"], serde_json::json!([]));
    let (status, _) = post(&h, Some(&id), "/v1/heartbeat", serde_json::json!({})).await;
    assert_eq!(status, 200);
    let instance = resp.instance_id;
    assert_eq!(h.fleet.view().status(instance), Some(Status::Online));

    // Renewal (before the manual clock runs ahead: rustls checks validity against the real
    // clock): the new certificate works, and its first use retires the old one.
    let (key2, csr2) = csr();
    let (status, body) = post(
        &h,
        Some(&id),
        "/v1/renew",
        serde_json::json!({"csr_pem": csr2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id2 = ClientId {
        cert: pem_to_der(body["certificate_pem"].as_str().unwrap()),
        key: key2.serialize_der(),
    };
    assert_eq!(
        post(&h, Some(&id), "/v1/heartbeat", serde_json::json!({}))
            .await
            .0,
        200,
        "old still valid"
    );
    assert_eq!(
        post(&h, Some(&id2), "/v1/heartbeat", serde_json::json!({}))
            .await
            .0,
        200
    );
    let (status, body) = post(&h, Some(&id), "/v1/heartbeat", serde_json::json!({})).await;
    assert_eq!((status, code(&body)), (403, ErrorCode::CertificateRevoked));

    // Silence: warning after 60 s, offline after 5 min, with threshold-crossing times.
    h.clock.advance(Duration::from_secs(61));
    let changes = h.fleet.sweep();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].transition.to, changes[0].transition.at),
        (
            Status::Warning,
            h.t0.saturating_add(Duration::from_secs(60))
        )
    );
    h.clock.advance(Duration::from_secs(240));
    let changes = h.fleet.sweep();
    assert_eq!(changes[0].transition.to, Status::Offline);
    assert_eq!(
        changes[0].transition.at,
        h.t0.saturating_add(Duration::from_millis(300_001))
    );
    let (status, _) = post(&h, Some(&id2), "/v1/heartbeat", serde_json::json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.fleet.view().status(instance),
        Some(Status::Online),
        "back online"
    );

    // Deregistration: the next heartbeat is refused.
    h.fleet
        .deregister(&TenantScope::All, instance)
        .await
        .unwrap();
    let (status, body) = post(&h, Some(&id2), "/v1/heartbeat", serde_json::json!({})).await;
    assert_eq!((status, code(&body)), (403, ErrorCode::CertificateRevoked));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_their_documented_errors_and_change_nothing() {
    let h = Harness::start(ServerConfig::default()).await;
    let token = h
        .fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Limited(1),
                expires_in: Some(Duration::from_secs(600)),
                ..NewToken::default()
            },
        )
        .await
        .unwrap();
    let t = token.presented.to_string();
    let store = Arc::clone(h.fleet.store());
    let count = || {
        let store = Arc::clone(&store);
        async move { store.count_instances().await.unwrap() }
    };

    let (_, good_csr) = csr();
    let cases: Vec<(&str, &str, Vec<u8>, u16, ErrorCode)> = vec![
        ("/v1/enroll", "application/json", serde_json::to_vec(&serde_json::json!({"token": format!("{}.{}", token.token.id, "0".repeat(32)), "csr_pem": good_csr, "system": {"hostname": "x"}})).unwrap(), 401, ErrorCode::InvalidToken),
        ("/v1/enroll", "application/json", serde_json::to_vec(&serde_json::json!({"token": t, "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "system": {"hostname": "x"}})).unwrap(), 400, ErrorCode::InvalidCsr),
        ("/v1/enroll", "application/json", b"{not json".to_vec(), 400, ErrorCode::MalformedRequest),
        ("/v1/enroll", "application/json", serde_json::to_vec(&serde_json::json!({"token": t, "csr_pem": good_csr, "system": {"hostname": "x"}, "extra": 1})).unwrap(), 400, ErrorCode::MalformedRequest),
        ("/v1/enroll", "text/plain", b"{}".to_vec(), 415, ErrorCode::UnsupportedMediaType),
        ("/v1/enroll", "application/json", vec![b' '; 17 * 1024], 413, ErrorCode::BodyTooLarge),
        ("/v1/heartbeat", "application/json", b"{}".to_vec(), 401, ErrorCode::Unauthenticated),
        ("/v1/renew", "application/json", b"{}".to_vec(), 401, ErrorCode::Unauthenticated),
        ("/v1/nope", "application/json", b"{}".to_vec(), 404, ErrorCode::NotFound),
    ];
    for (path, ct, body, status, expected) in cases {
        let (got, bytes) = post_raw(h.addr, &h.ca_der, None, path, ct, body)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!((got, code(&v)), (status, expected), "{path} {ct}: {v}");
        assert_eq!(count().await, 0, "{expected} must change nothing");
    }
    let stored = h
        .fleet
        .get_token(&TenantScope::All, &token.token.id)
        .await
        .unwrap();
    assert_eq!(stored.uses, 0, "no use consumed");

    // Used up, then expired.
    enroll(&h, &t, "first").await;
    let (status, body) = post(
        &h,
        None,
        "/v1/enroll",
        serde_json::json!({"token": t, "csr_pem": csr().1, "system": {"hostname": "second"}}),
    )
    .await;
    assert_eq!((status, code(&body)), (403, ErrorCode::TokenExhausted));
    let expiring = h
        .fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                expires_in: Some(Duration::from_secs(60)),
                ..NewToken::default()
            },
        )
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(61));
    let (status, body) = post(&h, None, "/v1/enroll", serde_json::json!({"token": expiring.presented.to_string(), "csr_pem": csr().1, "system": {"hostname": "late"}})).await;
    assert_eq!((status, code(&body)), (401, ErrorCode::TokenExpired));
    assert_eq!(count().await, 1, "only the one good enrollment exists");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_picks_aes_128_gcm_whatever_the_client_prefers() {
    let h = Harness::start(ServerConfig::default()).await;
    // rustls' default client order puts AES-256-GCM first.
    let default_order = rustls::crypto::ring::default_provider().cipher_suites;
    assert_eq!(
        default_order[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    let tls = connect(&h, None, &[b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    // A client that offers only AES-256-GCM still gets it.
    let mut only_256 = rustls::crypto::ring::default_provider();
    only_256
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(h.ca_der.clone())).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(only_256))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
    drop(tls);
    h.stop().await;
}

/// TLS 1.2 would send the client certificate (tenant, instance id, serial) in clear: the agent
/// listener speaks TLS 1.3 only. `openssl s_client` offers exactly one version per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_listener_refuses_tls_1_2() {
    let h = Harness::start(ServerConfig::default()).await;
    let connect = format!("127.0.0.1:{}", h.addr.port());
    let handshake = move |version: &'static str| {
        let connect = connect.clone();
        move || {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    version,
                    "-connect",
                    &connect,
                    "-servername",
                    "localhost",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("openssl is required for this test (apt-get install openssl)")
        }
    };
    let tls13 = tokio::task::spawn_blocking(handshake("-tls1_3"))
        .await
        .unwrap();
    let out13 = String::from_utf8_lossy(&tls13.stdout);
    assert!(
        out13.contains("Protocol  : TLSv1.3") || out13.contains("TLSv1.3"),
        "TLS 1.3 is served: {out13}"
    );
    let tls12 = tokio::task::spawn_blocking(handshake("-tls1_2"))
        .await
        .unwrap();
    let out12 = String::from_utf8_lossy(&tls12.stdout);
    assert!(
        !tls12.status.success() && !out12.contains("BEGIN CERTIFICATE"),
        "a TLS 1.2 handshake must fail: {out12} {}",
        String::from_utf8_lossy(&tls12.stderr)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let h = Harness::start(ServerConfig::default()).await;
    let other =
        CertificateAuthority::generate("other", SystemClock.now(), Duration::from_secs(86_400))
            .unwrap();
    let (key, csr) = csr();
    let csr = fleet_core::csr::validate_csr(&csr).unwrap();
    let foreign = other
        .issue_client(
            &csr,
            fleet_core::InstanceId::random(),
            None,
            SystemClock.now(),
            &fleet_core::IssuancePolicy::default(),
        )
        .unwrap();
    let id = ClientId {
        cert: foreign.der,
        key: key.serialize_der(),
    };
    let res = post_raw(
        h.addr,
        &h.ca_der,
        Some(&id),
        "/v1/heartbeat",
        "application/json",
        b"{}".to_vec(),
    )
    .await;
    assert!(res.is_err(), "the handshake must fail: {res:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_and_heartbeating_with_openssl_and_curl() {
    let h = Harness::start(ServerConfig::default()).await;
    let token = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("ca.pem"), h.fleet.ca().cert_pem()).unwrap();
    let port = h.addr.port();
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let token_string = token.presented.to_string();
    let base = url("/v1/enroll");
    let hb = url("/v1/heartbeat");
    let out = tokio::task::spawn_blocking(move || {
        // The agent's key and CSR, as an operator would make them by hand.
        run(&d, "openssl", &["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "key.pem", "-out", "csr.pem", "-subj", "/CN=by-hand"]);
        let csr = std::fs::read_to_string(d.join("csr.pem")).unwrap();
        let body = serde_json::json!({"token": token_string, "csr_pem": csr, "system": {"hostname": "by-hand"}});
        std::fs::write(d.join("enroll.json"), body.to_string()).unwrap();
        let enrolled = run(&d, "curl", &["-sS", "--fail-with-body", "--resolve", &resolve, "--cacert", "ca.pem",
            "-H", "Content-Type: application/json", "--data", "@enroll.json", &base]);
        let reply: serde_json::Value = serde_json::from_str(&enrolled).unwrap();
        std::fs::write(d.join("cert.pem"), reply["certificate_pem"].as_str().unwrap()).unwrap();
        let beat = run(&d, "curl", &["-sS", "--fail-with-body", "--resolve", &resolve, "--cacert", "ca.pem",
            "--cert", "cert.pem", "--key", "key.pem", "-H", "Content-Type: application/json",
            "--data", r#"{"metrics": {"cpu_percent": 3.5}}"#, &hb]);
        (reply, beat)
    })
    .await
    .unwrap();
    let (reply, beat) = out;
    let instance: fleet_core::InstanceId = reply["instance_id"].as_str().unwrap().parse().unwrap();
    let beat: serde_json::Value = serde_json::from_str(&beat).unwrap();
    assert_eq!(beat["next_heartbeat_secs"], 15);
    let view = h
        .fleet
        .get(&TenantScope::All, instance)
        .expect("enrolled by hand");
    assert_eq!(view.hostname, "by-hand");
    assert_eq!(view.metrics.and_then(|m| m.cpu_percent), Some(3.5));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_client_pins_the_ca_enrolls_heartbeats_and_renews() {
    use fleet_agent_proto::client::{self, AgentClient};
    let h = Harness::start(ServerConfig::default()).await;
    let endpoint = h.endpoint();
    let token = h
        .fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Limited(2),
                ..NewToken::default()
            },
        )
        .await
        .unwrap();

    // A join string pinning another CA is refused before the token is ever sent.
    let mut wrong = token.join.clone();
    wrong.ca_sha256 = fleet_core::Fingerprint::of(b"some other CA");
    let err = client::enroll(
        &endpoint,
        &wrong,
        fleet_core::SystemInfo::with_hostname("x"),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, client::ClientError::Transport(_)), "{err}");
    let ledger = h
        .fleet
        .token_ledger(&TenantScope::All, &token.token.id, 10)
        .await
        .unwrap();
    assert!(
        ledger.is_empty(),
        "the token never reached a server with another CA"
    );

    let identity = client::enroll(
        &endpoint,
        &token.join,
        fleet_core::SystemInfo::with_hostname("agent-1"),
        None,
    )
    .await
    .unwrap();
    let mut agent = AgentClient::new(endpoint.clone(), identity.clone()).unwrap();
    let reply = agent
        .heartbeat(&fleet_agent_proto::HeartbeatRequest::default())
        .await
        .unwrap();
    assert_eq!(reply.next_heartbeat_secs, 15);
    assert_eq!(
        h.fleet.view().status(identity.instance_id),
        Some(Status::Online)
    );

    let (nb, na) = client::validity(&identity.certificate_pem).unwrap();
    assert_eq!(
        na.duration_since(nb),
        Duration::from_secs(30 * 86_400 + 300)
    );
    agent.renew().await.unwrap();
    assert_ne!(agent.identity().certificate_pem, identity.certificate_pem);
    agent
        .heartbeat(&fleet_agent_proto::HeartbeatRequest::default())
        .await
        .unwrap();
    // The pre-renewal identity is now superseded.
    let old = AgentClient::new(endpoint, identity).unwrap();
    let err = old
        .heartbeat(&fleet_agent_proto::HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CertificateRevoked), "{err}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_client_keeps_its_connection_and_replaces_a_closed_one() {
    // An idle timeout long enough that a loaded CI machine does not let the connection go quiet
    // between the first heartbeats, short enough to wait out below.
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(1000),
        ..ServerConfig::default()
    };
    let h = Harness::start(config).await;
    let token = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let identity = fleet_agent_proto::client::enroll(
        &h.endpoint(),
        &token.join,
        fleet_core::SystemInfo {
            hostname: "kept".into(),
            ..fleet_core::SystemInfo::default()
        },
        None,
    )
    .await
    .unwrap();
    let after_enroll = h.server.handshakes();
    let agent = fleet_agent_proto::client::AgentClient::new(h.endpoint(), identity).unwrap();
    let hb = fleet_agent_proto::HeartbeatRequest::default();
    for _ in 0..5 {
        agent.heartbeat(&hb).await.unwrap();
    }
    assert_eq!(
        h.server.handshakes(),
        after_enroll + 1,
        "five heartbeats, one connection"
    );
    // The server closes the quiet connection (transport timing: a real-clock wait); the next
    // heartbeat opens a new one and succeeds.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    agent.heartbeat(&hb).await.unwrap();
    agent.heartbeat(&hb).await.unwrap();
    assert_eq!(h.server.handshakes(), after_enroll + 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_sent_in_pieces_are_joined_and_limited() {
    let h = Harness::start(ServerConfig::default()).await;
    let (enrolled, mut sender, _conn) = agent_connection(&h, "chunky").await;
    // Chunked transfer, no content-length: the server sees three frames.
    let send = |path: &'static str, pieces: Vec<Vec<u8>>| {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes>::new(4);
        tokio::spawn(async move {
            for p in pieces {
                if tx.send_data(Bytes::from(p)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        hyper::Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    };
    let pieces = [
        &b"{\"seq"[..],
        b"uence\":5,\"metrics\":{\"cpu_percent\":",
        b"42.5}}",
    ];
    let resp = sender
        .send_request(send(
            "/v1/heartbeat",
            pieces.iter().map(|p| p.to_vec()).collect(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Read the reply to its end, so the kept-alive connection is free for the next request.
    resp.into_body().collect().await.unwrap();
    let view = h
        .fleet
        .get(&TenantScope::All, enrolled.instance_id)
        .unwrap();
    assert_eq!(view.metrics.and_then(|m| m.cpu_percent), Some(42.5));

    // 3 × 6 KiB against the 16 KiB enrollment limit: refused, nothing enrolled.
    let before = h.fleet.view().len();
    sender.ready().await.unwrap();
    let resp = sender
        .send_request(send("/v1/enroll", vec![vec![b' '; 6 * 1024]; 3]))
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let err: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(err.error.code, ErrorCode::BodyTooLarge);
    assert_eq!(h.fleet.view().len(), before);
    drop(sender);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_over_http2() {
    let h = Harness::start(ServerConfig::default()).await;
    let token = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let (id, _) = enroll(&h, &token.presented.to_string(), "h2-agent").await;
    let tls = connect(&h, Some(&id), &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the server speaks HTTP/2"
    );
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Several heartbeats multiplexed on the one connection.
    for _ in 0..3 {
        let resp = sender.send_request(heartbeat_request()).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_outlives_the_header_read_timeout_between_requests() {
    // hyper runs its header-read timer while a kept-alive connection waits for the next
    // request; the server must not let that cut agents off between heartbeats.
    let config = ServerConfig {
        header_read_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    let h = Harness::start(config).await;
    let (_, mut sender, conn) = agent_connection(&h, "kept-alive").await;
    for _ in 0..2 {
        assert_eq!(
            sender
                .send_request(heartbeat_request())
                .await
                .unwrap()
                .status(),
            200
        );
        // Quiet for three header-read timeouts (transport timing: a real-clock wait).
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert!(!conn.is_finished(), "the server kept the connection");
    assert_eq!(
        sender
            .send_request(heartbeat_request())
            .await
            .unwrap()
            .status(),
        200
    );
    drop(sender);

    // A connection without a client certificate (enrollment) keeps the short timeout.
    let tls = connect(&h, None, &[b"http/1.1"]).await;
    let (mut anon, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(
        anon.send_request(heartbeat_request())
            .await
            .unwrap()
            .status(),
        401
    );
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the server closes the quiet anonymous connection")
        .unwrap()
        .ok();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connections_are_closed_after_the_idle_timeout() {
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(1000),
        ..ServerConfig::default()
    };
    let h = Harness::start(config).await;
    let (_, mut sender, conn) = agent_connection(&h, "idle-agent").await;
    assert_eq!(
        sender
            .send_request(heartbeat_request())
            .await
            .unwrap()
            .status(),
        200
    );
    // The connection is kept alive while in use…
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sender
            .send_request(heartbeat_request())
            .await
            .unwrap()
            .status(),
        200
    );
    // …and closed by the server once it has been quiet for the idle timeout (transport timing,
    // not fleet status: this is the one place a test waits on the real clock).
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the server closes the idle connection")
        .unwrap()
        .ok();
    assert!(sender.send_request(heartbeat_request()).await.is_err());
    h.stop().await;
}

/// Commands queued while an agent is stopped wait in the store; the restarted agent gets them in
/// its first heartbeat reply, runs the built-ins (refusing an unknown kind), reports results in
/// the next heartbeat, and the history shows them. A delivered command whose result never came
/// is delivered again after its lease, and the agent does not run it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_while_the_agent_is_stopped_arrive_on_its_first_heartbeat() {
    use fleet_agent_proto::HeartbeatRequest;
    use fleet_agent_proto::client::{self, AgentClient};
    use fleet_agent_proto::runner::CommandRunner;
    use fleet_core::command::{CommandQuery, DEFAULT_COMMAND_LEASE};
    use fleet_core::{CommandKind, CommandState, NewCommand, Payload};

    let h = Harness::start(ServerConfig::default()).await;
    let endpoint = h.endpoint();
    let token = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let identity = client::enroll(
        &endpoint,
        &token.join,
        fleet_core::SystemInfo::with_hostname("agent-7"),
        None,
    )
    .await
    .unwrap();
    let id = identity.instance_id;
    let agent = AgentClient::new(endpoint.clone(), identity.clone()).unwrap();
    let reply = agent.heartbeat(&HeartbeatRequest::default()).await.unwrap();
    assert!(reply.commands.is_empty());

    // The agent stops; ten minutes later the instance is offline.
    drop(agent);
    h.clock.advance(Duration::from_secs(600));
    h.fleet.sweep();
    assert_eq!(h.fleet.view().status(id), Some(Status::Offline));

    // Commands are queued while it is away.
    let scope = TenantScope::All;
    let mut kinds = Vec::new();
    for (kind, payload) in [
        ("ping", serde_json::Value::Null),
        ("collect-inventory", serde_json::json!({"apps": true})),
        ("format-disk", serde_json::json!({"device": "/dev/sda"})),
    ] {
        let mut new = NewCommand::for_instance(id, CommandKind::new(kind).unwrap());
        new.payload = Payload::from_value(&payload).unwrap();
        new.idempotency_key = Some(format!("e2e-{kind}"));
        let report = h.fleet.enqueue(&scope, new.clone()).await.unwrap();
        assert_eq!((report.created, report.existing), (1, 0));
        // Enqueueing again with the same key queues nothing new.
        let again = h.fleet.enqueue(&scope, new).await.unwrap();
        assert_eq!((again.created, again.existing), (0, 1));
        assert_eq!(again.commands[0].id, report.commands[0].id);
        kinds.push(report.commands[0].id);
    }
    h.clock.advance(Duration::from_secs(60));

    // The agent restarts: a new process with the saved identity and an empty runner.
    let agent = AgentClient::new(endpoint, identity).unwrap();
    let mut runner = CommandRunner::new(|| serde_json::json!({"hostname": "agent-7"}));
    let reply = agent.heartbeat(&HeartbeatRequest::default()).await.unwrap();
    assert_eq!(
        reply.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        kinds,
        "all three, oldest first, in the first heartbeat reply"
    );
    assert_eq!(reply.commands[2].payload["device"], "/dev/sda");
    assert_eq!(h.fleet.view().status(id), Some(Status::Online));
    runner.run(&reply.commands);

    // The result of the first command is lost (the next heartbeat reports only two); after the
    // lease it is delivered again and not run twice.
    let mut results = runner.pending_results();
    assert_eq!(results.len(), 3);
    let held_back = results.remove(0);
    let reply = agent
        .heartbeat(&HeartbeatRequest {
            command_results: results,
            ..HeartbeatRequest::default()
        })
        .await
        .unwrap();
    assert!(reply.commands.is_empty(), "leased commands are not resent");
    h.clock.advance(DEFAULT_COMMAND_LEASE);
    let reply = agent.heartbeat(&HeartbeatRequest::default()).await.unwrap();
    assert_eq!(
        reply.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![kinds[0]]
    );
    runner.run(&reply.commands);
    let results = runner.pending_results();
    assert_eq!(results.len(), 3, "the redelivered ping did not run again");
    assert_eq!(results[0], held_back);
    agent
        .heartbeat(&HeartbeatRequest {
            command_results: results.clone(),
            ..HeartbeatRequest::default()
        })
        .await
        .unwrap();
    runner.acknowledge(results.len());

    // The history, newest first.
    let history = h
        .fleet
        .commands(
            &scope,
            CommandQuery {
                instance: Some(id),
                limit: 10,
                ..CommandQuery::default()
            },
        )
        .await
        .unwrap();
    let states: Vec<(CommandState, String)> = history
        .iter()
        .map(|c| {
            (
                c.state,
                c.result
                    .as_ref()
                    .map(|r| r.output.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(states[0].0, CommandState::Failed);
    assert!(states[0].1.contains("unknown command kind \"format-disk\""));
    assert_eq!(
        states[1],
        (
            CommandState::Succeeded,
            r#"{"hostname":"agent-7"}"#.to_owned()
        )
    );
    assert_eq!(states[2], (CommandState::Succeeded, "pong".to_owned()));
    assert_eq!(history[2].deliveries, 2);
    let ping = h.fleet.command(&scope, kinds[0]).await.unwrap();
    assert_eq!(ping.result.and_then(|r| r.exit_code), Some(0));
    h.stop().await;
}
