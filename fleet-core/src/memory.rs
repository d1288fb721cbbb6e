//! `MemoryStore`: the reference store, holding everything in process memory.
//!
//! It implements every store trait exactly as documented and is the first store to run the
//! conformance suite. Use it in tests and for control planes that can rebuild their fleet from
//! elsewhere; nothing survives the process.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::alert::{FleetAlert, FleetAlertQuery};
use crate::ca::{CaMaterial, CertificateRecord, RevokedCertificate};
use crate::command::{
    Command, CommandId, CommandOutcome, CommandQuery, CommandResult, Delivery, Enqueued,
};
use crate::error::{RecordKind, StoreError};
use crate::identity::{Fingerprint, Serial};
use crate::live::StatusChange;
use crate::policy::{Policy, PolicyName};
use crate::store::PolicyStore;
use crate::store::{
    CertificateChange, CertificateStore, Change, ChangeFeed, ChangeKind, CommandStore,
    EnrollCommit, EnrollResult, EnrollTarget, HeartbeatRecord, HeartbeatStore, HistoryStore,
    InstanceStore, Seq, StatusChangeQuery, StoreResult, TokenStore,
};
use crate::token::{LedgerEntry, LedgerOutcome, RegistrationToken, TokenId, TokenState};
use crate::trend::TrendBucket;
use crate::{Groups, Instance, InstanceId, Tags, Timestamp};

/// Default number of change-feed entries a [`MemoryStore`] keeps.
pub const DEFAULT_FEED_CAPACITY: usize = 1 << 20;

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<InstanceId, Instance>,
    feed: VecDeque<Change>,
    last_seq: Seq,
    tokens: BTreeMap<TokenId, RegistrationToken>,
    ledger: HashMap<TokenId, Vec<LedgerEntry>>,
    ca: Option<CaMaterial>,
    /// The key-encryption key fleets over this store share when they have none (see
    /// `volatile_key_encryption_key`).
    kek: Option<crate::seal::KeyEncryptionKey>,
    revoked: BTreeMap<Serial, RevokedCertificate>,
    /// Latest enrollment (not retry) per token and key: the retry-window index.
    enrollments: HashMap<(TokenId, Fingerprint), (InstanceId, Timestamp)>,
    /// Recorded status changes, in recording order, and the set of them.
    history: Vec<StatusChange>,
    recorded: std::collections::HashSet<StatusChange>,
    fleet_alerts: Vec<FleetAlert>,
    policies: BTreeMap<PolicyName, Policy>,
    trends: BTreeMap<Timestamp, TrendBucket>,
    commands: BTreeMap<CommandId, Command>,
    /// (instance, idempotency key) → command.
    command_keys: HashMap<(InstanceId, String), CommandId>,
    /// Open commands by instance, oldest first.
    open_commands: BTreeSet<(InstanceId, CommandId)>,
}

fn token_not_found(id: &TokenId) -> StoreError {
    StoreError::NotFound {
        kind: RecordKind::Token,
        id: id.to_string(),
    }
}

/// A store in process memory; see the module docs.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    feed_capacity: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store keeping the last [`DEFAULT_FEED_CAPACITY`] changes.
    pub fn new() -> Self {
        Self::with_feed_capacity(DEFAULT_FEED_CAPACITY)
    }

    /// An empty store keeping the last `capacity` (at least 1) changes.
    pub fn with_feed_capacity(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            feed_capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated (every mutation below
        // completes before anything that could panic), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    fn revoke(&mut self, instance: InstanceId, cert: Option<CertificateRecord>, now: Timestamp) {
        if let Some(c) = cert {
            self.revoked.entry(c.serial).or_insert(RevokedCertificate {
                serial: c.serial,
                not_after: c.not_after,
                revoked_at: now,
                instance,
            });
        }
    }

    fn log(&mut self, commit: &EnrollCommit, outcome: LedgerOutcome, instance: Option<InstanceId>) {
        self.ledger
            .entry(commit.token.clone())
            .or_default()
            .push(LedgerEntry {
                token: commit.token.clone(),
                at: commit.now,
                outcome,
                instance,
                peer: commit.peer,
                key_fingerprint: Some(commit.key_fingerprint),
            });
    }

    fn recent_enrollment(
        &self,
        id: &TokenId,
        key: &Fingerprint,
        since: Timestamp,
    ) -> Option<InstanceId> {
        let &(instance, at) = self.enrollments.get(&(id.clone(), *key))?;
        (at >= since && self.instances.contains_key(&instance)).then_some(instance)
    }

    fn append(&mut self, instance: InstanceId, kind: ChangeKind, capacity: usize) -> Seq {
        self.last_seq += 1;
        self.feed.push_back(Change {
            seq: self.last_seq,
            instance,
            kind,
        });
        while self.feed.len() > capacity {
            self.feed.pop_front();
        }
        self.last_seq
    }
}

