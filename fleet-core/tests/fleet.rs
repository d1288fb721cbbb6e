//! `Fleet` behaviour: validation that changes nothing, tenant scoping, write-behind, and replicas
//! following each other through the change feed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fleet_core::ca::{CaMaterial, RevokedCertificate};
use fleet_core::command::{
    Command, CommandId, CommandOutcome, CommandQuery, CommandResult, Delivery, Enqueued,
};
use fleet_core::identity::Fingerprint;
use fleet_core::store::{
    CertificateChange, CertificateStore, Change, ChangeFeed, CommandStore, EnrollCommit,
    EnrollResult, HeartbeatRecord, HeartbeatStore, HistoryStore, InstanceStore, PolicyStore, Seq,
    StatusChangeQuery, StoreResult, TokenStore,
};
use fleet_core::token::{LedgerEntry, RegistrationToken, TokenId};
use fleet_core::{
    App, Filter, Fleet, FleetError, Groups, Heartbeat, Instance, InstanceId, ManualClock,
    MemoryStore, MetricsSample, NewInstance, StalenessPolicy, Status, StoreError, SystemInfo, Tags,
    TenantId, TenantScope, Timestamp,
};

const T0: Timestamp = Timestamp::from_unix_secs(1_700_000_000);

fn new(host: &str, tenant: Option<&str>) -> NewInstance {
    NewInstance {
        tenant: tenant.map(|t| TenantId::new(t).unwrap()),
        system: SystemInfo::with_hostname(host),
        tags: Tags::from_pairs([("env", "prod")]).unwrap(),
        ..NewInstance::default()
    }
}

async fn fleet() -> (Fleet<Arc<MemoryStore>>, ManualClock) {
    let clock = ManualClock::new(T0);
    let fleet = Fleet::builder(Arc::new(MemoryStore::new()))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    (fleet, clock)
}

/// Every instance in the live view, by id (list order is each view's own slot order).
fn all(f: &Fleet<Arc<MemoryStore>>) -> Vec<fleet_core::InstanceView> {
    let mut items = f.list(&Filter::all(), &TenantScope::All, None, 1000).items;
    items.sort_by_key(|v| v.id);
    items
}

#[tokio::test]
async fn invalid_registration_changes_nothing() {
    let (fleet, _) = fleet().await;
    for host in ["", "has space", "bad\u{0}"] {
        let err = fleet.register(new(host, None)).await.unwrap_err();
        assert!(matches!(err, FleetError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("hostname"), "{err}");
    }
    assert_eq!(
        fleet.store().count_instances().await.unwrap(),
        0,
        "nothing stored"
    );
    assert_eq!(
        fleet.store().latest_seq().await.unwrap(),
        0,
        "no change recorded"
    );
    assert!(all(&fleet).is_empty(), "nothing in the live view");
}

#[tokio::test]
async fn duplicate_id_is_refused_and_keeps_the_original() {
    let (fleet, _) = fleet().await;
    let a = fleet.register(new("a", None)).await.unwrap();
    let mut dup = new("b", None);
    dup.id = Some(a.id);
    let err = fleet.register(dup).await.unwrap_err();
    assert!(
        matches!(err, FleetError::InstanceExists(id) if id == a.id),
        "{err}"
    );
    let items = all(&fleet);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].hostname, "a");
}

