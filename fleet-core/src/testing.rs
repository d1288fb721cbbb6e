//! The store conformance suite: one `pub async fn` per property every [`FleetStore`] must have,
//! and [`store_conformance_tests!`](crate::store_conformance_tests) to run them all.
//!
//! In a store crate's tests (tokio with the `macros` and `rt-multi-thread` features required):
//!
//! ```text
//! fleet_core::store_conformance_tests!(async {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = MyStore::open(dir.path()).await.unwrap();
//!     (dir, store) // the first element is kept alive for the test (a cleanup guard)
//! });
//! ```
//!
//! Each property gets a fresh, empty store. A failing property panics with a message saying what
//! the contract requires. The suite is part of the API for store authors but is not covered by
//! semver: properties are added as contracts are written down.

// The suite reports a broken contract by panicking, as test assertions do.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::command::{
    BatchId, Command, CommandId, CommandKind, CommandOutcome, CommandQuery, CommandResult,
    CommandState, Delivery, Enqueued, Payload,
};
use crate::enroll::{AuthError, EnrollError, EnrollRequest, Enrollment};
use crate::store::{ChangeKind, FleetStore, HeartbeatRecord};
use crate::token::{LedgerOutcome, MaxUses, NewToken};
use crate::{
    App, Filter, Fleet, FleetError, Groups, Heartbeat, Instance, InstanceId, InstanceIdentity,
    ManualClock, MetricsSample, NewInstance, Status, StoreError, SystemInfo, Tags, TenantId,
    TenantScope, Timestamp,
};

/// A store under test, shared by tasks.
pub type DynStore = Arc<dyn FleetStore>;

/// The start time of the suite's manual clocks.
pub const T0: Timestamp = Timestamp::from_unix_secs(1_700_000_000);

/// A valid instance record for tests: hostname `host-{n}`, tags `env`/`n`, group `g{n % 3}`.
pub fn instance(n: u32) -> Instance {
    Instance {
        id: InstanceId::random(),
        tenant: n
            .is_multiple_of(2)
            .then(|| TenantId::new(format!("tenant-{}", n % 4)).unwrap_or_else(|e| panic!("{e}"))),
        system: SystemInfo {
            hostname: format!("host-{n}"),
            ip_addresses: vec![std::net::IpAddr::from([10, 0, (n >> 8) as u8, n as u8])],
            os: Some("Cloud OS".into()),
            ..SystemInfo::default()
        },
        tags: Tags::from_pairs([
            ("env", if n.is_multiple_of(2) { "prod" } else { "dev" }),
            ("n", &n.to_string()),
        ])
        .unwrap_or_else(|e| panic!("{e}")),
        groups: Groups::from_names([format!("g{}", n % 3)]).unwrap_or_else(|e| panic!("{e}")),
        registered_at: T0,
        last_seen: T0,
        metrics: None,
        apps: Vec::new(),
        certificate: None,
        next_certificate: None,
    }
}

async fn ok<T>(what: &str, f: impl Future<Output = Result<T, StoreError>>) -> T {
    match f.await {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e} ({e:?})"),
    }
}

/// `insert_instance` then `get_instance` returns the same record.
pub async fn insert_get_round_trip(store: DynStore) {
    let mut inst = instance(7);
    inst.metrics = Some(MetricsSample {
        cpu_percent: Some(12.5),
        ..MetricsSample::default()
    });
    inst.apps = vec![App {
        name: "nginx".into(),
        version: Some("1.25".into()),
    }];
    ok("insert", store.insert_instance(&inst)).await;
    let got = ok("get", store.get_instance(inst.id)).await;
    assert_eq!(
        got.as_ref(),
        Some(&inst),
        "a stored instance must read back unchanged"
    );
    assert_eq!(ok("count", store.count_instances()).await, 1);
}

/// Inserting an existing id is `AlreadyExists` and changes nothing (record and feed).
pub async fn duplicate_insert_is_rejected(store: DynStore) {
    let inst = instance(1);
    ok("insert", store.insert_instance(&inst)).await;
    let seq = ok("latest_seq", store.latest_seq()).await;
    let mut other = instance(2);
    other.id = inst.id;
    match store.insert_instance(&other).await {
        Err(StoreError::AlreadyExists { .. }) => {}
        other => panic!("duplicate insert must be AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        ok("get", store.get_instance(inst.id)).await,
        Some(inst),
        "the original must be untouched"
    );
    assert_eq!(
        ok("latest_seq", store.latest_seq()).await,
        seq,
        "a rejected insert appends no change"
    );
}

/// Reading, editing or deleting an unknown id: `None` / `NotFound`, and nothing is created.
pub async fn missing_instances(store: DynStore) {
    let id = InstanceId::random();
    assert_eq!(ok("get", store.get_instance(id)).await, None);
    assert!(matches!(
        store.set_tags(id, &Tags::new()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.set_groups(id, &Groups::new()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_instance(id, T0).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        ok("count", store.count_instances()).await,
        0,
        "nothing may be created"
    );
    assert_eq!(
        ok("latest_seq", store.latest_seq()).await,
        0,
        "failed writes append no change"
    );
}

/// Paging through `list_instances` visits every instance once, in ascending id order.
pub async fn list_pages_cover_everything_in_id_order(store: DynStore) {
    let mut ids = Vec::new();
    for n in 0..250 {
        let inst = instance(n);
        ids.push(inst.id);
        ok("insert", store.insert_instance(&inst)).await;
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = ok("list", store.list_instances(after, 7)).await;
        assert!(page.len() <= 7, "a page must respect the limit");
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        seen.extend(page.iter().map(|i| i.id));
    }
    assert_eq!(seen, ids, "listing must return every id once, ascending");
    assert!(ok("list", store.list_instances(None, 0)).await.is_empty());
}

/// Tag and group edits are stored and read back; other fields are untouched.
pub async fn tags_and_groups_are_stored(store: DynStore) {
    let inst = instance(3);
    ok("insert", store.insert_instance(&inst)).await;
    let tags = Tags::from_pairs([("tier", "critical"), ("fleet.io/owner", "ops")])
        .unwrap_or_else(|e| panic!("{e}"));
    let groups = Groups::from_names(["database-servers", "eu"]).unwrap_or_else(|e| panic!("{e}"));
    let s1 = ok("set_tags", store.set_tags(inst.id, &tags)).await;
    let s2 = ok("set_groups", store.set_groups(inst.id, &groups)).await;
    assert!(s2 > s1, "each edit gets a larger sequence number");
    let got = ok("get", store.get_instance(inst.id))
        .await
        .unwrap_or_else(|| panic!("instance vanished"));
    assert_eq!(got.tags, tags);
    assert_eq!(got.groups, groups);
    assert_eq!(got.system, inst.system, "edits must not touch other fields");
    assert_eq!(got.tenant, inst.tenant);
}

/// Deleting removes the instance and appends a `Deleted` change.
pub async fn delete_removes(store: DynStore) {
    let a = instance(1);
    let b = instance(2);
    ok("insert", store.insert_instance(&a)).await;
    ok("insert", store.insert_instance(&b)).await;
    let seq = ok("delete", store.delete_instance(a.id, T0)).await;
    assert_eq!(ok("get", store.get_instance(a.id)).await, None);
    assert_eq!(ok("get", store.get_instance(b.id)).await, Some(b));
    let changes = ok("changes", store.changes_since(seq - 1, 10)).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].instance, changes[0].kind),
        (a.id, ChangeKind::Deleted)
    );
    assert_eq!(ok("count", store.count_instances()).await, 1);
}

/// A heartbeat batch updates last seen, metrics and apps; `None` fields leave stored values;
/// heartbeats append nothing to the feed.
pub async fn heartbeats_update_last_known_state(store: DynStore) {
    let a = instance(1);
    let b = instance(2);
    ok("insert", store.insert_instance(&a)).await;
    ok("insert", store.insert_instance(&b)).await;
    let seq = ok("latest_seq", store.latest_seq()).await;
    let m1 = MetricsSample {
        cpu_percent: Some(50.0),
        uptime_secs: Some(10),
        ..MetricsSample::default()
    };
    let apps = vec![App {
        name: "postgres".into(),
        version: Some("15".into()),
    }];
    let t1 = T0.saturating_add(Duration::from_secs(15));
    ok(
        "write_heartbeats",
        store.write_heartbeats(&[
            HeartbeatRecord {
                id: a.id,
                last_seen: t1,
                metrics: Some(m1.clone()),
                apps: Some(apps.clone()),
            },
            HeartbeatRecord {
                id: b.id,
                last_seen: t1,
                metrics: None,
                apps: None,
            },
        ]),
    )
    .await;
    let t2 = t1.saturating_add(Duration::from_secs(15));
    ok(
        "write_heartbeats",
        store.write_heartbeats(&[HeartbeatRecord {
            id: a.id,
            last_seen: t2,
            metrics: None,
            apps: None,
        }]),
    )
    .await;
    let got = ok("get", store.get_instance(a.id))
        .await
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!(got.last_seen, t2);
    assert_eq!(
        got.metrics,
        Some(m1),
        "a record without metrics keeps the stored sample"
    );
    assert_eq!(
        got.apps, apps,
        "a record without apps keeps the stored list"
    );
    assert_eq!(got.tags, a.tags, "heartbeats never touch tags");
    let gb = ok("get", store.get_instance(b.id))
        .await
        .unwrap_or_else(|| panic!("missing"));
    assert_eq!((gb.last_seen, gb.metrics), (t1, None));
    assert_eq!(
        ok("latest_seq", store.latest_seq()).await,
        seq,
        "heartbeats append no change"
    );
}

/// A heartbeat record for a deleted (or never created) instance is skipped, never resurrecting it.
pub async fn heartbeats_never_resurrect(store: DynStore) {
    let a = instance(1);
    ok("insert", store.insert_instance(&a)).await;
    ok("delete", store.delete_instance(a.id, T0)).await;
    let ghost = InstanceId::random();
    ok(
        "write_heartbeats",
        store.write_heartbeats(&[
            HeartbeatRecord {
                id: a.id,
                last_seen: T0,
                metrics: None,
                apps: None,
            },
            HeartbeatRecord {
                id: ghost,
                last_seen: T0,
                metrics: None,
                apps: None,
            },
        ]),
    )
    .await;
    assert_eq!(ok("get", store.get_instance(a.id)).await, None);
    assert_eq!(ok("get", store.get_instance(ghost)).await, None);
    assert_eq!(ok("count", store.count_instances()).await, 0);
}

/// The feed has one change per durable mutation, strictly increasing, pageable from any point.
pub async fn change_feed_is_complete_and_ordered(store: DynStore) {
    assert_eq!(ok("latest_seq", store.latest_seq()).await, 0);
    let a = instance(1);
    let b = instance(2);
    let mut expected = vec![
        (
            ok("insert", store.insert_instance(&a)).await,
            a.id,
            ChangeKind::Upserted,
        ),
        (
            ok("insert", store.insert_instance(&b)).await,
            b.id,
            ChangeKind::Upserted,
        ),
        (
            ok("set_tags", store.set_tags(a.id, &Tags::new())).await,
            a.id,
            ChangeKind::Upserted,
        ),
        (
            ok("set_groups", store.set_groups(b.id, &Groups::new())).await,
            b.id,
            ChangeKind::Upserted,
        ),
        (
            ok("delete", store.delete_instance(a.id, T0)).await,
            a.id,
            ChangeKind::Deleted,
        ),
    ];
    expected.sort_by_key(|e| e.0);
    let all = ok("changes", store.changes_since(0, 100)).await;
    let got: Vec<_> = all.iter().map(|c| (c.seq, c.instance, c.kind)).collect();
    assert_eq!(
        got, expected,
        "one change per mutation, in order, with the returned seqs"
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(ok("latest_seq", store.latest_seq()).await, expected[4].0);
    // Paging: two at a time from each position.
    for start in 0..expected.len() {
        let after = if start == 0 { 0 } else { expected[start - 1].0 };
        let page = ok("changes", store.changes_since(after, 2)).await;
        let want: Vec<_> = expected[start..].iter().take(2).map(|e| e.0).collect();
        assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), want);
    }
    assert!(
        ok("changes", store.changes_since(expected[4].0, 10))
            .await
            .is_empty()
    );
}