#[async_trait]
impl InstanceStore for MemoryStore {
    async fn insert_instance(&self, instance: &Instance) -> StoreResult<Seq> {
        let mut s = self.lock();
        if s.instances.contains_key(&instance.id) {
            return Err(StoreError::instance_exists(instance.id));
        }
        s.instances.insert(instance.id, instance.clone());
        Ok(s.append(instance.id, ChangeKind::Upserted, self.feed_capacity))
    }

    async fn get_instance(&self, id: InstanceId) -> StoreResult<Option<Instance>> {
        Ok(self.lock().instances.get(&id).cloned())
    }

    async fn list_instances(
        &self,
        after: Option<InstanceId>,
        limit: usize,
    ) -> StoreResult<Vec<Instance>> {
        let s = self.lock();
        let iter: Box<dyn Iterator<Item = &Instance>> = match after {
            Some(a) => Box::new(
                s.instances
                    .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(_, v)| v),
            ),
            None => Box::new(s.instances.values()),
        };
        Ok(iter.take(limit).cloned().collect())
    }

    async fn set_tags(&self, id: InstanceId, tags: &Tags) -> StoreResult<Seq> {
        let mut s = self.lock();
        let inst = s
            .instances
            .get_mut(&id)
            .ok_or_else(|| StoreError::instance_not_found(id))?;
        inst.tags = tags.clone();
        Ok(s.append(id, ChangeKind::Upserted, self.feed_capacity))
    }

    async fn set_groups(&self, id: InstanceId, groups: &Groups) -> StoreResult<Seq> {
        let mut s = self.lock();
        let inst = s
            .instances
            .get_mut(&id)
            .ok_or_else(|| StoreError::instance_not_found(id))?;
        inst.groups = groups.clone();
        Ok(s.append(id, ChangeKind::Upserted, self.feed_capacity))
    }

    async fn delete_instance(&self, id: InstanceId, now: Timestamp) -> StoreResult<Seq> {
        let mut s = self.lock();
        let Some(inst) = s.instances.remove(&id) else {
            return Err(StoreError::instance_not_found(id));
        };
        s.revoke(id, inst.certificate, now);
        s.revoke(id, inst.next_certificate, now);
        Ok(s.append(id, ChangeKind::Deleted, self.feed_capacity))
    }

    async fn count_instances(&self) -> StoreResult<u64> {
        Ok(self.lock().instances.len() as u64)
    }
}