#[tokio::test]
async fn invalid_heartbeat_changes_nothing() {
    let (fleet, clock) = fleet().await;
    let a = fleet.register(new("a", None)).await.unwrap();
    let good = MetricsSample {
        cpu_percent: Some(10.0),
        ..MetricsSample::default()
    };
    fleet
        .heartbeat(
            a.id,
            Heartbeat {
                metrics: Some(good),
                apps: None,
            },
        )
        .unwrap();
    fleet.flush_heartbeats().await.unwrap();
    let before_view = fleet.get(&TenantScope::All, a.id).unwrap();
    let before_store = fleet.store().get_instance(a.id).await.unwrap();

    clock.advance(Duration::from_secs(30));
    let bad_metrics = Heartbeat {
        metrics: Some(MetricsSample {
            cpu_percent: Some(250.0),
            ..MetricsSample::default()
        }),
        apps: None,
    };
    let bad_apps = Heartbeat {
        metrics: None,
        apps: Some(vec![App {
            name: String::new(),
            version: None,
        }]),
    };
    let too_large = |field: &str| {
        let mut m = serde_json::to_value(MetricsSample::default()).unwrap();
        m[field] = serde_json::json!(u64::MAX);
        Heartbeat {
            metrics: Some(serde_json::from_value(m).unwrap()),
            apps: None,
        }
    };
    let mut bad = vec![(bad_metrics, "cpu_percent"), (bad_apps, "app name")];
    for field in [
        "memory_used_bytes",
        "memory_total_bytes",
        "disk_used_bytes",
        "disk_total_bytes",
        "network_rx_bytes",
        "network_tx_bytes",
        "uptime_secs",
    ] {
        bad.push((too_large(field), field));
    }
    for (hb, field) in bad {
        match fleet.heartbeat(a.id, hb) {
            Err(FleetError::Invalid(e)) => assert_eq!(e.what, field, "{e}"),
            other => panic!("{field}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        fleet.get(&TenantScope::All, a.id).unwrap(),
        before_view,
        "live view untouched"
    );
    assert_eq!(
        fleet.pending_heartbeats(),
        0,
        "nothing queued for the store"
    );
    assert_eq!(fleet.flush_heartbeats().await.unwrap(), 0);
    assert_eq!(
        fleet.store().get_instance(a.id).await.unwrap(),
        before_store,
        "store untouched"
    );

    let unknown = InstanceId::random();
    assert!(
        matches!(fleet.heartbeat(unknown, Heartbeat::default()), Err(FleetError::InstanceNotFound(id)) if id == unknown)
    );
    assert_eq!(fleet.pending_heartbeats(), 0);
}

/// Every accepted figure is shown exactly as reported: no f32 overflow to null, no integer
/// clamped to a sentinel.
#[tokio::test]
async fn metrics_round_trip_exactly_through_the_view() {
    let (fleet, _) = fleet().await;
    let a = fleet.register(new("a", None)).await.unwrap();
    let edge = fleet_core::metrics::MAX_METRIC_INTEGER;
    let sample = MetricsSample {
        cpu_percent: Some(37.123_456_789),
        memory_used_bytes: Some(edge),
        memory_total_bytes: Some(edge),
        disk_used_bytes: Some(0),
        disk_total_bytes: Some(edge),
        uptime_secs: Some(edge),
        load_1m: Some(1e300),
        ..MetricsSample::default()
    };
    fleet
        .heartbeat(
            a.id,
            Heartbeat {
                metrics: Some(sample.clone()),
                apps: None,
            },
        )
        .unwrap();
    let m = fleet.get(&TenantScope::All, a.id).unwrap().metrics.unwrap();
    assert_eq!(m.cpu_percent, sample.cpu_percent);
    assert_eq!(m.memory_used_bytes, Some(edge));
    assert_eq!(m.memory_total_bytes, Some(edge));
    assert_eq!(m.disk_total_bytes, Some(edge));
    assert_eq!(m.uptime_secs, Some(edge));
    assert_eq!(m.load_1m, Some(1e300));
    // And through JSON, as the APIs send it.
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["load_1m"], serde_json::json!(1e300));
    assert_eq!(json["memory_used_bytes"], serde_json::json!(edge));
}

#[tokio::test]
async fn heartbeat_reply_and_status_cycle() {
    let (fleet, clock) = fleet().await;
    let a = fleet.register(new("a", None)).await.unwrap();
    let ack = fleet.heartbeat(a.id, Heartbeat::default()).unwrap();
    assert_eq!(ack.status, Status::Online);
    assert_eq!(ack.next_heartbeat, Duration::from_secs(15));
    assert!(ack.transitions.is_empty());

    clock.advance(Duration::from_secs(60));
    let changes = fleet.sweep();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].transition.to, Status::Warning);
    assert_eq!(
        changes[0].transition.at,
        T0.saturating_add(Duration::from_secs(60))
    );
    clock.advance(Duration::from_secs(241));
    let changes = fleet.sweep();
    assert_eq!(changes[0].transition.to, Status::Offline);
    assert_eq!(fleet.summary(&Filter::all(), &TenantScope::All).offline, 1);

    // The offline instance keeps its last known state, and recovers on its next heartbeat.
    let view = fleet.get(&TenantScope::All, a.id).unwrap();
    assert_eq!((view.status, view.last_seen), (Status::Offline, T0));
    let ack = fleet.heartbeat(a.id, Heartbeat::default()).unwrap();
    assert_eq!(ack.status, Status::Online);
    assert_eq!(
        ack.transitions.iter().last().map(|t| (t.from, t.to)),
        Some((Status::Offline, Status::Online))
    );
}

#[tokio::test]
async fn tenant_scope_hides_and_protects_other_tenants() {
    let (fleet, _) = fleet().await;
    let acme = fleet.register(new("acme-1", Some("acme"))).await.unwrap();
    let globex = fleet
        .register(new("globex-1", Some("globex")))
        .await
        .unwrap();
    let scope = TenantScope::Tenant(TenantId::new("acme").unwrap());

    let listed: Vec<_> = fleet
        .list(&Filter::all(), &scope, None, 100)
        .items
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(listed, vec![acme.id]);
    assert_eq!(fleet.summary(&Filter::all(), &scope).total, 1);
    assert_eq!(
        fleet
            .summary(&Filter::parse("text:globex").unwrap(), &scope)
            .total,
        0
    );
    assert!(fleet.get(&scope, globex.id).is_none());
    assert!(matches!(
        fleet.detail(&scope, globex.id).await,
        Err(FleetError::InstanceNotFound(_))
    ));

    // Writes to another tenant's instance are refused as "not found" and change nothing.
    let seq = fleet.store().latest_seq().await.unwrap();
    let tags = Tags::from_pairs([("owned", "yes")]).unwrap();
    assert!(matches!(
        fleet.set_tags(&scope, globex.id, tags).await,
        Err(FleetError::InstanceNotFound(_))
    ));
    assert!(matches!(
        fleet
            .set_groups(&scope, globex.id, Groups::from_names(["x"]).unwrap())
            .await,
        Err(FleetError::InstanceNotFound(_))
    ));
    assert!(matches!(
        fleet.deregister(&scope, globex.id).await,
        Err(FleetError::InstanceNotFound(_))
    ));
    assert_eq!(
        fleet.store().latest_seq().await.unwrap(),
        seq,
        "nothing written"
    );
    assert_eq!(
        fleet.get(&TenantScope::All, globex.id).unwrap().tags,
        Tags::from_pairs([("env", "prod")]).unwrap()
    );

    // Within its own tenant the scoped operator can edit.
    fleet
        .set_tags(
            &scope,
            acme.id,
            Tags::from_pairs([("owned", "yes")]).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        fleet
            .summary(&Filter::parse("owned=yes").unwrap(), &TenantScope::All)
            .total,
        1
    );
}

