//! Guessing registration tokens against a durable store (sled in a temp dir): the answer's latency
//! must not say which token ids exist, and a real token's ledger must stay bounded however long
//! the guessing goes on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleet_core::ledger::MAX_RECORDED_ATTEMPTS;
use fleet_core::limiter::AttemptLimit;
use fleet_core::testing::{key_and_csr, request};
use fleet_core::{EnrollError, EnrollmentPolicy, Fleet, NewToken, TenantScope};
use fleet_store_sled::SledStore;

async fn fleet(dir: &std::path::Path) -> Fleet<SledStore> {
    let store = SledStore::open(dir.join("db")).await.expect("open");
    Fleet::builder(store)
        .key_encryption_key(fleet_core::testing::kek())
        // Every guess here comes from a new address; the limiter is not what is measured.
        .enrollment(EnrollmentPolicy {
            failed_attempts: AttemptLimit {
                max_failures: 1_000_000,
                ..AttemptLimit::default()
            },
            ..EnrollmentPolicy::default()
        })
        .open()
        .await
        .expect("fleet")
}

fn peer(i: u32) -> SocketAddr {
    SocketAddr::new(
        std::net::IpAddr::from(((10u32 << 24) | i).to_be_bytes()),
        40_000,
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A known id with a wrong secret used to pay a durable ledger write (an fsync on sled) before
/// its answer, an unknown id did not: the difference named the real token ids. Now both answer
/// after the same work, and the row is written later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_answers_as_fast_as_an_unknown_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = fleet(dir.path()).await;
    let real = fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .expect("token");
    let csr = key_and_csr().1;
    let wrong = format!("{}.{}", real.token.id, "0".repeat(32));
    let unknown = format!("{}.{}", "zzzzzzzz", "0".repeat(32));
    let (mut known_ids, mut unknown_ids) = (Vec::new(), Vec::new());
    for i in 0..300u32 {
        // Alternate, so a drifting machine slows both alike.
        for (token, times) in [(&wrong, &mut known_ids), (&unknown, &mut unknown_ids)] {
            let mut req = request(token, &csr, "guess");
            req.peer = Some(peer(i));
            let t = Instant::now();
            let r = fleet.enroll(req).await;
            times.push(t.elapsed());
            assert!(matches!(r, Err(EnrollError::InvalidToken)), "{r:?}");
        }
    }
    let (known, unknown) = (median(known_ids), median(unknown_ids));
    eprintln!("median: known id, wrong secret {known:?}; unknown id {unknown:?}");
    assert!(
        known <= unknown * 3 / 2 + Duration::from_micros(100),
        "a real token id answers measurably slower ({known:?} against {unknown:?})"
    );
    // The rows were written all the same, after the answers.
    fleet.flush_ledger().await;
    let rows = fleet
        .token_ledger(&TenantScope::All, &real.token.id, 10_000)
        .await
        .expect("ledger");
    assert_eq!(rows.len(), 300, "every wrong secret is recorded");
}

/// However long the guessing goes on, a real token holds at most the documented number of
/// refusal rows; beyond it the attempts are counted per source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_tokens_ledger_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = fleet(dir.path()).await;
    let real = fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .expect("token");
    let csr = key_and_csr().1;
    let wrong = format!("{}.{}", real.token.id, "0".repeat(32));
    let total = MAX_RECORDED_ATTEMPTS + 250;
    for i in 0..total {
        let mut req = request(&wrong, &csr, "guess");
        // Three sources take turns.
        req.peer = Some(peer(i % 3));
        assert!(fleet.enroll(req).await.is_err());
        if i % 500 == 0 {
            fleet.flush_ledger().await;
        }
    }
    let rows = fleet
        .token_ledger(&TenantScope::All, &real.token.id, 10_000)
        .await
        .expect("ledger");
    assert_eq!(rows.len(), MAX_RECORDED_ATTEMPTS as usize, "bounded");
    let unrecorded = fleet
        .unrecorded_attempts(&TenantScope::All, &real.token.id)
        .await
        .expect("unrecorded");
    assert_eq!(unrecorded.len(), 3, "counted per source: {unrecorded:?}");
    assert_eq!(unrecorded.iter().map(|u| u.attempts).sum::<u64>(), 250);
    // A restart keeps the bound: a new fleet over the same store (what a restarted process
    // has) reads the count of rows back from the store.
    let fleet = Fleet::builder(fleet.store().clone())
        .key_encryption_key(fleet_core::testing::kek())
        .open()
        .await
        .expect("reopened");
    let mut req = request(&wrong, &csr, "guess");
    req.peer = Some(peer(7));
    assert!(fleet.enroll(req).await.is_err());
    let rows = fleet
        .token_ledger(&TenantScope::All, &real.token.id, 10_000)
        .await
        .expect("ledger");
    assert_eq!(
        rows.len(),
        MAX_RECORDED_ATTEMPTS as usize,
        "still bounded after a restart"
    );
    let unrecorded = fleet
        .unrecorded_attempts(&TenantScope::All, &real.token.id)
        .await
        .expect("unrecorded");
    assert_eq!(unrecorded.iter().map(|u| u.attempts).sum::<u64>(), 1);
}