/// 8 tasks inserting 40 instances each at once: every insert lands, sequence numbers are unique.
pub async fn concurrent_inserts_all_land(store: DynStore) {
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..40 {
                seqs.push(ok("insert", store.insert_instance(&instance(t * 100 + n))).await);
            }
            seqs
        }));
    }
    let mut seqs = HashSet::new();
    for task in tasks {
        let got = task.await.unwrap_or_else(|e| panic!("task failed: {e}"));
        for s in got {
            assert!(seqs.insert(s), "sequence number {s} assigned twice");
        }
    }
    assert_eq!(ok("count", store.count_instances()).await, 320);
    assert_eq!(ok("changes", store.changes_since(0, 1000)).await.len(), 320);
}

/// Concurrent tag edits of one instance: the stored tags equal the edit with the largest
/// sequence number (the feed order is the commit order).
pub async fn concurrent_edits_follow_feed_order(store: DynStore) {
    let inst = instance(1);
    ok("insert", store.insert_instance(&inst)).await;
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let tags =
                Tags::from_pairs([("writer", t.to_string())]).unwrap_or_else(|e| panic!("{e}"));
            (ok("set_tags", store.set_tags(inst.id, &tags)).await, tags)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap_or_else(|e| panic!("task failed: {e}")));
    }
    let winner = results.iter().max_by_key(|r| r.0).map(|r| r.1.clone());
    let got = ok("get", store.get_instance(inst.id)).await.map(|i| i.tags);
    assert_eq!(
        got, winner,
        "the last committed edit (largest seq) must be the stored one"
    );
}

/// A `Fleet` opened on the store rebuilds the same view a previous `Fleet` left behind:
/// instances, labels, flushed last-seen times and statuses.
pub async fn fleet_rebuilds_from_store(store: DynStore) {
    let clock = ManualClock::new(T0);
    let fleet = Fleet::builder(Arc::clone(&store))
        .key_encryption_key(kek())
        .clock(clock.clone())
        .open()
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    let mut ids = Vec::new();
    for n in 0..20 {
        let inst = instance(n);
        let new = NewInstance {
            id: Some(inst.id),
            tenant: inst.tenant,
            system: inst.system,
            tags: inst.tags,
            groups: inst.groups,
        };
        ids.push(
            fleet
                .register(new)
                .await
                .unwrap_or_else(|e| panic!("register: {e}"))
                .id,
        );
    }
    clock.advance(Duration::from_secs(200));
    for id in &ids[..10] {
        let hb = Heartbeat {
            metrics: Some(MetricsSample {
                cpu_percent: Some(40.0),
                ..MetricsSample::default()
            }),
            apps: None,
        };
        fleet
            .heartbeat(*id, hb)
            .unwrap_or_else(|e| panic!("heartbeat: {e}"));
    }
    fleet
        .flush_heartbeats()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    fleet
        .deregister(&TenantScope::All, ids[19])
        .await
        .unwrap_or_else(|e| panic!("deregister: {e}"));
    let tags = Tags::from_pairs([("env", "staging")]).unwrap_or_else(|e| panic!("{e}"));
    fleet
        .set_tags(&TenantScope::All, ids[0], tags)
        .await
        .unwrap_or_else(|e| panic!("set_tags: {e}"));
    fleet.sweep();

    let reopened = Fleet::builder(Arc::clone(&store))
        .key_encryption_key(kek())
        .clock(clock.clone())
        .open()
        .await
        .unwrap_or_else(|e| panic!("reopen: {e}"));
    let all = Filter::all();
    assert_eq!(
        reopened.summary(&all, &TenantScope::All),
        fleet.summary(&all, &TenantScope::All)
    );
    let list = |f: &Fleet<DynStore>| -> BTreeMap<InstanceId, (Status, Timestamp, Tags)> {
        f.list(&all, &TenantScope::All, None, 1000)
            .items
            .into_iter()
            .map(|v| (v.id, (v.status, v.last_seen, v.tags)))
            .collect()
    };
    assert_eq!(
        list(&reopened),
        list(&fleet),
        "the rebuilt view must equal the original"
    );
    assert_eq!(reopened.summary(&all, &TenantScope::All).online, 10);
    assert_eq!(reopened.summary(&all, &TenantScope::All).warning, 9);
}

/// The DER prefix of a P-256 private key in PKCS#8 (what rcgen and openssl write): a store
/// holding these bytes, or a PEM "PRIVATE KEY", holds a CA key in the clear.
pub const P256_PKCS8_PREFIX: [u8; 19] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08,
];

/// Whether `bytes` contain a private key in the clear (PEM or P-256 PKCS#8 DER).
pub fn holds_clear_private_key(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"PRIVATE KEY")
        || bytes
            .windows(P256_PKCS8_PREFIX.len())
            .any(|w| w == P256_PKCS8_PREFIX)
}