/// Issue 16: a tenant operator's query — summary, every page of a list, a command's filter —
/// evaluates only that tenant's instances and never searches the text of the others, however
/// heavy its filter.
#[tokio::test]
async fn a_tenant_query_touches_only_that_tenants_instances() {
    use fleet_core::{CommandKind, CommandTarget, NewCommand};
    let (fleet, _) = fleet().await;
    for n in 0..400 {
        let tenant = match n % 40 {
            0 => Some("small"),
            1..20 => Some("big"),
            _ => None,
        };
        fleet
            .register(new(&format!("web-{n:03}.example.net"), tenant))
            .await
            .unwrap();
    }
    let scope = TenantScope::Tenant(TenantId::new("small").unwrap());
    // 4 text terms of 64 values: 256 values, 1,020 characters (the most the limits allow);
    // every term matches every instance (`.net`), so each instance is searched through.
    let heavy: String = (0..4)
        .map(|t| {
            let mut v: Vec<String> = (0..63).map(|i| format!("q{t}{i:02}")).collect();
            v.push(".net".into());
            format!("text:{}", v.join("|"))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let heavy = Filter::parse(&heavy).unwrap();

    let stats = || fleet.view().query_stats();
    let before = stats();
    assert_eq!(fleet.summary(&heavy, &scope).total, 10);
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = fleet.list(&heavy, &scope, cursor, 3);
        seen.extend(page.items.iter().map(|i| i.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 10);
    let report = fleet
        .enqueue(
            &scope,
            NewCommand {
                target: CommandTarget::Filter(heavy.clone()),
                ..NewCommand::for_instance(InstanceId::random(), CommandKind::new("ping").unwrap())
            },
        )
        .await
        .unwrap();
    assert_eq!(report.targeted, 10);
    let after = stats();
    // The summary (10), four pages of up to 3 (the 10, and for each of the three full pages
    // the next match, which says that more follow), the command's selection (10).
    assert_eq!(after.evaluated - before.evaluated, 10 + 13 + 10);
    assert_eq!(after.texts_scanned, before.texts_scanned, "no arena search");

    // Unscoped, the same filter has the whole fleet to look at.
    let before = stats();
    assert_eq!(fleet.summary(&heavy, &TenantScope::All).total, 400);
    let after = stats();
    assert!(
        (after.evaluated - before.evaluated) + (after.texts_scanned - before.texts_scanned) >= 400
    );
}

#[tokio::test]
async fn detail_combines_live_state_with_stored_facts() {
    let (fleet, _) = fleet().await;
    let mut n = new("db-1", None);
    n.system.os = Some("Cloud OS".into());
    let a = fleet.register(n).await.unwrap();
    let apps = vec![App {
        name: "postgres".into(),
        version: Some("15".into()),
    }];
    let m = MetricsSample {
        cpu_percent: Some(42.0),
        uptime_secs: Some(99),
        ..MetricsSample::default()
    };
    fleet
        .heartbeat(
            a.id,
            Heartbeat {
                metrics: Some(m),
                apps: Some(apps.clone()),
            },
        )
        .unwrap();
    // Before the flush the pending apps are shown; after it the stored ones.
    let d = fleet.detail(&TenantScope::All, a.id).await.unwrap();
    assert_eq!(d.apps, apps);
    assert_eq!(d.system.os.as_deref(), Some("Cloud OS"));
    assert_eq!(
        d.live.metrics.as_ref().and_then(|m| m.cpu_percent),
        Some(42.0)
    );
    fleet.flush_heartbeats().await.unwrap();
    assert_eq!(
        fleet.detail(&TenantScope::All, a.id).await.unwrap().apps,
        apps
    );
    assert_eq!(
        fleet
            .store()
            .get_instance(a.id)
            .await
            .unwrap()
            .unwrap()
            .apps,
        apps
    );
}

#[tokio::test]
async fn write_behind_keeps_one_record_per_instance_with_the_latest_state() {
    let (fleet, clock) = fleet().await;
    let a = fleet.register(new("a", None)).await.unwrap();
    let apps = vec![App {
        name: "nginx".into(),
        version: None,
    }];
    fleet
        .heartbeat(
            a.id,
            Heartbeat {
                metrics: None,
                apps: Some(apps.clone()),
            },
        )
        .unwrap();
    clock.advance(Duration::from_secs(5));
    let m = MetricsSample {
        cpu_percent: Some(5.0),
        ..MetricsSample::default()
    };
    fleet
        .heartbeat(
            a.id,
            Heartbeat {
                metrics: Some(m.clone()),
                apps: None,
            },
        )
        .unwrap();
    assert_eq!(fleet.pending_heartbeats(), 1, "latest per instance wins");
    assert_eq!(fleet.flush_heartbeats().await.unwrap(), 1);
    let stored = fleet.store().get_instance(a.id).await.unwrap().unwrap();
    assert_eq!(stored.last_seen, T0.saturating_add(Duration::from_secs(5)));
    assert_eq!(stored.metrics, Some(m));
    assert_eq!(
        stored.apps, apps,
        "apps from the earlier heartbeat survive the merge"
    );
}

/// A store whose heartbeat writes fail while `down` is set (fault injection over MemoryStore).
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    down: AtomicBool,
}

#[async_trait]
impl InstanceStore for Flaky {
    async fn insert_instance(&self, i: &Instance) -> StoreResult<Seq> {
        self.inner.insert_instance(i).await
    }
    async fn get_instance(&self, id: InstanceId) -> StoreResult<Option<Instance>> {
        self.inner.get_instance(id).await
    }
    async fn list_instances(
        &self,
        after: Option<InstanceId>,
        n: usize,
    ) -> StoreResult<Vec<Instance>> {
        self.inner.list_instances(after, n).await
    }
    async fn set_tags(&self, id: InstanceId, t: &Tags) -> StoreResult<Seq> {
        self.inner.set_tags(id, t).await
    }
    async fn set_groups(&self, id: InstanceId, g: &Groups) -> StoreResult<Seq> {
        self.inner.set_groups(id, g).await
    }
    async fn delete_instance(&self, id: InstanceId, now: Timestamp) -> StoreResult<Seq> {
        self.inner.delete_instance(id, now).await
    }
    async fn count_instances(&self) -> StoreResult<u64> {
        self.inner.count_instances().await
    }
}

#[async_trait]
impl HeartbeatStore for Flaky {
    async fn write_heartbeats(&self, b: &[HeartbeatRecord]) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                source: "database is down".into(),
            });
        }
        self.inner.write_heartbeats(b).await
    }
}

