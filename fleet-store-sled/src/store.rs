//! The fleet-core store traits on sled trees.

use async_trait::async_trait;
use fleet_core::alert::{FleetAlert, FleetAlertQuery};
use fleet_core::ca::{CaMaterial, CertificateRecord, RevokedCertificate};
use fleet_core::error::RecordKind;
use fleet_core::identity::Fingerprint;
use fleet_core::store::{
    CertificateChange, CertificateStore, Change, ChangeFeed, ChangeKind, EnrollCommit,
    EnrollResult, EnrollTarget, HeartbeatRecord, HeartbeatStore, HistoryStore, InstanceStore, Seq,
    StatusChangeQuery, StoreResult, TokenStore,
};
use fleet_core::token::{LedgerEntry, LedgerOutcome, RegistrationToken, TokenId, TokenState};
use fleet_core::trend::TrendBucket;
use fleet_core::{
    App, Groups, Instance, InstanceId, MetricsSample, StatusChange, StoreError, Tags, Timestamp,
};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};

use crate::codec::{encode, read_u64, u64_key};
use std::collections::{BTreeMap, HashMap};

use crate::journal::Journal;
use crate::{FEED_RETENTION, JOURNAL_MAX_BYTES, OVERLAY_MAX, SledStore, Trees, decode_at};

pub(crate) fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend {
        backend: "sled",
        source: Box::new(e),
    }
}

pub(crate) type TxResult<T> = ConflictableTransactionResult<T, StoreError>;

pub(crate) fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

pub(crate) fn tx<T>(r: Result<T, StoreError>) -> TxResult<T> {
    r.map_err(ConflictableTransactionError::Abort)
}

pub(crate) fn finish<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    })
}

/// What heartbeat batches write, separate from the durable record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StateRecord {
    last_seen: Timestamp,
    metrics: Option<MetricsSample>,
    apps: Option<Vec<App>>,
}

impl StateRecord {
    /// `newer` on top of `self`: the newer time; fields `newer` lacks are kept.
    fn merged(self, newer: Self) -> Self {
        Self {
            last_seen: newer.last_seen,
            metrics: newer.metrics.or(self.metrics),
            apps: newer.apps.or(self.apps),
        }
    }

    /// Takes `newer` in place: its time, and each field it carries.
    fn absorb(&mut self, newer: Self) {
        self.last_seen = newer.last_seen;
        if newer.metrics.is_some() {
            self.metrics = newer.metrics;
        }
        if newer.apps.is_some() {
            self.apps = newer.apps;
        }
    }

    fn from_record(r: HeartbeatRecord) -> (InstanceId, Self) {
        (
            r.id,
            Self {
                last_seen: r.last_seen,
                metrics: r.metrics,
                apps: r.apps,
            },
        )
    }
}

/// Heartbeat state journaled but not yet compacted into the `state` tree, and the journal.
#[derive(Debug)]
pub(crate) struct Overlay {
    states: HashMap<InstanceId, StateRecord>,
    pub(crate) journal: Journal,
}

impl Overlay {
    pub(crate) fn new(journal: Journal) -> Self {
        Self {
            states: HashMap::new(),
            journal,
        }
    }

    pub(crate) fn merge_batch(&mut self, batch: Vec<HeartbeatRecord>) {
        for rec in batch {
            let (id, state) = StateRecord::from_record(rec);
            self.merge(id, state);
        }
    }

    fn merge(&mut self, id: InstanceId, rec: StateRecord) {
        match self.states.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().absorb(rec),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(rec);
            }
        }
    }
}

/// The `state` page of an instance: the first two bytes of its (random) id, so 65,536 pages of
/// about 15 instances each at a million instances. Compaction rewrites each touched page once.
fn page_of(id: InstanceId) -> [u8; 2] {
    let b = id.as_bytes();
    [b[0], b[1]]
}

fn encode_page(states: &BTreeMap<InstanceId, StateRecord>) -> Result<Vec<u8>, StoreError> {
    let entries: Vec<(&InstanceId, &StateRecord)> = states.iter().collect();
    encode(&entries)
}

fn decode_page(page: &[u8], bytes: &[u8]) -> Result<BTreeMap<InstanceId, StateRecord>, StoreError> {
    let entries: Vec<(InstanceId, StateRecord)> = decode_at("state", page, bytes)?;
    Ok(entries.into_iter().collect())
}

fn token_not_found(id: &TokenId) -> StoreError {
    StoreError::NotFound {
        kind: RecordKind::Token,
        id: id.to_string(),
    }
}

