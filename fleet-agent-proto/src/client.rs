//! The agent side (feature `client`): enroll with a join string, then heartbeat and renew over
//! mutual TLS.
//!
//! **Pinning.** On first contact the agent does not yet trust any CA. The server sends the fleet
//! CA certificate after its own in the TLS chain; the agent accepts the connection only if one
//! certificate of that chain has the SHA-256 fingerprint carried by the join string, and the
//! server certificate verifies against it (and names the host dialled). After enrollment the agent
//! trusts exactly the CA it received.
//!
//! **Cadence.** [`next_delay`] spreads heartbeats with ±10 % jitter around the server's interval;
//! [`backoff`] grows the delay after failures, exponentially up to a cap, with full jitter.
//! [`renewal_due`] says when to renew: at a jittered 70–90 % of the certificate's lifetime.

use std::sync::Arc;
use std::time::Duration;

use fleet_core::{Fingerprint, InstanceId, JoinString, SystemInfo, Timestamp};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::{
    ENROLL_PATH, EnrollRequest, EnrollResponse, ErrorBody, ErrorCode, HEARTBEAT_PATH,
    HeartbeatRequest, HeartbeatResponse, RENEW_PATH, RenewRequest, RenewResponse,
};

/// What an enrolled agent keeps (in its state directory, readable only by itself).
#[derive(Clone, Serialize, serde::Deserialize)]
pub struct AgentIdentity {
    /// Its instance id.
    pub instance_id: InstanceId,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Its client certificate, PEM.
    pub certificate_pem: String,
    /// The fleet CA certificates the agent trusts, PEM: the one it pinned at enrollment, or the
    /// set a heartbeat reply announced during a CA rotation (the signing one first).
    pub ca_pem: String,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with a protocol error.
    #[error("server refused: {} ({})", .0.error.code, .0.error.message)]
    Refused(ErrorBody),
    /// Connecting, TLS or HTTP failed (retry with backoff).
    #[error("transport: {0}")]
    Transport(String),
    /// Local key or certificate material is unusable.
    #[error("credentials: {0}")]
    Credentials(String),
}

impl ClientError {
    /// The protocol error code, if the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused(b) => Some(b.error.code),
            _ => None,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    crate::crypto_provider()
}

/// Accepts a server chain only if it contains the pinned CA and the leaf verifies against it.
#[derive(Debug)]
struct PinnedCa {
    pin: Fingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of(c) == self.pin)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Every certificate of a PEM bundle (DER), at least one.
fn pem_ders(pem: &str) -> Result<Vec<Vec<u8>>, ClientError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|_| ClientError::Credentials("CA bundle: not PEM".into()))?;
        if block.label != "CERTIFICATE" {
            return Err(ClientError::Credentials(format!(
                "CA bundle: a {} block where certificates belong",
                block.label
            )));
        }
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(ClientError::Credentials("CA bundle: no certificate".into()));
    }
    Ok(out)
}

/// The [`fleet_core::ca::set_id`] of a PEM bundle.
fn trusted_set_id(pem: &str) -> Result<String, ClientError> {
    Ok(fleet_core::ca::set_id(
        pem_ders(pem)?.iter().map(|d| Fingerprint::of(d)),
    ))
}

fn pem_der(pem: &str) -> Result<Vec<u8>, ClientError> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, p)| p.contents)
        .map_err(|_| ClientError::Credentials("not PEM".into()))
}

/// A connection target: host name (as the certificate names it) and `host:port` to dial.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Name checked against the server certificate.
    pub server_name: String,
    /// Address to connect to.
    pub address: String,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