/// The store holds the CA sealed: no private key in the clear; another key-encryption key does
/// not open it; a fleet reopened with the same one signs with the same CA.
pub async fn ca_is_stored_sealed(store: DynStore) {
    let (fleet, _clock) = open_fleet(&store).await;
    let stored = store
        .load_ca()
        .await
        .expect("load_ca")
        .expect("open stores a CA");
    assert!(!stored.is_clear(), "the stored CA key must be sealed");
    assert!(
        !holds_clear_private_key(stored.key_pem.as_bytes())
            && !holds_clear_private_key(stored.cert_pem.as_bytes()),
        "no store may hold the CA key in the clear"
    );
    let other = crate::seal::KeyEncryptionKey::from_bytes([7; 32]);
    let Err(err) = Fleet::builder(Arc::clone(&store))
        .key_encryption_key(other)
        .open()
        .await
    else {
        panic!("another key-encryption key must not open the CA");
    };
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        chain.push_str(&format!(": {e}"));
        source = e.source();
    }
    assert!(
        chain.contains(&kek().id()),
        "the refusal names the key that sealed it: {chain}"
    );
    let (reopened, _clock) = open_fleet(&store).await;
    assert_eq!(reopened.ca().fingerprint(), fleet.ca().fingerprint());
    assert_eq!(
        store.load_ca().await.expect("load_ca"),
        Some(stored),
        "opening changes nothing"
    );
}

/// A CA key written in the clear by an earlier version is sealed when a fleet opens the store,
/// and is the same CA.
pub async fn clear_ca_key_is_sealed_at_open(store: DynStore) {
    let ca = crate::ca::CertificateAuthority::generate("old CA", T0, Duration::from_secs(86_400))
        .expect("ca");
    let (cert_pem, key_pem) = ca.export_pem();
    let clear = crate::ca::CaMaterial { cert_pem, key_pem };
    store.init_ca(&clear).await.expect("init_ca");
    let (fleet, _clock) = open_fleet(&store).await;
    assert_eq!(fleet.ca().fingerprint(), ca.fingerprint());
    let stored = store.load_ca().await.expect("load_ca").expect("a CA");
    assert!(!stored.is_clear(), "the clear key must be sealed at open");
    assert!(!holds_clear_private_key(stored.key_pem.as_bytes()));
}

/// `replace_ca` is a compare and swap: a stale `expected` changes nothing and returns what is
/// stored; of racing replacements from one `expected`, exactly one lands; a rotation through
/// a second fleet over the store is seen by the first after `reload_ca`.
pub async fn replace_ca_is_compare_and_swap(store: DynStore) {
    let fresh = |name: &str| {
        let ca = crate::ca::CertificateAuthority::generate(name, T0, Duration::from_secs(86_400))
            .expect("ca");
        crate::ca::CaSet::single(ca).seal(&kek()).expect("seal")
    };
    let first = fresh("first");
    assert!(
        matches!(
            store.replace_ca(&first, &first).await,
            Err(StoreError::NotFound { .. })
        ),
        "replace_ca on a store without a CA is NotFound"
    );
    assert_eq!(store.init_ca(&first).await.expect("init"), first);
    let stale = fresh("stale");
    let other = fresh("other");
    assert_eq!(
        store.replace_ca(&stale, &other).await.expect("replace"),
        first,
        "a stale expected value returns what is stored"
    );
    assert_eq!(store.load_ca().await.expect("load"), Some(first.clone()));
    let candidates: Vec<_> = (0..8).map(|n| fresh(&format!("c{n}"))).collect();
    let tasks: Vec<_> = candidates
        .iter()
        .cloned()
        .map(|c| {
            let store = Arc::clone(&store);
            let first = first.clone();
            tokio::spawn(async move { store.replace_ca(&first, &c).await.expect("replace") })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("join"));
    }
    let stored = store.load_ca().await.expect("load").expect("a CA");
    assert!(
        results.iter().all(|r| *r == stored),
        "every racer must be told the one value that landed"
    );
    assert_eq!(
        candidates.iter().filter(|c| **c == stored).count(),
        1,
        "exactly one racing replacement lands"
    );

    // Rotation through one fleet, seen by another over the same store.
    let (a, _clock) = open_fleet(&store).await;
    let (b, _clock) = open_fleet(&store).await;
    let old = a.ca().fingerprint();
    let next = a.begin_ca_rotation().await.expect("begin");
    assert_eq!(a.ca_set().all().len(), 2);
    assert_eq!(
        a.ca().fingerprint(),
        old,
        "begin does not change the signer"
    );
    let generation = b.ca_generation();
    b.reload_ca().await.expect("reload");
    assert_eq!(b.ca_set().id(), a.ca_set().id());
    assert_ne!(b.ca_generation(), generation);
    b.promote_ca(next).await.expect("promote");
    a.reload_ca().await.expect("reload");
    assert_eq!(a.ca().fingerprint(), next);
    assert!(
        matches!(
            a.retire_ca(next).await,
            Err(FleetError::Ca(crate::ca::CaError::NotInSet(_)))
        ),
        "the signing CA cannot be retired"
    );
    a.retire_ca(old).await.expect("retire");
    b.reload_ca().await.expect("reload");
    assert_eq!(b.ca_set().all().len(), 1);
    assert_eq!(b.ca().fingerprint(), next);
}

/// A fresh P-256 key and a CSR for it (PEM).
pub fn key_and_csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().expect("key generation");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (key, csr)
}

/// The key-encryption key of the suite's fleets: fixed, so that fleets opened over one store
/// one after another (a restart, a second replica) unseal the same CA. Tests only.
pub fn kek() -> crate::seal::KeyEncryptionKey {
    crate::seal::KeyEncryptionKey::from_bytes([0x42; 32])
}

/// A CSR for an existing key.
pub fn csr_for(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("pem")
}

/// A fleet over `store` with a manual clock at [`T0`].
pub async fn open_fleet(store: &DynStore) -> (Fleet<DynStore>, ManualClock) {
    let clock = ManualClock::new(T0);
    let fleet = Fleet::builder(Arc::clone(store))
        .key_encryption_key(kek())
        .clock(clock.clone())
        .open()
        .await
        .expect("open");
    (fleet, clock)
}

/// An enrollment request for `token` with `csr` and hostname `host`.
pub fn request(token: &str, csr: &str, host: &str) -> EnrollRequest {
    EnrollRequest {
        token: token.to_owned(),
        csr_pem: csr.to_owned(),
        system: SystemInfo::with_hostname(host),
        peer: Some("192.0.2.7:50000".parse().expect("addr")),
        previous_certificate_pem: None,
    }
}

/// Enrolls a new instance named `host` with a fresh one-use token made from `token` (its tenant,
/// tags and groups); returns the instance's id.
pub async fn enroll_with<S: FleetStore>(
    fleet: &Fleet<S>,
    token: NewToken,
    host: &str,
) -> InstanceId {
    let created = fleet
        .create_token(&TenantScope::All, token)
        .await
        .expect("token");
    fleet
        .enroll(request(
            &created.presented.to_string(),
            &key_and_csr().1,
            host,
        ))
        .await
        .expect("enroll")
        .instance
}

fn identity(e: &Enrollment) -> InstanceIdentity {
    InstanceIdentity::from_certificate_der(&e.certificate.der).expect("identity")
}

async fn racing_enrollments(store: DynStore, k: u32) {
    racing_enrollments_across(vec![store], k).await;
}

/// 200 concurrent enrollments with a token of `max_uses = k`, spread round-robin over one
/// `Fleet` per store handle (several handles on one database: several replicas, several pools)
/// register exactly min(200, k) instances, consume exactly that many uses and log every attempt.
pub async fn racing_enrollments_across(stores: Vec<DynStore>, k: u32) {
    const N: usize = 200;
    let mut fleets = Vec::new();
    for s in &stores {
        fleets.push(open_fleet(s).await.0);
    }
    let store = Arc::clone(&stores[0]);
    let fleet = fleets[0].clone();
    let token = fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Limited(k),
                ..NewToken::default()
            },
        )
        .await
        .expect("token");
    let csrs: Vec<String> = (0..N).map(|_| key_and_csr().1).collect();
    let mut tasks = Vec::new();
    for (i, csr) in csrs.into_iter().enumerate() {
        let fleet = fleets[i % fleets.len()].clone();
        let t = token.presented.to_string();
        tasks.push(tokio::spawn(async move {
            fleet.enroll(request(&t, &csr, &format!("h{i}"))).await
        }));
    }
    let mut ok = HashSet::new();
    for task in tasks {
        match task.await.expect("task") {
            Ok(e) => assert!(
                ok.insert(e.instance),
                "instance {} handed out twice",
                e.instance
            ),
            Err(EnrollError::TokenExhausted) => {}
            Err(e) => panic!("unexpected enrollment error: {e}"),
        }
    }
    let k = k as usize;
    assert_eq!(ok.len(), N.min(k), "exactly min(N, k) enrollments succeed");
    assert_eq!(
        store.count_instances().await.expect("count") as usize,
        N.min(k),
        "exactly min(N, k) instances exist"
    );
    for fleet in &fleets {
        fleet.flush_ledger().await;
    }
    let ledger = store.ledger(&token.token.id, 10_000).await.expect("ledger");
    let successes = ledger
        .iter()
        .filter(|e| e.outcome == LedgerOutcome::Enrolled)
        .count();
    assert_eq!(
        successes,
        N.min(k),
        "the ledger records exactly min(N, k) successes"
    );
    assert_eq!(ledger.len(), N, "every attempt is in the ledger");
    let stored = store
        .get_token(&token.token.id)
        .await
        .expect("get")
        .expect("token");
    assert_eq!(stored.uses as usize, N.min(k));
    // Enrollments through other replicas reach this one's view through the change feed.
    fleet.sync().await.expect("sync");
    assert_eq!(
        fleet.summary(&Filter::all(), &TenantScope::All).total as usize,
        N.min(k)
    );
}

