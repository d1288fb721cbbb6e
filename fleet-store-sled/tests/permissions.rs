//! The store's files are private to the user running it: a store directory `SledStore::open`
//! creates is 0700, every file in it 0600 (directories 0700) whatever the umask, the journal is
//! 0600 even if it was more permissive, and a backup is the same.

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fleet_core::store::{HeartbeatRecord, HeartbeatStore, InstanceStore};
use fleet_core::testing::instance;
use fleet_store_sled::SledStore;

/// The permission bits of `path`, in octal ("700").
fn mode(path: &Path) -> String {
    let bits = std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    format!("{bits:o}")
}

/// Every directory below `root` is 0700, every file 0600; returns how many files there are.
fn assert_private_below(root: &Path) -> usize {
    let mut files = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                assert_eq!(mode(&path), "700", "{}", path.display());
                dirs.push(path);
            } else {
                assert_eq!(mode(&path), "600", "{}", path.display());
                files += 1;
            }
        }
    }
    files
}

/// A store with an instance (its id returned) and a journaled heartbeat.
async fn populated(path: &Path) -> (SledStore, fleet_core::InstanceId) {
    let store = SledStore::open(path).await.unwrap();
    let inst = instance(1);
    store.insert_instance(&inst).await.unwrap();
    let hb = HeartbeatRecord {
        id: inst.id,
        last_seen: inst.last_seen,
        metrics: None,
        apps: None,
    };
    store.write_heartbeats(&[hb]).await.unwrap();
    (store, inst.id)
}

#[tokio::test]
async fn a_new_store_is_private() {
    let dir = tempfile::tempdir().unwrap();
    // Parents that do not exist are created private too.
    let path = dir.path().join("data").join("db");
    let (store, _) = populated(&path).await;
    assert_eq!(mode(&path), "700", "the store directory");
    assert_eq!(mode(&dir.path().join("data")), "700", "a parent it created");
    assert!(assert_private_below(&path) >= 3, "conf, db, journal");
    assert_eq!(mode(&path.join("fleet-heartbeats.journal")), "600");
    store.close().await.unwrap();
    assert_private_below(&path);
}

/// Files made permissive behind the store's back (or by an older version) are set private at
/// the next open; the directory the operator chose keeps its mode.
#[tokio::test]
async fn an_existing_store_is_made_private_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(populated(&path).await.0);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750)).unwrap();
    let mut loosened = 0;
    for entry in std::fs::read_dir(&path).unwrap() {
        let p = entry.unwrap().path();
        let loose = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(loose)).unwrap();
        loosened += 1;
    }
    assert!(loosened >= 3);
    let journal = path.join("fleet-heartbeats.journal");
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o666)).unwrap();
    let store = SledStore::open(&path).await.unwrap();
    assert_private_below(&path);
    assert_eq!(mode(&journal), "600");
    assert_eq!(
        mode(&path),
        "750",
        "an existing store directory keeps its mode"
    );
    drop(store);
}

#[tokio::test]
async fn a_backup_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = populated(&dir.path().join("db")).await;
    let backup = dir.path().join("backups").join("one");
    store.backup_to(&backup).await.unwrap();
    assert_eq!(mode(&backup), "700");
    assert!(assert_private_below(&backup) >= 2, "conf, db");
    // An existing empty destination is made private as well.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
    store.backup_to(&empty).await.unwrap();
    assert_eq!(mode(&empty), "700");
    assert!(assert_private_below(&empty) >= 2);
    // The restored store is private too.
    drop(store);
    let restored = SledStore::open(&backup).await.unwrap();
    assert!(restored.get_instance(id).await.unwrap().is_some());
    assert_private_below(&backup);
}