fn transport(e: &dyn std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// Opens a connection within [`REQUEST_TIMEOUT`]: TCP, then TLS with `tls`, then HTTP/1.1.
async fn connect(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Sender, ClientError> {
    tokio::time::timeout(REQUEST_TIMEOUT, open(endpoint, tls))
        .await
        .map_err(|_| transport(&"connecting timed out"))?
}

async fn open(endpoint: &Endpoint, tls: Arc<rustls::ClientConfig>) -> Result<Sender, ClientError> {
    let tcp = TcpStream::connect(&endpoint.address)
        .await
        .map_err(|e| transport(&e))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(endpoint.server_name.clone()).map_err(|e| transport(&e))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| transport(&e))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transport(&e))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Why a request on a connection got no answer.
enum Unanswered {
    /// The request never left: the connection was closed or not ready (safe to send again).
    NotSent(ClientError),
    /// It may have reached the server (the reply was lost, or the time ran out).
    Lost(ClientError),
}

impl Unanswered {
    fn into_error(self) -> ClientError {
        match self {
            Self::NotSent(e) | Self::Lost(e) => e,
        }
    }
}

/// Longest a request may take on a connection (connect, send, reply), so an agent whose server
/// vanished without closing the connection gives up and reconnects instead of waiting for TCP.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request on `sender`; the inner error is the server's answer.
async fn send<Resp: DeserializeOwned>(
    sender: &mut Sender,
    endpoint: &Endpoint,
    path: &str,
    json: Bytes,
    ca_set: Option<&str>,
) -> Result<Result<Resp, ClientError>, Unanswered> {
    let not_sent = |e: &dyn std::fmt::Display| Unanswered::NotSent(transport(e));
    let lost = |e: &dyn std::fmt::Display| Unanswered::Lost(transport(e));
    sender.ready().await.map_err(|e| not_sent(&e))?;
    let mut req = http::Request::post(path)
        .header(http::header::HOST, endpoint.server_name.as_str())
        .header(http::header::CONTENT_TYPE, crate::CONTENT_TYPE);
    if let Some(id) = ca_set {
        req = req.header(crate::CA_SET_HEADER, id);
    }
    let req = req.body(Full::new(json)).map_err(|e| not_sent(&e))?;
    let resp = match sender.try_send_request(req).await {
        Ok(resp) => resp,
        // hyper hands the request back when it never reached the connection.
        Err(e) if e.message().is_some() => return Err(not_sent(e.error())),
        Err(e) => return Err(lost(e.error())),
    };
    let ok = resp.status().is_success();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| lost(&e))?
        .to_bytes();
    Ok(decode_reply(ok, &bytes))
}

/// A reply's body: the route's response on success, else the server's error. Fields and error
/// codes that a newer server added are accepted ([`ErrorCode::Unknown`]), so a refusal still
/// reads as one.
fn decode_reply<Resp: DeserializeOwned>(ok: bool, bytes: &[u8]) -> Result<Resp, ClientError> {
    if ok {
        serde_json::from_slice(bytes).map_err(|e| transport(&e))
    } else {
        Err(serde_json::from_slice::<ErrorBody>(bytes)
            .map(ClientError::Refused)
            .unwrap_or_else(|_| {
                ClientError::Transport(format!(
                    "unexpected reply: {}",
                    String::from_utf8_lossy(bytes)
                ))
            }))
    }
}

