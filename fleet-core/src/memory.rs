//! `MemoryStore`: the reference store, holding everything in process memory.
//!
//! It implements every store trait exactly as documented and is the first store to run the
//! conformance suite. Use it in tests and for control planes that can rebuild their fleet from
//! elsewhere; nothing survives the process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::error::StoreError;
use crate::store::{
    Change, ChangeFeed, ChangeKind, HeartbeatRecord, HeartbeatStore, InstanceStore, Seq,
    StoreResult,
};
use crate::{Groups, Instance, InstanceId, Tags};

/// Default number of change-feed entries a [`MemoryStore`] keeps.
pub const DEFAULT_FEED_CAPACITY: usize = 1 << 20;

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<InstanceId, Instance>,
    feed: VecDeque<Change>,
    last_seq: Seq,
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

    async fn delete_instance(&self, id: InstanceId) -> StoreResult<Seq> {
        let mut s = self.lock();
        if s.instances.remove(&id).is_none() {
            return Err(StoreError::instance_not_found(id));
        }
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