#[async_trait]
impl ChangeFeed for Flaky {
    async fn changes_since(&self, after: Seq, n: usize) -> StoreResult<Vec<Change>> {
        self.inner.changes_since(after, n).await
    }
    async fn latest_seq(&self) -> StoreResult<Seq> {
        self.inner.latest_seq().await
    }
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> StoreResult<Option<u64>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                source: "injected".into(),
            });
        }
        self.inner.acquire_lease(name, holder, now, ttl).await
    }
}

#[async_trait]
impl TokenStore for Flaky {
    async fn insert_token(&self, t: &RegistrationToken) -> StoreResult<()> {
        self.inner.insert_token(t).await
    }
    async fn get_token(&self, id: &TokenId) -> StoreResult<Option<RegistrationToken>> {
        self.inner.get_token(id).await
    }
    async fn list_tokens(&self) -> StoreResult<Vec<RegistrationToken>> {
        self.inner.list_tokens().await
    }
    async fn revoke_token(&self, id: &TokenId, now: Timestamp) -> StoreResult<RegistrationToken> {
        self.inner.revoke_token(id, now).await
    }
    async fn append_ledger(&self, e: &LedgerEntry) -> StoreResult<()> {
        self.inner.append_ledger(e).await
    }
    async fn ledger(&self, id: &TokenId, n: usize) -> StoreResult<Vec<LedgerEntry>> {
        self.inner.ledger(id, n).await
    }
    async fn find_enrollment(
        &self,
        id: &TokenId,
        k: &Fingerprint,
        since: Timestamp,
    ) -> StoreResult<Option<InstanceId>> {
        self.inner.find_enrollment(id, k, since).await
    }
    async fn enroll(&self, c: &EnrollCommit) -> StoreResult<EnrollResult> {
        self.inner.enroll(c).await
    }
}

#[async_trait]
impl CertificateStore for Flaky {
    async fn load_ca(&self) -> StoreResult<Option<CaMaterial>> {
        self.inner.load_ca().await
    }
    async fn init_ca(&self, m: &CaMaterial) -> StoreResult<CaMaterial> {
        self.inner.init_ca(m).await
    }
    async fn replace_ca(&self, e: &CaMaterial, n: &CaMaterial) -> StoreResult<CaMaterial> {
        self.inner.replace_ca(e, n).await
    }
    fn volatile_key_encryption_key(&self) -> Option<fleet_core::seal::KeyEncryptionKey> {
        self.inner.volatile_key_encryption_key()
    }
    async fn set_certificate(
        &self,
        id: InstanceId,
        c: CertificateChange,
        now: Timestamp,
    ) -> StoreResult<Seq> {
        self.inner.set_certificate(id, c, now).await
    }
    async fn revoked_certificates(&self) -> StoreResult<Vec<RevokedCertificate>> {
        self.inner.revoked_certificates().await
    }
    async fn prune_revoked(&self, before: Timestamp) -> StoreResult<usize> {
        self.inner.prune_revoked(before).await
    }
}

