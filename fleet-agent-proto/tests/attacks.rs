//! Attacks on the agent server, each performed through the real server over TLS on loopback:
//! what an outside attacker found on an earlier version, kept closed by a test each.

use std::time::Duration;

use fleet_agent_proto::server::ServerConfig;
use fleet_core::store::CertificateStore;
use fleet_core::{NewToken, TenantScope};

mod support;
use support::*;

/// A network observer who captured an enrollment request (but not the agent's key) replays it.
/// Within the retry window that used to re-issue with a new serial and retire the certificate the
/// agent was using, knocking it offline. Now a replay re-signs the same certificate and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_captured_enrollment_revokes_nothing() {
    let h = Harness::start(ServerConfig::default()).await;
    let token = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let (key, csr) = csr();
    let body = serde_json::json!({
        "token": token.presented.to_string(),
        "csr_pem": csr,
        "system": {"hostname": "victim"},
    });
    let (status, reply) = post(&h, None, "/v1/enroll", body.clone()).await;
    assert_eq!(status, 200, "{reply}");
    let agent = ClientId {
        cert: pem_to_der(reply["certificate_pem"].as_str().unwrap()),
        key: key.serialize_der(),
    };
    let beat = serde_json::json!({"metrics": {"cpu_percent": 1.0}});
    assert_eq!(
        post(&h, Some(&agent), "/v1/heartbeat", beat.clone())
            .await
            .0,
        200
    );

    for i in 0..10 {
        h.clock.advance(Duration::from_secs(5));
        let (status, replayed) = post(&h, None, "/v1/enroll", body.clone()).await;
        assert_eq!(status, 200, "replay {i} is answered as a retry: {replayed}");
        assert_eq!(replayed["instance_id"], reply["instance_id"]);
        let (status, answer) = post(&h, Some(&agent), "/v1/heartbeat", beat.clone()).await;
        assert_eq!(
            status, 200,
            "after replay {i} the agent's certificate still works: {answer}"
        );
    }
    assert!(
        h.fleet
            .store()
            .revoked_certificates()
            .await
            .unwrap()
            .is_empty(),
        "no certificate was retired"
    );
    assert_eq!(h.fleet.view().len(), 1, "no second instance");
    h.stop().await;
}