/// 200 concurrent enrollments with a single-use token register exactly one instance.
pub async fn racing_enrollments_max_uses_1(store: DynStore) {
    racing_enrollments(store, 1).await;
}

/// 200 concurrent enrollments with `max_uses = 7` register exactly 7 instances.
pub async fn racing_enrollments_max_uses_7(store: DynStore) {
    racing_enrollments(store, 7).await;
}

/// 200 concurrent enrollments with `max_uses = 50` register exactly 50 instances.
pub async fn racing_enrollments_max_uses_50(store: DynStore) {
    racing_enrollments(store, 50).await;
}

/// Expired, revoked, unknown, wrong-secret and exhausted tokens change nothing but the ledger.
pub async fn refused_tokens_change_only_the_ledger(store: DynStore) {
    let (fleet, clock) = open_fleet(&store).await;
    let scope = TenantScope::All;
    let expiring = fleet
        .create_token(
            &scope,
            NewToken {
                expires_in: Some(Duration::from_secs(60)),
                ..NewToken::default()
            },
        )
        .await
        .expect("token");
    let revoked = fleet
        .create_token(&scope, NewToken::default())
        .await
        .expect("token");
    fleet
        .revoke_token(&scope, &revoked.token.id)
        .await
        .expect("revoke");
    let used = fleet
        .create_token(&scope, NewToken::default())
        .await
        .expect("token");
    fleet
        .enroll(request(
            &used.presented.to_string(),
            &key_and_csr().1,
            "first",
        ))
        .await
        .expect("first use");
    clock.advance(Duration::from_secs(60)); // `expiring` expires exactly now

    let snapshot = || async {
        (
            store.count_instances().await.expect("count"),
            store.latest_seq().await.expect("seq"),
            fleet
                .list_tokens(&TenantScope::All)
                .await
                .expect("tokens")
                .iter()
                .map(|t| (t.id.clone(), t.uses, t.revoked_at))
                .collect::<Vec<_>>(),
            fleet.summary(&Filter::all(), &TenantScope::All),
        )
    };
    let ledger_len = |t: crate::TokenId| {
        let store = Arc::clone(&store);
        async move { store.ledger(&t, 10_000).await.expect("ledger").len() }
    };
    let before = snapshot().await;
    let wrong_secret = format!("{}.{}", used.token.id, "0".repeat(32));
    let unknown = format!("{}.{}", "zzzzzzzz", "0".repeat(32));
    type Case = (String, Option<crate::TokenId>, fn(&EnrollError) -> bool);
    let cases: Vec<Case> = vec![
        (
            expiring.presented.to_string(),
            Some(expiring.token.id.clone()),
            |e| matches!(e, EnrollError::TokenExpired),
        ),
        (
            revoked.presented.to_string(),
            Some(revoked.token.id.clone()),
            |e| matches!(e, EnrollError::TokenRevoked),
        ),
        (
            used.presented.to_string(),
            Some(used.token.id.clone()),
            |e| matches!(e, EnrollError::TokenExhausted),
        ),
        (wrong_secret, Some(used.token.id.clone()), |e| {
            matches!(e, EnrollError::InvalidToken)
        }),
        (unknown, None, |e| matches!(e, EnrollError::InvalidToken)),
        ("not a token".into(), None, |e| {
            matches!(e, EnrollError::InvalidToken)
        }),
    ];
    for (tok, id, expected) in cases {
        let ledger_before = match &id {
            Some(id) => ledger_len(id.clone()).await,
            None => 0,
        };
        let err = fleet
            .enroll(request(&tok, &key_and_csr().1, "intruder"))
            .await
            .expect_err("must be refused");
        assert!(expected(&err), "wrong error for {tok:?}: {err:?}");
        fleet.flush_ledger().await;
        assert_eq!(
            snapshot().await,
            before,
            "a refused enrollment ({err}) must change nothing"
        );
        if let Some(id) = id {
            assert_eq!(
                ledger_len(id).await,
                ledger_before + 1,
                "the attempt ({err}) is recorded in the ledger"
            );
        }
    }
    let ledger = store.ledger(&used.token.id, 10).await.expect("ledger");
    assert_eq!(ledger[0].outcome, LedgerOutcome::WrongSecret);
    assert_eq!(ledger[1].outcome, LedgerOutcome::Exhausted);
    assert!(
        ledger[1].key_fingerprint.is_some() && ledger[1].peer.is_some(),
        "fingerprint and peer are recorded"
    );
}

/// The same token and key retrying within the window get the same instance and a valid
/// certificate, without consuming a use; after the window they do not.
pub async fn retry_within_window_returns_the_same_instance(store: DynStore) {
    let (fleet, clock) = open_fleet(&store).await;
    let token = fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .expect("token");
    let t = token.presented.to_string();
    let (key, csr) = key_and_csr();
    let first = fleet
        .enroll(request(&t, &csr, "web-01"))
        .await
        .expect("first");
    clock.advance(Duration::from_secs(30));
    let before = store
        .get_instance(first.instance)
        .await
        .expect("get")
        .expect("instance");
    let again = fleet
        .enroll(request(&t, &csr_for(&key), "web-01"))
        .await
        .expect("retry");
    assert_eq!(
        again.instance, first.instance,
        "a retry returns the same instance"
    );
    assert_eq!(again.outcome, LedgerOutcome::Retried);
    assert_eq!(
        again.certificate.record, first.certificate.record,
        "the same certificate (serial, end of validity), signed again"
    );
    assert_eq!(store.count_instances().await.expect("count"), 1);
    assert_eq!(
        store
            .get_token(&token.token.id)
            .await
            .expect("get")
            .expect("token")
            .uses,
        1,
        "no use consumed"
    );
    // A replayed request (anyone who saw it can send it) changes nothing: both certificates
    // work, nothing is revoked, the instance record is as it was.
    for _ in 0..10 {
        fleet
            .enroll(request(&t, &csr_for(&key), "web-01"))
            .await
            .expect("replay");
    }
    fleet
        .authenticate(&identity(&again))
        .await
        .expect("the retried certificate is valid");
    fleet
        .authenticate(&identity(&first))
        .await
        .expect("the first certificate, possibly in use, stays valid");
    assert!(
        store
            .revoked_certificates()
            .await
            .expect("revoked")
            .is_empty(),
        "nothing retired"
    );
    assert_eq!(
        store
            .get_instance(first.instance)
            .await
            .expect("get")
            .expect("instance"),
        before
    );
    // Another key is not a retry.
    assert!(matches!(
        fleet.enroll(request(&t, &key_and_csr().1, "web-02")).await,
        Err(EnrollError::TokenExhausted)
    ));
    // After the window the same key is not a retry either.
    clock.advance(Duration::from_secs(600));
    assert!(matches!(
        fleet.enroll(request(&t, &csr_for(&key), "web-01")).await,
        Err(EnrollError::TokenExhausted)
    ));
    assert_eq!(store.count_instances().await.expect("count"), 1);
}

