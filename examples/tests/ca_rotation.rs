//! CA rotation with the real `agent` binary (issue 16, finding 13): the agent runs as a user runs
//! it, against the real agent server over mutual TLS on loopback, while the control plane steps
//! through begin, promote and retire. The agent keeps the announced set in its state file,
//! renews onto the new CA when told, and heartbeats through every step: no agent is stranded.
//!
//! The agent is a separate process on the real clock, so the test polls its state file and the
//! fleet view, bounded, for what it does (heartbeats every second here).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fleet_agent_proto::client::AgentIdentity;
use fleet_agent_proto::server::{AgentServer, ServerConfig};
use fleet_core::identity::Fingerprint;
use fleet_core::{
    Fleet, MemoryStore, NewToken, StalenessPolicy, SystemClock, TenantScope, Timestamp,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;

fn identity(state: &Path) -> Option<AgentIdentity> {
    let bytes = std::fs::read(state.join("identity.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

/// The CA of `fleet`'s set that signed the agent's certificate.
fn signer(fleet: &Fleet<Arc<MemoryStore>>, id: &AgentIdentity) -> Option<Fingerprint> {
    let cert = ders(&id.certificate_pem).into_iter().next()?;
    fleet
        .ca_set()
        .all()
        .iter()
        .find(|ca| ca.verify_issued_ignoring_time(&cert).is_some())
        .map(|ca| ca.fingerprint())
}

/// Waits (bounded, on the real clock: the agent is another process) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 30 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_a_ca_rotation_from_begin_to_retire() {
    let policy = StalenessPolicy {
        heartbeat_interval: Some(Duration::from_secs(1)),
        ..StalenessPolicy::default()
    };
    let fleet = Fleet::builder(Arc::new(MemoryStore::new()))
        .clock(SystemClock)
        .policy(policy)
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
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });

    let token = fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["--join", &token.join.to_string()])
        .args(["--server", &format!("https://localhost:{port}")])
        .arg("--state-dir")
        .arg(&state)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let old = fleet.ca().fingerprint();
    until("the agent to enroll", || identity(&state).is_some()).await;
    let instance = identity(&state).unwrap().instance_id;
    let last_seen = || {
        fleet
            .get(&TenantScope::All, instance)
            .map_or(Timestamp::UNIX_EPOCH, |v| v.last_seen)
    };
    let heartbeating_after = |t: Timestamp| move || last_seen() > t;

    // 1. A new CA, trusted beside the old: the agent keeps the announced set.
    let new = fleet.begin_ca_rotation().await.unwrap();
    until("the agent to keep the new set", || {
        identity(&state).is_some_and(|id| ders(&id.ca_pem).len() == 2)
    })
    .await;
    let before_promotion = identity(&state).unwrap();
    assert_eq!(signer(&fleet, &before_promotion), Some(old));

    // 2. Promotion: the agent is told to renew and does, onto the new CA; the listener now
    //    presents a certificate of the new CA, which the agent accepts.
    fleet.promote_ca(new).await.unwrap();
    until("the agent to renew onto the new CA", || {
        identity(&state).is_some_and(|id| signer(&fleet, &id) == Some(new))
    })
    .await;
    let t = last_seen();
    until("a heartbeat on the new certificate", heartbeating_after(t)).await;

    // 3. Retirement: the agent drops the old CA and goes on heartbeating.
    fleet.retire_ca(old).await.unwrap();
    until("the agent to trust only the new CA", || {
        identity(&state).is_some_and(|id| {
            let cas = ders(&id.ca_pem);
            cas.len() == 1 && Fingerprint::of(&cas[0]) == new
        })
    })
    .await;
    let t = last_seen();
    until("a heartbeat after the retirement", heartbeating_after(t)).await;
    assert_eq!(fleet.view().len(), 1, "the same instance throughout");
    assert!(agent.try_wait().unwrap().is_none(), "the agent still runs");

    agent.kill().await.unwrap();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
