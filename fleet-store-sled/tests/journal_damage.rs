//! Damage to the heartbeat journal, through the public API: a store dropped without `close` (as
//! in a crash) and reopened with bytes of its journal flipped, overwritten or cut off loses the
//! heartbeat batches the damage touches and no other, and reports what it skipped.

use std::time::Duration;

use fleet_core::store::{HeartbeatRecord, HeartbeatStore, InstanceStore};
use fleet_core::testing::{T0, instance};
use fleet_core::{InstanceId, Timestamp};
use fleet_store_sled::SledStore;

const BATCHES: usize = 24;

fn seen(i: usize) -> Timestamp {
    T0.saturating_add(Duration::from_secs(60 + i as u64))
}

struct Journaled {
    dir: tempfile::TempDir,
    ids: Vec<InstanceId>,
    /// The journal as written: batch `i` (a heartbeat of instance `i`) is `bytes[ends[i-1]..ends[i]]`.
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Journaled {
    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("db")
    }

    fn journal(&self) -> std::path::PathBuf {
        self.db().join("fleet-heartbeats.journal")
    }

    /// The record of batch `i`.
    fn record(&self, i: usize) -> std::ops::Range<usize> {
        (if i == 0 { 0 } else { self.ends[i - 1] })..self.ends[i]
    }

    /// Opens the store with `damaged` as its journal and returns, per batch, whether its
    /// heartbeat was recovered; and the store.
    async fn reopen_with(&self, damaged: &[u8]) -> (Vec<bool>, SledStore) {
        std::fs::write(self.journal(), damaged).unwrap();
        let store = SledStore::open(self.db()).await.unwrap();
        let mut recovered = Vec::new();
        for (i, id) in self.ids.iter().enumerate() {
            let inst = store.get_instance(*id).await.unwrap().unwrap();
            assert!(
                inst.last_seen == seen(i) || inst.last_seen == T0,
                "batch {i}"
            );
            recovered.push(inst.last_seen == seen(i));
        }
        (recovered, store)
    }
}

/// A store whose journal holds `BATCHES` batches, one heartbeat each, never compacted.
async fn journaled() -> Journaled {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path().join("db")).await.unwrap();
    let journal = dir.path().join("db").join("fleet-heartbeats.journal");
    let mut ids = Vec::new();
    let mut ends = Vec::new();
    for i in 0..BATCHES {
        let inst = instance(i as u32);
        store.insert_instance(&inst).await.unwrap();
        let rec = HeartbeatRecord {
            id: inst.id,
            last_seen: seen(i),
            metrics: None,
            apps: None,
        };
        store.write_heartbeats(&[rec]).await.unwrap();
        ends.push(std::fs::metadata(&journal).unwrap().len() as usize);
        ids.push(inst.id);
    }
    drop(store);
    let bytes = std::fs::read(&journal).unwrap();
    assert_eq!(bytes.len(), ends[BATCHES - 1]);
    Journaled {
        dir,
        ids,
        bytes,
        ends,
    }
}

fn expect_all_but(lost: &[usize]) -> Vec<bool> {
    (0..BATCHES).map(|i| !lost.contains(&i)).collect()
}

/// The attack: one flipped byte in the middle of the journal (in a body, in a length, in a
/// marker) or an overwritten stretch, loses only the batches it touches. The previous format
/// stopped at the damage and cut the file there, losing every later batch.
#[tokio::test]
async fn damage_in_the_middle_loses_only_the_damaged_batches() {
    let j = journaled().await;
    let mut cases: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for i in [1, 7, 12, 22] {
        let r = j.record(i);
        for (what, at) in [
            ("marker", r.start),
            ("length", r.start + 9),
            ("body", r.end - 3),
        ] {
            let mut b = j.bytes.clone();
            b[at] ^= 0x10;
            cases.push((format!("batch {i}: {what} byte {at} flipped"), b, vec![i]));
        }
    }
    let (from, to) = (j.record(5).start + 4, j.record(8).start + 2);
    let mut b = j.bytes.clone();
    b[from..to].fill(0);
    cases.push((format!("bytes {from}..{to} zeroed"), b, vec![5, 6, 7, 8]));
    for (why, damaged, lost) in cases {
        let (recovered, store) = j.reopen_with(&damaged).await;
        assert_eq!(recovered, expect_all_but(&lost), "{why}");
        let r = store.journal_recovery();
        assert_eq!(r.records_replayed, (BATCHES - lost.len()) as u64, "{why}");
        assert!(
            r.records_skipped >= 1 && r.bytes_skipped > 0,
            "{why}: {r:?}"
        );
        assert_eq!(r.torn_tail_bytes, 0, "{why}");
        assert!(r.rewritten, "{why}");
        // The damaged records are gone from the file; the intact ones stay, and a later batch
        // is replayed after them at the next open.
        let later = HeartbeatRecord {
            id: j.ids[0],
            last_seen: seen(1000),
            metrics: None,
            apps: None,
        };
        store.write_heartbeats(&[later]).await.unwrap();
        drop(store);
        let store = SledStore::open(j.db()).await.unwrap();
        let r = store.journal_recovery();
        assert_eq!(
            r.records_replayed,
            (BATCHES - lost.len() + 1) as u64,
            "{why}"
        );
        assert_eq!((r.records_skipped, r.bytes_skipped), (0, 0), "{why}");
        let first = store.get_instance(j.ids[0]).await.unwrap().unwrap();
        assert_eq!(
            first.last_seen,
            seen(1000),
            "{why}: the later batch survives"
        );
        drop(store);
    }
}

/// A crash in the middle of an append: the torn record is cut off, nothing else is lost.
#[tokio::test]
async fn a_torn_tail_is_cut_off() {
    let j = journaled().await;
    let last = j.record(BATCHES - 1);
    let torn = &j.bytes[..last.start + last.len() / 2];
    let (recovered, store) = j.reopen_with(torn).await;
    assert_eq!(recovered, expect_all_but(&[BATCHES - 1]));
    let r = store.journal_recovery();
    assert_eq!(r.records_replayed, BATCHES as u64 - 1);
    assert_eq!(r.torn_tail_bytes, (last.len() / 2) as u64);
    assert_eq!(
        (r.records_skipped, r.bytes_skipped, r.rewritten),
        (0, 0, false)
    );
    assert_eq!(
        std::fs::metadata(j.journal()).unwrap().len(),
        last.start as u64,
        "the file ends with the last intact record"
    );
}

/// A journal in the previous format (no marker) is replayed and converted.
#[tokio::test]
async fn a_version_1_journal_is_replayed() {
    let j = journaled().await;
    let mut old = Vec::new();
    for (i, id) in j.ids.iter().enumerate() {
        let rec = HeartbeatRecord {
            id: *id,
            last_seen: seen(i),
            metrics: None,
            apps: None,
        };
        let body = postcard::to_extend(&vec![rec], vec![1u8]).unwrap();
        old.extend_from_slice(&(body.len() as u32).to_le_bytes());
        old.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        old.extend_from_slice(&body);
    }
    let (recovered, store) = j.reopen_with(&old).await;
    assert_eq!(recovered, expect_all_but(&[]));
    let r = store.journal_recovery();
    assert_eq!(
        (r.records_replayed, r.legacy_records),
        (BATCHES as u64, BATCHES as u64)
    );
    assert!(r.rewritten);
    drop(store);
    assert_eq!(
        std::fs::read(j.journal()).unwrap(),
        j.bytes,
        "rewritten in the current format, as this version writes it"
    );
}
