//! SledStore runs the whole conformance suite, each property in a fresh temp directory.

use fleet_store_sled::SledStore;

fleet_core::store_conformance_tests!(async {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path().join("db")).await.expect("open");
    (dir, store)
});