#[async_trait]
impl HistoryStore for Flaky {
    async fn record_status_changes(&self, c: &[fleet_core::StatusChange]) -> StoreResult<()> {
        self.inner.record_status_changes(c).await
    }
    async fn status_changes(
        &self,
        q: &StatusChangeQuery,
    ) -> StoreResult<Vec<fleet_core::StatusChange>> {
        self.inner.status_changes(q).await
    }
    async fn record_fleet_alert(&self, a: &fleet_core::FleetAlert) -> StoreResult<()> {
        self.inner.record_fleet_alert(a).await
    }
    async fn fleet_alerts(
        &self,
        q: &fleet_core::FleetAlertQuery,
    ) -> StoreResult<Vec<fleet_core::FleetAlert>> {
        self.inner.fleet_alerts(q).await
    }
    async fn record_trend_buckets(&self, b: &[fleet_core::TrendBucket]) -> StoreResult<()> {
        self.inner.record_trend_buckets(b).await
    }
    async fn trend_buckets(
        &self,
        from: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<fleet_core::TrendBucket>> {
        self.inner.trend_buckets(from, until).await
    }
    async fn prune_history(&self, before: Timestamp) -> StoreResult<usize> {
        self.inner.prune_history(before).await
    }
}

#[async_trait]
impl CommandStore for Flaky {
    async fn enqueue_commands(&self, c: &[Command]) -> StoreResult<Vec<Enqueued>> {
        self.inner.enqueue_commands(c).await
    }
    async fn get_command(&self, id: CommandId) -> StoreResult<Option<Command>> {
        self.inner.get_command(id).await
    }
    async fn list_commands(&self, q: &CommandQuery) -> StoreResult<Vec<Command>> {
        self.inner.list_commands(q).await
    }
    async fn deliver_commands(
        &self,
        i: InstanceId,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Delivery> {
        self.inner.deliver_commands(i, now, lease, limit).await
    }
    async fn complete_command(
        &self,
        i: InstanceId,
        id: CommandId,
        o: CommandOutcome,
        r: &CommandResult,
        now: Timestamp,
    ) -> StoreResult<Command> {
        self.inner.complete_command(i, id, o, r, now).await
    }
    async fn cancel_command(&self, id: CommandId, now: Timestamp) -> StoreResult<Command> {
        self.inner.cancel_command(id, now).await
    }
    async fn expire_commands(&self, now: Timestamp) -> StoreResult<usize> {
        self.inner.expire_commands(now).await
    }
    async fn instances_with_open_commands(&self) -> StoreResult<Vec<InstanceId>> {
        self.inner.instances_with_open_commands().await
    }
    async fn prune_commands(&self, before: Timestamp) -> StoreResult<usize> {
        self.inner.prune_commands(before).await
    }
}

#[async_trait]
impl PolicyStore for Flaky {
    async fn insert_policy(&self, p: &fleet_core::Policy) -> StoreResult<()> {
        self.inner.insert_policy(p).await
    }
    async fn list_policies(&self) -> StoreResult<Vec<fleet_core::Policy>> {
        self.inner.list_policies().await
    }
    async fn delete_policy(&self, n: &fleet_core::PolicyName) -> StoreResult<()> {
        self.inner.delete_policy(n).await
    }
}

#[tokio::test]
async fn failed_flush_loses_nothing() {
    let clock = ManualClock::new(T0);
    let fleet = Fleet::builder(Arc::new(Flaky::default()))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let a = fleet.register(new("a", None)).await.unwrap();
    let m1 = MetricsSample {
        cpu_percent: Some(1.0),
        ..MetricsSample::default()
    };
    clock.advance(Duration::from_secs(10));
    fleet
        .heartbeat(
            a.id,
            Heartbeat {
                metrics: Some(m1.clone()),
                apps: None,
            },
        )
        .unwrap();

    fleet.store().down.store(true, Ordering::SeqCst);
    let err = fleet.flush_heartbeats().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(fleet.pending_heartbeats(), 1, "the batch is kept");
    // A newer liveness-only heartbeat arrives while the store is down.
    clock.advance(Duration::from_secs(10));
    fleet.heartbeat(a.id, Heartbeat::default()).unwrap();

    fleet.store().down.store(false, Ordering::SeqCst);
    assert_eq!(fleet.flush_heartbeats().await.unwrap(), 1);
    let stored = fleet.store().get_instance(a.id).await.unwrap().unwrap();
    assert_eq!(
        stored.last_seen,
        T0.saturating_add(Duration::from_secs(20)),
        "newest time wins"
    );
    assert_eq!(
        stored.metrics,
        Some(m1),
        "the sample from the failed batch is not lost"
    );
}

#[tokio::test]
async fn write_through_persists_each_exchanged_heartbeat_before_answering() {
    let clock = ManualClock::new(T0);
    let fleet = Fleet::builder(Arc::new(Flaky::default()))
        .clock(clock.clone())
        .write_through(true)
        .open()
        .await
        .unwrap();
    let a = fleet.register(new("a", None)).await.unwrap();
    let m1 = MetricsSample {
        cpu_percent: Some(1.0),
        ..MetricsSample::default()
    };
    clock.advance(Duration::from_secs(10));
    let hb = |m: Option<MetricsSample>| Heartbeat {
        metrics: m,
        apps: None,
    };
    fleet
        .exchange(a.id, hb(Some(m1.clone())), Vec::new())
        .await
        .unwrap();
    assert_eq!(fleet.pending_heartbeats(), 0, "nothing waits for a flush");
    let stored = fleet.store().get_instance(a.id).await.unwrap().unwrap();
    assert_eq!(stored.last_seen, T0.saturating_add(Duration::from_secs(10)));
    assert_eq!(stored.metrics, Some(m1.clone()));

    // A failed write answers with the store's error and keeps the record for the next flush.
    fleet.store().down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(10));
    let err = fleet
        .exchange(a.id, hb(None), Vec::new())
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(fleet.pending_heartbeats(), 1, "the record is kept");
    let stored = fleet.store().get_instance(a.id).await.unwrap().unwrap();
    assert_eq!(
        stored.last_seen,
        T0.saturating_add(Duration::from_secs(10)),
        "the store is unchanged"
    );
    fleet.store().down.store(false, Ordering::SeqCst);
    assert_eq!(fleet.flush_heartbeats().await.unwrap(), 1);
    let stored = fleet.store().get_instance(a.id).await.unwrap().unwrap();
    assert_eq!(stored.last_seen, T0.saturating_add(Duration::from_secs(20)));
    assert_eq!(
        stored.metrics,
        Some(m1),
        "the older sample survives the merge"
    );
}

#[tokio::test]
async fn replicas_follow_each_other_through_the_change_feed() {
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let a = Fleet::builder(Arc::clone(&store))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let b = Fleet::builder(Arc::clone(&store))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();

    let x = a.register(new("x", None)).await.unwrap();
    let y = a.register(new("y", Some("acme"))).await.unwrap();
    assert!(
        b.get(&TenantScope::All, x.id).is_none(),
        "b has not synced yet"
    );
    assert_eq!(b.sync().await.unwrap(), 2);
    assert_eq!(b.summary(&Filter::all(), &TenantScope::All).total, 2);

    b.set_tags(
        &TenantScope::All,
        x.id,
        Tags::from_pairs([("env", "staging")]).unwrap(),
    )
    .await
    .unwrap();
    b.deregister(&TenantScope::All, y.id).await.unwrap();
    a.sync().await.unwrap();
    let on_a = all(&a);
    assert_eq!(on_a.len(), 1);
    assert_eq!(
        on_a[0].tags,
        Tags::from_pairs([("env", "staging")]).unwrap()
    );
    // Syncing again is a no-op, and both views agree.
    assert_eq!(a.sync().await.unwrap(), 0);
    b.sync().await.unwrap();
    assert_eq!(all(&a), all(&b));
}

#[tokio::test]
async fn truncated_feed_falls_back_to_reconciliation() {
    let store = Arc::new(MemoryStore::with_feed_capacity(2));
    let clock = ManualClock::new(T0);
    let a = Fleet::builder(Arc::clone(&store))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let b = Fleet::builder(Arc::clone(&store))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(a.register(new(&format!("h{i}"), None)).await.unwrap().id);
    }
    a.deregister(&TenantScope::All, ids[0]).await.unwrap();
    assert!(matches!(
        store.changes_since(0, 10).await,
        Err(StoreError::FeedTruncated { .. })
    ));
    b.sync().await.unwrap();
    assert_eq!(all(&b).len(), 4);
    assert_eq!(all(&a), all(&b));
}