/// [`send`] within [`REQUEST_TIMEOUT`].
async fn send_within<Resp: DeserializeOwned>(
    sender: &mut Sender,
    endpoint: &Endpoint,
    path: &str,
    json: Bytes,
    ca_set: Option<&str>,
) -> Result<Result<Resp, ClientError>, Unanswered> {
    tokio::time::timeout(REQUEST_TIMEOUT, send(sender, endpoint, path, json, ca_set))
        .await
        .unwrap_or_else(|_| {
            Err(Unanswered::Lost(ClientError::Transport(format!(
                "no reply within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))))
        })
}

/// One request on a connection of its own.
async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
    endpoint: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    body: &Req,
) -> Result<Resp, ClientError> {
    let json = Bytes::from(serde_json::to_vec(body).map_err(|e| transport(&e))?);
    let mut sender = connect(endpoint, tls).await?;
    send_within(&mut sender, endpoint, path, json, None)
        .await
        .map_err(Unanswered::into_error)?
}

/// Enrolls: makes a P-256 key and CSR, pins the CA from the join string, and returns the identity
/// to keep. `previous` re-enrolls an instance whose certificate expired (same key).
pub async fn enroll(
    endpoint: &Endpoint,
    join: &JoinString,
    system: SystemInfo,
    previous: Option<&AgentIdentity>,
) -> Result<AgentIdentity, ClientError> {
    let key = match previous {
        Some(p) => rcgen::KeyPair::from_pem(&p.key_pem)
            .map_err(|e| ClientError::Credentials(e.to_string()))?,
        None => rcgen::KeyPair::generate().map_err(|e| ClientError::Credentials(e.to_string()))?,
    };
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| ClientError::Credentials(e.to_string()))?;
    let provider = provider();
    let verifier = Arc::new(PinnedCa {
        pin: join.ca_sha256,
        provider: Arc::clone(&provider),
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(crate::TLS_VERSIONS)
        .map_err(|e| ClientError::Transport(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let body = EnrollRequest {
        token: join.token.to_string(),
        csr_pem: csr,
        system,
        previous_certificate_pem: previous.map(|p| p.certificate_pem.clone()),
    };
    let reply: EnrollResponse = exchange(endpoint, Arc::new(tls), ENROLL_PATH, &body).await?;
    if Fingerprint::of(&pem_der(&reply.ca_pem)?) != join.ca_sha256 {
        return Err(ClientError::Credentials(
            "the CA in the reply is not the pinned one".into(),
        ));
    }
    Ok(AgentIdentity {
        instance_id: reply.instance_id,
        key_pem: key.serialize_pem(),
        certificate_pem: reply.certificate_pem,
        ca_pem: reply.ca_pem,
    })
}

/// An enrolled agent's client. It keeps its connection to the server open between requests
/// (the server keeps a quiet connection for its idle timeout, 90 s by default, longer than two
/// heartbeat intervals), so a heartbeat costs the server no TLS handshake. A connection found
/// closed before a request left is replaced and the request sent on the new one; a request that
/// may have reached the server is never sent twice. Every request is bounded by
/// [`REQUEST_TIMEOUT`]. Clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    identity: AgentIdentity,
    tls: Arc<rustls::ClientConfig>,
    /// The id of the trusted CA set (sent with each request).
    ca_set: String,
    conn: Arc<tokio::sync::Mutex<Option<Sender>>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("endpoint", &self.endpoint)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client that trusts the identity's CA and presents its certificate.
    pub fn new(endpoint: Endpoint, identity: AgentIdentity) -> Result<Self, ClientError> {
        let tls = Self::tls(&identity)?;
        let ca_set = trusted_set_id(&identity.ca_pem)?;
        Ok(Self {
            endpoint,
            identity,
            tls,
            ca_set,
            conn: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    /// Sends a request on the kept-alive connection, opening one when there is none. If the kept
    /// connection turns out closed before the request left (the server's idle timeout, a
    /// restart), the request goes out on a new connection; if it may have reached the server
    /// (a lost reply, [`REQUEST_TIMEOUT`]), the error is returned and the connection dropped.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let json = Bytes::from(serde_json::to_vec(body).map_err(|e| transport(&e))?);
        let mut slot = self.conn.lock().await;
        let ca_set = Some(self.ca_set.as_str());
        if let Some(sender) = slot.as_mut() {
            match send_within(sender, &self.endpoint, path, json.clone(), ca_set).await {
                Ok(answer) => return answer,
                Err(Unanswered::NotSent(_)) => *slot = None,
                Err(Unanswered::Lost(e)) => {
                    *slot = None;
                    return Err(e);
                }
            }
        }
        let mut sender = connect(&self.endpoint, Arc::clone(&self.tls)).await?;
        let answer = send_within(&mut sender, &self.endpoint, path, json, ca_set)
            .await
            .map_err(Unanswered::into_error)?;
        *slot = Some(sender);
        answer
    }

    fn tls(identity: &AgentIdentity) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in pem_ders(&identity.ca_pem)? {
            roots
                .add(CertificateDer::from(ca))
                .map_err(|e| ClientError::Credentials(e.to_string()))?;
        }
        let key = rcgen::KeyPair::from_pem(&identity.key_pem)
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(crate::TLS_VERSIONS)
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from(pem_der(&identity.certificate_pem)?)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        Ok(Arc::new(cfg))
    }

    /// The TLS settings in use: the identity's CA as the only root, its certificate as the
    /// client certificate, the `ring` provider.
    pub fn tls_config(&self) -> &Arc<rustls::ClientConfig> {
        &self.tls
    }

    /// The identity in use.
    pub fn identity(&self) -> &AgentIdentity {
        &self.identity
    }

    /// Trusts `bundle_pem` — the CA certificates a heartbeat reply announced in
    /// [`HeartbeatResponse::ca_bundle_pem`] — from now on, in place of the identity's: the
    /// server is checked against them on the next connection (the kept one stays), and
    /// [`identity`](Self::identity) holds them, for the caller to keep. The bundle came over a
    /// connection the previous roots authenticated. Refused (nothing changes) unless it holds
    /// at least one certificate and every block parses.
    pub fn trust_ca_bundle(&mut self, bundle_pem: &str) -> Result<(), ClientError> {
        let identity = AgentIdentity {
            ca_pem: bundle_pem.to_string(),
            ..self.identity.clone()
        };
        let tls = Self::tls(&identity)?;
        self.ca_set = trusted_set_id(&identity.ca_pem)?;
        self.tls = tls;
        self.identity = identity;
        Ok(())
    }

    /// The id of the CA set this client trusts, sent in [`crate::CA_SET_HEADER`].
    pub fn trusted_ca_set(&self) -> &str {
        &self.ca_set
    }

    /// Sends one heartbeat.
    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.call(HEARTBEAT_PATH, req).await
    }

    /// Renews: a new key and CSR; on success the client switches to the new identity.
    pub async fn renew(&mut self) -> Result<(), ClientError> {
        let key =
            rcgen::KeyPair::generate().map_err(|e| ClientError::Credentials(e.to_string()))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        let reply: RenewResponse = exchange(
            &self.endpoint,
            Arc::clone(&self.tls),
            RENEW_PATH,
            &RenewRequest { csr_pem: csr },
        )
        .await?;
        let identity = AgentIdentity {
            key_pem: key.serialize_pem(),
            certificate_pem: reply.certificate_pem,
            ..self.identity.clone()
        };
        self.tls = Self::tls(&identity)?;
        self.identity = identity;
        // The kept connection authenticated with the old certificate: the next request opens
        // one with the new certificate, which makes the server promote it.
        self.conn = Arc::new(tokio::sync::Mutex::new(None));
        Ok(())
    }
}

/// The validity period of a PEM certificate.
pub fn validity(certificate_pem: &str) -> Result<(Timestamp, Timestamp), ClientError> {
    let der = pem_der(certificate_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| ClientError::Credentials(e.to_string()))?;
    let v = cert.validity();
    Ok((
        Timestamp::from_unix_secs(v.not_before.timestamp()),
        Timestamp::from_unix_secs(v.not_after.timestamp()),
    ))
}

/// When to renew a certificate valid from `not_before` to `not_after`: at `fraction` (drawn by
/// the caller from 0.7..=0.9) of its lifetime.
pub fn renewal_due(not_before: Timestamp, not_after: Timestamp, fraction: f64) -> Timestamp {
    let life = not_after.duration_since(not_before);
    not_before.saturating_add(life.mul_f64(fraction.clamp(0.7, 0.9)))
}

/// The delay before the next heartbeat: the server's interval with ±10 % jitter (`unit` drawn
/// uniformly from 0..1).
pub fn next_delay(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// The delay after `failures` consecutive failures: exponential from 1 s, capped at `cap`, with
/// full jitter (`unit` drawn uniformly from 0..1), so a restarted control plane is not hit by every
/// agent at once.
pub fn backoff(failures: u32, cap: Duration, unit: f64) -> Duration {
    let exp = Duration::from_secs(1).saturating_mul(1u32 << failures.min(16));
    exp.min(cap).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_of_a_newer_server_are_understood() {
        // A refusal with a code and fields this build does not know is still a refusal.
        let refused = decode_reply::<HeartbeatResponse>(
            false,
            br#"{"error":{"code":"quota_exceeded","message":"later","field":"metrics","hint":1}}"#,
        );
        match refused {
            Err(ClientError::Refused(b)) => {
                assert_eq!(b.error.code, ErrorCode::Unknown);
                assert_eq!(b.error.message, "later");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A reply and its commands may carry fields added later.
        let reply: HeartbeatResponse = decode_reply(
            true,
            br#"{"commands":[{"id":"00000000-0000-0000-0000-000000000001","kind":"ping","payload":null,"priority":3}],"next_heartbeat_secs":15,"added_later":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(reply.commands.len(), 1);
        assert_eq!(reply.next_heartbeat_secs, 15);
    }

    #[test]
    fn cadence_helpers() {
        let nb = Timestamp::from_unix_secs(0);
        let na = Timestamp::from_unix_secs(1000);
        assert_eq!(renewal_due(nb, na, 0.8), Timestamp::from_unix_secs(800));
        assert_eq!(
            renewal_due(nb, na, 0.1),
            Timestamp::from_unix_secs(700),
            "clamped to 70 %"
        );
        assert_eq!(
            next_delay(Duration::from_secs(10), 0.0),
            Duration::from_secs(9)
        );
        assert_eq!(
            next_delay(Duration::from_secs(10), 1.0),
            Duration::from_secs(11)
        );
        assert_eq!(
            backoff(0, Duration::from_secs(90), 1.0),
            Duration::from_secs(1)
        );
        assert_eq!(
            backoff(3, Duration::from_secs(90), 1.0),
            Duration::from_secs(8)
        );
        assert_eq!(
            backoff(30, Duration::from_secs(90), 1.0),
            Duration::from_secs(90)
        );
        assert_eq!(
            backoff(30, Duration::from_secs(90), 0.5),
            Duration::from_secs(45)
        );
    }
}
