//! The live view: the in-memory index of every instance that heartbeats and dashboards use.
//!
//! Nothing here touches the store. Per instance it keeps the staleness state, the figures the
//! summary adds up, the last counter readings (for network rates), tags, groups, tenant and the
//! searchable text — a few hundred bytes. Around that:
//!
//! - **postings**: a roaring bitmap of slots per status, tag key, tag key/value, group and tenant,
//!   so a filter is evaluated with bitmap algebra;
//! - **running totals**, so the whole-fleet summary is O(1);
//! - a **deadline wheel**, so a sweep costs O(transitions) and a sweep with nothing due O(1);
//! - a **text arena**, so an unscoped free-text search is one `memmem` (or Aho-Corasick) pass over
//!   contiguous memory.
//!
//! Instances live in dense slots (`u32`); a removed instance's slot is reused. Lists are in slot
//! order, which is stable for as long as an instance exists; a [`Cursor`] names a slot position.
//!
//! Filters are evaluated by [`query`]: a bounded step at a time, so that
//! [`Fleet`](crate::Fleet) can release the lock between steps and no query holds up heartbeats
//! for more than one step, walking only the scope's tenant (or a smaller posting); that module
//! says what a query evaluated in steps answers.
//!
//! Every mutation carries a version — the store's change-feed sequence number — and a mutation
//! older than what a slot already reflects is ignored, so writes applied out of order (own writes
//! racing the change feed) converge on the store's state.

#[cfg(test)]
mod model_tests;
pub mod query;
mod text;
mod wheel;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use roaring::RoaringBitmap;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::filter::Filter;
use crate::identity::Serial;
use crate::metrics::{CounterReading, MetricsSample, NetworkRates};
use crate::staleness::{Event, StalenessPolicy, StalenessState, Status, Transition, Transitions};
use crate::store::Seq;
use crate::summary::{ABSENT, ABSENT_CPU, Contribution, FleetSummary, RunningTotals};
use crate::tag::{TagKey, TagValue};
use crate::{GroupName, Groups, Instance, InstanceId, Tags, TenantId, TenantScope, Timestamp};

use text::{TextIndex, TextRef};
use wheel::Wheel;

const NO_ID: u32 = u32::MAX;

/// A position in a list of instances, returned with each page (opaque to callers; printed and
/// parsed as text so it can travel in a URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor(u32);

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Cursor {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse()
            .map(Self)
            .map_err(|_| ValidationError::new("cursor", s, "is not a cursor this server issued"))
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    /// The items, in list order.
    pub items: Vec<T>,
    /// Where the next page starts, if there may be more.
    pub next_cursor: Option<Cursor>,
}

/// An instance's latest figures as the live view holds them (CPU at 0.1 % resolution).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveMetrics {
    /// Server time the sample was received.
    pub sampled_at: Timestamp,
    /// CPU utilization, percent.
    pub cpu_percent: Option<f64>,
    /// Memory in use, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Memory installed, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Disk in use, bytes.
    pub disk_used_bytes: Option<u64>,
    /// Disk capacity, bytes.
    pub disk_total_bytes: Option<u64>,
    /// Inbound traffic over the last sample interval, bytes per second.
    pub network_rx_bytes_per_sec: Option<u64>,
    /// Outbound traffic over the last sample interval, bytes per second.
    pub network_tx_bytes_per_sec: Option<u64>,
    /// Seconds since boot, as of `sampled_at`.
    pub uptime_secs: Option<u64>,
    /// 1-minute load average.
    pub load_1m: Option<f64>,
}

/// What the live view knows about one instance: a list row, or the live part of its detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Identity.
    pub id: InstanceId,
    /// Tenant.
    pub tenant: Option<TenantId>,
    /// Hostname.
    pub hostname: String,
    /// IP addresses.
    pub ip_addresses: Vec<IpAddr>,
    /// Current status.
    pub status: Status,
    /// Server time of the last heartbeat.
    pub last_seen: Timestamp,
    /// Registration time.
    pub registered_at: Timestamp,
    /// Tags.
    pub tags: Tags,
    /// Groups.
    pub groups: Groups,
    /// Latest figures, if a sample was ever received.
    pub metrics: Option<LiveMetrics>,
}

