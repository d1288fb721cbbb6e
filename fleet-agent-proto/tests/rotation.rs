//! CA rotation end to end (issue 16, finding 13) — the response to a leaked CA key — with the
//! real agent client against the real server over TLS on loopback: the server announces the new
//! set in heartbeat replies, the agent trusts it, the promotion moves the server certificate and
//! every new signature to the new CA and tells agents on old certificates to renew now, and the
//! retirement shuts out what the old CA signed.

use std::sync::Arc;
use std::time::Duration;

use fleet_agent_proto::HeartbeatRequest;
use fleet_agent_proto::client::{AgentClient, Endpoint, enroll};
use fleet_agent_proto::server::{AgentServer, ServerConfig};
use fleet_core::identity::Fingerprint;
use fleet_core::{
    Clock, Fleet, ManualClock, MemoryStore, NewToken, SystemClock, SystemInfo, TenantScope,
};
use tokio::net::TcpListener;

struct Running {
    fleet: Fleet<Arc<MemoryStore>>,
    endpoint: Endpoint,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start() -> Running {
    let clock = ManualClock::new(SystemClock.now());
    let fleet = Fleet::builder(Arc::new(MemoryStore::new()))
        .clock(clock)
        .open()
        .await
        .unwrap();
    let server = Arc::new(
        AgentServer::issuing(
            fleet.clone(),
            vec!["localhost".into(), "127.0.0.1".into()],
            ServerConfig::default(),
        )
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = Endpoint {
        server_name: "localhost".into(),
        address: listener.local_addr().unwrap().to_string(),
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running {
        fleet,
        endpoint,
        stop,
        task,
    }
}

async fn enrolled(r: &Running, host: &str) -> AgentClient {
    let token = r
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let identity = enroll(
        &r.endpoint,
        &token.join,
        SystemInfo {
            hostname: host.into(),
            ..SystemInfo::default()
        },
        None,
    )
    .await
    .unwrap();
    AgentClient::new(r.endpoint.clone(), identity).unwrap()
}

/// The fingerprint of the CA that signed a PEM certificate, among `cas`.
fn signer(r: &Running, cert_pem: &str) -> Option<Fingerprint> {
    let der = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .unwrap()
        .1
        .contents;
    r.fleet
        .ca_set()
        .all()
        .iter()
        .find(|ca| ca.verify_issued_ignoring_time(&der).is_some())
        .map(|ca| ca.fingerprint())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_moves_every_agent_to_the_new_ca_without_stranding_one() {
    let r = start().await;
    let hb = HeartbeatRequest::default();
    let old = r.fleet.ca().fingerprint();
    let mut agent = enrolled(&r, "rotating").await;
    // An agent from before rotation support: it sends no trusted-set header and never learns
    // the new set (a fresh client over a copy of its identity that ignores the announcements).
    let stale = enrolled(&r, "stale").await;

    let reply = agent.heartbeat(&hb).await.unwrap();
    assert_eq!(reply.ca_bundle_pem, None, "nothing to announce");
    assert!(!reply.renew_now);

    // 1. A new CA, trusted, not signing: announced to the agent, which trusts both.
    let new = r.fleet.begin_ca_rotation().await.unwrap();
    let reply = agent.heartbeat(&hb).await.unwrap();
    let bundle = reply.ca_bundle_pem.expect("the new set is announced");
    assert!(!reply.renew_now, "the old CA still signs");
    agent.trust_ca_bundle(&bundle).unwrap();
    assert_eq!(agent.trusted_ca_set(), r.fleet.ca_set().id());
    let reply = agent.heartbeat(&hb).await.unwrap();
    assert_eq!(reply.ca_bundle_pem, None, "announced once the agent has it");

    // 2. Promotion: the server's certificate and every new signature come from the new CA, and
    //    the agent, still on a certificate of the old one, is told to renew now.
    r.fleet.promote_ca(new).await.unwrap();
    let reply = agent.heartbeat(&hb).await.unwrap();
    assert!(reply.renew_now, "renew now: the old CA no longer signs");
    agent
        .trust_ca_bundle(
            &reply
                .ca_bundle_pem
                .expect("the order changed: the new CA signs"),
        )
        .unwrap();
    // The renewal opens a new connection: the server now presents a certificate of the new CA,
    // which the agent accepts because it trusts the announced set.
    agent.renew().await.unwrap();
    assert_eq!(
        signer(&r, &agent.identity().certificate_pem),
        Some(new),
        "renewed by the new CA"
    );
    let reply = agent.heartbeat(&hb).await.unwrap();
    assert!(!reply.renew_now, "on a certificate of the signing CA");
    // The agent that never learned the set cannot verify the control plane any more: this is
    // the overlap it missed (an agent that heartbeats during step 1 never is in this state).
    let mut fresh_stale = AgentClient::new(r.endpoint.clone(), stale.identity().clone()).unwrap();
    let err = fresh_stale.heartbeat(&hb).await.unwrap_err();
    assert!(
        err.to_string().contains("certificate") || err.to_string().contains("issuer"),
        "the stale agent refuses the new server certificate: {err}"
    );
    // Trusting the set — as a heartbeat before the promotion would have taught it — it
    // connects, is told to renew, and does.
    fresh_stale
        .trust_ca_bundle(&r.fleet.ca_set().bundle_pem())
        .unwrap();
    assert!(fresh_stale.heartbeat(&hb).await.unwrap().renew_now);
    let before_retire = fresh_stale.identity().clone();
    fresh_stale.renew().await.unwrap();
    assert_eq!(
        signer(&r, &fresh_stale.identity().certificate_pem),
        Some(new)
    );

    // 3. Retirement: the old CA leaves the set; agents are told, and what it signed no longer
    //    passes the handshake.
    r.fleet.retire_ca(old).await.unwrap();
    let reply = agent.heartbeat(&hb).await.unwrap();
    agent
        .trust_ca_bundle(&reply.ca_bundle_pem.expect("the set shrank"))
        .unwrap();
    assert_eq!(r.fleet.ca_set().all().len(), 1);
    // A new connection with the renewed certificate works…
    let again = AgentClient::new(r.endpoint.clone(), agent.identity().clone()).unwrap();
    assert!(!again.heartbeat(&hb).await.unwrap().renew_now);
    // …and one with a certificate of the retired CA does not get past TLS.
    let retired = fleet_agent_proto::client::AgentIdentity {
        ca_pem: r.fleet.ca_set().bundle_pem(),
        ..before_retire
    };
    let old_cert = AgentClient::new(r.endpoint.clone(), retired).unwrap();
    let err = old_cert.heartbeat(&hb).await.unwrap_err();
    assert!(
        err.code().is_none(),
        "refused at the handshake, not by a route: {err}"
    );
    // Nothing was re-enrolled: the two instances are the same two.
    assert_eq!(r.fleet.view().len(), 2);
    let _ = r.stop.send(());
    tokio::time::timeout(Duration::from_secs(15), r.task)
        .await
        .unwrap()
        .unwrap();
}