/// No API that takes a tenant scope shows or changes another tenant's instances, tokens or
/// ledger entries.
pub async fn tenant_isolation(store: DynStore) {
    let (fleet, _) = open_fleet(&store).await;
    let acme = TenantScope::Tenant(TenantId::new("acme").expect("tenant"));
    let globex_id = TenantId::new("globex").expect("tenant");
    let globex = TenantScope::Tenant(globex_id.clone());
    let ta = fleet
        .create_token(&acme, NewToken::default())
        .await
        .expect("token");
    assert_eq!(
        ta.token.tenant.as_ref().map(TenantId::as_str),
        Some("acme"),
        "a scoped operator's token gets its tenant"
    );
    let tg = fleet
        .create_token(&globex, NewToken::default())
        .await
        .expect("token");
    let cross = NewToken {
        tenant: Some(globex_id),
        ..NewToken::default()
    };
    assert!(matches!(
        fleet.create_token(&acme, cross).await,
        Err(FleetError::Invalid(_))
    ));
    let a = fleet
        .enroll(request(
            &ta.presented.to_string(),
            &key_and_csr().1,
            "acme-1",
        ))
        .await
        .expect("enroll");
    let g = fleet
        .enroll(request(
            &tg.presented.to_string(),
            &key_and_csr().1,
            "globex-1",
        ))
        .await
        .expect("enroll");
    assert_eq!(a.tenant.as_ref().map(TenantId::as_str), Some("acme"));
    assert_eq!(
        identity(&g).tenant.as_ref().map(TenantId::as_str),
        Some("globex"),
        "the certificate names the tenant"
    );

    let ids: Vec<_> = fleet
        .list_tokens(&acme)
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, vec![ta.token.id.clone()]);
    assert!(matches!(
        fleet.get_token(&acme, &tg.token.id).await,
        Err(FleetError::TokenNotFound(_))
    ));
    assert!(matches!(
        fleet.token_ledger(&acme, &tg.token.id, 10).await,
        Err(FleetError::TokenNotFound(_))
    ));
    assert!(matches!(
        fleet.revoke_token(&acme, &tg.token.id).await,
        Err(FleetError::TokenNotFound(_))
    ));
    assert!(
        fleet
            .get_token(&TenantScope::All, &tg.token.id)
            .await
            .expect("get")
            .revoked_at
            .is_none(),
        "not revoked"
    );
    assert_eq!(
        fleet
            .token_ledger(&acme, &ta.token.id, 10)
            .await
            .expect("ledger")
            .len(),
        1
    );

    let listed: Vec<_> = fleet
        .list(&Filter::all(), &acme, None, 100)
        .items
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(listed, vec![a.instance]);
    assert_eq!(fleet.summary(&Filter::all(), &acme).total, 1);
    assert!(fleet.get(&acme, g.instance).is_none());
    assert!(matches!(
        fleet.detail(&acme, g.instance).await,
        Err(FleetError::InstanceNotFound(_))
    ));
    assert_eq!(fleet.summary(&Filter::all(), &TenantScope::All).total, 2);
}

/// A certificate issued for instance A never acts as instance B: its identity names A, and
/// claiming B with A's serial is refused.
pub async fn certificate_of_one_instance_cannot_act_as_another(store: DynStore) {
    let (fleet, _) = open_fleet(&store).await;
    let token = fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Limited(2),
                ..NewToken::default()
            },
        )
        .await
        .expect("token");
    let a = fleet
        .enroll(request(&token.presented.to_string(), &key_and_csr().1, "a"))
        .await
        .expect("a");
    let b = fleet
        .enroll(request(&token.presented.to_string(), &key_and_csr().1, "b"))
        .await
        .expect("b");
    let id_a = identity(&a);
    assert_eq!(id_a.instance, a.instance, "A's certificate names A");
    let forged = InstanceIdentity {
        instance: b.instance,
        ..id_a.clone()
    };
    assert!(matches!(
        fleet.authenticate(&forged).await,
        Err(AuthError::CertificateRevoked)
    ));
    let before = fleet.get(&TenantScope::All, b.instance).expect("b");
    assert!(
        fleet
            .heartbeat_as(&forged, Heartbeat::default())
            .await
            .is_err()
    );
    assert_eq!(
        fleet.get(&TenantScope::All, b.instance).expect("b"),
        before,
        "B unchanged"
    );
    fleet
        .heartbeat_as(&id_a, Heartbeat::default())
        .await
        .expect("A acts as A");
}

/// Renewal stages a certificate; its first use promotes it and supersedes the old one;
/// deregistration revokes, and the CRL lists the revoked serials.
pub async fn renewal_and_revocation(store: DynStore) {
    let (fleet, clock) = open_fleet(&store).await;
    let token = fleet
        .create_token(&TenantScope::All, NewToken::default())
        .await
        .expect("token");
    let e = fleet
        .enroll(request(&token.presented.to_string(), &key_and_csr().1, "a"))
        .await
        .expect("enroll");
    let old = identity(&e);
    clock.advance(Duration::from_secs(3600));
    let renewed = fleet.renew(&old, &key_and_csr().1).await.expect("renew");
    let new = InstanceIdentity::from_certificate_der(&renewed.der).expect("identity");
    assert_eq!(new.instance, old.instance);
    fleet
        .authenticate(&old)
        .await
        .expect("the old certificate stays valid until the new one is used");
    fleet
        .authenticate(&new)
        .await
        .expect("the new certificate works");
    assert!(
        matches!(
            fleet.authenticate(&old).await,
            Err(AuthError::CertificateRevoked)
        ),
        "first use supersedes the old one"
    );
    let stored = store
        .get_instance(old.instance)
        .await
        .expect("get")
        .expect("instance");
    assert_eq!(
        stored.certificate.map(|c| c.serial),
        Some(new.serial),
        "durably promoted"
    );

    fleet
        .deregister(&TenantScope::All, old.instance)
        .await
        .expect("deregister");
    assert!(matches!(
        fleet.authenticate(&new).await,
        Err(AuthError::UnknownInstance)
    ));
    let revoked: HashSet<_> = store
        .revoked_certificates()
        .await
        .expect("revoked")
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert!(revoked.contains(&old.serial) && revoked.contains(&new.serial));
    let crl = fleet.crl(Duration::from_secs(3600)).await.expect("crl");
    assert!(crl.contains("BEGIN X509 CRL"));
    // Pruning forgets nothing before the certificates expire, everything after.
    assert_eq!(fleet.prune_revoked().await.expect("prune"), 0);
    clock.advance(Duration::from_secs(31 * 24 * 3600));
    assert_eq!(fleet.prune_revoked().await.expect("prune"), 2);
}

/// An instance whose certificate expired re-enrolls with a re-enrollment token and the same key,
/// keeping its identity and tags; without permission, or with another key, it cannot.
pub async fn reenrollment_after_expiry(store: DynStore) {
    let (fleet, clock) = open_fleet(&store).await;
    let scope = TenantScope::All;
    let first = fleet
        .create_token(&scope, NewToken::default())
        .await
        .expect("token");
    let (key, csr) = key_and_csr();
    let e = fleet
        .enroll(request(&first.presented.to_string(), &csr, "db-1"))
        .await
        .expect("enroll");
    fleet
        .set_tags(
            &scope,
            e.instance,
            Tags::from_pairs([("tier", "critical")]).expect("tags"),
        )
        .await
        .expect("tags");
    clock.advance(Duration::from_secs(40 * 24 * 3600)); // the certificate expired while offline

    let plain = fleet
        .create_token(&scope, NewToken::default())
        .await
        .expect("token");
    let mut req = request(&plain.presented.to_string(), &csr_for(&key), "db-1");
    req.previous_certificate_pem = Some(e.certificate.pem.clone());
    assert!(
        matches!(
            fleet.enroll(req).await,
            Err(EnrollError::ReenrollRefused(_))
        ),
        "the token must allow it"
    );

    let reenroll = fleet
        .create_token(
            &scope,
            NewToken {
                allow_reenroll: true,
                ..NewToken::default()
            },
        )
        .await
        .expect("token");
    let mut other_key = request(&reenroll.presented.to_string(), &key_and_csr().1, "db-1");
    other_key.previous_certificate_pem = Some(e.certificate.pem.clone());
    assert!(
        matches!(
            fleet.enroll(other_key).await,
            Err(EnrollError::ReenrollRefused(_))
        ),
        "the key must match"
    );
    assert_eq!(
        store
            .get_token(&reenroll.token.id)
            .await
            .expect("get")
            .expect("token")
            .uses,
        0,
        "refusals consume nothing"
    );

    let mut req = request(&reenroll.presented.to_string(), &csr_for(&key), "db-1");
    req.previous_certificate_pem = Some(e.certificate.pem.clone());
    let again = fleet.enroll(req).await.expect("re-enroll");
    assert_eq!(again.instance, e.instance, "identity kept");
    assert_eq!(again.outcome, LedgerOutcome::Reenrolled);
    let view = fleet.get(&scope, e.instance).expect("instance");
    assert_eq!(
        view.tags,
        Tags::from_pairs([("tier", "critical")]).expect("tags"),
        "tags kept"
    );
    assert_eq!(store.count_instances().await.expect("count"), 1);
    fleet
        .authenticate(&identity(&again))
        .await
        .expect("the new certificate works");
    assert!(
        fleet.authenticate(&identity(&e)).await.is_err(),
        "the expired one is superseded"
    );
}