/// A status change of one instance, as found by a sweep or a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StatusChange {
    /// Which instance.
    pub instance: InstanceId,
    /// The change.
    #[serde(flatten)]
    pub transition: Transition,
}

/// The labels of an instance that the view indexes.
struct Labels<'a> {
    tenant: Option<&'a TenantId>,
    hostname: &'a str,
    ips: &'a [IpAddr],
    tags: &'a Tags,
    groups: &'a Groups,
}

/// String interner: dense ids for tag keys, tag values, groups and tenants.
#[derive(Debug, Default)]
struct Interner {
    ids: FxHashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(NO_ID - 1);
        self.names.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// Names interned so far (they are never removed).
    fn len(&self) -> usize {
        self.names.len()
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |s| s)
    }
}

/// Cold per-instance data.
#[derive(Debug)]
struct Slot {
    id: InstanceId,
    version: Seq,
    registered_at: Timestamp,
    sampled_at: Timestamp,
    rx_counter: u64,
    tx_counter: u64,
    uptime_secs: u64,
    /// The reported figures shown as they came (NaN: not reported); the aggregates use the
    /// contribution's compact forms.
    cpu_percent: f64,
    load_1m: f64,
    tenant: u32,
    text: TextRef,
    /// Hostname as reported, only when it differs from its lowercase form kept in the arena.
    hostname: Option<Box<str>>,
    tags: Box<[(u32, u32)]>,
    groups: Box<[u32]>,
    /// Serial of the current client certificate.
    serial: Option<Serial>,
    /// Serial of a renewed certificate not used yet.
    next_serial: Option<Serial>,
}

/// How a presented certificate serial relates to an instance's certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateCheck {
    /// The instance's current certificate.
    Current,
    /// The renewed certificate, used for the first time.
    Staged,
    /// Neither: superseded, revoked, or issued for another tenant.
    Refused,
    /// No such instance (never registered, or deregistered).
    UnknownInstance,
}

/// Memory the live view uses, by part (heap bytes; see [`LiveView::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemoryUsage {
    /// Instances held.
    pub instances: usize,
    /// Fixed-size per-slot arrays and the id index.
    pub slots_bytes: usize,
    /// Searchable text arena.
    pub text_bytes: usize,
    /// Deadline wheel.
    pub wheel_bytes: usize,
    /// Posting bitmaps (serialized size, a close estimate of their heap use).
    pub postings_bytes: usize,
}

/// The in-memory fleet index; see the module docs.
#[derive(Debug)]
pub struct LiveView {
    policy: StalenessPolicy,
    index: FxHashMap<InstanceId, u32>,
    slots: Vec<Option<Slot>>,
    contrib: Vec<Contribution>,
    states: Vec<StalenessState>,
    free: Vec<u32>,
    live: RoaringBitmap,
    by_status: [RoaringBitmap; 3],
    tag_keys: Vec<RoaringBitmap>,
    tag_values: FxHashMap<(u32, u32), RoaringBitmap>,
    groups: Vec<RoaringBitmap>,
    tenants: Vec<RoaringBitmap>,
    key_names: Interner,
    value_names: Interner,
    group_names: Interner,
    tenant_names: Interner,
    text: TextIndex,
    wheel: Wheel,
    totals: RunningTotals,
    due: Vec<u32>,
    /// Start-up grace: (control plane started, grace ends). See [`LiveView::begin_grace`].
    grace: Option<(Timestamp, Timestamp)>,
    /// Work done by queries ([`LiveView::query_stats`]).
    query_counters: query::QueryCounters,
}

fn posting(v: &mut Vec<RoaringBitmap>, id: u32) -> &mut RoaringBitmap {
    let i = id as usize;
    if v.len() <= i {
        v.resize_with(i + 1, RoaringBitmap::new);
    }
    &mut v[i]
}

/// The text a `text:` filter term searches for one instance: the hostname folded with
/// [`str::to_lowercase`], then each IP address in its `Display` form, each on a line of its own.
/// A needle matches when it is non-empty, contains neither `\n` nor NUL, and is a substring of
/// this text (so a match never spans two lines). Public so that stores evaluating filters
/// themselves (SQL push-down) fold exactly as the live view does.
pub fn searchable_text(hostname: &str, ips: &[IpAddr]) -> String {
    let mut s = hostname.to_lowercase();
    for ip in ips {
        s.push('\n');
        s.push_str(&ip.to_string());
    }
    s
}

