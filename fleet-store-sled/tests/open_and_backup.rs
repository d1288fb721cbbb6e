//! Opening what is not a healthy fleet store fails with an error naming the path (never a
//! panic); a backup made with `backup_to` restores to the same fleet.

use std::time::Duration;

use fleet_core::store::{CertificateStore, ChangeFeed, InstanceStore, TokenStore};
use fleet_core::testing::{key_and_csr, request};
use fleet_core::{
    Clock, Filter, Fleet, Heartbeat, ManualClock, MetricsSample, NewToken, Tags, TenantScope,
    Timestamp,
};
use fleet_store_sled::{OpenError, SledStore, sled};

fn mentions(err: &OpenError, path: &std::path::Path) -> bool {
    err.to_string().contains(&path.display().to_string())
}

#[tokio::test]
async fn a_file_at_the_data_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    std::fs::write(&path, b"hello").unwrap();
    let err = SledStore::open(&path).await.unwrap_err();
    assert!(matches!(err, OpenError::NotADirectory { .. }), "{err:?}");
    assert!(mentions(&err, &path), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"hello",
        "the file is untouched"
    );
}

#[tokio::test]
async fn a_foreign_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"my files").unwrap();
    let err = SledStore::open(dir.path()).await.unwrap_err();
    assert!(matches!(err, OpenError::Foreign { .. }), "{err:?}");
    assert!(mentions(&err, dir.path()), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing was created"
    );
}

#[tokio::test]
async fn another_sled_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let db = sled::open(&path).unwrap();
        db.open_tree("users")
            .unwrap()
            .insert(b"alice", b"x")
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(&path).await.unwrap_err();
    assert!(matches!(err, OpenError::Foreign { .. }), "{err:?}");
    assert!(mentions(&err, &path), "{err}");
}

#[tokio::test]
async fn a_corrupt_database_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let store = SledStore::open(&path).await.unwrap();
        let fleet = Fleet::builder(store)
            .key_encryption_key(fleet_core::testing::kek())
            .open()
            .await
            .unwrap();
        fleet
            .create_token(&TenantScope::All, NewToken::default())
            .await
            .unwrap();
    }
    // Overwrite the database file with garbage.
    let file = path.join("db");
    let len = std::fs::metadata(&file).unwrap().len() as usize;
    std::fs::write(&file, vec![0xA5; len.max(4096)]).unwrap();
    std::fs::remove_file(path.join("conf")).ok();
    std::fs::write(path.join("conf"), b"garbage conf").unwrap();
    let err = SledStore::open(&path)
        .await
        .expect_err("a corrupt store must not open");
    eprintln!("corrupt store: {err} ({err:?})");
    assert!(mentions(&err, &path), "{err}");
}