/// Status changes are recorded once, read newest first, and filtered by instance, time window
/// and limit.
pub async fn status_changes_round_trip(store: DynStore) {
    use crate::live::StatusChange;
    use crate::staleness::Transition;
    use crate::store::StatusChangeQuery;
    let a = InstanceId::random();
    let b = InstanceId::random();
    let at = |s: u64| T0.saturating_add(Duration::from_secs(s));
    let change = |instance, from, to, t| StatusChange {
        instance,
        transition: Transition {
            from,
            to,
            at: at(t),
        },
    };
    let changes = vec![
        change(a, Status::Online, Status::Warning, 60),
        change(b, Status::Online, Status::Warning, 70),
        change(a, Status::Warning, Status::Offline, 300),
        change(a, Status::Offline, Status::Online, 900),
    ];
    ok("record", store.record_status_changes(&changes[..2])).await;
    ok("record", store.record_status_changes(&changes)).await;
    let all = ok(
        "query",
        store.status_changes(&StatusChangeQuery {
            limit: 100,
            ..StatusChangeQuery::default()
        }),
    )
    .await;
    let mut newest_first = changes.clone();
    newest_first.reverse();
    assert_eq!(all, newest_first, "each change once, newest first");
    let of_a = ok(
        "query",
        store.status_changes(&StatusChangeQuery {
            instance: Some(a),
            limit: 100,
            ..StatusChangeQuery::default()
        }),
    )
    .await;
    assert_eq!(of_a.len(), 3);
    assert!(of_a.iter().all(|c| c.instance == a));
    let window = StatusChangeQuery {
        since: Some(at(65)),
        until: Some(at(900)),
        limit: 100,
        ..StatusChangeQuery::default()
    };
    let got = ok("query", store.status_changes(&window)).await;
    assert_eq!(
        got,
        vec![changes[2], changes[1]],
        "since inclusive, until exclusive"
    );
    let exact = StatusChangeQuery {
        since: Some(at(70)),
        until: Some(at(300)),
        limit: 100,
        ..StatusChangeQuery::default()
    };
    let got = ok("query", store.status_changes(&exact)).await;
    assert_eq!(
        got,
        vec![changes[1]],
        "bounds on changes: since in, until out"
    );
    let limited = ok(
        "query",
        store.status_changes(&StatusChangeQuery {
            limit: 2,
            ..StatusChangeQuery::default()
        }),
    )
    .await;
    assert_eq!(limited, newest_first[..2].to_vec());
    assert!(
        ok("query", store.status_changes(&StatusChangeQuery::default()))
            .await
            .is_empty(),
        "limit 0"
    );
}

/// A queued command for tests: kind `ping`, payload `{"n": n}`, created at `at`, living `ttl`.
pub fn command(instance: InstanceId, n: u32, at: Timestamp, ttl: Duration) -> Command {
    Command {
        id: CommandId::new(at).unwrap_or_else(|e| panic!("{e}")),
        batch: None,
        instance,
        tenant: None,
        kind: CommandKind::new("ping").unwrap_or_else(|e| panic!("{e}")),
        payload: Payload::from_value(&serde_json::json!({ "n": n }))
            .unwrap_or_else(|e| panic!("{e}")),
        idempotency_key: None,
        state: CommandState::Queued,
        created_at: at,
        expires_at: at.saturating_add(ttl),
        delivered_at: None,
        lease_until: None,
        deliveries: 0,
        finished_at: None,
        result: None,
    }
}

const LEASE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

fn at(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

/// A command's life through the store: enqueue, get, list (newest first, paged, by instance,
/// batch and state), delivery with a lease and redelivery after it, results (recorded once; a
/// second result changes nothing; another instance's result is `NotFound`), cancel (only while
/// queued), expiry, and pruning of finished commands.
pub async fn command_lifecycle(store: DynStore) {
    let a = InstanceId::random();
    let b = InstanceId::random();
    let batch = BatchId::new(T0).unwrap_or_else(|e| panic!("{e}"));
    let mut cmds = Vec::new();
    for n in 0..5u32 {
        let mut c = command(a, n, at(u64::from(n)), DAY);
        if n >= 3 {
            c.batch = Some(batch);
        }
        cmds.push(c);
    }
    let other = command(b, 9, at(10), DAY);
    let feed_before = ok("seq", store.latest_seq()).await;
    let stored = ok("enqueue", store.enqueue_commands(&cmds)).await;
    let queued = ok("feed", store.changes_since(feed_before, 100)).await;
    assert_eq!(queued.len(), 5, "one change per created command");
    assert!(
        queued
            .iter()
            .all(|c| c.instance == a && c.kind == ChangeKind::CommandQueued)
    );
    assert!(stored.iter().all(|e| matches!(e, Enqueued::Created(_))));
    ok(
        "enqueue",
        store.enqueue_commands(std::slice::from_ref(&other)),
    )
    .await;
    assert!(
        store.enqueue_commands(&cmds[..1]).await.is_err(),
        "a taken command id is refused"
    );
    assert_eq!(
        ok("get", store.get_command(cmds[0].id)).await.as_ref(),
        Some(&cmds[0])
    );
    assert_eq!(
        ok("get", store.get_command(CommandId::from_u128(7))).await,
        None
    );

    let list = |q: CommandQuery| {
        let store = Arc::clone(&store);
        async move { ok("list", store.list_commands(&q)).await }
    };
    let all = list(CommandQuery {
        limit: 100,
        ..CommandQuery::default()
    })
    .await;
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let page1 = list(CommandQuery {
        instance: Some(a),
        limit: 2,
        ..CommandQuery::default()
    })
    .await;
    let page2 = list(CommandQuery {
        instance: Some(a),
        before: page1.last().map(|c| c.id),
        limit: 10,
        ..CommandQuery::default()
    })
    .await;
    let ids: Vec<CommandId> = page1.iter().chain(&page2).map(|c| c.id).collect();
    let mut expected: Vec<CommandId> = cmds.iter().map(|c| c.id).collect();
    expected.reverse();
    assert_eq!(
        ids, expected,
        "pages by instance cover its commands newest first"
    );
    let of_batch = list(CommandQuery {
        batch: Some(batch),
        limit: 10,
        ..CommandQuery::default()
    })
    .await;
    assert_eq!(
        of_batch.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![cmds[4].id, cmds[3].id]
    );
    assert_eq!(list(CommandQuery::default()).await.len(), 0, "limit 0");

    // Delivery: oldest first, at most `limit`, each with a lease.
    let d = ok("deliver", store.deliver_commands(a, at(100), LEASE, 2)).await;
    assert_eq!(
        d.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![cmds[0].id, cmds[1].id]
    );
    assert_eq!(d.open, 5);
    for c in &d.commands {
        assert_eq!(c.state, CommandState::Delivered);
        assert_eq!(c.delivered_at, Some(at(100)));
        assert_eq!(c.lease_until, Some(at(160)));
        assert_eq!(c.deliveries, 1);
    }
    let d = ok("deliver", store.deliver_commands(a, at(101), LEASE, 10)).await;
    assert_eq!(
        d.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![cmds[2].id, cmds[3].id, cmds[4].id],
        "leased commands are not handed out again"
    );
    assert!(
        ok("deliver", store.deliver_commands(a, at(150), LEASE, 10))
            .await
            .commands
            .is_empty()
    );

    // Cancel: only while queued.
    match store.cancel_command(cmds[0].id, at(150)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("cancelling a delivered command must be a Conflict, got {other:?}"),
    }
    assert_eq!(
        ok("get", store.get_command(cmds[0].id))
            .await
            .map(|c| c.state),
        Some(CommandState::Delivered)
    );
    assert!(matches!(
        store.cancel_command(CommandId::from_u128(7), at(150)).await,
        Err(StoreError::NotFound { .. })
    ));
    let cancelled = ok("cancel", store.cancel_command(other.id, at(150))).await;
    assert_eq!(cancelled.state, CommandState::Cancelled);
    assert_eq!(cancelled.finished_at, Some(at(150)));
    assert!(
        ok("deliver", store.deliver_commands(b, at(151), LEASE, 10))
            .await
            .commands
            .is_empty()
    );

    // Results.
    let result = CommandResult::new(Some(0), "pong");
    assert!(
        matches!(
            store
                .complete_command(b, cmds[0].id, CommandOutcome::Succeeded, &result, at(155))
                .await,
            Err(StoreError::NotFound { .. })
        ),
        "another instance's result"
    );
    let done = ok(
        "complete",
        store.complete_command(a, cmds[0].id, CommandOutcome::Succeeded, &result, at(155)),
    )
    .await;
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.result.as_ref(), Some(&result));
    assert_eq!(done.finished_at, Some(at(155)));
    assert_eq!(done.lease_until, None);
    let again = ok(
        "complete",
        store.complete_command(
            a,
            cmds[0].id,
            CommandOutcome::Failed,
            &CommandResult::new(Some(1), "late"),
            at(156),
        ),
    )
    .await;
    assert_eq!(again, done, "a second result changes nothing");

    // After the lease: the unanswered ones are delivered again.
    let d = ok("deliver", store.deliver_commands(a, at(160), LEASE, 10)).await;
    assert_eq!(
        d.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![cmds[1].id]
    );
    assert_eq!(d.commands[0].deliveries, 2);
    assert_eq!(
        d.commands[0].delivered_at,
        Some(at(100)),
        "first delivery time kept"
    );
    assert_eq!(d.open, 4);
    let open = ok("open", store.instances_with_open_commands()).await;
    assert_eq!(open, vec![a]);

    // Expiry and pruning.
    let expired = ok(
        "expire",
        store.expire_commands(
            T0.saturating_add(DAY)
                .saturating_add(Duration::from_secs(10)),
        ),
    )
    .await;
    assert_eq!(expired, 4);
    assert!(
        ok("open", store.instances_with_open_commands())
            .await
            .is_empty()
    );
    let states = list(CommandQuery {
        state: Some(CommandState::Expired),
        limit: 10,
        ..CommandQuery::default()
    })
    .await;
    assert_eq!(states.len(), 4);
    let pruned = ok("prune", store.prune_commands(at(156))).await;
    assert_eq!(
        pruned, 2,
        "the succeeded and the cancelled command finished before the cut"
    );
    assert_eq!(ok("get", store.get_command(cmds[0].id)).await, None);
    assert_eq!(
        list(CommandQuery {
            limit: 100,
            ..CommandQuery::default()
        })
        .await
        .len(),
        4
    );
}