/// Allocates the next change-feed sequence number and appends the change, inside a transaction.
/// Every durable write goes through the one `meta/seq` key, so sequence order is commit order.
pub(crate) fn append_change(
    meta: &TransactionalTree,
    feed: &TransactionalTree,
    instance: InstanceId,
    kind: ChangeKind,
) -> TxResult<Seq> {
    let seq = read_u64(meta.get(b"seq")?.as_deref()) + 1;
    meta.insert(b"seq", &u64_key(seq))?;
    feed.insert(
        &u64_key(seq),
        tx(encode(&Change {
            seq,
            instance,
            kind,
        }))?,
    )?;
    Ok(seq)
}

fn get_instance_tx(instances: &TransactionalTree, id: InstanceId) -> TxResult<Option<Instance>> {
    match instances.get(id.as_bytes())? {
        Some(v) => Ok(Some(tx(decode_at("instances", id.as_bytes(), &v))?)),
        None => Ok(None),
    }
}

fn revoke_tx(
    serials: &TransactionalTree,
    revoked: &TransactionalTree,
    instance: InstanceId,
    cert: Option<CertificateRecord>,
    now: Timestamp,
) -> TxResult<()> {
    if let Some(c) = cert {
        serials.remove(c.serial.as_bytes())?;
        if revoked.get(c.serial.as_bytes())?.is_none() {
            let r = RevokedCertificate {
                serial: c.serial,
                not_after: c.not_after,
                revoked_at: now,
                instance,
            };
            revoked.insert(c.serial.as_bytes(), tx(encode(&r))?)?;
        }
    }
    Ok(())
}

fn ledger_key(t: &TransactionalTree, token: &TokenId) -> TxResult<Vec<u8>> {
    let mut key = token.as_str().as_bytes().to_vec();
    key.extend_from_slice(&u64_key(t.generate_id()?));
    Ok(key)
}