#[tokio::test]
async fn invalid_policy_is_refused_at_open() {
    let bad = StalenessPolicy {
        warning_after: Duration::from_secs(300),
        ..StalenessPolicy::default()
    };
    let err = Fleet::builder(MemoryStore::new())
        .policy(bad)
        .open()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("offline_after"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn maintenance_flushes_sweeps_and_reports() {
    let (fleet, clock) = fleet().await;
    let a = fleet.register(new("a", None)).await.unwrap();
    fleet.heartbeat(a.id, Heartbeat::default()).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let upkeep = fleet.spawn_maintenance(fleet_core::MaintenanceConfig::default(), move |event| {
        let _ = tx.send(event);
    });
    // Paused tokio time: the timers fire as soon as the task idles; the fleet's clock decides status.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fleet.pending_heartbeats(), 0, "flushed");
    clock.advance(Duration::from_secs(61));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rx.try_recv().is_err(),
        "alerts are held for the mass-staleness window"
    );
    clock.advance(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match rx.try_recv() {
        Ok(fleet_core::MaintenanceEvent::StatusChanges(changes)) => {
            assert_eq!(changes[0].instance, a.id);
            assert_eq!(changes[0].transition.to, Status::Warning);
        }
        other => panic!("expected status changes, got {other:?}"),
    }
    upkeep.shutdown().await;
}

/// A replica that cannot claim the sweeper lease says so, not that syncing failed.
#[tokio::test(start_paused = true)]
async fn a_failed_lease_claim_is_reported_as_such() {
    let clock = ManualClock::new(T0);
    let fleet = Fleet::builder(Arc::new(Flaky::default()))
        .clock(clock.clone())
        .sweep_lag(Duration::from_secs(3))
        .open()
        .await
        .unwrap();
    fleet.store().down.store(true, Ordering::SeqCst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let upkeep = fleet.spawn_maintenance(fleet_core::MaintenanceConfig::default(), move |event| {
        let _ = tx.send(event);
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    upkeep.shutdown().await;
    let mut lease_failures = 0;
    while let Ok(event) = rx.try_recv() {
        match event {
            fleet_core::MaintenanceEvent::LeaseFailed(_) => lease_failures += 1,
            fleet_core::MaintenanceEvent::SyncFailed(e) => {
                panic!("reported as a sync failure: {e}")
            }
            _ => {}
        }
    }
    assert!(lease_failures >= 1, "the failed claim is reported");
}

/// Revocations are kept for the CRL until their certificates expire, then the upkeep forgets
/// them: the list does not grow for ever.
#[tokio::test(start_paused = true)]
async fn maintenance_prunes_revocations_of_expired_certificates() {
    let (fleet, clock) = fleet().await;
    let gone =
        fleet_core::testing::enroll_with(&fleet, fleet_core::NewToken::default(), "gone").await;
    fleet.deregister(&TenantScope::All, gone).await.unwrap();
    let revoked = fleet.store().revoked_certificates().await.unwrap();
    assert_eq!(revoked.len(), 1, "deregistering revokes the certificate");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = fleet_core::MaintenanceConfig {
        upkeep_every: Duration::from_secs(5),
        ..fleet_core::MaintenanceConfig::default()
    };
    let upkeep = fleet.spawn_maintenance(config, move |event| {
        let _ = tx.send(event);
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        fleet.store().revoked_certificates().await.unwrap(),
        revoked,
        "kept while the certificate could still be presented"
    );
    // Past the certificate's end of validity (30 days by default).
    clock.set(revoked[0].not_after.saturating_add(Duration::from_secs(1)));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        fleet
            .store()
            .revoked_certificates()
            .await
            .unwrap()
            .is_empty()
    );
    let mut reported = 0;
    while let Ok(event) = rx.try_recv() {
        if let fleet_core::MaintenanceEvent::Upkeep {
            pruned_revocations, ..
        } = event
        {
            reported += pruned_revocations;
        }
    }
    assert_eq!(reported, 1, "the upkeep says what it pruned");
    upkeep.shutdown().await;
}

#[tokio::test]
async fn transitions_are_recorded_as_alerts_and_uptime_is_exact() {
    let (fleet, clock) = fleet().await;
    let a = fleet.register(new("a", Some("acme"))).await.unwrap();
    let b = fleet.register(new("b", None)).await.unwrap();
    fleet.heartbeat(b.id, Heartbeat::default()).unwrap();
    // a goes silent: warning at 60 s, offline at 300 s + 1 ms; b keeps heartbeating.
    for _ in 0..40 {
        clock.advance(Duration::from_secs(15));
        fleet.heartbeat(b.id, Heartbeat::default()).unwrap();
        fleet.sweep();
    }
    // a comes back after 600 s.
    fleet.heartbeat(a.id, Heartbeat::default()).unwrap();
    let all = StatusChangeQuery {
        limit: 100,
        ..StatusChangeQuery::default()
    };
    let pending = fleet.status_changes(&TenantScope::All, &all).await.unwrap();
    assert_eq!(pending.len(), 3, "visible before the flush: {pending:?}");
    fleet.flush_heartbeats().await.unwrap();
    let recorded = fleet.store().status_changes(&all).await.unwrap();
    assert_eq!(recorded, pending, "recorded once, newest first");
    assert_eq!(
        recorded
            .iter()
            .map(|c| (c.transition.from, c.transition.to))
            .collect::<Vec<_>>(),
        vec![
            (Status::Offline, Status::Online),
            (Status::Warning, Status::Offline),
            (Status::Online, Status::Warning)
        ]
    );
    assert_eq!(
        recorded[2].transition.at,
        T0.saturating_add(Duration::from_secs(60))
    );
    // Recording the same changes again adds nothing.
    fleet
        .store()
        .record_status_changes(&recorded)
        .await
        .unwrap();
    assert_eq!(fleet.store().status_changes(&all).await.unwrap().len(), 3);
    // Filters: instance, time window, limit, tenant scope.
    let only_b = StatusChangeQuery {
        instance: Some(b.id),
        limit: 100,
        ..StatusChangeQuery::default()
    };
    assert!(
        fleet
            .status_changes(&TenantScope::All, &only_b)
            .await
            .unwrap()
            .is_empty()
    );
    let window = StatusChangeQuery {
        since: Some(T0.saturating_add(Duration::from_secs(100))),
        limit: 100,
        ..StatusChangeQuery::default()
    };
    assert_eq!(
        fleet
            .status_changes(&TenantScope::All, &window)
            .await
            .unwrap()
            .len(),
        2
    );
    let one = StatusChangeQuery {
        limit: 1,
        ..StatusChangeQuery::default()
    };
    assert_eq!(
        fleet
            .status_changes(&TenantScope::All, &one)
            .await
            .unwrap()
            .len(),
        1
    );
    let other = TenantScope::Tenant(TenantId::new("globex").unwrap());
    assert!(
        fleet.status_changes(&other, &all).await.unwrap().is_empty(),
        "another tenant sees none"
    );

    // Uptime over the 600 s: online for the first 60 s only; b all the time.
    let end = T0.saturating_add(Duration::from_secs(600));
    let up_a = fleet
        .uptime(&TenantScope::All, a.id, T0, end)
        .await
        .unwrap()
        .unwrap();
    assert!((up_a - 10.0).abs() < 1e-9, "{up_a}");
    assert_eq!(
        fleet
            .uptime(&TenantScope::All, b.id, T0, end)
            .await
            .unwrap(),
        Some(100.0)
    );
    assert_eq!(
        fleet
            .uptime(
                &TenantScope::All,
                a.id,
                T0.saturating_sub(Duration::from_secs(100)),
                T0
            )
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn recent_metrics_follow_heartbeats_and_go_with_the_instance() {
    let (fleet, clock) = fleet().await;
    let a = fleet.register(new("a", Some("t1"))).await.unwrap().id;
    for k in 0..5u64 {
        clock.advance(Duration::from_secs(15));
        let metrics = MetricsSample {
            cpu_percent: Some(10.0 * k as f64),
            memory_used_bytes: Some(1 << 30),
            memory_total_bytes: Some(4 << 30),
            network_rx_bytes: Some(1000 * k * k),
            ..MetricsSample::default()
        };
        fleet
            .heartbeat(
                a,
                Heartbeat {
                    metrics: Some(metrics),
                    apps: None,
                },
            )
            .unwrap();
        // A liveness-only heartbeat adds no point.
        fleet.heartbeat(a, Heartbeat::default()).unwrap();
    }
    let points = fleet
        .recent_metrics(&TenantScope::All, a, Timestamp::UNIX_EPOCH)
        .unwrap();
    assert_eq!(points.len(), 5);
    assert_eq!(points[4].cpu_percent, Some(40.0));
    assert_eq!(points[4].memory_percent, Some(25.0));
    assert!(points.windows(2).all(|w| w[0].at < w[1].at));
    assert!(points[1].network_rx_bytes_per_sec.is_some());
    let other = TenantScope::Tenant(TenantId::new("t2").unwrap());
    assert!(matches!(
        fleet.recent_metrics(&other, a, Timestamp::UNIX_EPOCH),
        Err(FleetError::InstanceNotFound(_))
    ));
    assert_eq!(fleet.recent_metrics_stats().instances, 1);
    fleet.deregister(&TenantScope::All, a).await.unwrap();
    assert_eq!(fleet.recent_metrics_stats().instances, 0);
}

#[tokio::test]
async fn an_enqueue_too_large_in_all_is_refused_and_queues_nothing() {
    use fleet_core::command::{CommandQuery, MAX_COMMAND_PAYLOAD};
    use fleet_core::{CommandKind, CommandTarget, NewCommand, Payload};
    let (fleet, _) = fleet().await;
    for n in 0..4200 {
        fleet
            .register(NewInstance {
                groups: Groups::from_names(["all"]).unwrap(),
                ..new(&format!("h{n}"), None)
            })
            .await
            .unwrap();
    }
    let big = serde_json::Value::String("x".repeat(MAX_COMMAND_PAYLOAD - 2));
    let mut cmd = NewCommand {
        target: CommandTarget::Group(fleet_core::GroupName::new("all").unwrap()),
        kind: CommandKind::new("ping").unwrap(),
        payload: Payload::from_value(&big).unwrap(),
        ttl_secs: None,
        idempotency_key: None,
    };
    let err = fleet
        .enqueue(&TenantScope::All, cmd.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, FleetError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("256 MiB"), "{err}");
    let listed = fleet
        .commands(
            &TenantScope::All,
            CommandQuery {
                limit: 10,
                ..CommandQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(listed.is_empty(), "nothing queued");
    // A small payload for the same 4,200 instances is fine, written in chunks.
    cmd.payload = Payload::null();
    let report = fleet.enqueue(&TenantScope::All, cmd).await.unwrap();
    assert_eq!((report.targeted, report.created), (4200, 4200));
    assert_eq!(
        report.commands.len(),
        fleet_core::command::MAX_REPORTED_COMMANDS
    );
}

/// A command enqueued through one replica is delivered by another once it has followed the
/// change feed — and, after a feed truncation, from the queue itself.
#[tokio::test]
async fn commands_enqueued_on_one_replica_are_delivered_through_another() {
    use fleet_core::{CommandKind, NewCommand};
    let store = Arc::new(MemoryStore::with_feed_capacity(4));
    let clock = ManualClock::new(T0);
    let open = || {
        Fleet::builder(Arc::clone(&store))
            .clock(clock.clone())
            .open()
    };
    let a = open().await.unwrap();
    let b = open().await.unwrap();
    let x = a.register(new("x", None)).await.unwrap().id;
    b.sync().await.unwrap();
    let ping = NewCommand::for_instance(x, CommandKind::new("ping").unwrap());
    let queued = a.enqueue(&TenantScope::All, ping.clone()).await.unwrap();
    let ex = b.exchange(x, Heartbeat::default(), vec![]).await.unwrap();
    assert!(ex.commands.is_empty(), "b has not followed the feed yet");
    b.sync().await.unwrap();
    let ex = b.exchange(x, Heartbeat::default(), vec![]).await.unwrap();
    assert_eq!(ex.commands.len(), 1);
    assert_eq!(ex.commands[0].id, queued.commands[0].id);

    // The result goes through b; nothing is left for x, so b stops looking.
    let done = fleet_core::ReportedResult {
        id: ex.commands[0].id,
        outcome: CommandOutcome::Succeeded,
        result: CommandResult::new(Some(0), "pong"),
    };
    let ex = b
        .exchange(x, Heartbeat::default(), vec![done])
        .await
        .unwrap();
    assert!(ex.commands.is_empty());

    // Many changes later the feed no longer holds the enqueue: b reconciles and still delivers.
    let second = a.enqueue(&TenantScope::All, ping).await.unwrap();
    for n in 0..6 {
        a.register(new(&format!("filler-{n}"), None)).await.unwrap();
    }
    b.sync().await.unwrap();
    let ex = b.exchange(x, Heartbeat::default(), vec![]).await.unwrap();
    let ids: Vec<_> = ex.commands.iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![second.commands[0].id]);
}
