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

/// 200 concurrent wrong guesses from one address: the limit is checked and counted in one step,
/// so exactly the budget is evaluated (and recorded) and the rest answered 429 with
/// `Retry-After`. A guesser behind a site's NAT address does not lock that site out: a correct
/// token from the same address still enrolls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failed_token_limiter_cannot_be_raced_or_turned_against_agents() {
    let limit = fleet_core::limiter::AttemptLimit {
        max_failures: 20,
        ..Default::default()
    };
    let enrollment = fleet_core::EnrollmentPolicy {
        failed_attempts: limit,
        ..Default::default()
    };
    let h = Harness::start_with(ServerConfig::default(), enrollment).await;
    let real = h
        .fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    // The token id is public (it is in the join string); the secret is guessed.
    let guess = serde_json::json!({
        "token": format!("{}.{}", real.token.id, "0".repeat(32)),
        "csr_pem": csr().1,
        "system": {"hostname": "guess"},
    });
    let body = serde_json::to_vec(&guess).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (addr, ca, body) = (h.addr, h.ca_der.clone(), body.clone());
            tokio::spawn(async move {
                post_full(addr, &ca, None, "/v1/enroll", body)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let (mut refused, mut limited) = (0, 0);
    for t in tasks {
        let (status, headers, reply) = t.await.unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        match (status, code(&reply)) {
            (401, fleet_agent_proto::ErrorCode::InvalidToken) => refused += 1,
            (429, fleet_agent_proto::ErrorCode::RateLimited) => {
                let after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=60).contains(&after), "Retry-After {after}");
                limited += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(
        (refused, limited),
        (20, 180),
        "exactly the budget is evaluated"
    );
    let ledger = h
        .fleet
        .token_ledger(&TenantScope::All, &real.token.id, 1_000)
        .await
        .unwrap();
    assert_eq!(ledger.len(), 20, "the limited guesses cost no ledger row");

    // The correct secret from the same address is not refused because of the guesses.
    let (status, reply) = post(
        &h,
        None,
        "/v1/enroll",
        serde_json::json!({"token": real.presented.to_string(), "csr_pem": csr().1, "system": {"hostname": "site-agent"}}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    // When the window has passed, a wrong token is evaluated again.
    h.clock.advance(Duration::from_secs(61));
    let (status, reply) = post(&h, None, "/v1/enroll", guess).await;
    assert_eq!(
        (status, code(&reply)),
        (401, fleet_agent_proto::ErrorCode::InvalidToken)
    );
    h.stop().await;
}