fn enrollment_key(token: &TokenId, key: &Fingerprint) -> Vec<u8> {
    let mut k = token.as_str().as_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

impl Trees {
    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        // Every update of the overlay completes before anything that could panic.
        self.overlay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a heartbeat batch to the journal (one record, one fsync), merges it into the
    /// overlay, and compacts when the journal or overlay grew past its limit.
    fn journal_heartbeats(&self, batch: Vec<HeartbeatRecord>) -> Result<(), StoreError> {
        let mut overlay = self.overlay();
        overlay.journal.append(&batch)?;
        overlay.merge_batch(batch);
        if overlay.journal.len >= JOURNAL_MAX_BYTES || overlay.states.len() >= OVERLAY_MAX {
            self.compact(&mut overlay)?;
        }
        Ok(())
    }

    /// Folds the overlay into the `state` tree page by page (skipping instances that no longer
    /// exist) and clears the journal. A crash in between leaves the journal, which is replayed at
    /// open; replaying is idempotent.
    fn compact(&self, overlay: &mut Overlay) -> Result<(), StoreError> {
        let mut by_page: BTreeMap<[u8; 2], Vec<(InstanceId, StateRecord)>> = BTreeMap::new();
        for (id, rec) in overlay.states.drain() {
            by_page.entry(page_of(id)).or_default().push((id, rec));
        }
        let mut writes = sled::Batch::default();
        for (page, updates) in by_page {
            let mut states = self.read_page(page)?;
            for (id, rec) in updates {
                match states.get_mut(&id) {
                    // Already in its page: the instance existed when it was first compacted, and
                    // a deregistration removes it from the page under this same lock.
                    Some(old) => old.absorb(rec),
                    // New to the page: skip it if the instance is gone (a heartbeat that raced
                    // its deregistration), so no orphan state is written.
                    None => {
                        if self
                            .instances
                            .contains_key(id.as_bytes())
                            .map_err(backend)?
                        {
                            states.insert(id, rec);
                        }
                    }
                }
            }
            writes.insert(&page, encode_page(&states)?);
        }
        self.state.apply_batch(writes).map_err(backend)?;
        self.flush()?;
        overlay.journal.clear()
    }

    /// The stored heartbeat states of one page.
    fn read_page(&self, page: [u8; 2]) -> Result<BTreeMap<InstanceId, StateRecord>, StoreError> {
        match self.state.get(page).map_err(backend)? {
            Some(v) => decode_page(&page, &v),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Compacts whatever the journal holds (before a backup, or on demand).
    pub(crate) fn compact_now(&self) -> Result<(), StoreError> {
        let mut overlay = self.overlay();
        self.compact(&mut overlay)
    }

    fn instance(&self, id: InstanceId) -> Result<Option<Instance>, StoreError> {
        let Some(v) = self.instances.get(id.as_bytes()).map_err(backend)? else {
            return Ok(None);
        };
        let page = self.read_page(page_of(id))?;
        self.with_state(id, &v, &page).map(Some)
    }

    /// Decodes a stored record and lays the heartbeat state (stored in `page`, then journaled)
    /// over it.
    fn with_state(
        &self,
        id: InstanceId,
        record: &[u8],
        page: &BTreeMap<InstanceId, StateRecord>,
    ) -> Result<Instance, StoreError> {
        let mut inst: Instance = decode_at("instances", id.as_bytes(), record)?;
        let stored = page.get(&id).cloned();
        let pending = self.overlay().states.get(&id).cloned();
        let state = match (stored, pending) {
            (Some(s), Some(p)) => Some(s.merged(p)),
            (s, p) => s.or(p),
        };
        if let Some(state) = state {
            inst.last_seen = state.last_seen;
            if state.metrics.is_some() {
                inst.metrics = state.metrics;
            }
            if let Some(apps) = state.apps {
                inst.apps = apps;
            }
        }
        Ok(inst)
    }

    /// Removes an instance's heartbeat state from its page (outside a transaction).
    fn forget_state(&self, id: InstanceId) -> Result<(), StoreError> {
        let page = page_of(id);
        let mut states = self.read_page(page)?;
        if states.remove(&id).is_some() {
            self.state
                .insert(page, encode_page(&states)?)
                .map_err(backend)?;
        }
        Ok(())
    }

    /// Prunes change-feed entries beyond the retention (best effort, outside transactions).
    fn prune_feed(&self, seq: Seq) -> Result<(), StoreError> {
        if !seq.is_multiple_of(4096) || seq <= FEED_RETENTION {
            return Ok(());
        }
        let cut = u64_key(seq - FEED_RETENTION);
        for key in self.feed.range(..cut.as_slice()).keys() {
            self.feed.remove(key.map_err(backend)?).map_err(backend)?;
        }
        Ok(())
    }

    fn edit_instance(&self, id: InstanceId, f: impl Fn(&mut Instance)) -> Result<Seq, StoreError> {
        let r = (&self.meta, &self.instances, &self.feed).transaction(|(meta, instances, feed)| {
            let Some(mut inst) = get_instance_tx(instances, id)? else {
                return abort(StoreError::instance_not_found(id));
            };
            f(&mut inst);
            instances.insert(id.as_bytes(), tx(encode(&inst))?)?;
            append_change(meta, feed, id, ChangeKind::Upserted)
        });
        let seq = finish(r)?;
        self.flush()?;
        self.prune_feed(seq)?;
        Ok(seq)
    }
}

impl SledStore {
    /// Inserts many instances (an import, a migration) in transactions of `chunk` records, each
    /// flushed once, instead of one transaction and flush per instance. Each instance gets its
    /// change-feed entry as with [`InstanceStore::insert_instance`]. Stops at the first id that
    /// already exists ([`StoreError::AlreadyExists`]); the chunks committed before it stay.
    pub async fn bulk_insert(&self, instances: Vec<Instance>, chunk: usize) -> StoreResult<Seq> {
        self.blocking(move |t| {
            let mut seq = 0;
            for part in instances.chunks(chunk.max(1)) {
                let r = (&t.meta, &t.instances, &t.feed, &t.serials).transaction(
                    |(meta, inst_tree, feed, serials)| {
                        let mut last = 0;
                        for inst in part {
                            if inst_tree.get(inst.id.as_bytes())?.is_some() {
                                return abort(StoreError::instance_exists(inst.id));
                            }
                            inst_tree.insert(inst.id.as_bytes(), tx(encode(inst))?)?;
                            for c in [inst.certificate, inst.next_certificate]
                                .into_iter()
                                .flatten()
                            {
                                serials.insert(c.serial.as_bytes(), inst.id.as_bytes())?;
                            }
                            last = append_change(meta, feed, inst.id, ChangeKind::Upserted)?;
                        }
                        Ok(last)
                    },
                );
                seq = finish(r)?;
                t.flush()?;
            }
            Ok(seq)
        })
        .await
    }
}

#[async_trait]
impl InstanceStore for SledStore {
    async fn insert_instance(&self, instance: &Instance) -> StoreResult<Seq> {
        let inst = instance.clone();
        self.blocking(move |t| {
            let r = (&t.meta, &t.instances, &t.feed, &t.serials).transaction(
                |(meta, instances, feed, serials)| {
                    if instances.get(inst.id.as_bytes())?.is_some() {
                        return abort(StoreError::instance_exists(inst.id));
                    }
                    instances.insert(inst.id.as_bytes(), tx(encode(&inst))?)?;
                    for c in [inst.certificate, inst.next_certificate]
                        .into_iter()
                        .flatten()
                    {
                        serials.insert(c.serial.as_bytes(), inst.id.as_bytes())?;
                    }
                    append_change(meta, feed, inst.id, ChangeKind::Upserted)
                },
            );
            let seq = finish(r)?;
            t.flush()?;
            t.prune_feed(seq)?;
            Ok(seq)
        })
        .await
    }

    async fn get_instance(&self, id: InstanceId) -> StoreResult<Option<Instance>> {
        self.blocking(move |t| t.instance(id)).await
    }

    async fn list_instances(
        &self,
        after: Option<InstanceId>,
        limit: usize,
    ) -> StoreResult<Vec<Instance>> {
        self.blocking(move |t| {
            let iter = match after {
                Some(a) => t.instances.range((
                    std::ops::Bound::Excluded(a.as_bytes().to_vec()),
                    std::ops::Bound::Unbounded,
                )),
                None => t.instances.iter(),
            };
            let mut out = Vec::with_capacity(limit.min(4096));
            // Ids come in ascending order, so pages do too: each is decoded once per scan.
            let mut page: Option<([u8; 2], BTreeMap<InstanceId, StateRecord>)> = None;
            for entry in iter.take(limit) {
                let (key, value) = entry.map_err(backend)?;
                let id = <[u8; 16]>::try_from(key.as_ref())
                    .map(InstanceId::from_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        detail: format!("instances/{} is not an id", crate::hex(&key)),
                        source: None,
                    })?;
                let key = page_of(id);
                if page.as_ref().is_none_or(|(k, _)| *k != key) {
                    page = Some((key, t.read_page(key)?));
                }
                let states = page.as_ref().map(|(_, p)| p);
                out.push(t.with_state(id, &value, states.unwrap_or(&BTreeMap::new()))?);
            }
            Ok(out)
        })
        .await
    }

    async fn set_tags(&self, id: InstanceId, tags: &Tags) -> StoreResult<Seq> {
        let tags = tags.clone();
        self.blocking(move |t| t.edit_instance(id, |i| i.tags = tags.clone()))
            .await
    }

    async fn set_groups(&self, id: InstanceId, groups: &Groups) -> StoreResult<Seq> {
        let groups = groups.clone();
        self.blocking(move |t| t.edit_instance(id, |i| i.groups = groups.clone()))
            .await
    }

    async fn delete_instance(&self, id: InstanceId, now: Timestamp) -> StoreResult<Seq> {
        self.blocking(move |t| {
            let r = (
                &t.meta,
                &t.instances,
                &t.state,
                &t.feed,
                &t.serials,
                &t.revoked,
            )
                .transaction(|(meta, instances, state, feed, serials, revoked)| {
                    let Some(inst) = get_instance_tx(instances, id)? else {
                        return abort(StoreError::instance_not_found(id));
                    };
                    instances.remove(id.as_bytes())?;
                    let page = page_of(id);
                    if let Some(v) = state.get(page)? {
                        let mut states = tx(decode_page(&page, &v))?;
                        if states.remove(&id).is_some() {
                            state.insert(&page, tx(encode_page(&states))?)?;
                        }
                    }
                    revoke_tx(serials, revoked, id, inst.certificate, now)?;
                    revoke_tx(serials, revoked, id, inst.next_certificate, now)?;
                    append_change(meta, feed, id, ChangeKind::Deleted)
                });
            let seq = finish(r)?;
            {
                // A compaction that checked this instance before the deletion committed may have
                // written its state after it; compactions hold the overlay lock, so once we have
                // it, removing the state again leaves no orphan behind.
                let mut overlay = t.overlay();
                overlay.states.remove(&id);
                t.forget_state(id)?;
            }
            t.flush()?;
            t.prune_feed(seq)?;
            Ok(seq)
        })
        .await
    }

    async fn count_instances(&self) -> StoreResult<u64> {
        self.blocking(|t| Ok(t.instances.len() as u64)).await
    }
}

#[async_trait]
impl HeartbeatStore for SledStore {
    async fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = batch.to_vec();
        self.blocking(move |t| t.journal_heartbeats(batch)).await
    }
}

#[async_trait]
impl ChangeFeed for SledStore {
    async fn changes_since(&self, after: Seq, limit: usize) -> StoreResult<Vec<Change>> {
        self.blocking(move |t| {
            let oldest = match t.feed.first().map_err(backend)? {
                Some((k, _)) => read_u64(Some(&k)),
                None => read_u64(t.meta.get(b"seq").map_err(backend)?.as_deref()) + 1,
            };
            let last = read_u64(t.meta.get(b"seq").map_err(backend)?.as_deref());
            if after.saturating_add(1) < oldest && after < last {
                return Err(StoreError::FeedTruncated {
                    requested: after,
                    oldest,
                });
            }
            let start = u64_key(after.saturating_add(1));
            let mut out = Vec::new();
            for entry in t.feed.range(start.as_slice()..).take(limit) {
                let (k, v) = entry.map_err(backend)?;
                out.push(decode_at("feed", &k, &v)?);
            }
            Ok(out)
        })
        .await
    }

    async fn latest_seq(&self) -> StoreResult<Seq> {
        self.blocking(|t| Ok(read_u64(t.meta.get(b"seq").map_err(backend)?.as_deref())))
            .await
    }
}

#[async_trait]
impl TokenStore for SledStore {
    async fn insert_token(&self, token: &RegistrationToken) -> StoreResult<()> {
        let token = token.clone();
        self.blocking(move |t| {
            let value = encode(&token)?;
            match t
                .tokens
                .compare_and_swap(token.id.as_str(), None as Option<&[u8]>, Some(value))
                .map_err(backend)?
            {
                Ok(()) => t.flush(),
                Err(_) => Err(StoreError::AlreadyExists {
                    kind: RecordKind::Token,
                    id: token.id.to_string(),
                }),
            }
        })
        .await
    }

    async fn get_token(&self, id: &TokenId) -> StoreResult<Option<RegistrationToken>> {
        let id = id.clone();
        self.blocking(move |t| match t.tokens.get(id.as_str()).map_err(backend)? {
            Some(v) => Ok(Some(decode_at("tokens", id.as_str().as_bytes(), &v)?)),
            None => Ok(None),
        })
        .await
    }

    async fn list_tokens(&self) -> StoreResult<Vec<RegistrationToken>> {
        self.blocking(|t| {
            let mut all = Vec::new();
            for entry in t.tokens.iter() {
                let (k, v) = entry.map_err(backend)?;
                all.push(decode_at::<RegistrationToken>("tokens", &k, &v)?);
            }
            all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            Ok(all)
        })
        .await
    }

    async fn revoke_token(&self, id: &TokenId, now: Timestamp) -> StoreResult<RegistrationToken> {
        let id = id.clone();
        self.blocking(move |t| {
            let r = t.tokens.transaction(|tokens| {
                let Some(v) = tokens.get(id.as_str())? else {
                    return abort(token_not_found(&id));
                };
                let mut token: RegistrationToken =
                    tx(decode_at("tokens", id.as_str().as_bytes(), &v))?;
                token.revoked_at.get_or_insert(now);
                tokens.insert(id.as_str(), tx(encode(&token))?)?;
                Ok(token)
            });
            let token = finish(r)?;
            t.flush()?;
            Ok(token)
        })
        .await
    }

    async fn append_ledger(&self, entry: &LedgerEntry) -> StoreResult<()> {
        let entry = entry.clone();
        self.blocking(move |t| {
            let r = (&t.tokens, &t.ledger).transaction(|(tokens, ledger)| {
                if tokens.get(entry.token.as_str())?.is_none() {
                    return abort(token_not_found(&entry.token));
                }
                let key = ledger_key(ledger, &entry.token)?;
                ledger.insert(key, tx(encode(&entry))?)?;
                Ok(())
            });
            finish(r)?;
            t.flush()
        })
        .await
    }

    async fn ledger(&self, id: &TokenId, limit: usize) -> StoreResult<Vec<LedgerEntry>> {
        let id = id.clone();
        self.blocking(move |t| {
            let mut out = Vec::new();
            for entry in t.ledger.scan_prefix(id.as_str()).rev().take(limit) {
                let (k, v) = entry.map_err(backend)?;
                out.push(decode_at("ledger", &k, &v)?);
            }
            Ok(out)
        })
        .await
    }

    async fn find_enrollment(
        &self,
        id: &TokenId,
        key: &Fingerprint,
        since: Timestamp,
    ) -> StoreResult<Option<InstanceId>> {
        let k = enrollment_key(id, key);
        self.blocking(move |t| {
            let Some(v) = t.enrollments.get(&k).map_err(backend)? else {
                return Ok(None);
            };
            let (instance, at): (InstanceId, Timestamp) = decode_at("enrollments", &k, &v)?;
            Ok((at >= since
                && t.instances
                    .contains_key(instance.as_bytes())
                    .map_err(backend)?)
            .then_some(instance))
        })
        .await
    }

    async fn enroll(&self, commit: &EnrollCommit) -> StoreResult<EnrollResult> {
        let c = commit.clone();
        self.blocking(move |t| {
            let r = (
                &t.meta,
                &t.tokens,
                &t.instances,
                &t.ledger,
                &t.enrollments,
                &t.serials,
                &t.revoked,
                &t.feed,
            )
                .transaction(
                    |(meta, tokens, instances, ledger, enrollments, serials, revoked, feed)| {
                        let log = |outcome: LedgerOutcome,
                                   instance: Option<InstanceId>|
                         -> TxResult<()> {
                            let entry = LedgerEntry {
                                token: c.token.clone(),
                                at: c.now,
                                outcome,
                                instance,
                                peer: c.peer,
                                key_fingerprint: Some(c.key_fingerprint),
                            };
                            let key = ledger_key(ledger, &c.token)?;
                            ledger.insert(key, tx(encode(&entry))?)?;
                            Ok(())
                        };
                        let Some(tv) = tokens.get(c.token.as_str())? else {
                            return Ok(EnrollResult::UnknownToken);
                        };
                        let mut token: RegistrationToken =
                            tx(decode_at("tokens", c.token.as_str().as_bytes(), &tv))?;
                        if token.revoked_at.is_some() {
                            log(LedgerOutcome::Revoked, None)?;
                            return Ok(EnrollResult::Rejected(TokenState::Revoked));
                        }
                        let ekey = enrollment_key(&c.token, &c.key_fingerprint);
                        if let Some(v) = enrollments.get(&ekey)? {
                            let (instance, at): (InstanceId, Timestamp) =
                                tx(decode_at("enrollments", &ekey, &v))?;
                            if at >= c.retry_since && instances.get(instance.as_bytes())?.is_some()
                            {
                                log(LedgerOutcome::Retried, Some(instance))?;
                                return Ok(EnrollResult::Retry { instance });
                            }
                        }
                        match token.state(c.now) {
                            TokenState::Active => {}
                            state => {
                                log(LedgerOutcome::refused(state), None)?;
                                return Ok(EnrollResult::Rejected(state));
                            }
                        }
                        let (instance, outcome) = match &c.target {
                            EnrollTarget::New(inst) => {
                                if instances.get(inst.id.as_bytes())?.is_some() {
                                    return abort(StoreError::instance_exists(inst.id));
                                }
                                instances.insert(inst.id.as_bytes(), tx(encode(&**inst))?)?;
                                for cert in [inst.certificate, inst.next_certificate]
                                    .into_iter()
                                    .flatten()
                                {
                                    serials.insert(cert.serial.as_bytes(), inst.id.as_bytes())?;
                                }
                                (inst.id, LedgerOutcome::Enrolled)
                            }
                            EnrollTarget::Existing {
                                instance,
                                expected_serial,
                                certificate,
                            } => {
                                let current = get_instance_tx(instances, *instance)?;
                                let matches = current
                                    .as_ref()
                                    .and_then(|i| i.certificate)
                                    .is_some_and(|cert| cert.serial == *expected_serial);
                                let Some(mut inst) =
                                    current.filter(|_| token.allow_reenroll && matches)
                                else {
                                    log(LedgerOutcome::ReenrollRefused, Some(*instance))?;
                                    return Ok(EnrollResult::ReenrollRefused);
                                };
                                let old = inst.certificate.replace(*certificate);
                                let staged = inst.next_certificate.take();
                                revoke_tx(serials, revoked, *instance, old, c.now)?;
                                revoke_tx(serials, revoked, *instance, staged, c.now)?;
                                serials
                                    .insert(certificate.serial.as_bytes(), instance.as_bytes())?;
                                instances.insert(instance.as_bytes(), tx(encode(&inst))?)?;
                                (*instance, LedgerOutcome::Reenrolled)
                            }
                        };
                        token.uses = token.uses.saturating_add(1);
                        tokens.insert(c.token.as_str(), tx(encode(&token))?)?;
                        log(outcome, Some(instance))?;
                        enrollments.insert(ekey, tx(encode(&(instance, c.now)))?)?;
                        let seq = append_change(meta, feed, instance, ChangeKind::Upserted)?;
                        Ok(EnrollResult::Enrolled { seq })
                    },
                );
            let result = finish(r)?;
            t.flush()?;
            if let EnrollResult::Enrolled { seq } = result {
                t.prune_feed(seq)?;
            }
            Ok(result)
        })
        .await
    }
}

#[async_trait]
impl CertificateStore for SledStore {
    async fn load_ca(&self) -> StoreResult<Option<CaMaterial>> {
        self.blocking(|t| match t.meta.get(b"ca").map_err(backend)? {
            Some(v) => Ok(Some(decode_at("meta", b"ca", &v)?)),
            None => Ok(None),
        })
        .await
    }

    async fn init_ca(&self, material: &CaMaterial) -> StoreResult<CaMaterial> {
        let material = material.clone();
        self.blocking(move |t| {
            let value = encode(&material)?;
            let stored = match t
                .meta
                .compare_and_swap(b"ca", None as Option<&[u8]>, Some(value))
                .map_err(backend)?
            {
                Ok(()) => material,
                Err(current) => match current.current {
                    Some(v) => decode_at("meta", b"ca", &v)?,
                    None => material,
                },
            };
            t.flush()?;
            Ok(stored)
        })
        .await
    }

    async fn replace_ca(&self, expected: &CaMaterial, new: &CaMaterial) -> StoreResult<CaMaterial> {
        let (expected, new) = (expected.clone(), new.clone());
        self.blocking(move |t| {
            let stored = match t
                .meta
                .compare_and_swap(b"ca", Some(encode(&expected)?), Some(encode(&new)?))
                .map_err(backend)?
            {
                Ok(()) => new,
                Err(current) => match current.current {
                    Some(v) => decode_at("meta", b"ca", &v)?,
                    None => {
                        return Err(StoreError::NotFound {
                            kind: RecordKind::Ca,
                            id: "ca".into(),
                        });
                    }
                },
            };
            t.flush()?;
            Ok(stored)
        })
        .await
    }

    async fn set_certificate(
        &self,
        id: InstanceId,
        change: CertificateChange,
        now: Timestamp,
    ) -> StoreResult<Seq> {
        self.blocking(move |t| {
            let r = (&t.meta, &t.instances, &t.serials, &t.revoked, &t.feed).transaction(
                |(meta, instances, serials, revoked, feed)| {
                    let Some(mut inst) = get_instance_tx(instances, id)? else {
                        return abort(StoreError::instance_not_found(id));
                    };
                    let update = tx(change.apply(&mut inst))?;
                    for g in update.retired {
                        revoke_tx(serials, revoked, id, g, now)?;
                    }
                    if let Some(c) = update.added {
                        serials.insert(c.serial.as_bytes(), id.as_bytes())?;
                    }
                    instances.insert(id.as_bytes(), tx(encode(&inst))?)?;
                    append_change(meta, feed, id, ChangeKind::Upserted)
                },
            );
            let seq = finish(r)?;
            t.flush()?;
            t.prune_feed(seq)?;
            Ok(seq)
        })
        .await
    }

    async fn revoked_certificates(&self) -> StoreResult<Vec<RevokedCertificate>> {
        self.blocking(|t| {
            let mut out = Vec::new();
            for entry in t.revoked.iter() {
                let (k, v) = entry.map_err(backend)?;
                out.push(decode_at("revoked", &k, &v)?);
            }
            Ok(out)
        })
        .await
    }

    async fn prune_revoked(&self, before: Timestamp) -> StoreResult<usize> {
        self.blocking(move |t| {
            let mut n = 0;
            for entry in t.revoked.iter() {
                let (k, v) = entry.map_err(backend)?;
                let r: RevokedCertificate = decode_at("revoked", &k, &v)?;
                if r.not_after < before {
                    t.revoked.remove(&k).map_err(backend)?;
                    n += 1;
                }
            }
            t.flush()?;
            Ok(n)
        })
        .await
    }
}

/// Key of a status change in the `history` tree: time (order-preserving), instance, statuses.
/// A time as a key: big-endian with the sign bit flipped, so negative times sort first.
fn time_key(at: Timestamp) -> [u8; 8] {
    ((at.as_unix_millis() as u64) ^ (1 << 63)).to_be_bytes()
}

fn history_key(c: &StatusChange) -> Vec<u8> {
    let mut k = Vec::with_capacity(26);
    k.extend_from_slice(&time_key(c.transition.at));
    k.extend_from_slice(c.instance.as_bytes());
    k.push(c.transition.from as u8);
    k.push(c.transition.to as u8);
    k
}

#[async_trait]
impl HistoryStore for SledStore {
    async fn record_status_changes(&self, changes: &[StatusChange]) -> StoreResult<()> {
        let changes = changes.to_vec();
        self.blocking(move |t| {
            let r = (&t.history, &t.history_by_instance).transaction(|(history, by_instance)| {
                for c in &changes {
                    let key = history_key(c);
                    if history.get(&key)?.is_some() {
                        continue;
                    }
                    // `StatusChange` flattens its transition for JSON, which postcard cannot
                    // encode: store the pair.
                    history.insert(key.as_slice(), tx(encode(&(c.instance, c.transition)))?)?;
                    let mut ik = c.instance.as_bytes().to_vec();
                    ik.extend_from_slice(&key);
                    by_instance.insert(ik, &[] as &[u8])?;
                }
                Ok(())
            });
            finish(r)?;
            t.flush()
        })
        .await
    }

    async fn status_changes(&self, query: &StatusChangeQuery) -> StoreResult<Vec<StatusChange>> {
        let query = query.clone();
        self.blocking(move |t| {
            let mut out = Vec::new();
            if query.limit == 0 {
                return Ok(out);
            }
            match query.instance {
                Some(id) => {
                    for entry in t.history_by_instance.scan_prefix(id.as_bytes()).rev() {
                        let (k, _) = entry.map_err(backend)?;
                        let Some(v) = t.history.get(&k[16..]).map_err(backend)? else {
                            continue;
                        };
                        let (instance, transition) = decode_at("history", &k[16..], &v)?;
                        let c = StatusChange {
                            instance,
                            transition,
                        };
                        if query.matches(&c) {
                            out.push(c);
                            if out.len() == query.limit {
                                break;
                            }
                        }
                    }
                }
                None => {
                    // Keys begin with the time: seek straight to the window instead of walking
                    // down from the newest change (callers page backwards with `until`).
                    use std::ops::Bound;
                    let lo = query
                        .since
                        .map_or(Bound::Unbounded, |s| Bound::Included(time_key(s).to_vec()));
                    let hi = query
                        .until
                        .map_or(Bound::Unbounded, |u| Bound::Excluded(time_key(u).to_vec()));
                    for entry in t.history.range::<Vec<u8>, _>((lo, hi)).rev() {
                        let (k, v) = entry.map_err(backend)?;
                        let (instance, transition) = decode_at("history", &k, &v)?;
                        let c = StatusChange {
                            instance,
                            transition,
                        };
                        if query.since.is_some_and(|s| c.transition.at < s) {
                            break;
                        }
                        if query.matches(&c) {
                            out.push(c);
                            if out.len() == query.limit {
                                break;
                            }
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_fleet_alert(&self, alert: &FleetAlert) -> StoreResult<()> {
        let mut key = time_key(alert.at).to_vec();
        key.push(alert.kind as u8);
        let value = encode(alert)?;
        self.blocking(move |t| {
            t.fleet_alerts
                .compare_and_swap(key, None as Option<&[u8]>, Some(value))
                .map_err(backend)?
                .ok();
            t.flush()
        })
        .await
    }

    async fn fleet_alerts(&self, query: &FleetAlertQuery) -> StoreResult<Vec<FleetAlert>> {
        let query = query.clone();
        self.blocking(move |t| {
            let from = query.since.map_or([0u8; 8], time_key);
            let until = query.until.map_or([0xff; 8], time_key);
            let mut out = Vec::new();
            if query.limit == 0 {
                return Ok(out);
            }
            for e in t.fleet_alerts.range(from..until).rev() {
                let (k, v) = e.map_err(backend)?;
                out.push(decode_at("fleet_alerts", &k, &v)?);
                if out.len() == query.limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_trend_buckets(&self, buckets: &[TrendBucket]) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for b in buckets {
            batch.insert(&time_key(b.start), encode(b)?);
        }
        self.blocking(move |t| {
            t.trends.apply_batch(batch).map_err(backend)?;
            t.flush()
        })
        .await
    }

    async fn trend_buckets(
        &self,
        from: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<TrendBucket>> {
        self.blocking(move |t| {
            if from >= until {
                return Ok(Vec::new());
            }
            t.trends
                .range(time_key(from)..time_key(until))
                .map(|e| {
                    let (k, v) = e.map_err(backend)?;
                    decode_at("trends", &k, &v)
                })
                .collect()
        })
        .await
    }

    async fn prune_history(&self, before: Timestamp) -> StoreResult<usize> {
        self.blocking(move |t| {
            let cut = time_key(before);
            let mut n = 0;
            for e in t.history.range(..cut) {
                let (k, _) = e.map_err(backend)?;
                let Some(instance) = k.get(8..24) else {
                    continue;
                };
                let mut ik = instance.to_vec();
                ik.extend_from_slice(&k);
                let r = (&t.history, &t.history_by_instance).transaction(|(h, by)| {
                    h.remove(&*k)?;
                    by.remove(ik.as_slice())?;
                    Ok(())
                });
                finish(r)?;
                n += 1;
            }
            for tree in [&t.fleet_alerts, &t.trends] {
                for e in tree.range(..cut) {
                    let (k, _) = e.map_err(backend)?;
                    tree.remove(k).map_err(backend)?;
                    n += 1;
                }
            }
            t.flush()?;
            Ok(n)
        })
        .await
    }
}