/// Concurrent enqueues with one idempotency key for one instance store exactly one command; all
/// callers get that command back. The same key for another instance is a different command.
pub async fn idempotency_key_deduplicates_concurrent_enqueues(store: DynStore) {
    let a = InstanceId::random();
    let b = InstanceId::random();
    let mut tasks = Vec::new();
    for n in 0..32u32 {
        let store = Arc::clone(&store);
        let instance = if n == 31 { b } else { a };
        tasks.push(tokio::spawn(async move {
            let mut c = command(instance, n, T0, DAY);
            c.idempotency_key = Some("deploy-42".into());
            ok("enqueue", store.enqueue_commands(&[c])).await.remove(0)
        }));
    }
    let mut created = 0;
    let mut ids_a = HashSet::new();
    for t in tasks {
        let e = t.await.unwrap_or_else(|e| panic!("task failed: {e}"));
        created += usize::from(matches!(e, Enqueued::Created(_)));
        if e.command().instance == a {
            ids_a.insert(e.command().id);
        }
    }
    assert_eq!(created, 2, "one command per instance and key");
    assert_eq!(ids_a.len(), 1, "every caller got the one stored command");
    let listed = ok(
        "list",
        store.list_commands(&CommandQuery {
            instance: Some(a),
            limit: 100,
            ..CommandQuery::default()
        }),
    )
    .await;
    assert_eq!(listed.len(), 1);
    let d = ok("deliver", store.deliver_commands(a, at(1), LEASE, 100)).await;
    assert_eq!(d.commands.len(), 1, "one delivery, not 31");
}

/// Concurrent deliveries of one instance's queue never hand the same command to two heartbeats
/// while its lease runs; after the lease, concurrent redeliveries again hand each out once.
pub async fn concurrent_deliveries_never_double_deliver(store: DynStore) {
    let a = InstanceId::random();
    let cmds: Vec<Command> = (0..40)
        .map(|n| command(a, n, at(u64::from(n)), DAY))
        .collect();
    ok("enqueue", store.enqueue_commands(&cmds)).await;
    for (round, now) in [(1, at(100)), (2, at(100).saturating_add(LEASE))] {
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                ok("deliver", store.deliver_commands(a, now, LEASE, 5))
                    .await
                    .commands
            }));
        }
        let mut seen = HashSet::new();
        for t in tasks {
            for c in t.await.unwrap_or_else(|e| panic!("task failed: {e}")) {
                assert_eq!(c.deliveries, round);
                assert!(
                    seen.insert(c.id),
                    "round {round}: command {} handed out twice",
                    c.id
                );
            }
        }
        assert_eq!(
            seen.len(),
            40,
            "round {round}: 12 deliveries of 5 cover all 40 commands"
        );
    }
}

/// No command is delivered at or after its `expires_at` — neither a queued one nor a delivered
/// one whose lease ran out. A delivered command expires only once its lease has run out too (the
/// agent that got it just before the deadline has its lease to report), and a result that
/// arrives for it after it expired is still recorded; a queued command that expired never takes
/// a result. `expire_commands` applies the same rule without a delivery.
pub async fn expired_commands_are_never_delivered(store: DynStore) {
    let a = InstanceId::random();
    let short = command(a, 0, at(0), Duration::from_secs(30));
    let leased = command(a, 1, at(1), Duration::from_secs(89));
    let long = command(a, 2, at(2), DAY);
    let never = command(a, 3, at(3), Duration::from_secs(20));
    ok(
        "enqueue",
        store.enqueue_commands(&[short.clone(), leased.clone(), long.clone(), never.clone()]),
    )
    .await;
    let ids = |d: &Delivery| d.commands.iter().map(|c| c.id).collect::<Vec<_>>();
    let state = |id| {
        let store = Arc::clone(&store);
        async move { ok("get", store.get_command(id)).await.map(|c| c.state) }
    };
    let d = ok("deliver", store.deliver_commands(a, at(19), LEASE, 1)).await;
    assert_eq!(ids(&d), vec![short.id]);
    // At 30 s `never` (queued, TTL 23 s) has expired and `short` is past its TTL but inside its
    // lease (until 79 s): it stays delivered and is not handed out again; `leased` is delivered.
    let d = ok("deliver", store.deliver_commands(a, at(30), LEASE, 1)).await;
    assert_eq!(ids(&d), vec![leased.id]);
    assert_eq!(d.open, 3, "short, leased, long");
    assert_eq!(state(never.id).await, Some(CommandState::Expired));
    assert_eq!(state(short.id).await, Some(CommandState::Delivered));
    // At 90 s both leases ran out and both TTLs passed: expired, never redelivered.
    let d = ok("deliver", store.deliver_commands(a, at(90), LEASE, 10)).await;
    assert_eq!(ids(&d), vec![long.id]);
    assert_eq!(state(short.id).await, Some(CommandState::Expired));
    assert_eq!(state(leased.id).await, Some(CommandState::Expired));
    let late = ok(
        "complete",
        store.complete_command(
            a,
            leased.id,
            CommandOutcome::Succeeded,
            &CommandResult::new(Some(0), "ran"),
            at(91),
        ),
    )
    .await;
    assert_eq!(
        late.state,
        CommandState::Succeeded,
        "it was delivered and ran: the late result is recorded"
    );
    let refused = ok(
        "complete",
        store.complete_command(
            a,
            never.id,
            CommandOutcome::Succeeded,
            &CommandResult::default(),
            at(91),
        ),
    )
    .await;
    assert_eq!(
        refused.state,
        CommandState::Expired,
        "never delivered: no result"
    );
    assert_eq!(refused.result, None);
    // expire_commands does the same without a delivery.
    let queued = command(a, 4, at(100), Duration::from_secs(10));
    ok(
        "enqueue",
        store.enqueue_commands(std::slice::from_ref(&queued)),
    )
    .await;
    assert_eq!(ok("expire", store.expire_commands(at(109))).await, 0);
    assert_eq!(ok("expire", store.expire_commands(at(110))).await, 1);
    let d = ok("deliver", store.deliver_commands(a, at(110), LEASE, 10)).await;
    assert!(d.commands.iter().all(|c| c.id != queued.id));
    // A delivered command past its TTL waits for its lease before expire_commands takes it.
    let soon = command(a, 5, at(201), Duration::from_secs(5));
    ok(
        "enqueue",
        store.enqueue_commands(std::slice::from_ref(&soon)),
    )
    .await;
    let d = ok("deliver", store.deliver_commands(a, at(202), LEASE, 10)).await;
    assert!(ids(&d).contains(&soon.id));
    assert_eq!(
        ok("expire", store.expire_commands(at(250))).await,
        0,
        "lease until 262 s"
    );
    assert_eq!(ok("expire", store.expire_commands(at(262))).await, 1);
}

/// A cancel racing a delivery ends in exactly one of the two: the command is either cancelled
/// (and was never handed out) or delivered (and the cancel was refused with `Conflict`).
pub async fn cancel_races_delivery(store: DynStore) {
    let a = InstanceId::random();
    let cmds: Vec<Command> = (0..40)
        .map(|n| command(a, n, at(u64::from(n)), DAY))
        .collect();
    ok("enqueue", store.enqueue_commands(&cmds)).await;
    let mut cancels = Vec::new();
    for c in &cmds {
        let store = Arc::clone(&store);
        let id = c.id;
        cancels.push(tokio::spawn(async move {
            (id, store.cancel_command(id, at(100)).await)
        }));
    }
    let mut deliveries = Vec::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        deliveries.push(tokio::spawn(async move {
            ok("deliver", store.deliver_commands(a, at(100), LEASE, 5))
                .await
                .commands
        }));
    }
    let mut delivered = HashSet::new();
    for d in deliveries {
        for c in d.await.unwrap_or_else(|e| panic!("task failed: {e}")) {
            assert!(delivered.insert(c.id));
        }
    }
    for t in cancels {
        let (id, r) = t.await.unwrap_or_else(|e| panic!("task failed: {e}"));
        let stored = ok("get", store.get_command(id))
            .await
            .unwrap_or_else(|| panic!("{id} lost"));
        match r {
            Ok(c) => {
                assert_eq!(c.state, CommandState::Cancelled);
                assert_eq!(stored.state, CommandState::Cancelled);
                assert!(
                    !delivered.contains(&id),
                    "{id} both cancelled and delivered"
                );
            }
            Err(StoreError::Conflict(_)) => {
                assert!(
                    delivered.contains(&id),
                    "{id}: cancel refused but not delivered"
                );
                assert_eq!(stored.state, CommandState::Delivered);
            }
            Err(e) => panic!("cancel failed: {e}"),
        }
    }
}

