//! The harness of the agent server's tests: a server on 127.0.0.1 with an ephemeral port over a
//! manual clock, clients with and without certificates, and the requests they send.

// Each test file uses the part of the harness it needs.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_agent_proto::server::{AgentServer, ServerConfig, tls_config};
use fleet_agent_proto::{EnrollResponse, ErrorBody, ErrorCode};
use fleet_core::{
    Clock, EnrollmentPolicy, Fleet, ManualClock, MemoryStore, NewToken, SystemClock, TenantScope,
    Timestamp,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;

pub struct Harness {
    pub fleet: Fleet<Arc<MemoryStore>>,
    pub clock: ManualClock,
    /// Where the manual clock started: the real time, since rustls checks certificate validity
    /// against the real clock.
    pub t0: Timestamp,
    pub addr: SocketAddr,
    pub ca_der: Vec<u8>,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
    pub server: Arc<AgentServer<Arc<MemoryStore>>>,
}

impl Harness {
    pub async fn start(config: ServerConfig) -> Self {
        Self::start_with(config, EnrollmentPolicy::default()).await
    }

    /// A server whose fleet enrolls with `enrollment`.
    pub async fn start_with(config: ServerConfig, enrollment: EnrollmentPolicy) -> Self {
        let t0 = SystemClock.now();
        let clock = ManualClock::new(t0);
        let fleet = Fleet::builder(Arc::new(MemoryStore::new()))
            .clock(clock.clone())
            .enrollment(enrollment)
            .open()
            .await
            .unwrap();
        // The server certificate must be valid by the machine's real clock (rustls checks it).
        let server_cert = fleet
            .ca()
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                t0,
                Duration::from_secs(3600),
            )
            .unwrap();
        let tls = tls_config(fleet.ca().cert_der(), &server_cert).unwrap();
        let server = Arc::new(AgentServer::new(fleet.clone(), tls, config));
        // The backlog the control panel listens with: a flood's burst of connections waits
        // there for the accept loop instead of having its SYNs dropped.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(4096).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::clone(&server);
        let task = tokio::spawn(async move {
            served
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            ca_der: fleet.ca().cert_der().to_vec(),
            fleet,
            clock,
            t0,
            addr,
            stop: Some(tx),
            task,
            server,
        }
    }

    /// Where the agent client reaches this server.
    pub fn endpoint(&self) -> fleet_agent_proto::client::Endpoint {
        fleet_agent_proto::client::Endpoint {
            server_name: "localhost".into(),
            address: self.addr.to_string(),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

/// A client identity: certificate and PKCS#8 key (DER).
#[derive(Clone)]
pub struct ClientId {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

pub fn client_config(ca_der: &[u8], id: Option<&ClientId>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match id {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(id.cert.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// POSTs a JSON `body` to `path`; returns the status, headers and body, or the TLS/IO error.
pub async fn post_full(
    addr: SocketAddr,
    ca_der: &[u8],
    id: Option<&ClientId>,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, http::HeaderMap, Vec<u8>), String> {
    request(addr, ca_der, id, path, "application/json", body).await
}

/// POSTs `body` with `content_type` to `path`; returns the status and body, or the TLS/IO error.
pub async fn post_raw(
    addr: SocketAddr,
    ca_der: &[u8],
    id: Option<&ClientId>,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    request(addr, ca_der, id, path, content_type, body)
        .await
        .map(|(status, _, body)| (status, body))
}

async fn request(
    addr: SocketAddr,
    ca_der: &[u8],
    id: Option<&ClientId>,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, http::HeaderMap, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_der, id));
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            // With TLS 1.3 a refused client certificate surfaces as an alert after the client's
            // side of the handshake: show the connection's own error.
            let detail = match conn.await {
                Ok(Err(c)) => format!("{c:?}"),
                other => format!("{other:?}"),
            };
            return Err(format!("request: {e} ({detail})"));
        }
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, bytes.to_vec()))
}

pub async fn post(
    h: &Harness,
    id: Option<&ClientId>,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let (status, bytes) = post_raw(
        h.addr,
        &h.ca_der,
        id,
        path,
        "application/json",
        serde_json::to_vec(&body).unwrap(),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

pub fn code(v: &serde_json::Value) -> ErrorCode {
    serde_json::from_value::<ErrorBody>(v.clone())
        .map(|b| b.error.code)
        .unwrap_or_else(|_| panic!("not an error body: {v}"))
}

pub fn csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, csr)
}

pub fn pem_to_der(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

pub async fn enroll(h: &Harness, token: &str, host: &str) -> (ClientId, EnrollResponse) {
    let (key, csr) = csr();
    let (status, body) = post(
        h,
        None,
        "/v1/enroll",
        serde_json::json!({"token": token, "csr_pem": csr, "system": {"hostname": host}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let resp: EnrollResponse = serde_json::from_value(body).unwrap();
    (
        ClientId {
            cert: pem_to_der(&resp.certificate_pem),
            key: key.serialize_der(),
        },
        resp,
    )
}

/// Runs a command line tool; it is part of the build image (CI installs it when missing), so its
/// absence is a failure.
pub fn run(dir: &std::path::Path, program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is required for this test (apt-get install {program}): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Enrolls an agent called `host` and opens a kept-alive HTTP/1.1 connection with its
/// certificate; the connection runs in the returned task.
pub async fn agent_connection<B>(
    h: &Harness,
    host: &str,
) -> (
    EnrollResponse,
    hyper::client::conn::http1::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let token = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let (id, enrolled) = enroll(h, &token.presented.to_string(), host).await;
    let tls = connect(h, Some(&id), &[b"http/1.1"]).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    (enrolled, sender, tokio::spawn(conn))
}

pub async fn connect(
    h: &Harness,
    id: Option<&ClientId>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut cfg = (*client_config(&h.ca_der, id)).clone();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

pub fn heartbeat_request() -> hyper::Request<Full<Bytes>> {
    hyper::Request::post("https://localhost/v1/heartbeat")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}
