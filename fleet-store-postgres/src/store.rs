//! The fleet-core store traits on PostgreSQL.

use std::time::Duration;

use async_trait::async_trait;
use fleet_core::alert::{FleetAlert, FleetAlertQuery};
use fleet_core::ca::{CaMaterial, CertificateRecord, RevokedCertificate};
use fleet_core::command::{
    Command, CommandId, CommandOutcome, CommandQuery, CommandResult, CommandState, Delivery,
    Enqueued,
};
use fleet_core::error::RecordKind;
use fleet_core::identity::Fingerprint;
use fleet_core::policy::{Policy, PolicyName};
use fleet_core::store::{
    CertificateChange, CertificateStore, Change, ChangeFeed, ChangeKind, CommandStore,
    EnrollCommit, EnrollResult, EnrollTarget, HeartbeatLog, HeartbeatRecord, HeartbeatStore,
    HistoryStore, InstanceStore, PolicyStore, Seq, StatusChangeQuery, StoreResult, TokenStore,
};
use fleet_core::token::{LedgerEntry, LedgerOutcome, RegistrationToken, TokenId, TokenState};
use fleet_core::trend::TrendBucket;
use fleet_core::{
    Groups, Instance, InstanceId, Status, StatusChange, StoreError, Tags, Timestamp, Transition,
};
use sqlx::{PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::{FEED_RETENTION, PgStore, db, from_json, to_json};

type Tx<'a> = Transaction<'a, Postgres>;

/// Heartbeat-log batches kept (about ten minutes of one flush a second per replica).
const HB_LOG_RETENTION: i64 = 1200;

fn ms(t: Timestamp) -> i64 {
    t.as_unix_millis()
}

fn uuid(id: InstanceId) -> Uuid {
    id.as_uuid()
}

fn kind_code(k: ChangeKind) -> i16 {
    match k {
        ChangeKind::Upserted => 0,
        ChangeKind::Deleted => 1,
        ChangeKind::CommandQueued => 2,
        // A kind added to fleet-core later: stored as "re-read the instance".
        _ => 0,
    }
}

fn kind_of(code: i16) -> Result<ChangeKind, StoreError> {
    match code {
        0 => Ok(ChangeKind::Upserted),
        1 => Ok(ChangeKind::Deleted),
        2 => Ok(ChangeKind::CommandQueued),
        other => Err(StoreError::Corrupt {
            detail: format!("fleet_changes: unknown change kind {other}"),
            source: None,
        }),
    }
}

fn status_code(s: Status) -> i16 {
    match s {
        Status::Online => 0,
        Status::Warning => 1,
        Status::Offline => 2,
    }
}

fn status_of(code: i16) -> Result<Status, StoreError> {
    match code {
        0 => Ok(Status::Online),
        1 => Ok(Status::Warning),
        2 => Ok(Status::Offline),
        other => Err(StoreError::Corrupt {
            detail: format!("fleet_status_changes: unknown status {other}"),
            source: None,
        }),
    }
}

fn instance_exists(id: InstanceId) -> StoreError {
    StoreError::instance_exists(id)
}

fn token_not_found(id: &TokenId) -> StoreError {
    StoreError::NotFound {
        kind: RecordKind::Token,
        id: id.to_string(),
    }
}

fn command_not_found(id: CommandId) -> StoreError {
    StoreError::NotFound {
        kind: RecordKind::Command,
        id: id.to_string(),
    }
}

fn command_uuid(id: CommandId) -> Uuid {
    Uuid::from_bytes(*id.as_bytes())
}

/// A failed COMMIT: the server may have committed before the connection broke, so the outcome
/// is unknown — never `Unavailable` ("nothing was written"), which would invite a blind retry.
fn commit_err(e: sqlx::Error) -> StoreError {
    StoreError::Backend {
        backend: "postgres",
        source: Box::new(e),
    }
}

async fn notify(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(crate::NOTIFY_CHANNEL)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Numbers `changes` from the feed head (taking its lock until the transaction ends) and appends
/// them; returns the last sequence number.
async fn append_changes(
    tx: &mut PgConnection,
    changes: &[(InstanceId, ChangeKind)],
) -> Result<Seq, StoreError> {
    let n = i64::try_from(changes.len()).unwrap_or(i64::MAX);
    let head: i64 = sqlx::query_scalar("UPDATE fleet_feed_head SET seq = seq + $1 RETURNING seq")
        .bind(n)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let first = head - n + 1;
    let seqs: Vec<i64> = (first..=head).collect();
    let ids: Vec<Uuid> = changes.iter().map(|(i, _)| uuid(*i)).collect();
    let kinds: Vec<i16> = changes.iter().map(|(_, k)| kind_code(*k)).collect();
    sqlx::query(
        "INSERT INTO fleet_changes (seq, instance, kind) \
         SELECT * FROM UNNEST($1::int8[], $2::uuid[], $3::int2[])",
    )
    .bind(&seqs)
    .bind(&ids)
    .bind(&kinds)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    // Wake the other replicas (delivered at commit; a hint, the feed is the truth).
    notify(&mut *tx).await?;
    // Forget old changes now and then (every 4,096 sequence numbers or so).
    if first / 4096 != (head + 1) / 4096 {
        sqlx::query("DELETE FROM fleet_changes WHERE seq <= $1")
            .bind(head - FEED_RETENTION)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    u64::try_from(head).map_err(|_| StoreError::Corrupt {
        detail: format!("fleet_feed_head: negative sequence {head}"),
        source: None,
    })
}

async fn append_change(
    tx: &mut PgConnection,
    instance: InstanceId,
    kind: ChangeKind,
) -> Result<Seq, StoreError> {
    append_changes(tx, &[(instance, kind)]).await
}

async fn revoke(
    tx: &mut PgConnection,
    instance: InstanceId,
    cert: Option<CertificateRecord>,
    now: Timestamp,
) -> Result<(), StoreError> {
    let Some(c) = cert else { return Ok(()) };
    let r = RevokedCertificate {
        serial: c.serial,
        not_after: c.not_after,
        revoked_at: now,
        instance,
    };
    sqlx::query(
        "INSERT INTO fleet_revoked (serial, not_after, record) VALUES ($1, $2, $3) \
         ON CONFLICT (serial) DO NOTHING",
    )
    .bind(c.serial.as_bytes().as_slice())
    .bind(ms(c.not_after))
    .bind(to_json(&r)?)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    Ok(())
}

async fn instance_for_update(
    tx: &mut PgConnection,
    id: InstanceId,
) -> Result<Option<Instance>, StoreError> {
    let row: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT record FROM fleet_instances WHERE id = $1 FOR UPDATE")
            .bind(uuid(id))
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    row.map(|v| from_json(v, "fleet_instances.record"))
        .transpose()
}

/// `fleet_instances.search_text` for `inst`: what the live view's text index holds for it,
/// folded by the same function (see `migrations/0002_search_text.sql`).
pub(crate) fn search_text(inst: &Instance) -> String {
    fleet_core::live::searchable_text(&inst.system.hostname, &inst.system.ip_addresses)
}

async fn insert_instance_row(tx: &mut PgConnection, inst: &Instance) -> Result<bool, StoreError> {
    let groups: Vec<String> = inst.groups.iter().map(|g| g.as_str().to_owned()).collect();
    let done = sqlx::query(
        "INSERT INTO fleet_instances (id, tenant, hostname, tags, groups, record, search_text) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
    )
    .bind(uuid(inst.id))
    .bind(inst.tenant.as_ref().map(|t| t.as_str().to_owned()))
    .bind(&inst.system.hostname)
    .bind(to_json(&inst.tags)?)
    .bind(&groups)
    .bind(to_json(inst)?)
    .bind(search_text(inst))
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    Ok(done.rows_affected() == 1)
}

/// Rewrites every column derived from the record, so none can drift from it (and a row an
/// older binary wrote without `search_text` gets it).
async fn update_instance_row(tx: &mut PgConnection, inst: &Instance) -> Result<(), StoreError> {
    let groups: Vec<String> = inst.groups.iter().map(|g| g.as_str().to_owned()).collect();
    sqlx::query(
        "UPDATE fleet_instances SET tenant = $2, hostname = $3, tags = $4, groups = $5, \
         record = $6, search_text = $7 WHERE id = $1",
    )
    .bind(uuid(inst.id))
    .bind(inst.tenant.as_ref().map(|t| t.as_str().to_owned()))
    .bind(&inst.system.hostname)
    .bind(to_json(&inst.tags)?)
    .bind(&groups)
    .bind(to_json(inst)?)
    .bind(search_text(inst))
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    Ok(())
}

/// Rows the backfill folds per transaction.
const BACKFILL_BATCH: i64 = 1000;

/// Fills in `search_text` from Rust for every row that lacks it (rows from before migration
/// 0002, or written since by an older binary), `BACKFILL_BATCH` rows per transaction. Rows
/// another replica's backfill holds are skipped, so replicas starting at once share the work.
/// Returns how many rows it filled in.
pub(crate) async fn backfill_search_text(store: &PgStore) -> Result<u64, StoreError> {
    let mut filled = 0;
    loop {
        let mut tx = store.begin().await?;
        let rows: Vec<(Uuid, serde_json::Value)> = sqlx::query_as(
            "SELECT id, record FROM fleet_instances WHERE search_text IS NULL \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BACKFILL_BATCH)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        if rows.is_empty() {
            return Ok(filled);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut texts = Vec::with_capacity(rows.len());
        for (id, record) in rows {
            let inst: Instance = from_json(record, "fleet_instances.record")?;
            ids.push(id);
            texts.push(search_text(&inst));
        }
        sqlx::query(
            "UPDATE fleet_instances i SET search_text = u.text \
             FROM UNNEST($1::uuid[], $2::text[]) AS u(id, text) WHERE i.id = u.id",
        )
        .bind(&ids)
        .bind(&texts)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(commit_err)?;
        filled += u64::try_from(ids.len()).unwrap_or(u64::MAX);
    }
}

/// The stored record with the heartbeat state laid over it.
pub(crate) fn instance_from_row(row: &sqlx::postgres::PgRow) -> Result<Instance, StoreError> {
    let record: serde_json::Value = row.try_get("record").map_err(db)?;
    let mut inst: Instance = from_json(record, "fleet_instances.record")?;
    let last_seen: Option<i64> = row.try_get("last_seen").map_err(db)?;
    if let Some(t) = last_seen {
        inst.last_seen = Timestamp::from_unix_millis(t);
    }
    let metrics: Option<serde_json::Value> = row.try_get("metrics").map_err(db)?;
    if let Some(m) = metrics {
        inst.metrics = Some(from_json(m, "fleet_heartbeats.metrics")?);
    }
    let apps: Option<serde_json::Value> = row.try_get("apps").map_err(db)?;
    if let Some(a) = apps {
        inst.apps = from_json(a, "fleet_heartbeats.apps")?;
    }
    Ok(inst)
}

const INSTANCE_SELECT: &str = "SELECT i.record, h.last_seen, h.metrics, h.apps \
     FROM fleet_instances i LEFT JOIN fleet_heartbeats h ON h.id = i.id";

impl PgStore {
    async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        self.pool().begin().await.map_err(db)
    }

    async fn set_labels(
        &self,
        id: InstanceId,
        edit: impl FnOnce(&mut Instance),
    ) -> StoreResult<Seq> {
        let mut tx = self.begin().await?;
        let Some(mut inst) = instance_for_update(&mut tx, id).await? else {
            return Err(StoreError::instance_not_found(id));
        };
        edit(&mut inst);
        update_instance_row(&mut tx, &inst).await?;
        let seq = append_change(&mut tx, id, ChangeKind::Upserted).await?;
        tx.commit().await.map_err(commit_err)?;
        Ok(seq)
    }
}

#[async_trait]
impl InstanceStore for PgStore {
    async fn insert_instance(&self, instance: &Instance) -> StoreResult<Seq> {
        let mut tx = self.begin().await?;
        if !insert_instance_row(&mut tx, instance).await? {
            return Err(instance_exists(instance.id));
        }
        let seq = append_change(&mut tx, instance.id, ChangeKind::Upserted).await?;
        tx.commit().await.map_err(commit_err)?;
        Ok(seq)
    }

    async fn get_instance(&self, id: InstanceId) -> StoreResult<Option<Instance>> {
        let row = sqlx::query(&format!("{INSTANCE_SELECT} WHERE i.id = $1"))
            .bind(uuid(id))
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
        row.as_ref().map(instance_from_row).transpose()
    }

    async fn list_instances(
        &self,
        after: Option<InstanceId>,
        limit: usize,
    ) -> StoreResult<Vec<Instance>> {
        let rows = sqlx::query(&format!(
            "{INSTANCE_SELECT} WHERE ($1::uuid IS NULL OR i.id > $1) ORDER BY i.id LIMIT $2"
        ))
        .bind(after.map(uuid))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.iter().map(instance_from_row).collect()
    }

    async fn set_tags(&self, id: InstanceId, tags: &Tags) -> StoreResult<Seq> {
        let tags = tags.clone();
        self.set_labels(id, |i| i.tags = tags).await
    }

    async fn set_groups(&self, id: InstanceId, groups: &Groups) -> StoreResult<Seq> {
        let groups = groups.clone();
        self.set_labels(id, |i| i.groups = groups).await
    }

    async fn delete_instance(&self, id: InstanceId, now: Timestamp) -> StoreResult<Seq> {
        let mut tx = self.begin().await?;
        let record: Option<serde_json::Value> =
            sqlx::query_scalar("DELETE FROM fleet_instances WHERE id = $1 RETURNING record")
                .bind(uuid(id))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(record) = record else {
            return Err(StoreError::instance_not_found(id));
        };
        let inst: Instance = from_json(record, "fleet_instances.record")?;
        revoke(&mut tx, id, inst.certificate, now).await?;
        revoke(&mut tx, id, inst.next_certificate, now).await?;
        sqlx::query("DELETE FROM fleet_heartbeats WHERE id = $1")
            .bind(uuid(id))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let seq = append_change(&mut tx, id, ChangeKind::Deleted).await?;
        tx.commit().await.map_err(commit_err)?;
        Ok(seq)
    }

    async fn count_instances(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM fleet_instances")
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

#[async_trait]
impl HeartbeatStore for PgStore {
    async fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(batch.len());
        let mut seen = Vec::with_capacity(batch.len());
        let mut metrics = Vec::with_capacity(batch.len());
        let mut apps = Vec::with_capacity(batch.len());
        for r in batch {
            ids.push(uuid(r.id));
            seen.push(ms(r.last_seen));
            metrics.push(r.metrics.as_ref().map(to_json).transpose()?);
            apps.push(r.apps.as_ref().map(to_json).transpose()?);
        }
        let mut tx = self.begin().await?;
        // The batch is numbered in the heartbeat log under the head's lock (commit order) ...
        let seq: i64 = sqlx::query_scalar("UPDATE fleet_hb_head SET seq = seq + 1 RETURNING seq")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        // ... and one statement, with the arrays sent and parsed once, upserts the last known
        // state (skipping instances that do not exist: never registered, or deleted) and logs
        // the batch for the other replicas.
        sqlx::query(
            "WITH u AS ( \
                 SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::jsonb[], $4::jsonb[]) \
                     AS u(id, last_seen, metrics, apps) \
             ), upsert AS ( \
                 INSERT INTO fleet_heartbeats (id, last_seen, metrics, apps) \
                 SELECT u.id, u.last_seen, u.metrics, u.apps FROM u \
                 WHERE EXISTS (SELECT 1 FROM fleet_instances i WHERE i.id = u.id) \
                 ON CONFLICT (id) DO UPDATE SET \
                     last_seen = EXCLUDED.last_seen, \
                     metrics = COALESCE(EXCLUDED.metrics, fleet_heartbeats.metrics), \
                     apps = COALESCE(EXCLUDED.apps, fleet_heartbeats.apps) \
                 WHERE EXCLUDED.last_seen >= fleet_heartbeats.last_seen \
             ) \
             INSERT INTO fleet_hb_log (seq, ids, last_seen, metrics) \
             SELECT $5, $1, $2, $3",
        )
        .bind(&ids)
        .bind(&seen)
        .bind(&metrics)
        .bind(&apps)
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        notify(&mut tx).await?;
        if seq % 64 == 0 {
            sqlx::query("DELETE FROM fleet_hb_log WHERE seq <= $1")
                .bind(seq - HB_LOG_RETENTION)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(commit_err)?;
        Ok(())
    }

    async fn heartbeat_log_head(&self) -> StoreResult<u64> {
        let head: i64 = sqlx::query_scalar("SELECT seq FROM fleet_hb_head")
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        Ok(u64::try_from(head).unwrap_or(0))
    }

    async fn heartbeats_since(&self, after: u64, limit: usize) -> StoreResult<HeartbeatLog> {
        let after_i = i64::try_from(after).unwrap_or(i64::MAX);
        let last: i64 = sqlx::query_scalar("SELECT seq FROM fleet_hb_head")
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        type LogRow = (i64, Vec<Uuid>, Vec<i64>, Vec<Option<serde_json::Value>>);
        let rows: Vec<LogRow> = sqlx::query_as(
            "SELECT seq, ids, last_seen, metrics FROM fleet_hb_log WHERE seq > $1 \
             ORDER BY seq LIMIT $2",
        )
        .bind(after_i)
        .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        // Batch numbers are contiguous: a gap right after `after` means pruned batches.
        let first = rows.first().map(|r| r.0);
        if after_i < last && first != Some(after_i + 1) {
            return Err(StoreError::FeedTruncated {
                requested: after,
                oldest: first.map_or(0, |f| u64::try_from(f).unwrap_or(0)),
            });
        }
        let mut log = HeartbeatLog {
            position: after,
            records: Vec::new(),
        };
        for (seq, ids, seen, metrics) in rows {
            for ((id, at), m) in ids.into_iter().zip(seen).zip(metrics) {
                log.records.push(HeartbeatRecord {
                    id: InstanceId::from_bytes(*id.as_bytes()),
                    last_seen: Timestamp::from_unix_millis(at),
                    metrics: m
                        .map(|m| from_json(m, "fleet_hb_log.metrics"))
                        .transpose()?,
                    apps: None,
                });
            }
            log.position = u64::try_from(seq).unwrap_or(after);
        }
        Ok(log)
    }
}

#[async_trait]
impl ChangeFeed for PgStore {
    async fn changes_since(&self, after: Seq, limit: usize) -> StoreResult<Vec<Change>> {
        let after_i = i64::try_from(after).unwrap_or(i64::MAX);
        let last: i64 = sqlx::query_scalar("SELECT seq FROM fleet_feed_head")
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        let rows: Vec<(i64, Uuid, i16)> = sqlx::query_as(
            "SELECT seq, instance, kind FROM fleet_changes WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_i)
        .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        // Sequence numbers are contiguous (a rolled-back write rolls its numbers back too), so a
        // gap right after `after` means pruned changes.
        let first = rows.first().map(|r| r.0);
        if after_i < last && first != Some(after_i + 1) {
            return Err(StoreError::FeedTruncated {
                requested: after,
                oldest: first.map_or(0, |f| u64::try_from(f).unwrap_or(0)),
            });
        }
        rows.into_iter()
            .take(limit)
            .map(|(seq, instance, kind)| {
                Ok(Change {
                    seq: u64::try_from(seq).unwrap_or(0),
                    instance: InstanceId::from_bytes(*instance.as_bytes()),
                    kind: kind_of(kind)?,
                })
            })
            .collect()
    }

    async fn latest_seq(&self) -> StoreResult<Seq> {
        let head: i64 = sqlx::query_scalar("SELECT seq FROM fleet_feed_head")
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        Ok(u64::try_from(head).unwrap_or(0))
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: Timestamp,
        ttl: Duration,
    ) -> StoreResult<Option<u64>> {
        // One statement: PostgreSQL's row lock on the conflicting row makes it atomic.
        let epoch: Option<i64> = sqlx::query_scalar(
            "INSERT INTO fleet_leases (name, holder, epoch, expires_at) VALUES ($1, $2, 1, $4) \
             ON CONFLICT (name) DO UPDATE SET \
                 epoch = fleet_leases.epoch \
                     + CASE WHEN fleet_leases.holder = EXCLUDED.holder THEN 0 ELSE 1 END, \
                 holder = EXCLUDED.holder, \
                 expires_at = EXCLUDED.expires_at \
             WHERE fleet_leases.holder = EXCLUDED.holder OR fleet_leases.expires_at <= $3 \
             RETURNING epoch",
        )
        .bind(name)
        .bind(holder)
        .bind(ms(now))
        .bind(ms(now.saturating_add(ttl)))
        .fetch_optional(self.pool())
        .await
        .map_err(db)?;
        Ok(epoch.map(|e| u64::try_from(e).unwrap_or(0)))
    }

    async fn wait_for_writes(&self) {
        self.notified().await;
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        sqlx::query("UPDATE fleet_leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }
}

async fn log(
    tx: &mut PgConnection,
    commit: &EnrollCommit,
    outcome: LedgerOutcome,
    instance: Option<InstanceId>,
) -> Result<(), StoreError> {
    let entry = LedgerEntry {
        token: commit.token.clone(),
        at: commit.now,
        outcome,
        instance,
        peer: commit.peer,
        key_fingerprint: Some(commit.key_fingerprint),
    };
    sqlx::query("INSERT INTO fleet_ledger (token, entry) VALUES ($1, $2)")
        .bind(commit.token.as_str())
        .bind(to_json(&entry)?)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    Ok(())
}

async fn recent_enrollment(
    conn: &mut PgConnection,
    token: &TokenId,
    key: &Fingerprint,
    since: Timestamp,
) -> Result<Option<InstanceId>, StoreError> {
    let found: Option<Uuid> = sqlx::query_scalar(
        "SELECT e.instance FROM fleet_enrollments e \
         JOIN fleet_instances i ON i.id = e.instance \
         WHERE e.token = $1 AND e.key = $2 AND e.at >= $3",
    )
    .bind(token.as_str())
    .bind(key.as_bytes().as_slice())
    .bind(ms(since))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    Ok(found.map(|u| InstanceId::from_bytes(*u.as_bytes())))
}

#[async_trait]
impl TokenStore for PgStore {
    async fn insert_token(&self, token: &RegistrationToken) -> StoreResult<()> {
        let done = sqlx::query(
            "INSERT INTO fleet_tokens (id, created_at, record) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(token.id.as_str())
        .bind(ms(token.created_at))
        .bind(to_json(token)?)
        .execute(self.pool())
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists {
                kind: RecordKind::Token,
                id: token.id.to_string(),
            });
        }
        Ok(())
    }

    async fn get_token(&self, id: &TokenId) -> StoreResult<Option<RegistrationToken>> {
        let v: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT record FROM fleet_tokens WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(self.pool())
                .await
                .map_err(db)?;
        v.map(|v| from_json(v, "fleet_tokens.record")).transpose()
    }

    async fn list_tokens(&self) -> StoreResult<Vec<RegistrationToken>> {
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT record FROM fleet_tokens ORDER BY created_at, id COLLATE \"C\"",
        )
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|v| from_json(v, "fleet_tokens.record"))
            .collect()
    }

    async fn revoke_token(&self, id: &TokenId, now: Timestamp) -> StoreResult<RegistrationToken> {
        let mut tx = self.begin().await?;
        let v: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT record FROM fleet_tokens WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(v) = v else {
            return Err(token_not_found(id));
        };
        let mut token: RegistrationToken = from_json(v, "fleet_tokens.record")?;
        token.revoked_at.get_or_insert(now);
        sqlx::query("UPDATE fleet_tokens SET record = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(to_json(&token)?)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(commit_err)?;
        Ok(token)
    }

    async fn append_ledger(&self, entry: &LedgerEntry) -> StoreResult<()> {
        let done = sqlx::query(
            "INSERT INTO fleet_ledger (token, entry) \
             SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM fleet_tokens WHERE id = $1)",
        )
        .bind(entry.token.as_str())
        .bind(to_json(entry)?)
        .execute(self.pool())
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(token_not_found(&entry.token));
        }
        Ok(())
    }

    async fn ledger(&self, id: &TokenId, limit: usize) -> StoreResult<Vec<LedgerEntry>> {
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT entry FROM fleet_ledger WHERE token = $1 ORDER BY n DESC LIMIT $2",
        )
        .bind(id.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|v| from_json(v, "fleet_ledger.entry"))
            .collect()
    }

    async fn find_enrollment(
        &self,
        id: &TokenId,
        key: &Fingerprint,
        since: Timestamp,
    ) -> StoreResult<Option<InstanceId>> {
        let mut conn = self.pool().acquire().await.map_err(db)?;
        recent_enrollment(&mut conn, id, key, since).await
    }

    async fn enroll(&self, commit: &EnrollCommit) -> StoreResult<EnrollResult> {
        let mut tx = self.begin().await?;
        // The token row's lock makes concurrent enrollments with it run one at a time.
        let v: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT record FROM fleet_tokens WHERE id = $1 FOR UPDATE")
                .bind(commit.token.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(v) = v else {
            return Ok(EnrollResult::UnknownToken);
        };
        let mut token: RegistrationToken = from_json(v, "fleet_tokens.record")?;
        let result = 'decide: {
            if token.revoked_at.is_some() {
                log(&mut tx, commit, LedgerOutcome::Revoked, None).await?;
                break 'decide EnrollResult::Rejected(TokenState::Revoked);
            }
            if let Some(instance) = recent_enrollment(
                &mut tx,
                &commit.token,
                &commit.key_fingerprint,
                commit.retry_since,
            )
            .await?
            {
                log(&mut tx, commit, LedgerOutcome::Retried, Some(instance)).await?;
                break 'decide EnrollResult::Retry { instance };
            }
            match token.state(commit.now) {
                TokenState::Active => {}
                state => {
                    log(&mut tx, commit, LedgerOutcome::refused(state), None).await?;
                    break 'decide EnrollResult::Rejected(state);
                }
            }
            let (instance, outcome) = match &commit.target {
                EnrollTarget::New(inst) => {
                    if !insert_instance_row(&mut tx, inst).await? {
                        return Err(instance_exists(inst.id));
                    }
                    (inst.id, LedgerOutcome::Enrolled)
                }
                EnrollTarget::Existing {
                    instance,
                    expected_serial,
                    certificate,
                } => {
                    let current = instance_for_update(&mut tx, *instance).await?;
                    let ok = token.allow_reenroll
                        && current
                            .as_ref()
                            .and_then(|i| i.certificate)
                            .is_some_and(|c| c.serial == *expected_serial);
                    let Some(mut inst) = current.filter(|_| ok) else {
                        log(
                            &mut tx,
                            commit,
                            LedgerOutcome::ReenrollRefused,
                            Some(*instance),
                        )
                        .await?;
                        break 'decide EnrollResult::ReenrollRefused;
                    };
                    let old = inst.certificate.replace(*certificate);
                    let staged = inst.next_certificate.take();
                    update_instance_row(&mut tx, &inst).await?;
                    revoke(&mut tx, *instance, old, commit.now).await?;
                    revoke(&mut tx, *instance, staged, commit.now).await?;
                    (*instance, LedgerOutcome::Reenrolled)
                }
            };
            token.uses = token.uses.saturating_add(1);
            sqlx::query("UPDATE fleet_tokens SET record = $2 WHERE id = $1")
                .bind(commit.token.as_str())
                .bind(to_json(&token)?)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            log(&mut tx, commit, outcome, Some(instance)).await?;
            sqlx::query(
                "INSERT INTO fleet_enrollments (token, key, instance, at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (token, key) DO UPDATE SET instance = EXCLUDED.instance, at = EXCLUDED.at",
            )
            .bind(commit.token.as_str())
            .bind(commit.key_fingerprint.as_bytes().as_slice())
            .bind(uuid(instance))
            .bind(ms(commit.now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let seq = append_change(&mut tx, instance, ChangeKind::Upserted).await?;
            EnrollResult::Enrolled { seq }
        };
        tx.commit().await.map_err(commit_err)?;
        Ok(result)
    }
}

#[async_trait]
impl CertificateStore for PgStore {
    async fn load_ca(&self) -> StoreResult<Option<CaMaterial>> {
        let v: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT value FROM fleet_meta WHERE key = 'ca'")
                .fetch_optional(self.pool())
                .await
                .map_err(db)?;
        v.map(|v| from_json(v, "fleet_meta.ca")).transpose()
    }

    async fn init_ca(&self, material: &CaMaterial) -> StoreResult<CaMaterial> {
        sqlx::query(
            "INSERT INTO fleet_meta (key, value) VALUES ('ca', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(to_json(material)?)
        .execute(self.pool())
        .await
        .map_err(db)?;
        self.load_ca().await?.ok_or_else(|| StoreError::Corrupt {
            detail: "fleet_meta.ca vanished right after it was written".into(),
            source: None,
        })
    }

    async fn replace_ca(&self, expected: &CaMaterial, new: &CaMaterial) -> StoreResult<CaMaterial> {
        // jsonb equality compares the stored object with the expected one.
        sqlx::query("UPDATE fleet_meta SET value = $2 WHERE key = 'ca' AND value = $1")
            .bind(to_json(expected)?)
            .bind(to_json(new)?)
            .execute(self.pool())
            .await
            .map_err(db)?;
        self.load_ca().await?.ok_or_else(|| StoreError::NotFound {
            kind: RecordKind::Ca,
            id: "ca".into(),
        })
    }

    async fn set_certificate(
        &self,
        id: InstanceId,
        change: CertificateChange,
        now: Timestamp,
    ) -> StoreResult<Seq> {
        let mut tx = self.begin().await?;
        let Some(mut inst) = instance_for_update(&mut tx, id).await? else {
            return Err(StoreError::instance_not_found(id));
        };
        let update = change.apply(&mut inst)?;
        for r in update.retired {
            revoke(&mut tx, id, r, now).await?;
        }
        update_instance_row(&mut tx, &inst).await?;
        let seq = append_change(&mut tx, id, ChangeKind::Upserted).await?;
        tx.commit().await.map_err(commit_err)?;
        Ok(seq)
    }

    async fn revoked_certificates(&self) -> StoreResult<Vec<RevokedCertificate>> {
        let rows: Vec<serde_json::Value> =
            sqlx::query_scalar("SELECT record FROM fleet_revoked ORDER BY serial")
                .fetch_all(self.pool())
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|v| from_json(v, "fleet_revoked.record"))
            .collect()
    }

    async fn prune_revoked(&self, before: Timestamp) -> StoreResult<usize> {
        let done = sqlx::query("DELETE FROM fleet_revoked WHERE not_after < $1")
            .bind(ms(before))
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }
}

#[async_trait]
impl HistoryStore for PgStore {
    async fn record_status_changes(&self, changes: &[StatusChange]) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let at: Vec<i64> = changes.iter().map(|c| ms(c.transition.at)).collect();
        let ids: Vec<Uuid> = changes.iter().map(|c| uuid(c.instance)).collect();
        let from: Vec<i16> = changes
            .iter()
            .map(|c| status_code(c.transition.from))
            .collect();
        let to: Vec<i16> = changes
            .iter()
            .map(|c| status_code(c.transition.to))
            .collect();
        sqlx::query(
            "INSERT INTO fleet_status_changes (at, instance, from_status, to_status) \
             SELECT at, instance, from_status, to_status \
             FROM UNNEST($1::int8[], $2::uuid[], $3::int2[], $4::int2[]) WITH ORDINALITY \
                 AS u(at, instance, from_status, to_status, ord) \
             ORDER BY ord \
             ON CONFLICT DO NOTHING",
        )
        .bind(&at)
        .bind(&ids)
        .bind(&from)
        .bind(&to)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn status_changes(&self, query: &StatusChangeQuery) -> StoreResult<Vec<StatusChange>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, Uuid, i16, i16)> = sqlx::query_as(
            "SELECT at, instance, from_status, to_status FROM fleet_status_changes \
             WHERE ($1::uuid IS NULL OR instance = $1) \
               AND ($2::int8 IS NULL OR at >= $2) \
               AND ($3::int8 IS NULL OR at < $3) \
             ORDER BY at DESC, n DESC LIMIT $4",
        )
        .bind(query.instance.map(uuid))
        .bind(query.since.map(ms))
        .bind(query.until.map(ms))
        .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|(at, instance, from, to)| {
                Ok(StatusChange {
                    instance: InstanceId::from_bytes(*instance.as_bytes()),
                    transition: Transition {
                        from: status_of(from)?,
                        to: status_of(to)?,
                        at: Timestamp::from_unix_millis(at),
                    },
                })
            })
            .collect()
    }

    async fn record_fleet_alert(&self, alert: &FleetAlert) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO fleet_alerts (at, kind, record) VALUES ($1, $2, $3) \
             ON CONFLICT (at, kind) DO NOTHING",
        )
        .bind(ms(alert.at))
        .bind(format!("{:?}", alert.kind))
        .bind(to_json(alert)?)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn fleet_alerts(&self, query: &FleetAlertQuery) -> StoreResult<Vec<FleetAlert>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT record FROM fleet_alerts \
             WHERE ($1::int8 IS NULL OR at >= $1) AND ($2::int8 IS NULL OR at < $2) \
             ORDER BY at DESC, kind LIMIT $3",
        )
        .bind(query.since.map(ms))
        .bind(query.until.map(ms))
        .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|v| from_json(v, "fleet_alerts.record"))
            .collect()
    }

    async fn record_trend_buckets(&self, buckets: &[TrendBucket]) -> StoreResult<()> {
        if buckets.is_empty() {
            return Ok(());
        }
        let starts: Vec<i64> = buckets.iter().map(|b| ms(b.start)).collect();
        let records = buckets.iter().map(to_json).collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO fleet_trends (start, record) \
             SELECT * FROM UNNEST($1::int8[], $2::jsonb[]) \
             ON CONFLICT (start) DO UPDATE SET record = EXCLUDED.record",
        )
        .bind(&starts)
        .bind(&records)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn trend_buckets(
        &self,
        from: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<TrendBucket>> {
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT record FROM fleet_trends WHERE start >= $1 AND start < $2 ORDER BY start",
        )
        .bind(ms(from))
        .bind(ms(until))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|v| from_json(v, "fleet_trends.record"))
            .collect()
    }

    async fn prune_history(&self, before: Timestamp) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        let mut n = 0;
        for sql in [
            "DELETE FROM fleet_status_changes WHERE at < $1",
            "DELETE FROM fleet_alerts WHERE at < $1",
            "DELETE FROM fleet_trends WHERE start < $1",
        ] {
            let done = sqlx::query(sql)
                .bind(ms(before))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            n += usize::try_from(done.rows_affected()).unwrap_or(usize::MAX);
        }
        // A heartbeat flush racing a deregistration can leave the deleted instance a state row;
        // the upkeep that applies retention sweeps such rows away (not counted as history).
        sqlx::query(
            "DELETE FROM fleet_heartbeats h \
             WHERE NOT EXISTS (SELECT 1 FROM fleet_instances i WHERE i.id = h.id)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(commit_err)?;
        Ok(n)
    }
}