#[async_trait]
impl HeartbeatStore for MemoryStore {
    async fn write_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
        let mut s = self.lock();
        for rec in batch {
            let Some(inst) = s.instances.get_mut(&rec.id) else {
                continue;
            };
            inst.last_seen = rec.last_seen;
            if let Some(m) = &rec.metrics {
                inst.metrics = Some(m.clone());
            }
            if let Some(apps) = &rec.apps {
                inst.apps = apps.clone();
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ChangeFeed for MemoryStore {
    async fn changes_since(&self, after: Seq, limit: usize) -> StoreResult<Vec<Change>> {
        let s = self.lock();
        let oldest = s.feed.front().map_or(s.last_seq + 1, |c| c.seq);
        if after.saturating_add(1) < oldest && after < s.last_seq {
            return Err(StoreError::FeedTruncated {
                requested: after,
                oldest,
            });
        }
        let start = s.feed.partition_point(|c| c.seq <= after);
        Ok(s.feed.range(start..).take(limit).copied().collect())
    }

    async fn latest_seq(&self) -> StoreResult<Seq> {
        Ok(self.lock().last_seq)
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn insert_token(&self, token: &RegistrationToken) -> StoreResult<()> {
        let mut s = self.lock();
        if s.tokens.contains_key(&token.id) {
            return Err(StoreError::AlreadyExists {
                kind: RecordKind::Token,
                id: token.id.to_string(),
            });
        }
        s.tokens.insert(token.id.clone(), token.clone());
        Ok(())
    }

    async fn get_token(&self, id: &TokenId) -> StoreResult<Option<RegistrationToken>> {
        Ok(self.lock().tokens.get(id).cloned())
    }

    async fn list_tokens(&self) -> StoreResult<Vec<RegistrationToken>> {
        let mut all: Vec<_> = self.lock().tokens.values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(all)
    }

    async fn revoke_token(&self, id: &TokenId, now: Timestamp) -> StoreResult<RegistrationToken> {
        let mut s = self.lock();
        let t = s.tokens.get_mut(id).ok_or_else(|| token_not_found(id))?;
        t.revoked_at.get_or_insert(now);
        Ok(t.clone())
    }

    async fn append_ledger(&self, entry: &LedgerEntry) -> StoreResult<()> {
        let mut s = self.lock();
        if !s.tokens.contains_key(&entry.token) {
            return Err(token_not_found(&entry.token));
        }
        s.ledger
            .entry(entry.token.clone())
            .or_default()
            .push(entry.clone());
        Ok(())
    }

    async fn ledger(&self, id: &TokenId, limit: usize) -> StoreResult<Vec<LedgerEntry>> {
        let s = self.lock();
        Ok(s.ledger
            .get(id)
            .map(|l| l.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn find_enrollment(
        &self,
        id: &TokenId,
        key: &Fingerprint,
        since: Timestamp,
    ) -> StoreResult<Option<InstanceId>> {
        Ok(self.lock().recent_enrollment(id, key, since))
    }

    async fn enroll(&self, commit: &EnrollCommit) -> StoreResult<EnrollResult> {
        let mut s = self.lock();
        let Some(token) = s.tokens.get(&commit.token).cloned() else {
            return Ok(EnrollResult::UnknownToken);
        };
        if token.revoked_at.is_some() {
            s.log(commit, LedgerOutcome::Revoked, None);
            return Ok(EnrollResult::Rejected(TokenState::Revoked));
        }
        if let Some(instance) =
            s.recent_enrollment(&commit.token, &commit.key_fingerprint, commit.retry_since)
        {
            s.log(commit, LedgerOutcome::Retried, Some(instance));
            return Ok(EnrollResult::Retry { instance });
        }
        match token.state(commit.now) {
            TokenState::Active => {}
            state => {
                s.log(commit, LedgerOutcome::refused(state), None);
                return Ok(EnrollResult::Rejected(state));
            }
        }
        let (instance, outcome) = match &commit.target {
            EnrollTarget::New(inst) => {
                if s.instances.contains_key(&inst.id) {
                    return Err(StoreError::instance_exists(inst.id));
                }
                s.instances.insert(inst.id, (**inst).clone());
                (inst.id, LedgerOutcome::Enrolled)
            }
            EnrollTarget::Existing {
                instance,
                expected_serial,
                certificate,
            } => {
                let current = s.instances.get(instance).and_then(|i| i.certificate);
                let ok =
                    token.allow_reenroll && current.is_some_and(|c| c.serial == *expected_serial);
                if !ok {
                    s.log(commit, LedgerOutcome::ReenrollRefused, Some(*instance));
                    return Ok(EnrollResult::ReenrollRefused);
                }
                let staged = s.instances.get_mut(instance).and_then(|i| {
                    i.certificate = Some(*certificate);
                    i.next_certificate.take()
                });
                s.revoke(*instance, current, commit.now);
                s.revoke(*instance, staged, commit.now);
                (*instance, LedgerOutcome::Reenrolled)
            }
        };
        if let Some(t) = s.tokens.get_mut(&commit.token) {
            t.uses = t.uses.saturating_add(1);
        }
        s.log(commit, outcome, Some(instance));
        s.enrollments.insert(
            (commit.token.clone(), commit.key_fingerprint),
            (instance, commit.now),
        );
        let seq = s.append(instance, ChangeKind::Upserted, self.feed_capacity);
        Ok(EnrollResult::Enrolled { seq })
    }
}

#[async_trait]
impl CertificateStore for MemoryStore {
    async fn load_ca(&self) -> StoreResult<Option<CaMaterial>> {
        Ok(self.lock().ca.clone())
    }

    async fn init_ca(&self, material: &CaMaterial) -> StoreResult<CaMaterial> {
        Ok(self
            .lock()
            .ca
            .get_or_insert_with(|| material.clone())
            .clone())
    }

    async fn replace_ca(&self, expected: &CaMaterial, new: &CaMaterial) -> StoreResult<CaMaterial> {
        let mut inner = self.lock();
        match &mut inner.ca {
            None => Err(StoreError::NotFound {
                kind: RecordKind::Ca,
                id: "ca".into(),
            }),
            Some(stored) if stored == expected => {
                *stored = new.clone();
                Ok(new.clone())
            }
            Some(stored) => Ok(stored.clone()),
        }
    }

    fn volatile_key_encryption_key(&self) -> Option<crate::seal::KeyEncryptionKey> {
        let mut inner = self.lock();
        if inner.kek.is_none() {
            inner.kek = crate::seal::KeyEncryptionKey::generate().ok();
        }
        inner.kek.clone()
    }

    async fn set_certificate(
        &self,
        id: InstanceId,
        change: CertificateChange,
        now: Timestamp,
    ) -> StoreResult<Seq> {
        let mut s = self.lock();
        let inst = s
            .instances
            .get_mut(&id)
            .ok_or_else(|| StoreError::instance_not_found(id))?;
        let update = change.apply(inst)?;
        for r in update.retired {
            s.revoke(id, r, now);
        }
        Ok(s.append(id, ChangeKind::Upserted, self.feed_capacity))
    }

    async fn revoked_certificates(&self) -> StoreResult<Vec<RevokedCertificate>> {
        Ok(self.lock().revoked.values().copied().collect())
    }

    async fn prune_revoked(&self, before: Timestamp) -> StoreResult<usize> {
        let mut s = self.lock();
        let n = s.revoked.len();
        s.revoked.retain(|_, r| r.not_after >= before);
        Ok(n - s.revoked.len())
    }
}

#[async_trait]
impl HistoryStore for MemoryStore {
    async fn record_status_changes(&self, changes: &[StatusChange]) -> StoreResult<()> {
        let mut s = self.lock();
        for c in changes {
            if s.recorded.insert(*c) {
                s.history.push(*c);
            }
        }
        Ok(())
    }

    async fn status_changes(&self, query: &StatusChangeQuery) -> StoreResult<Vec<StatusChange>> {
        let s = self.lock();
        let mut out: Vec<(usize, StatusChange)> = s
            .history
            .iter()
            .enumerate()
            .filter(|(_, c)| query.matches(c))
            .map(|(i, c)| (i, *c))
            .collect();
        out.sort_by_key(|(i, c)| std::cmp::Reverse((c.transition.at, *i)));
        Ok(out.into_iter().take(query.limit).map(|(_, c)| c).collect())
    }

    async fn record_fleet_alert(&self, alert: &FleetAlert) -> StoreResult<()> {
        let mut s = self.lock();
        if !s
            .fleet_alerts
            .iter()
            .any(|a| a.at == alert.at && a.kind == alert.kind)
        {
            s.fleet_alerts.push(alert.clone());
        }
        Ok(())
    }

    async fn fleet_alerts(&self, query: &FleetAlertQuery) -> StoreResult<Vec<FleetAlert>> {
        let s = self.lock();
        let mut out: Vec<FleetAlert> = s
            .fleet_alerts
            .iter()
            .filter(|a| query.matches(a))
            .cloned()
            .collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.at));
        out.truncate(query.limit);
        Ok(out)
    }

    async fn record_trend_buckets(&self, buckets: &[TrendBucket]) -> StoreResult<()> {
        let mut s = self.lock();
        for b in buckets {
            s.trends.insert(b.start, b.clone());
        }
        Ok(())
    }

    async fn trend_buckets(
        &self,
        from: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<TrendBucket>> {
        if from >= until {
            return Ok(Vec::new());
        }
        Ok(self
            .lock()
            .trends
            .range(from..until)
            .map(|(_, b)| b.clone())
            .collect())
    }

    async fn prune_history(&self, before: Timestamp) -> StoreResult<usize> {
        let mut s = self.lock();
        let n = s.history.len() + s.fleet_alerts.len() + s.trends.len();
        s.history.retain(|c| c.transition.at >= before);
        let State {
            history, recorded, ..
        } = &mut *s;
        recorded.retain(|c| c.transition.at >= before);
        debug_assert_eq!(history.len(), recorded.len());
        s.fleet_alerts.retain(|a| a.at >= before);
        s.trends = s.trends.split_off(&before);
        Ok(n - (s.history.len() + s.fleet_alerts.len() + s.trends.len()))
    }
}

fn command_not_found(id: CommandId) -> StoreError {
    StoreError::NotFound {
        kind: RecordKind::Command,
        id: id.to_string(),
    }
}

#[async_trait]
impl CommandStore for MemoryStore {
    async fn enqueue_commands(&self, commands: &[Command]) -> StoreResult<Vec<Enqueued>> {
        let mut s = self.lock();
        let mut out = Vec::with_capacity(commands.len());
        for c in commands {
            if let Some(key) = &c.idempotency_key
                && let Some(existing) = s
                    .command_keys
                    .get(&(c.instance, key.clone()))
                    .and_then(|id| s.commands.get(id))
            {
                out.push(Enqueued::Existing(existing.clone()));
                continue;
            }
            if s.commands.contains_key(&c.id) {
                return Err(StoreError::AlreadyExists {
                    kind: RecordKind::Command,
                    id: c.id.to_string(),
                });
            }
            if let Some(key) = &c.idempotency_key {
                s.command_keys.insert((c.instance, key.clone()), c.id);
            }
            if !c.state.is_finished() {
                s.open_commands.insert((c.instance, c.id));
            }
            s.commands.insert(c.id, c.clone());
            s.append(c.instance, ChangeKind::CommandQueued, self.feed_capacity);
            out.push(Enqueued::Created(c.clone()));
        }
        Ok(out)
    }

    async fn get_command(&self, id: CommandId) -> StoreResult<Option<Command>> {
        Ok(self.lock().commands.get(&id).cloned())
    }

    async fn list_commands(&self, query: &CommandQuery) -> StoreResult<Vec<Command>> {
        let s = self.lock();
        Ok(s.commands
            .values()
            .rev()
            .filter(|c| query.matches(c))
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn deliver_commands(
        &self,
        instance: InstanceId,
        now: Timestamp,
        lease: std::time::Duration,
        limit: usize,
    ) -> StoreResult<Delivery> {
        let mut s = self.lock();
        let State {
            commands,
            open_commands,
            ..
        } = &mut *s;
        let ids: Vec<CommandId> = open_commands
            .range(
                (instance, CommandId::from_u128(0))..=(instance, CommandId::from_u128(u128::MAX)),
            )
            .map(|&(_, id)| id)
            .collect();
        let mut delivery = Delivery::default();
        for id in ids {
            let Some(c) = commands.get_mut(&id) else {
                continue;
            };
            if c.expired_at(now) {
                c.expire(now);
                open_commands.remove(&(instance, id));
                continue;
            }
            delivery.open += 1;
            if delivery.commands.len() < limit && c.deliverable(now) {
                c.deliver(now, lease);
                delivery.commands.push(c.clone());
            }
        }
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
        let mut s = self.lock();
        let c = s
            .commands
            .get_mut(&id)
            .filter(|c| c.instance == instance)
            .ok_or_else(|| command_not_found(id))?;
        c.complete(outcome, result.clone(), now);
        let c = c.clone();
        if c.state.is_finished() {
            s.open_commands.remove(&(instance, id));
        }
        Ok(c)
    }

    async fn cancel_command(&self, id: CommandId, now: Timestamp) -> StoreResult<Command> {
        let mut s = self.lock();
        let c = s
            .commands
            .get_mut(&id)
            .ok_or_else(|| command_not_found(id))?;
        c.cancel(now)?;
        let c = c.clone();
        s.open_commands.remove(&(c.instance, id));
        Ok(c)
    }

    async fn expire_commands(&self, now: Timestamp) -> StoreResult<usize> {
        let mut s = self.lock();
        let State {
            commands,
            open_commands,
            ..
        } = &mut *s;
        let mut n = 0;
        open_commands.retain(|(_, id)| match commands.get_mut(id) {
            Some(c) if c.expired_at(now) => {
                c.expire(now);
                n += 1;
                false
            }
            Some(_) => true,
            None => false,
        });
        Ok(n)
    }

    async fn instances_with_open_commands(&self) -> StoreResult<Vec<InstanceId>> {
        let s = self.lock();
        let mut out: Vec<InstanceId> = s.open_commands.iter().map(|&(i, _)| i).collect();
        out.dedup();
        Ok(out)
    }

    async fn prune_commands(&self, before: Timestamp) -> StoreResult<usize> {
        let mut s = self.lock();
        let State {
            commands,
            command_keys,
            ..
        } = &mut *s;
        let n = commands.len();
        commands.retain(|_, c| c.finished_at.is_none_or(|f| f >= before));
        command_keys.retain(|_, id| commands.contains_key(id));
        Ok(n - commands.len())
    }
}

#[async_trait]
impl PolicyStore for MemoryStore {
    async fn insert_policy(&self, policy: &Policy) -> StoreResult<()> {
        let mut s = self.lock();
        if s.policies.contains_key(&policy.name) {
            return Err(StoreError::AlreadyExists {
                kind: RecordKind::Policy,
                id: policy.name.to_string(),
            });
        }
        s.policies.insert(policy.name.clone(), policy.clone());
        Ok(())
    }

    async fn list_policies(&self) -> StoreResult<Vec<Policy>> {
        Ok(self.lock().policies.values().cloned().collect())
    }

    async fn delete_policy(&self, name: &PolicyName) -> StoreResult<()> {
        match self.lock().policies.remove(name) {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound {
                kind: RecordKind::Policy,
                id: name.to_string(),
            }),
        }
    }
}