impl LiveView {
    /// An empty view with `policy` (validated).
    pub fn new(policy: StalenessPolicy) -> Result<Self, ValidationError> {
        policy.validate()?;
        Ok(Self {
            policy,
            index: FxHashMap::default(),
            slots: Vec::new(),
            contrib: Vec::new(),
            states: Vec::new(),
            free: Vec::new(),
            live: RoaringBitmap::new(),
            by_status: Default::default(),
            tag_keys: Vec::new(),
            tag_values: FxHashMap::default(),
            groups: Vec::new(),
            tenants: Vec::new(),
            key_names: Interner::default(),
            value_names: Interner::default(),
            group_names: Interner::default(),
            tenant_names: Interner::default(),
            text: TextIndex::default(),
            wheel: Wheel::new(),
            totals: RunningTotals::default(),
            due: Vec::new(),
            grace: None,
            query_counters: query::QueryCounters::default(),
        })
    }

    /// The staleness policy.
    pub fn policy(&self) -> &StalenessPolicy {
        &self.policy
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Instance counts per tenant, each `[online, warning, offline]` (the order of
    /// [`Status::ALL`]); the first entry is `None`, the instances without a tenant. Tenants with
    /// no instance left are skipped. Computed from the status and tenant bitmaps without
    /// visiting any instance (what `/metrics` reports).
    pub fn status_counts_by_tenant(&self) -> Vec<(Option<TenantId>, [u64; 3])> {
        let mut out = vec![(None, std::array::from_fn(|i| self.by_status[i].len()))];
        for (t, bits) in self.tenants.iter().enumerate() {
            if bits.is_empty() {
                continue;
            }
            let counts: [u64; 3] =
                std::array::from_fn(|i| self.by_status[i].intersection_len(bits));
            for (none, n) in out[0].1.iter_mut().zip(counts) {
                *none -= n;
            }
            let name = self.tenant_names.name(u32::try_from(t).unwrap_or(NO_ID));
            out.push((Some(TenantId(name.into())), counts));
        }
        out
    }

    /// Whether the view holds no instance.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether the instance is in the view.
    pub fn contains(&self, id: InstanceId) -> bool {
        self.index.contains_key(&id)
    }

    /// The instance's current status.
    pub fn status(&self, id: InstanceId) -> Option<Status> {
        self.index.get(&id).map(|&s| self.states[s as usize].status)
    }

    /// The instance's tenant (`Some(None)` for an instance without one).
    pub fn tenant(&self, id: InstanceId) -> Option<Option<TenantId>> {
        let slot = self.slot(*self.index.get(&id)?)?;
        Some(self.tenant_of(slot))
    }

    fn slot(&self, s: u32) -> Option<&Slot> {
        self.slots.get(s as usize).and_then(Option::as_ref)
    }

    fn tenant_of(&self, slot: &Slot) -> Option<TenantId> {
        (slot.tenant != NO_ID).then(|| TenantId(self.tenant_names.name(slot.tenant).into()))
    }

    /// Adds or updates an instance from its durable record, as of store version `version`.
    ///
    /// A record older than what the view already reflects (`version` ≤ the slot's) changes
    /// nothing. For an instance already present, tenant, system info, tags and groups are
    /// replaced; a newer `last_seen` counts as a heartbeat received at that time (one made
    /// through another replica), an older one is ignored. A new instance's status is derived
    /// from its `last_seen` at `now`. Returns whether anything was applied.
    pub fn upsert(&mut self, inst: &Instance, version: Seq, now: Timestamp) -> bool {
        if let Some(&s) = self.index.get(&inst.id) {
            if self
                .slot(s)
                .is_some_and(|slot| slot.version >= version && version != 0)
            {
                return false;
            }
            self.unindex_labels(s);
            self.index_labels(s, inst);
            if let Some(slot) = self.slots[s as usize].as_mut() {
                slot.version = slot.version.max(version);
                slot.serial = inst.certificate.map(|c| c.serial);
                slot.next_serial = inst.next_certificate.map(|c| c.serial);
            }
            if inst.last_seen > self.states[s as usize].last_heartbeat {
                self.apply_heartbeat(s, inst.last_seen, inst.metrics.as_ref());
            }
            return true;
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                let Ok(s) = u32::try_from(self.slots.len()) else {
                    return false;
                };
                if s >= (1 << 31) - 1 {
                    return false;
                }
                self.slots.push(None);
                self.contrib.push(Contribution::EMPTY);
                self.states.push(StalenessState::new(Timestamp::UNIX_EPOCH));
                self.wheel.ensure(self.slots.len());
                s
            }
        };
        let status = self.policy.status_at(inst.last_seen, now);
        let state = StalenessState {
            status,
            last_heartbeat: inst.last_seen,
            streak: 0,
        };
        let mut slot = Slot {
            id: inst.id,
            version,
            registered_at: inst.registered_at,
            sampled_at: inst.last_seen,
            rx_counter: ABSENT,
            tx_counter: ABSENT,
            uptime_secs: ABSENT,
            cpu_percent: f64::NAN,
            load_1m: f64::NAN,
            tenant: NO_ID,
            text: TextRef::NONE,
            hostname: None,
            tags: Box::new([]),
            groups: Box::new([]),
            serial: inst.certificate.map(|c| c.serial),
            next_serial: inst.next_certificate.map(|c| c.serial),
        };
        let contribution = match &inst.metrics {
            Some(m) => {
                record_counters(&mut slot, m, inst.last_seen);
                Contribution::from_sample(status, Some(m), NetworkRates::default())
            }
            None => Contribution {
                status,
                ..Contribution::EMPTY
            },
        };
        self.slots[s as usize] = Some(slot);
        self.states[s as usize] = state;
        self.contrib[s as usize] = contribution;
        self.totals.add(&contribution);
        self.by_status[status.index()].insert(s);
        self.live.insert(s);
        self.index.insert(inst.id, s);
        self.index_labels(s, inst);
        self.wheel.schedule(
            s,
            self.policy
                .next_deadline(&state)
                .map(Timestamp::as_unix_millis),
        );
        true
    }

    fn index_labels(&mut self, s: u32, inst: &Instance) {
        let labels = Labels {
            tenant: inst.tenant.as_ref(),
            hostname: &inst.system.hostname,
            ips: &inst.system.ip_addresses,
            tags: &inst.tags,
            groups: &inst.groups,
        };
        self.index_parts(s, &labels);
    }

    fn index_parts(&mut self, s: u32, inst: &Labels<'_>) {
        let tags: Box<[(u32, u32)]> = inst
            .tags
            .iter()
            .map(|(k, v)| {
                let (k, v) = (
                    self.key_names.intern(k.as_str()),
                    self.value_names.intern(v.as_str()),
                );
                posting(&mut self.tag_keys, k).insert(s);
                self.tag_values.entry((k, v)).or_default().insert(s);
                (k, v)
            })
            .collect();
        let groups: Box<[u32]> = inst
            .groups
            .iter()
            .map(|g| {
                let g = self.group_names.intern(g.as_str());
                posting(&mut self.groups, g).insert(s);
                g
            })
            .collect();
        let tenant = match inst.tenant {
            Some(t) => {
                let t = self.tenant_names.intern(t.as_str());
                posting(&mut self.tenants, t).insert(s);
                t
            }
            None => NO_ID,
        };
        let text = searchable_text(inst.hostname, inst.ips);
        let text_ref = self.text.insert(s, &text).unwrap_or(TextRef::NONE);
        let lower_differs = inst.hostname.to_lowercase() != inst.hostname;
        if let Some(slot) = self.slots[s as usize].as_mut() {
            slot.tags = tags;
            slot.groups = groups;
            slot.tenant = tenant;
            slot.text = text_ref;
            slot.hostname = lower_differs.then(|| inst.hostname.into());
        }
    }

    fn unindex_labels(&mut self, s: u32) {
        let Some(slot) = self.slots.get_mut(s as usize).and_then(Option::as_mut) else {
            return;
        };
        let tags = std::mem::take(&mut slot.tags);
        let groups = std::mem::take(&mut slot.groups);
        let tenant = std::mem::replace(&mut slot.tenant, NO_ID);
        let text = std::mem::replace(&mut slot.text, TextRef::NONE);
        for &(k, v) in tags.iter() {
            if let Some(b) = self.tag_keys.get_mut(k as usize) {
                b.remove(s);
            }
            if let Some(b) = self.tag_values.get_mut(&(k, v)) {
                b.remove(s);
                if b.is_empty() {
                    self.tag_values.remove(&(k, v));
                }
            }
        }
        for &g in groups.iter() {
            if let Some(b) = self.groups.get_mut(g as usize) {
                b.remove(s);
            }
        }
        if let Some(b) = self.tenants.get_mut(tenant as usize) {
            b.remove(s);
        }
        self.text.remove(text);
        if self.text.wants_compaction() {
            let refs = self.slots.iter_mut().enumerate().filter_map(|(i, slot)| {
                let slot = slot.as_mut()?;
                Some((u32::try_from(i).ok()?, &mut slot.text))
            });
            self.text.compact(refs);
        }
    }

    /// Checks a certificate serial (and the tenant written in the certificate) against the
    /// instance's current and staged certificates.
    pub fn check_certificate(
        &self,
        id: InstanceId,
        serial: Serial,
        tenant: Option<&TenantId>,
    ) -> CertificateCheck {
        let Some(slot) = self.index.get(&id).and_then(|&s| self.slot(s)) else {
            return CertificateCheck::UnknownInstance;
        };
        if self.tenant_of(slot).as_ref() != tenant {
            return CertificateCheck::Refused;
        }
        if slot.serial == Some(serial) {
            CertificateCheck::Current
        } else if slot.next_serial == Some(serial) {
            CertificateCheck::Staged
        } else {
            CertificateCheck::Refused
        }
    }

    /// Replaces an instance's tags and/or groups as of store version `version`. Returns whether
    /// anything was applied (false for an unknown instance or an outdated version).
    pub fn set_labels(
        &mut self,
        id: InstanceId,
        tags: Option<&Tags>,
        groups: Option<&Groups>,
        version: Seq,
    ) -> bool {
        let Some(&s) = self.index.get(&id) else {
            return false;
        };
        if self
            .slot(s)
            .is_some_and(|slot| slot.version >= version && version != 0)
        {
            return false;
        }
        let Some(current) = self.view_of(s) else {
            return false;
        };
        self.unindex_labels(s);
        self.index_parts(
            s,
            &Labels {
                tenant: current.tenant.as_ref(),
                hostname: &current.hostname,
                ips: &current.ip_addresses,
                tags: tags.unwrap_or(&current.tags),
                groups: groups.unwrap_or(&current.groups),
            },
        );
        if let Some(slot) = self.slots[s as usize].as_mut() {
            slot.version = slot.version.max(version);
        }
        true
    }

    /// Removes an instance as of store version `version`. Returns whether it was present.
    pub fn remove(&mut self, id: InstanceId, version: Seq) -> bool {
        let Some(&s) = self.index.get(&id) else {
            return false;
        };
        if self
            .slot(s)
            .is_some_and(|slot| slot.version > version && version != 0)
        {
            return false;
        }
        self.unindex_labels(s);
        let c = self.contrib[s as usize];
        self.totals.remove(&c);
        self.by_status[c.status.index()].remove(s);
        self.live.remove(s);
        self.wheel.schedule(s, None);
        self.index.remove(&id);
        self.slots[s as usize] = None;
        self.contrib[s as usize] = Contribution::EMPTY;
        self.free.push(s);
        true
    }

    /// Records a heartbeat received at server time `now`, with an optional metrics sample
    /// (assumed valid). Returns the status transitions it caused, or `None` for an unknown
    /// instance.
    pub fn heartbeat(
        &mut self,
        id: InstanceId,
        now: Timestamp,
        metrics: Option<&MetricsSample>,
    ) -> Option<Transitions> {
        let s = *self.index.get(&id)?;
        Some(self.apply_heartbeat(s, now, metrics))
    }

    /// Applies a heartbeat another replica received at `at` (from the store's heartbeat log),
    /// if it is newer than what this view knows; returns the transitions it caused (none when it
    /// is not newer), or `None` for an unknown instance.
    pub fn observe_heartbeat(
        &mut self,
        id: InstanceId,
        at: Timestamp,
        metrics: Option<&MetricsSample>,
    ) -> Option<Transitions> {
        let s = *self.index.get(&id)?;
        if at <= self.states[s as usize].last_heartbeat {
            return Some(Transitions::default());
        }
        Some(self.apply_heartbeat(s, at, metrics))
    }

    fn apply_heartbeat(
        &mut self,
        s: u32,
        now: Timestamp,
        metrics: Option<&MetricsSample>,
    ) -> Transitions {
        let i = s as usize;
        let mut before = self.states[i];
        if let Some((started, until)) = self.grace
            && now < until
            && before.last_heartbeat < started
        {
            // Its status is the one it had at the horizon; what happened after that went unseen,
            // so there is nothing to catch up on: only a recovery, if it was not online.
            before.last_heartbeat = now;
        }
        let (state, transitions) = self.policy.step(before, Event::Heartbeat, now);
        let old = self.contrib[i];
        let mut new = Contribution {
            status: state.status,
            ..old
        };
        if let (Some(m), Some(slot)) = (metrics, self.slots[i].as_mut()) {
            let prev = CounterReading {
                at: slot.sampled_at,
                rx: (slot.rx_counter != ABSENT).then_some(slot.rx_counter),
                tx: (slot.tx_counter != ABSENT).then_some(slot.tx_counter),
            };
            let next = CounterReading {
                at: now,
                rx: m.network_rx_bytes,
                tx: m.network_tx_bytes,
            };
            let rates = NetworkRates::between(prev, next);
            record_counters(slot, m, now);
            new = Contribution::from_sample(state.status, Some(m), rates);
        }
        self.set_state(s, state, old, new);
        transitions
    }

    fn set_state(&mut self, s: u32, state: StalenessState, old: Contribution, new: Contribution) {
        let i = s as usize;
        if old != new {
            self.totals.remove(&old);
            self.totals.add(&new);
            self.contrib[i] = new;
        }
        if old.status != new.status {
            self.by_status[old.status.index()].remove(s);
            self.by_status[new.status.index()].insert(s);
        }
        self.states[i] = state;
        self.wheel.schedule(
            s,
            self.policy
                .next_deadline(&state)
                .map(Timestamp::as_unix_millis),
        );
    }

    /// Applies every status change due at `now` and returns them, in no particular order across
    /// instances (each instance's own changes are in order). Costs O(changes) plus O(1).
    ///
    /// During a start-up grace ([`begin_grace`](Self::begin_grace)) instances last heard from
    /// before the start are left alone until the grace ends.
    pub fn sweep(&mut self, now: Timestamp) -> Vec<StatusChange> {
        let grace = self.grace.filter(|&(_, until)| now < until);
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        self.wheel.take_due(now.as_unix_millis(), &mut due);
        let mut out = Vec::new();
        for &s in &due {
            let i = s as usize;
            let Some(id) = self.slot(s).map(|slot| slot.id) else {
                continue;
            };
            if let Some((started, until)) = grace
                && self.states[i].last_heartbeat < started
            {
                self.wheel.schedule(s, Some(until.as_unix_millis()));
                continue;
            }
            let (state, transitions) = self.policy.step(self.states[i], Event::Tick, now);
            let old = self.contrib[i];
            self.set_state(
                s,
                state,
                old,
                Contribution {
                    status: state.status,
                    ..old
                },
            );
            out.extend(transitions.into_iter().map(|transition| StatusChange {
                instance: id,
                transition,
            }));
        }
        self.due = due;
        out
    }

    /// Starts a start-up grace: a control plane that was down cannot tell a silent instance from
    /// one it simply could not hear, so until `until` no instance last heard from before
    /// `started` is marked warning or offline.
    ///
    /// Each instance is shown with the status it had at the *horizon* — when the previous control
    /// plane last swept (`horizon`, from the stored trend buckets), or else the latest heartbeat
    /// the store knew of — so its silence while nobody was listening is not held against it. One
    /// that was online then and heartbeats before `until` stays online without catch-up
    /// transitions; one that was warning or offline then is caught up as usual (its recovery is
    /// recorded). When the grace ends, instances still silent change status at their exact
    /// threshold-crossing times. Returns how many instances' shown status changed.
    pub fn begin_grace(
        &mut self,
        started: Timestamp,
        until: Timestamp,
        horizon: Option<Timestamp>,
    ) -> usize {
        let horizon = horizon
            .or_else(|| {
                self.live
                    .iter()
                    .map(|s| self.states[s as usize].last_heartbeat)
                    .max()
            })
            .unwrap_or(started)
            .min(started);
        self.grace = Some((started, until));
        let mut changed = 0;
        let slots: Vec<u32> = self.live.iter().collect();
        for s in slots {
            let i = s as usize;
            let state = self.states[i];
            let target = self
                .policy
                .status_at(state.last_heartbeat, horizon.max(state.last_heartbeat));
            if state.status != target {
                let old = self.contrib[i];
                let new = Contribution {
                    status: target,
                    ..old
                };
                self.set_state(
                    s,
                    StalenessState {
                        status: target,
                        ..state
                    },
                    old,
                    new,
                );
                changed += 1;
            }
        }
        changed
    }

    /// Whether a start-up grace is running at `now`.
    pub fn in_grace(&self, now: Timestamp) -> bool {
        self.grace.is_some_and(|(_, until)| now < until)
    }

    /// Summary of the instances `filter` selects within `scope`. The unfiltered, unscoped summary
    /// is O(1); any other costs O(instances of the scope, or of the smallest posting a term
    /// names). Runs to the end on this view: [`Fleet::summary`](crate::Fleet::summary) releases
    /// the lock between steps instead.
    pub fn summary(&self, filter: &Filter, scope: &TenantScope) -> FleetSummary {
        query::summary(self, filter, scope, query::Tuning::DEFAULT)
    }

    /// Number of instances with status `s` in the whole view (O(1)).
    pub fn count(&self, s: Status) -> u64 {
        self.totals.count(s)
    }

    /// Ids of every instance `filter` selects within `scope`, in list order.
    pub fn matching(&self, filter: &Filter, scope: &TenantScope) -> Vec<InstanceId> {
        query::matching(self, filter, scope, query::Tuning::DEFAULT)
    }

    /// A page of at most `limit` instances `filter` selects within `scope`, starting after
    /// `after`, in slot order; `next_cursor` is set when more follow.
    pub fn list(
        &self,
        filter: &Filter,
        scope: &TenantScope,
        after: Option<Cursor>,
        limit: usize,
    ) -> Page<InstanceView> {
        query::list(self, filter, scope, after, limit, query::Tuning::DEFAULT)
    }

    /// The live view of one instance, if visible in `scope`.
    pub fn get(&self, id: InstanceId, scope: &TenantScope) -> Option<InstanceView> {
        let s = *self.index.get(&id)?;
        let v = self.view_of(s)?;
        scope.allows(v.tenant.as_ref()).then_some(v)
    }

    /// The instance's current figures as a graph point (cheap: no strings are built).
    pub(crate) fn point(&self, id: InstanceId) -> Option<crate::recent::MetricsPoint> {
        let s = *self.index.get(&id)? as usize;
        let c = self.contrib.get(s)?;
        let slot = self.slots.get(s)?.as_ref()?;
        if !c.has_sample {
            return None;
        }
        let pct = |used: u64, total: u64| {
            (used != ABSENT && total != ABSENT && total > 0)
                .then(|| used as f64 * 100.0 / total as f64)
        };
        let rate = |r: u64| (r != ABSENT).then_some(r as f64);
        Some(crate::recent::MetricsPoint {
            at: slot.sampled_at,
            cpu_percent: (c.cpu != ABSENT_CPU).then(|| f64::from(c.cpu) / 10.0),
            memory_percent: pct(c.mem_used, c.mem_total),
            disk_percent: pct(c.disk_used, c.disk_total),
            network_rx_bytes_per_sec: rate(c.rx_rate),
            network_tx_bytes_per_sec: rate(c.tx_rate),
        })
    }

    fn view_of(&self, s: u32) -> Option<InstanceView> {
        let slot = self.slot(s)?;
        let c = &self.contrib[s as usize];
        let state = &self.states[s as usize];
        let text = self.text.get(slot.text);
        let mut lines = text.split('\n');
        let lower_host = lines.next().unwrap_or_default();
        let hostname = slot.hostname.as_deref().unwrap_or(lower_host).to_owned();
        let ip_addresses = lines.filter_map(|l| l.parse().ok()).collect();
        let tags = Tags(
            slot.tags
                .iter()
                .map(|&(k, v)| {
                    (
                        TagKey(self.key_names.name(k).into()),
                        TagValue(self.value_names.name(v).into()),
                    )
                })
                .collect(),
        );
        let groups = Groups(
            slot.groups
                .iter()
                .map(|&g| GroupName(self.group_names.name(g).into()))
                .collect(),
        );
        let opt = |v: u64| (v != ABSENT).then_some(v);
        let metrics = c.has_sample.then(|| LiveMetrics {
            sampled_at: slot.sampled_at,
            cpu_percent: (!slot.cpu_percent.is_nan()).then_some(slot.cpu_percent),
            memory_used_bytes: opt(c.mem_used),
            memory_total_bytes: opt(c.mem_total),
            disk_used_bytes: opt(c.disk_used),
            disk_total_bytes: opt(c.disk_total),
            network_rx_bytes_per_sec: opt(c.rx_rate),
            network_tx_bytes_per_sec: opt(c.tx_rate),
            uptime_secs: opt(slot.uptime_secs),
            load_1m: (!slot.load_1m.is_nan()).then_some(slot.load_1m),
        });
        Some(InstanceView {
            id: slot.id,
            tenant: self.tenant_of(slot),
            hostname,
            ip_addresses,
            status: state.status,
            last_seen: state.last_heartbeat,
            registered_at: slot.registered_at,
            tags,
            groups,
            metrics,
        })
    }

    /// Heap memory held, by part. Per-slot arrays are counted at capacity; boxed tags, groups and
    /// mixed-case hostnames are counted at their length (allocator overhead excluded).
    pub fn memory(&self) -> MemoryUsage {
        let per_slot =
            size_of::<Option<Slot>>() + size_of::<Contribution>() + size_of::<StalenessState>();
        let boxed: usize = self
            .slots
            .iter()
            .flatten()
            .map(|s| {
                s.tags.len() * 8 + s.groups.len() * 4 + s.hostname.as_ref().map_or(0, |h| h.len())
            })
            .sum();
        let index = self.index.capacity() * (size_of::<(InstanceId, u32)>() + 1);
        let postings = self.live.serialized_size()
            + self
                .by_status
                .iter()
                .map(RoaringBitmap::serialized_size)
                .sum::<usize>()
            + self
                .tag_keys
                .iter()
                .map(RoaringBitmap::serialized_size)
                .sum::<usize>()
            + self
                .tag_values
                .values()
                .map(RoaringBitmap::serialized_size)
                .sum::<usize>()
            + self
                .groups
                .iter()
                .map(RoaringBitmap::serialized_size)
                .sum::<usize>()
            + self
                .tenants
                .iter()
                .map(RoaringBitmap::serialized_size)
                .sum::<usize>();
        MemoryUsage {
            instances: self.len(),
            slots_bytes: self.slots.capacity() * per_slot + boxed + index,
            text_bytes: self.text.heap_bytes(),
            wheel_bytes: self.wheel.heap_bytes(),
            postings_bytes: postings,
        }
    }
}

fn record_counters(slot: &mut Slot, m: &MetricsSample, at: Timestamp) {
    slot.sampled_at = at;
    slot.rx_counter = m.network_rx_bytes.unwrap_or(ABSENT);
    slot.tx_counter = m.network_tx_bytes.unwrap_or(ABSENT);
    slot.uptime_secs = m.uptime_secs.map_or(ABSENT, |u| u.min(ABSENT - 1));
    slot.cpu_percent = m.cpu_percent.unwrap_or(f64::NAN);
    slot.load_1m = m.load_1m.unwrap_or(f64::NAN);
}