async fn command_for_update(
    tx: &mut PgConnection,
    id: CommandId,
) -> Result<Option<Command>, StoreError> {
    let v: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT record FROM fleet_commands WHERE id = $1 FOR UPDATE")
            .bind(command_uuid(id))
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    v.map(|v| from_json(v, "fleet_commands.record")).transpose()
}

async fn save_command(tx: &mut PgConnection, c: &Command) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE fleet_commands SET state = $2, finished_at = $3, lease_until = $4, record = $5 \
         WHERE id = $1",
    )
    .bind(command_uuid(c.id))
    .bind(c.state.as_str())
    .bind(c.finished_at.map(ms))
    .bind(c.lease_until.map(ms))
    .bind(to_json(c)?)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    Ok(())
}

const OPEN: &str = "state IN ('queued', 'delivered')";

#[async_trait]
impl CommandStore for PgStore {
    async fn enqueue_commands(&self, commands: &[Command]) -> StoreResult<Vec<Enqueued>> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(commands.len());
        let mut instances = Vec::with_capacity(commands.len());
        let mut batches = Vec::with_capacity(commands.len());
        let mut tenants = Vec::with_capacity(commands.len());
        let mut states = Vec::with_capacity(commands.len());
        let mut expires = Vec::with_capacity(commands.len());
        let mut keys = Vec::with_capacity(commands.len());
        let mut records = Vec::with_capacity(commands.len());
        // Rows go in (instance, key) order, so two batches contending for the same idempotency
        // keys wait for each other instead of deadlocking.
        let mut ordered: Vec<&Command> = commands.iter().collect();
        ordered.sort_by(|a, b| {
            (a.instance, &a.idempotency_key).cmp(&(b.instance, &b.idempotency_key))
        });
        for c in ordered {
            ids.push(command_uuid(c.id));
            instances.push(uuid(c.instance));
            batches.push(c.batch.map(|b| Uuid::from_bytes(*b.as_bytes())));
            tenants.push(c.tenant.as_ref().map(|t| t.as_str().to_owned()));
            states.push(c.state.as_str());
            expires.push(ms(c.expires_at));
            keys.push(c.idempotency_key.clone());
            records.push(to_json(c)?);
        }
        let mut tx = self.begin().await?;
        // A row whose (instance, key) is taken is skipped — concurrent enqueues with one key wait
        // for each other here and exactly one inserts.
        let created: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO fleet_commands \
                 (id, instance, batch, tenant, state, expires_at, idempotency_key, record) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], \
                                  $6::int8[], $7::text[], $8::jsonb[]) \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&ids)
        .bind(&instances)
        .bind(&batches)
        .bind(&tenants)
        .bind(&states)
        .bind(&expires)
        .bind(&keys)
        .bind(&records)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let created: std::collections::HashSet<Uuid> = created.into_iter().collect();
        let mut out = Vec::with_capacity(commands.len());
        let mut changes = Vec::new();
        for c in commands {
            if created.contains(&command_uuid(c.id)) {
                changes.push((c.instance, ChangeKind::CommandQueued));
                out.push(Enqueued::Created(c.clone()));
                continue;
            }
            let existing: Option<serde_json::Value> = match &c.idempotency_key {
                Some(key) => sqlx::query_scalar(
                    "SELECT record FROM fleet_commands WHERE instance = $1 AND idempotency_key = $2",
                )
                .bind(uuid(c.instance))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?,
                None => None,
            };
            match existing {
                Some(v) => out.push(Enqueued::Existing(from_json(v, "fleet_commands.record")?)),
                None => {
                    return Err(StoreError::AlreadyExists {
                        kind: RecordKind::Command,
                        id: c.id.to_string(),
                    });
                }
            }
        }
        if !changes.is_empty() {
            append_changes(&mut tx, &changes).await?;
        }
        tx.commit().await.map_err(commit_err)?;
        Ok(out)
    }

    async fn get_command(&self, id: CommandId) -> StoreResult<Option<Command>> {
        let v: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT record FROM fleet_commands WHERE id = $1")
                .bind(command_uuid(id))
                .fetch_optional(self.pool())
                .await
                .map_err(db)?;
        v.map(|v| from_json(v, "fleet_commands.record")).transpose()
    }

    async fn list_commands(&self, query: &CommandQuery) -> StoreResult<Vec<Command>> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let (by_tenant, tenant) = match &query.tenant {
            None => (false, None),
            Some(t) => (true, t.as_ref().map(|t| t.as_str().to_owned())),
        };
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT record FROM fleet_commands \
             WHERE ($1::uuid IS NULL OR instance = $1) \
               AND ($2::uuid IS NULL OR batch = $2) \
               AND ($3::text IS NULL OR state = $3) \
               AND ($4::uuid IS NULL OR id < $4) \
               AND (NOT $5 OR tenant IS NOT DISTINCT FROM $6) \
             ORDER BY id DESC LIMIT $7",
        )
        .bind(query.instance.map(uuid))
        .bind(query.batch.map(|b| Uuid::from_bytes(*b.as_bytes())))
        .bind(query.state.map(CommandState::as_str))
        .bind(query.before.map(command_uuid))
        .bind(by_tenant)
        .bind(tenant)
        .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|v| from_json(v, "fleet_commands.record"))
            .collect()
    }

    async fn deliver_commands(
        &self,
        instance: InstanceId,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Delivery> {
        let mut tx = self.begin().await?;
        let id = uuid(instance);
        // First what is due to expire, then up to `limit` deliverable commands, oldest first.
        // Rows another delivery (or a cancel) holds are skipped: never handed out twice, and
        // concurrent deliveries share the queue instead of waiting for each other.
        let due: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
            "SELECT record FROM fleet_commands WHERE instance = $1 AND {OPEN} \
               AND expires_at <= $2 AND (state = 'queued' OR coalesce(lease_until, 0) <= $2) \
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(id)
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        for v in due {
            let mut c: Command = from_json(v, "fleet_commands.record")?;
            if c.expired_at(now) {
                c.expire(now);
                save_command(&mut tx, &c).await?;
            }
        }
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
            "SELECT record FROM fleet_commands WHERE instance = $1 AND {OPEN} \
               AND expires_at > $2 AND (state = 'queued' OR coalesce(lease_until, 0) <= $2) \
             ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED"
        ))
        .bind(id)
        .bind(ms(now))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut delivery = Delivery::default();
        for v in rows {
            let mut c: Command = from_json(v, "fleet_commands.record")?;
            if c.deliverable(now) {
                c.deliver(now, lease);
                save_command(&mut tx, &c).await?;
                delivery.commands.push(c);
            }
        }
        // Counted without locks, so commands another delivery holds count too.
        let open: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM fleet_commands WHERE instance = $1 AND {OPEN}"
        ))
        .bind(uuid(instance))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        delivery.open = usize::try_from(open).unwrap_or(0);
        tx.commit().await.map_err(commit_err)?;
        Ok(delivery)
    }

    async fn complete_command(
        &self,
        instance: InstanceId,
        id: CommandId,
        outcome: CommandOutcome,
        result: &CommandResult,
        now: Timestamp,
    ) -> StoreResult<Command> {
        let mut tx = self.begin().await?;
        let Some(mut c) = command_for_update(&mut tx, id)
            .await?
            .filter(|c| c.instance == instance)
        else {
            return Err(command_not_found(id));
        };
        if c.complete(outcome, result.clone(), now) {
            save_command(&mut tx, &c).await?;
        }
        tx.commit().await.map_err(commit_err)?;
        Ok(c)
    }

    async fn cancel_command(&self, id: CommandId, now: Timestamp) -> StoreResult<Command> {
        let mut tx = self.begin().await?;
        let Some(mut c) = command_for_update(&mut tx, id).await? else {
            return Err(command_not_found(id));
        };
        c.cancel(now)?;
        save_command(&mut tx, &c).await?;
        tx.commit().await.map_err(commit_err)?;
        Ok(c)
    }

    async fn expire_commands(&self, now: Timestamp) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
            "SELECT record FROM fleet_commands WHERE {OPEN} AND expires_at <= $1 \
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut n = 0;
        for v in rows {
            let mut c: Command = from_json(v, "fleet_commands.record")?;
            if c.expired_at(now) {
                c.expire(now);
                save_command(&mut tx, &c).await?;
                n += 1;
            }
        }
        tx.commit().await.map_err(commit_err)?;
        Ok(n)
    }

    async fn instances_with_open_commands(&self) -> StoreResult<Vec<InstanceId>> {
        let rows: Vec<Uuid> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT instance FROM fleet_commands WHERE {OPEN} ORDER BY instance"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|u| InstanceId::from_bytes(*u.as_bytes()))
            .collect())
    }

    async fn prune_commands(&self, before: Timestamp) -> StoreResult<usize> {
        let done = sqlx::query("DELETE FROM fleet_commands WHERE finished_at < $1")
            .bind(ms(before))
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }
}

#[async_trait]
impl PolicyStore for PgStore {
    async fn insert_policy(&self, policy: &Policy) -> StoreResult<()> {
        let done = sqlx::query(
            "INSERT INTO fleet_policies (name, record) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(policy.name.as_str())
        .bind(to_json(policy)?)
        .execute(self.pool())
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists {
                kind: RecordKind::Policy,
                id: policy.name.to_string(),
            });
        }
        Ok(())
    }

    async fn list_policies(&self) -> StoreResult<Vec<Policy>> {
        let rows: Vec<serde_json::Value> =
            sqlx::query_scalar("SELECT record FROM fleet_policies ORDER BY name COLLATE \"C\"")
                .fetch_all(self.pool())
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|v| from_json(v, "fleet_policies.record"))
            .collect()
    }

    async fn delete_policy(&self, name: &PolicyName) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM fleet_policies WHERE name = $1")
            .bind(name.as_str())
            .execute(self.pool())
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: RecordKind::Policy,
                id: name.to_string(),
            });
        }
        Ok(())
    }
}