/// Fleet alerts (recorded once, newest first, windowed), trend buckets (replaced by start,
/// oldest first, windowed) and retention (everything before the cut goes, nothing after it).
pub async fn fleet_alerts_trends_and_retention(store: DynStore) {
    use crate::alert::{FleetAlert, FleetAlertKind, FleetAlertQuery};
    use crate::live::StatusChange;
    use crate::staleness::Transition;
    use crate::store::StatusChangeQuery;
    use crate::trend::TrendBucket;
    let alert = |secs: u64| FleetAlert {
        at: at(secs),
        kind: FleetAlertKind::MassStaleness,
        status: Status::Offline,
        affected: 600,
        fleet_size: 1000,
        message: "600 of 1000 instances went offline".into(),
    };
    for a in [alert(100), alert(200), alert(100), alert(300)] {
        ok("record alert", store.record_fleet_alert(&a)).await;
    }
    let all = ok(
        "alerts",
        store.fleet_alerts(&FleetAlertQuery {
            limit: 10,
            ..FleetAlertQuery::default()
        }),
    )
    .await;
    assert_eq!(
        all,
        vec![alert(300), alert(200), alert(100)],
        "once each, newest first"
    );
    let window = FleetAlertQuery {
        since: Some(at(150)),
        until: Some(at(300)),
        limit: 10,
    };
    assert_eq!(
        ok("alerts", store.fleet_alerts(&window)).await,
        vec![alert(200)]
    );

    let hour = Duration::from_secs(3600);
    let mut b0 = TrendBucket::containing(T0, hour);
    b0.samples = 1;
    b0.online = 5.0;
    let mut b1 = TrendBucket::containing(T0.saturating_add(hour), hour);
    b1.samples = 2;
    ok(
        "trends",
        store.record_trend_buckets(&[b1.clone(), b0.clone()]),
    )
    .await;
    b0.samples = 3;
    ok(
        "trends",
        store.record_trend_buckets(std::slice::from_ref(&b0)),
    )
    .await;
    let got = ok(
        "trends",
        store.trend_buckets(b0.start, b1.start.saturating_add(hour)),
    )
    .await;
    assert_eq!(
        got,
        vec![b0.clone(), b1.clone()],
        "replaced by start, oldest first"
    );
    assert_eq!(
        ok("trends", store.trend_buckets(b1.start, b1.start)).await,
        vec![]
    );
    assert_eq!(
        ok("trends", store.trend_buckets(b0.start, b1.start)).await,
        vec![b0.clone()]
    );

    let i = InstanceId::random();
    let change = |secs| StatusChange {
        instance: i,
        transition: Transition {
            from: Status::Online,
            to: Status::Warning,
            at: at(secs),
        },
    };
    ok(
        "record",
        store.record_status_changes(&[change(100), change(5000)]),
    )
    .await;
    let pruned = ok("prune", store.prune_history(b1.start)).await;
    assert_eq!(
        pruned, 5,
        "the change at 100 s, three alerts and the first bucket"
    );
    let changes = ok(
        "changes",
        store.status_changes(&StatusChangeQuery {
            instance: Some(i),
            limit: 10,
            ..StatusChangeQuery::default()
        }),
    )
    .await;
    assert_eq!(changes, vec![change(5000)]);
    assert!(
        ok(
            "alerts",
            store.fleet_alerts(&FleetAlertQuery {
                limit: 10,
                ..FleetAlertQuery::default()
            })
        )
        .await
        .is_empty()
    );
    assert_eq!(
        ok("trends", store.trend_buckets(T0, at(100_000))).await,
        vec![b1]
    );
}

/// Policies: stored once by name (a taken name is `AlreadyExists` and changes nothing), listed
/// by name, deleted (`NotFound` when unknown); and, through a `Fleet`, evaluated per instance and
/// as fleet-level compliance.
pub async fn policies_round_trip_and_compliance(store: DynStore) {
    use crate::policy::{NewPolicy, PolicyName, Rule};
    let (fleet, _) = open_fleet(&store).await;
    let mut ids = Vec::new();
    for n in 0..4u32 {
        let mut inst = instance(n);
        inst.system.agent_version = Some(format!("1.{n}.0"));
        ok("insert", store.insert_instance(&inst)).await;
        ids.push(inst.id);
    }
    fleet.sync().await.expect("sync");
    let new = |name: &str, filter: &str, rule: Rule| NewPolicy {
        name: PolicyName::new(name).expect("name"),
        description: String::new(),
        filter: Filter::parse(filter).expect("filter"),
        rule,
    };
    let agent = fleet
        .create_policy(new(
            "agent-1-2",
            "",
            Rule::AgentVersionAtLeast("1.2.0".into()),
        ))
        .await
        .expect("create");
    fleet
        .create_policy(new(
            "prod-tagged",
            "env=prod",
            Rule::TagPresent(crate::TagKey::new("n").expect("key")),
        ))
        .await
        .expect("create");
    match fleet
        .create_policy(new(
            "agent-1-2",
            "",
            Rule::TagPresent(crate::TagKey::new("x").expect("key")),
        ))
        .await
    {
        Err(FleetError::Store(StoreError::AlreadyExists { .. })) => {}
        other => panic!("a taken name must be AlreadyExists, got {other:?}"),
    }
    let listed = fleet.policies().await.expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0], agent, "listed by name, stored as created");

    let results = fleet
        .policy_results(&TenantScope::All, ids[1])
        .await
        .expect("results");
    assert_eq!(
        results.len(),
        1,
        "instance 1 is dev: only the fleet-wide policy applies"
    );
    assert!(!results[0].pass);
    assert!(results[0].reason.contains("1.1.0"), "{}", results[0].reason);
    let compliance = fleet
        .compliance(&TenantScope::All)
        .await
        .expect("compliance");
    let by_name: BTreeMap<String, (u64, u64)> = compliance
        .iter()
        .map(|c| (c.policy.to_string(), (c.applicable, c.passing)))
        .collect();
    assert_eq!(by_name["agent-1-2"], (4, 2));
    assert_eq!(by_name["prod-tagged"], (2, 2));
    assert!((compliance[0].percent - 50.0).abs() < 1e-9);

    fleet
        .delete_policy(&PolicyName::new("prod-tagged").expect("name"))
        .await
        .expect("delete");
    assert!(matches!(
        fleet
            .delete_policy(&PolicyName::new("prod-tagged").expect("name"))
            .await,
        Err(FleetError::Store(StoreError::NotFound { .. }))
    ));
    assert_eq!(fleet.policies().await.expect("list"), vec![agent]);
}

/// Emits one `#[tokio::test]` per conformance property for a store builder.
///
/// The argument is an expression evaluating to a future of `(guard, store)`: the guard (a temp
/// dir, a throwaway schema) lives as long as the test; the store must be empty.
#[macro_export]
macro_rules! store_conformance_tests {
    ($build:expr) => {
        $crate::store_conformance_tests!(@each $build;
            insert_get_round_trip,
            duplicate_insert_is_rejected,
            missing_instances,
            list_pages_cover_everything_in_id_order,
            tags_and_groups_are_stored,
            delete_removes,
            heartbeats_update_last_known_state,
            heartbeats_never_resurrect,
            change_feed_is_complete_and_ordered,
            concurrent_inserts_all_land,
            concurrent_edits_follow_feed_order,
            fleet_rebuilds_from_store,
            ca_is_stored_sealed,
            clear_ca_key_is_sealed_at_open,
            replace_ca_is_compare_and_swap,
            racing_enrollments_max_uses_1,
            racing_enrollments_max_uses_7,
            racing_enrollments_max_uses_50,
            refused_tokens_change_only_the_ledger,
            retry_within_window_returns_the_same_instance,
            tenant_isolation,
            certificate_of_one_instance_cannot_act_as_another,
            renewal_and_revocation,
            reenrollment_after_expiry,
            status_changes_round_trip,
            command_lifecycle,
            idempotency_key_deduplicates_concurrent_enqueues,
            concurrent_deliveries_never_double_deliver,
            expired_commands_are_never_delivered,
            cancel_races_delivery,
            fleet_alerts_trends_and_retention,
            policies_round_trip_and_compliance,
        );
    };
    (@each $build:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_guard, store) = $build.await;
                let store: $crate::testing::DynStore = ::std::sync::Arc::new(store);
                $crate::testing::$name(store).await;
            }
        )*
    };
}