#[tokio::test]
async fn a_newer_layout_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(SledStore::open(&path).await.unwrap());
    {
        // sled releases its file lock from a background thread after the drop: retry briefly.
        let db = (0..40)
            .find_map(|_| match sled::open(&path) {
                Ok(db) => Some(db),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    None
                }
            })
            .expect("the dropped store releases its lock");
        let meta = db.open_tree("meta").unwrap();
        let mut marker = meta.get(b"format").unwrap().unwrap().to_vec();
        marker[0] = 99;
        meta.insert(b"format", marker).unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(&path).await.unwrap_err();
    assert!(
        matches!(err, OpenError::UnsupportedVersion { found: 99, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn backup_restores_the_same_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let store = SledStore::open(dir.path().join("db")).await.unwrap();
    let fleet = Fleet::builder(store.clone())
        .key_encryption_key(fleet_core::testing::kek())
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let token = fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: fleet_core::MaxUses::Limited(3),
                ..NewToken::default()
            },
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for host in ["a", "b"] {
        ids.push(
            fleet
                .enroll(request(
                    &token.presented.to_string(),
                    &key_and_csr().1,
                    host,
                ))
                .await
                .unwrap()
                .instance,
        );
    }
    fleet
        .set_tags(
            &TenantScope::All,
            ids[0],
            Tags::from_pairs([("env", "prod")]).unwrap(),
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(20));
    let m = MetricsSample {
        cpu_percent: Some(33.0),
        ..MetricsSample::default()
    };
    fleet
        .heartbeat(
            ids[1],
            Heartbeat {
                metrics: Some(m.clone()),
                apps: None,
            },
        )
        .unwrap();
    fleet.flush_heartbeats().await.unwrap();

    let backup = dir.path().join("backup");
    store.backup_to(&backup).await.unwrap();
    // A non-empty destination is refused.
    assert!(store.backup_to(&backup).await.is_err());

    let restored = SledStore::open(&backup).await.unwrap();
    assert_eq!(
        restored.load_ca().await.unwrap(),
        store.load_ca().await.unwrap(),
        "the CA travels with the backup"
    );
    assert_eq!(
        restored.list_tokens().await.unwrap(),
        store.list_tokens().await.unwrap()
    );
    assert_eq!(
        restored.ledger(&token.token.id, 10).await.unwrap(),
        store.ledger(&token.token.id, 10).await.unwrap()
    );
    assert_eq!(
        restored.list_instances(None, 10).await.unwrap(),
        store.list_instances(None, 10).await.unwrap()
    );
    assert_eq!(
        restored.latest_seq().await.unwrap(),
        store.latest_seq().await.unwrap()
    );
    let again = Fleet::builder(restored)
        .key_encryption_key(fleet_core::testing::kek())
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    assert_eq!(
        again.summary(&Filter::all(), &TenantScope::All),
        fleet.summary(&Filter::all(), &TenantScope::All)
    );
    assert_eq!(again.ca().fingerprint(), fleet.ca().fingerprint());
    let detail = again.detail(&TenantScope::All, ids[1]).await.unwrap();
    assert_eq!(detail.live.metrics.and_then(|m| m.cpu_percent), Some(33.0));
    // Enrollment continues against the restored token count.
    let third = again
        .enroll(request(&token.presented.to_string(), &key_and_csr().1, "c"))
        .await
        .unwrap();
    assert!(again.get(&TenantScope::All, third.instance).is_some());
    assert!(
        again
            .enroll(request(&token.presented.to_string(), &key_and_csr().1, "d"))
            .await
            .is_err(),
        "3 uses, then exhausted"
    );
}

#[tokio::test]
async fn close_compacts_the_journal_and_reopen_sees_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let store = SledStore::open(&path).await.unwrap();
    let fleet = Fleet::builder(store.clone())
        .key_encryption_key(fleet_core::testing::kek())
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let token = fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .unwrap();
    let id = fleet
        .enroll(request(&token.presented.to_string(), &key_and_csr().1, "a"))
        .await
        .unwrap()
        .instance;
    clock.advance(Duration::from_secs(7));
    let m = MetricsSample {
        cpu_percent: Some(12.0),
        ..MetricsSample::default()
    };
    fleet
        .heartbeat(
            id,
            Heartbeat {
                metrics: Some(m.clone()),
                apps: None,
            },
        )
        .unwrap();
    fleet.flush_heartbeats().await.unwrap();
    let journal = path.join("fleet-heartbeats.journal");
    assert!(
        std::fs::metadata(&journal).unwrap().len() > 0,
        "the batch is journaled"
    );
    store.close().await.unwrap();
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        0,
        "close compacts the journal"
    );
    drop(fleet);
    drop(store);
    let reopened = SledStore::open(&path).await.unwrap();
    let inst = reopened.get_instance(id).await.unwrap().unwrap();
    assert_eq!(inst.last_seen, clock.now());
    assert_eq!(inst.metrics, Some(m));
}

#[tokio::test]
async fn a_store_in_use_is_reported_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let first = SledStore::open(&path).await.unwrap();
    let err = SledStore::open(&path).await.unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
    assert!(mentions(&err, &path), "{err}");
    drop(first);
}
