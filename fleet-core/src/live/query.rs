//! Filter evaluation over the live view, a bounded step at a time.
//!
//! Heartbeats take the view's lock for writing; a summary, list or selection takes it for
//! reading. A query therefore never evaluates the whole fleet under one lock hold: it advances a
//! step at a time, each step doing a budget of work estimated at ≈ 50 µs (from ~250 instances for
//! the heaviest filter the parser accepts to ~3,300 for a plain tag filter; at least one), and
//! [`Fleet`](crate::Fleet) releases the lock between steps, so a heartbeat waits for at most one
//! step. (The lock prefers writers: a waiting heartbeat gets it before the query's next step.)
//! Between steps the query's thread also offers the CPU to other threads
//! ([`std::thread::yield_now`]): on a busy core, a heartbeat's thread then runs after the current
//! step instead of at the end of the query thread's time slice. A transport that serves
//! heartbeats on async workers should run filtered queries on a blocking thread (the operator API
//! of the examples does), so that the workers are never busy with one.
//!
//! # Which instances a query touches
//!
//! A query walks one **driver** posting in slot order, from a continuation slot: the scope's
//! tenant posting, or the smallest posting a term names (`env=prod`, `group:db`, `status:online`,
//! a tag key), or every instance. A tenant-scoped query only evaluates instances of its tenant:
//! its driver is the tenant's posting, or a smaller posting whose slots are first checked against
//! the tenant's posting — a bitmap lookup, without reading the other instance. Each visited
//! instance is evaluated against the compiled filter (interned ids, a bitmask for statuses, one
//! matcher per `text:` term: a `memmem` search per value for a few values, one Aho-Corasick
//! automaton for more) with the cheapest checks first.
//!
//! An **unscoped** query with a `text:` term may instead search the text arena first, a range of
//! entries per step (`memmem` passes or the automaton over contiguous bytes, much cheaper per
//! instance than reading each instance's text), when that is estimated to cost less than visiting
//! the driver's instances; the instances found are then evaluated like any other. Scoped queries
//! never do this: the arena holds every tenant's text.
//!
//! [`LiveView::query_stats`] counts instances evaluated and texts searched ([`QueryStats`]), which
//! is how the tests show that a tenant's query touches its own instances only.
//!
//! # What a query evaluated in steps answers
//!
//! Between two steps the view may change, so a query sees each instance at one moment — under
//! the lock, in the step that reaches its slot — and different instances at different moments,
//! as a list read page by page always has. What holds:
//!
//! - **No instance twice.** Slots are visited in ascending order, each once, and an instance keeps
//!   its slot for as long as it exists.
//! - **Exact for what does not change.** An instance that exists and keeps its labels for the
//!   whole query is answered if and only if it matches the filter at the moment its slot is
//!   reached, with its state of that moment (a summary counts its status then).
//! - **Order and cursors.** Lists are in slot order; a page's cursor is the slot of its last row,
//!   and the next page starts after it, exactly as before.
//! - **Changes during the query** (a registration, a removal, a relabelling) are seen or not, as
//!   if they had happened just before or just after: an instance relabelled between the arena
//!   search and its evaluation may be missed, one registered into a slot already passed is not
//!   answered, and one removed before its slot is reached is not answered. An instance is never
//!   answered with labels that do not match: a name that first appears during the query
//!   (`env=dev` while the filter says `env!=dev`) is judged by what it means when the instance is
//!   evaluated.
//!
//! A copy-on-write snapshot would answer for a single moment, but every heartbeat would then pay
//! for copying what a reader holds, and each instance would carry a reference count on top of its
//! ≤ 512 bytes; the guarantees above are the ones a paged list already documents, and all that a
//! summary of a fleet that changes every second can mean.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use roaring::RoaringBitmap;
use serde::Serialize;

use super::text::TextMatcher;
use super::{Cursor, InstanceView, LiveView, NO_ID, Page, Slot};
use crate::filter::{Filter, TagSelector, Term};
use crate::summary::{Accumulator, FleetSummary};
use crate::{InstanceId, TenantScope};

/// Work one step may do, in rough nanoseconds of one core (50 µs), so that an estimate off by a
/// factor of twenty still keeps a step, and a heartbeat's wait, near 1 ms. (Measured, release
/// build at 1,000,000 instances: steps of the heaviest filter, estimated at ~195 per instance,
/// take 33–36 µs, the slowest step of any query ~0.1–0.17 ms. Steps of 100 µs let heartbeats
/// wait noticeably longer under load, `fleet-bench filter`, for the same query throughput.)
pub(crate) const STEP_BUDGET: u64 = 50_000;

/// How queries are stepped: the budget of a step and, in tests, when the arena is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuning {
    /// Work per step ([`STEP_BUDGET`]).
    pub(crate) budget: u64,
    /// When an unscoped text query searches the arena.
    pub(crate) arena: ArenaMode,
}

impl Tuning {
    /// What the view and `Fleet` use.
    pub(crate) const DEFAULT: Self = Self {
        budget: STEP_BUDGET,
        arena: ArenaMode::Auto,
    };
}
/// Visiting one slot of the driver (iterating, the scope's membership test).
const VISIT_COST: u64 = 5;
/// A match that becomes a list row (strings, tags and groups copied).
const ROW_COST: u64 = 1_000;
/// A match that is added to a summary or an id list.
pub(crate) const COUNT_COST: u64 = 10;
/// Evaluating one instance's text with one `text:` term: finding the text (on top of searching
/// it).
const TEXT_COST: u64 = 5;
/// An arena match: finding its entry and checking it is the slot's live text (a slot read).
const HIT_COST: u64 = 100;

/// Entries of the arena the first step of a search takes: what `budget` affords if every entry
/// (of `entry_bytes` on average) matched.
fn first_entries(budget: u64, per_kib: u64, entry_bytes: usize) -> usize {
    let per_entry = HIT_COST + (entry_bytes as u64).saturating_mul(per_kib) / 1024;
    usize::try_from(budget / per_entry.max(1)).unwrap_or(usize::MAX)
}

/// Compactions of the text arena after which an arena search gives up and the query evaluates
/// instance by instance instead (each compaction moves every entry; it needs half the arena to
/// have died, so this is never reached in practice).
const MAX_RESTARTS: u32 = 2;

/// Work done by queries since the view was created (cumulative; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueryStats {
    /// Steps taken, each one hold of the view's lock.
    pub steps: u64,
    /// Instances evaluated against a filter.
    pub evaluated: u64,
    /// Instance texts searched by an arena search (evaluated instances' texts are not counted
    /// here).
    pub texts_scanned: u64,
}

/// The counters behind [`QueryStats`]; queries hold the view shared, hence atomics.
#[derive(Debug, Default)]
pub(crate) struct QueryCounters {
    steps: AtomicU64,
    evaluated: AtomicU64,
    texts_scanned: AtomicU64,
}

impl LiveView {
    /// Work done by queries so far.
    pub fn query_stats(&self) -> QueryStats {
        let c = &self.query_counters;
        QueryStats {
            steps: c.steps.load(Ordering::Relaxed),
            evaluated: c.evaluated.load(Ordering::Relaxed),
            texts_scanned: c.texts_scanned.load(Ordering::Relaxed),
        }
    }
}

/// One term, compiled against the view's interned names. A name the view never interned is
/// `None` (no instance has it); value and group lists are sorted ids.
#[derive(Debug)]
enum Check {
    /// Bit `Status::index()` set for each wanted status.
    Status(u8),
    Groups(Box<[u32]>),
    Tenants(Box<[u32]>),
    /// Index into the query's text matchers.
    Text(usize),
    Has(Option<u32>),
    Lacks(Option<u32>),
    In(Option<u32>, Box<[u32]>),
    NotIn(Option<u32>, Box<[u32]>),
}

fn log2(n: usize) -> u64 {
    u64::from(usize::BITS - n.leading_zeros())
}

impl Check {
    fn never(&self, texts: &[TextMatcher]) -> bool {
        match self {
            Self::Status(m) => *m == 0,
            Self::Groups(g) | Self::Tenants(g) => g.is_empty(),
            Self::Text(i) => texts.get(*i).is_none_or(TextMatcher::never),
            Self::Has(k) => k.is_none(),
            Self::In(k, v) => k.is_none() || v.is_empty(),
            Self::Lacks(_) | Self::NotIn(..) => false,
        }
    }

    /// Rough cost of evaluating it on one instance (≈ ns).
    fn cost(&self, texts: &[TextMatcher]) -> u64 {
        match self {
            Self::Status(_) => 2,
            Self::Groups(g) | Self::Tenants(g) => 4 + 2 * log2(g.len()),
            Self::Has(_) | Self::Lacks(_) => 6,
            Self::In(_, v) | Self::NotIn(_, v) => 8 + 2 * log2(v.len()),
            Self::Text(i) => TEXT_COST + texts.get(*i).map_or(0, TextMatcher::cost_per_instance),
        }
    }

    /// Whether evaluating it reads the instance's slot (its labels), not only its status.
    fn reads_slot(&self) -> bool {
        !matches!(self, Self::Status(_))
    }

    /// `slot` is the instance's, fetched when some check of the plan [reads it](Self::reads_slot)
    /// (`None` otherwise).
    fn eval(&self, view: &LiveView, texts: &[TextMatcher], s: u32, slot: Option<&Slot>) -> bool {
        let tag_in = |slot: &Slot, k: &Option<u32>, vals: &[u32]| {
            k.is_some_and(|k| {
                slot.tags
                    .iter()
                    .any(|&(kk, vv)| kk == k && vals.binary_search(&vv).is_ok())
            })
        };
        let has = |slot: &Slot, k: &Option<u32>| {
            k.is_some_and(|k| slot.tags.iter().any(|&(kk, _)| kk == k))
        };
        match (self, slot) {
            (Self::Status(mask), _) => view
                .states
                .get(s as usize)
                .is_some_and(|st| mask & (1 << st.status.index()) != 0),
            (_, None) => false,
            (Self::Groups(ids), Some(slot)) => {
                slot.groups.iter().any(|g| ids.binary_search(g).is_ok())
            }
            (Self::Tenants(ids), Some(slot)) => {
                slot.tenant != NO_ID && ids.binary_search(&slot.tenant).is_ok()
            }
            (Self::Text(i), Some(slot)) => texts
                .get(*i)
                .is_some_and(|m| m.is_match(view.text.bytes(slot.text))),
            (Self::Has(k), Some(slot)) => has(slot, k),
            (Self::Lacks(k), Some(slot)) => !has(slot, k),
            (Self::In(k, vals), Some(slot)) => tag_in(slot, k, vals),
            (Self::NotIn(k, vals), Some(slot)) => !tag_in(slot, k, vals),
        }
    }
}

/// The posting a query walks (see the module docs). Postings are looked up again at every step,
/// so the walk always follows the current view.
#[derive(Debug)]
enum Driver {
    Nothing,
    Live,
    Status(usize),
    Key(u32),
    Value(u32, u32),
    Group(u32),
    Tenant(u32),
    /// Instances an arena search found (the query's own bitmap).
    Found(RoaringBitmap),
}

impl Driver {
    fn bitmap<'a>(&'a self, v: &'a LiveView) -> Option<&'a RoaringBitmap> {
        match self {
            Self::Nothing => None,
            Self::Live => Some(&v.live),
            Self::Status(i) => v.by_status.get(*i),
            Self::Key(k) => v.tag_keys.get(*k as usize),
            Self::Value(k, val) => v.tag_values.get(&(*k, *val)),
            Self::Group(g) => v.groups.get(*g as usize),
            Self::Tenant(t) => v.tenants.get(*t as usize),
            Self::Found(b) => Some(b),
        }
    }

    fn len(&self, v: &LiveView) -> u64 {
        self.bitmap(v).map_or(0, RoaringBitmap::len)
    }
}

/// An arena search in progress.
#[derive(Debug)]
struct ArenaSearch {
    /// Which text matcher.
    text: usize,
    /// Next entry of the arena.
    entry: usize,
    /// The arena's generation the entry numbers belong to.
    generation: u64,
    restarts: u32,
    /// Entries of the arena the next step searches: sized from what the last step cost, so that
    /// a value matching in every entry (`text:0`) does not make steps longer than their budget.
    entries: usize,
    found: RoaringBitmap,
    /// The check the driver stood for (with its term's index), evaluated again once the driver
    /// is `found`.
    implied: Option<(usize, Check)>,
}

/// The filter compiled against the view, on the query's first step.
#[derive(Debug)]
struct Plan {
    /// Each with the index of its term in the filter; cheapest first.
    checks: Vec<(usize, Check)>,
    /// Σ cost of the checks.
    weight: u64,
    /// Whether a check reads the instance's slot.
    reads_slot: bool,
    driver: Driver,
    /// The tenant posting a visited slot must be in, when the driver is not that posting.
    scope: Option<u32>,
    search: Option<ArenaSearch>,
    /// How many names the view had interned when the checks were compiled ([`interned`]).
    interned: [usize; 4],
}

/// Names the view has interned, by kind: they only ever grow, so an unchanged count means every
/// name a plan looked up still resolves as it did.
fn interned(view: &LiveView) -> [usize; 4] {
    [
        view.key_names.len(),
        view.value_names.len(),
        view.group_names.len(),
        view.tenant_names.len(),
    ]
}

/// A term compiled against the view's names; `text` is the index of the term's matcher, for a
/// `text:` term.
fn compile_term(view: &LiveView, term: &Term, text: usize) -> Check {
    let ids = |names: &mut dyn Iterator<Item = Option<u32>>| -> Box<[u32]> {
        let mut v: Vec<u32> = names.flatten().collect();
        v.sort_unstable();
        v.dedup();
        v.into()
    };
    match term {
        Term::Status(st) => Check::Status(st.iter().fold(0, |m, s| m | (1 << s.index()))),
        Term::Group(g) => {
            Check::Groups(ids(&mut g.iter().map(|g| view.group_names.get(g.as_str()))))
        }
        Term::Tenant(t) => Check::Tenants(ids(&mut t
            .iter()
            .map(|t| view.tenant_names.get(t.as_str())))),
        Term::Text(_) => Check::Text(text),
        Term::Tag(sel) => {
            let k = view.key_names.get(sel.key().as_str());
            let vals = |vs: &[crate::TagValue]| {
                ids(&mut vs.iter().map(|v| view.value_names.get(v.as_str())))
            };
            match sel {
                TagSelector::Exists(_) => Check::Has(k),
                TagSelector::Absent(_) => Check::Lacks(k),
                TagSelector::Eq(_, v) => Check::In(k, vals(std::slice::from_ref(v))),
                TagSelector::NotEq(_, v) => Check::NotIn(k, vals(std::slice::from_ref(v))),
                TagSelector::In(_, vs) => Check::In(k, vals(vs)),
                TagSelector::NotIn(_, vs) => Check::NotIn(k, vals(vs)),
            }
        }
    }
}

/// Whether an unscoped query with a `text:` term searches the arena first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArenaMode {
    /// When estimated cheaper than visiting the driver's instances.
    Auto,
    /// Never (tests).
    #[cfg(test)]
    Never,
    /// Whenever allowed (tests).
    #[cfg(test)]
    Always,
}

/// A query in progress: a filter within a scope, from a slot on; see the module docs.
#[derive(Debug)]
pub(crate) struct Query<'f> {
    filter: &'f Filter,
    scope: &'f TenantScope,
    /// One per `text:` term, in filter order (built before the first step, outside any lock).
    texts: Vec<TextMatcher>,
    plan: Option<Plan>,
    /// Next slot to visit; `None` once finished.
    next: Option<u32>,
    /// Budget cost of one match.
    match_cost: u64,
    budget: u64,
    arena: ArenaMode,
}

impl<'f> Query<'f> {
    /// A query over slots `from..`, each match costing `match_cost` of a step's budget.
    pub(crate) fn new(
        filter: &'f Filter,
        scope: &'f TenantScope,
        from: u32,
        match_cost: u64,
        tuning: Tuning,
    ) -> Self {
        let texts = filter
            .terms()
            .iter()
            .filter_map(|t| match t {
                Term::Text(needles) => Some(TextMatcher::new(needles)),
                _ => None,
            })
            .collect();
        Self {
            filter,
            scope,
            texts,
            plan: None,
            next: Some(from),
            match_cost,
            budget: tuning.budget.max(1),
            arena: tuning.arena,
        }
    }

    fn compile(&self, view: &LiveView) -> Plan {
        let mut checks = Vec::new();
        let mut text = 0;
        for (i, term) in self.filter.terms().iter().enumerate() {
            checks.push((i, compile_term(view, term, text)));
            if matches!(term, Term::Text(_)) {
                text += 1;
            }
        }
        let scope = match self.scope {
            TenantScope::All => None,
            TenantScope::Tenant(t) => Some(view.tenant_names.get(t.as_str())),
        };
        let nothing = Plan {
            checks: Vec::new(),
            weight: 0,
            reads_slot: false,
            driver: Driver::Nothing,
            scope: None,
            search: None,
            interned: interned(view),
        };
        // A check that cannot match now (an unknown name) ends the query at once, before anything
        // was answered: as if the query ran before that name appeared.
        if matches!(scope, Some(None)) || checks.iter().any(|(_, c)| c.never(&self.texts)) {
            return nothing;
        }
        // A check that holds for everyone *now* (`env!=dev` while no instance has `dev`) is kept:
        // the name may appear before the query ends (see `refresh`).
        checks.retain(|(_, c)| !matches!(c, Check::Status(0b111)));

        // The driver: the smallest posting the scope or a term names.
        let mut driver = Driver::Live;
        let mut driver_len = view.live.len();
        let mut implied = None;
        let mut consider = |d: Driver, from: Option<usize>| {
            let n = d.len(view);
            if n < driver_len || (n == driver_len && from.is_none()) {
                driver_len = n;
                driver = d;
                implied = from;
            }
        };
        if let Some(Some(t)) = scope {
            consider(Driver::Tenant(t), None);
        }
        for (i, (_, c)) in checks.iter().enumerate() {
            let d = match c {
                Check::Status(m) if m.count_ones() == 1 => {
                    Driver::Status(m.trailing_zeros() as usize)
                }
                Check::Groups(g) if g.len() == 1 => Driver::Group(g[0]),
                Check::Tenants(t) if t.len() == 1 => Driver::Tenant(t[0]),
                Check::Has(Some(k)) => Driver::Key(*k),
                Check::In(Some(k), v) if v.len() == 1 => Driver::Value(*k, v[0]),
                _ => continue,
            };
            consider(d, Some(i));
        }
        // A slot in the driver satisfies the check the driver stands for.
        let implied = implied.map(|i| checks.remove(i));
        let scope = match (scope, &driver, &implied) {
            (Some(Some(t)), Driver::Tenant(d), None) if *d == t => None,
            (scope, _, _) => scope.flatten(),
        };
        checks.sort_by_key(|(_, c)| c.cost(&self.texts));
        let weight = checks.iter().map(|(_, c)| c.cost(&self.texts)).sum();

        // An unscoped text search may go through the arena first.
        let text = checks.iter().find_map(|(_, c)| match c {
            Check::Text(i) => Some(*i),
            _ => None,
        });
        let search = match (self.scope, text) {
            (TenantScope::All, Some(i)) => {
                let per_kib = self.texts.get(i).map_or(0, TextMatcher::cost_per_kib);
                let arena =
                    (view.text.len() as u64 / 1024) * per_kib + view.text.entries() as u64 / 16;
                let visits = driver_len * (VISIT_COST + weight);
                let wanted = match self.arena {
                    ArenaMode::Auto => arena < visits,
                    #[cfg(test)]
                    ArenaMode::Never => false,
                    #[cfg(test)]
                    ArenaMode::Always => true,
                };
                wanted.then(|| ArenaSearch {
                    text: i,
                    entry: 0,
                    generation: view.text.generation(),
                    restarts: 0,
                    // As if every entry matched (the worst a step can meet): grown, at most
                    // doubling, while the steps turn out cheaper.
                    entries: first_entries(self.budget, per_kib, view.text.entry_bytes()),
                    found: RoaringBitmap::new(),
                    implied: None,
                })
            }
            _ => None,
        };
        let (checks, search) = match search {
            Some(mut s) => {
                s.implied = implied;
                (checks, Some(s))
            }
            None => (checks, None),
        };
        Plan {
            reads_slot: checks.iter().any(|(_, c)| c.reads_slot()),
            checks,
            weight,
            driver,
            scope,
            search,
            interned: interned(view),
        }
    }

    /// Resolves the names of the plan's checks again, after the view interned new names: a check
    /// compiled when a name was unknown would judge an instance that has it now wrongly
    /// (`env!=dev` answering one that just got `env=dev`). The driver stays: its name was known,
    /// its id is still the same, and the term it stands for still holds for its slots.
    fn refresh(&self, plan: &mut Plan, view: &LiveView) {
        let terms = self.filter.terms();
        let checks = plan
            .checks
            .iter_mut()
            .chain(plan.search.as_mut().and_then(|s| s.implied.as_mut()));
        for (i, c) in checks {
            if let Some(term) = terms.get(*i)
                && !matches!(c, Check::Text(_))
            {
                *c = compile_term(view, term, 0);
            }
        }
        plan.weight = plan.checks.iter().map(|(_, c)| c.cost(&self.texts)).sum();
        plan.interned = interned(view);
    }

    /// Does one step of the query on `view`, calling `sink` with each matching slot in ascending
    /// order; `sink` may stop the query. Returns whether the query is finished.
    pub(crate) fn step<F>(&mut self, view: &LiveView, sink: &mut F) -> bool
    where
        F: FnMut(&LiveView, u32) -> ControlFlow<()>,
    {
        let Some(from) = self.next else {
            return true;
        };
        let mut plan = match self.plan.take() {
            Some(p) => p,
            None => self.compile(view),
        };
        if plan.interned != interned(view) {
            self.refresh(&mut plan, view);
        }
        let plan = self.plan.insert(plan);
        let counters = &view.query_counters;
        counters.steps.fetch_add(1, Ordering::Relaxed);

        if let Some(search) = &mut plan.search {
            if search.generation != view.text.generation() {
                // The arena was compacted since the last step: its entries moved.
                search.generation = view.text.generation();
                search.entry = 0;
                search.restarts += 1;
            }
            if search.restarts > MAX_RESTARTS {
                // Evaluate instance by instance after all; the driver still stands for its check.
                plan.search = None;
                return false;
            }
            let Some(m) = self.texts.get(search.text) else {
                plan.search = None;
                return false;
            };
            let per_kib = m.cost_per_kib();
            let found = &mut search.found;
            let scanned = view
                .text
                .scan(m, search.entry, search.entries, |slot, off| {
                    if view.slot(slot).is_some_and(|s| s.text.offset() == off) {
                        found.insert(slot);
                    }
                });
            counters
                .texts_scanned
                .fetch_add(scanned.entries as u64, Ordering::Relaxed);
            search.entry = scanned.next;
            // The cost this step had, and the range the next one can afford (at most twice this
            // one's: the arena's next part may match more).
            let cost =
                (scanned.bytes as u64 * per_kib / 1024 + scanned.hits as u64 * HIT_COST).max(1);
            let afford = u128::from(self.budget) * scanned.entries as u128 / u128::from(cost);
            search.entries = usize::try_from(afford)
                .unwrap_or(usize::MAX)
                .clamp(1, scanned.entries.saturating_mul(2).max(16));
            if scanned.next >= view.text.entries() {
                let found = std::mem::take(&mut search.found);
                if let Some((i, c)) = search.implied.take() {
                    // The instances found are not in the driver's posting by construction.
                    plan.weight += c.cost(&self.texts);
                    plan.reads_slot |= c.reads_slot();
                    plan.checks.insert(0, (i, c));
                }
                plan.driver = Driver::Found(found);
                plan.search = None;
            }
            return false;
        }

        let Some(bits) = plan.driver.bitmap(view) else {
            self.next = None;
            return true;
        };
        let scope = plan.scope.map(|t| view.tenants.get(t as usize));
        let mut it = bits.iter();
        it.advance_to(from);
        let (mut spent, mut evaluated) = (0u64, 0u64);
        let mut finished = true;
        if plan.checks.is_empty() && scope.is_none() {
            // The driver's posting is the answer: every slot of it matches (a summary of
            // `env=prod`, a tenant's unfiltered list). A fixed number per step, no checks.
            let per_step = (self.budget / (VISIT_COST + self.match_cost)).max(1);
            let mut taken = 0;
            for s in it {
                if taken == per_step {
                    self.next = Some(s);
                    finished = false;
                    break;
                }
                taken += 1;
                if sink(view, s).is_break() {
                    break;
                }
            }
            counters.evaluated.fetch_add(taken, Ordering::Relaxed);
            if finished {
                self.next = None;
            }
            return finished;
        }
        for s in it {
            if spent >= self.budget {
                self.next = Some(s);
                finished = false;
                break;
            }
            spent += VISIT_COST;
            if let Some(t) = scope
                && !t.is_some_and(|t| t.contains(s))
            {
                continue;
            }
            // Postings hold live slots only; the slot itself (cold memory: labels, counters) is
            // read only for a check that needs it.
            let slot = if plan.reads_slot {
                match view.slot(s) {
                    Some(slot) => Some(slot),
                    None => continue,
                }
            } else {
                None
            };
            evaluated += 1;
            spent += plan.weight;
            if plan
                .checks
                .iter()
                .all(|(_, c)| c.eval(view, &self.texts, s, slot))
            {
                spent += self.match_cost;
                if sink(view, s).is_break() {
                    break;
                }
            }
        }
        counters.evaluated.fetch_add(evaluated, Ordering::Relaxed);
        if finished {
            self.next = None;
        }
        finished
    }
}

/// Where a query reads the view: a view itself (held throughout, for callers that already hold
/// it) or the lock around it (taken for each step, released in between).
pub(crate) trait ViewLock {
    /// Runs `f` with the view.
    fn with_view<R>(&self, f: impl FnOnce(&LiveView) -> R) -> R;

    /// Called between two steps, the view released.
    fn between_steps(&self) {}
}

impl ViewLock for LiveView {
    fn with_view<R>(&self, f: impl FnOnce(&Self) -> R) -> R {
        f(self)
    }
}

impl ViewLock for RwLock<LiveView> {
    fn with_view<R>(&self, f: impl FnOnce(&LiveView) -> R) -> R {
        // The view is only mutated by methods that cannot panic midway through an update of its
        // invariants, so a poisoned lock still guards a consistent view.
        f(&self.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Offers the CPU to other threads: a thread that a heartbeat woke (one waiting for the
    /// lock, or an async worker with a heartbeat to read) runs now rather than at the end of
    /// the query thread's time slice — on a busy core, the difference between waiting one step
    /// and waiting milliseconds.
    fn between_steps(&self) {
        std::thread::yield_now();
    }
}

/// Runs `q` to the end (or until `sink` stops it), one step per lock hold.
pub(crate) fn run<L, F>(lock: &L, mut q: Query<'_>, mut sink: F)
where
    L: ViewLock + ?Sized,
    F: FnMut(&LiveView, u32) -> ControlFlow<()>,
{
    while !lock.with_view(|v| q.step(v, &mut sink)) {
        lock.between_steps();
    }
}

/// Summary of the instances `filter` selects within `scope`; unfiltered and unscoped O(1).
pub(crate) fn summary<L: ViewLock + ?Sized>(
    lock: &L,
    filter: &Filter,
    scope: &TenantScope,
    tuning: Tuning,
) -> FleetSummary {
    if filter.is_all() && *scope == TenantScope::All {
        return lock.with_view(|v| v.totals.summary());
    }
    let mut acc = Accumulator::default();
    run(
        lock,
        Query::new(filter, scope, 0, COUNT_COST, tuning),
        |v, s| {
            if let Some(c) = v.contrib.get(s as usize) {
                acc.add(c);
            }
            ControlFlow::Continue(())
        },
    );
    acc.finish()
}

/// Ids of the instances `filter` selects within `scope`, in list order.
pub(crate) fn matching<L: ViewLock + ?Sized>(
    lock: &L,
    filter: &Filter,
    scope: &TenantScope,
    tuning: Tuning,
) -> Vec<InstanceId> {
    let mut ids = Vec::new();
    run(
        lock,
        Query::new(filter, scope, 0, COUNT_COST, tuning),
        |v, s| {
            if let Some(slot) = v.slot(s) {
                ids.push(slot.id);
            }
            ControlFlow::Continue(())
        },
    );
    ids
}

/// A page of at most `limit` instances `filter` selects within `scope`, after `after`.
pub(crate) fn list<L: ViewLock + ?Sized>(
    lock: &L,
    filter: &Filter,
    scope: &TenantScope,
    after: Option<Cursor>,
    limit: usize,
    tuning: Tuning,
) -> Page<InstanceView> {
    let empty = Page {
        items: Vec::new(),
        next_cursor: None,
    };
    let from = match after {
        None => Some(0),
        Some(Cursor(c)) => c.checked_add(1),
    };
    let Some(from) = from else {
        return empty;
    };
    if limit == 0 {
        return empty;
    }
    let mut items = Vec::with_capacity(limit.min(1000));
    let mut last = None;
    let mut more = false;
    run(
        lock,
        Query::new(filter, scope, from, ROW_COST, tuning),
        |v, s| {
            if items.len() == limit {
                more = true;
                return ControlFlow::Break(());
            }
            if let Some(row) = v.view_of(s) {
                items.push(row);
                last = Some(s);
            }
            ControlFlow::Continue(())
        },
    );
    Page {
        items,
        next_cursor: if more { last.map(Cursor) } else { None },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::RwLock;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        Groups, Instance, InstanceId, StalenessPolicy, Status, SystemInfo, Tags, TenantId,
        Timestamp,
    };

    const T0: Timestamp = Timestamp::from_unix_secs(1_700_000_000);

    fn inst(n: u32, tenant: Option<&str>, host: &str, tags: &[(&str, &str)]) -> Instance {
        Instance {
            id: InstanceId::random(),
            tenant: tenant.map(|t| TenantId::new(t).unwrap()),
            system: SystemInfo {
                hostname: host.to_owned(),
                ip_addresses: vec![std::net::IpAddr::from([10, 9, (n >> 8) as u8, n as u8])],
                ..SystemInfo::default()
            },
            tags: Tags::from_pairs(tags.iter().copied()).unwrap(),
            groups: Groups::default(),
            registered_at: T0,
            last_seen: T0,
            metrics: None,
            apps: Vec::new(),
            certificate: None,
            next_certificate: None,
        }
    }

    fn view() -> LiveView {
        LiveView::new(StalenessPolicy::default()).unwrap()
    }

    fn delta(before: QueryStats, after: QueryStats) -> QueryStats {
        QueryStats {
            steps: after.steps - before.steps,
            evaluated: after.evaluated - before.evaluated,
            texts_scanned: after.texts_scanned - before.texts_scanned,
        }
    }

    /// The heaviest filter a parse allows, in text: 4 terms of 64 four-letter values (256
    /// values, 1,024 characters), each term with one value every hostname here contains, so
    /// that every term is evaluated.
    fn heaviest_text_filter() -> Filter {
        let term = |t: usize| {
            let mut v: Vec<String> = (0..63)
                .map(|i| {
                    let l = |n: usize| char::from(b'a' + (n % 26) as u8);
                    format!("q{}{}{}", l(t), l(i / 26), l(i))
                })
                .collect();
            v.push(".net".into());
            format!("text:{}", v.join("|"))
        };
        let text = (0..4).map(term).collect::<Vec<_>>().join(" ");
        Filter::parse(&text).unwrap()
    }

    /// Tenant `small` has 10 instances, `big` 500, and 500 have no tenant; all hostnames match
    /// the heaviest text filter.
    fn tenants_view() -> (LiveView, Vec<InstanceId>) {
        let mut v = view();
        let mut small = Vec::new();
        for n in 0..1010u32 {
            let tenant = match n {
                0..10 => Some("small"),
                10..510 => Some("big"),
                _ => None,
            };
            let tags: &[(&str, &str)] = if n % 200 == 5 {
                &[("env", "rare")]
            } else {
                &[]
            };
            let i = inst(n, tenant, &format!("host-{n:04}.example.net"), tags);
            if tenant == Some("small") {
                small.push(i.id);
            }
            assert!(v.upsert(&i, 0, T0));
        }
        (v, small)
    }

    #[test]
    fn a_tenant_scoped_query_evaluates_only_that_tenants_instances() {
        let (v, small) = tenants_view();
        let scope = TenantScope::Tenant(TenantId::new("small").unwrap());
        let heavy = heaviest_text_filter();

        let before = v.query_stats();
        let s = v.summary(&heavy, &scope);
        let d = delta(before, v.query_stats());
        assert_eq!(s.total, 10);
        assert_eq!(d.evaluated, 10, "only the tenant's 10 instances: {d:?}");
        assert_eq!(
            d.texts_scanned, 0,
            "the shared text arena is never searched: {d:?}"
        );

        let before = v.query_stats();
        let mut ids = v.matching(&heavy, &scope);
        let page = v.list(&heavy, &scope, None, 1000);
        let d = delta(before, v.query_stats());
        assert_eq!((d.evaluated, d.texts_scanned), (20, 0), "{d:?}");
        ids.sort();
        let mut want = small.clone();
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(page.items.len(), 10);

        // A tenant with half the fleet: searching the arena would be estimated cheaper than its
        // 500 instances one by one, but the arena holds everyone's text.
        let big = TenantScope::Tenant(TenantId::new("big").unwrap());
        let before = v.query_stats();
        assert_eq!(v.summary(&heavy, &big).total, 500);
        let d = delta(before, v.query_stats());
        assert_eq!((d.evaluated, d.texts_scanned), (500, 0), "{d:?}");

        // Driven by a smaller posting (`env=rare`: 5 instances, one of them the tenant's), the
        // other tenants' slots are passed over by the tenant's bitmap, never evaluated.
        let rare = Filter::parse("env=rare").unwrap().text([".net"]);
        let before = v.query_stats();
        assert_eq!(v.summary(&rare, &scope).total, 1);
        let d = delta(before, v.query_stats());
        assert_eq!((d.evaluated, d.texts_scanned), (1, 0), "{d:?}");

        // Unscoped, the same filters do touch every instance (the counters count).
        let before = v.query_stats();
        assert_eq!(v.summary(&heavy, &TenantScope::All).total, 1010);
        let d = delta(before, v.query_stats());
        assert!(d.evaluated + d.texts_scanned >= 1010, "{d:?}");

        // A tenant the view never saw: nothing is evaluated.
        let before = v.query_stats();
        let nobody = TenantScope::Tenant(TenantId::new("nobody").unwrap());
        assert_eq!(v.summary(&heavy, &nobody).total, 0);
        assert_eq!(delta(before, v.query_stats()).evaluated, 0);
    }

    #[test]
    fn a_step_stays_within_its_budget() {
        let mut v = view();
        for n in 0..20_000u32 {
            let tenant = (n % 2 == 0).then_some("acme");
            assert!(v.upsert(
                &inst(n, tenant, &format!("node-{n:05}.example.net"), &[]),
                0,
                T0
            ));
        }
        let heavy = heaviest_text_filter();
        let scope = TenantScope::Tenant(TenantId::new("acme").unwrap());
        let mut q = Query::new(&heavy, &scope, 0, COUNT_COST, Tuning::DEFAULT);
        let mut matched = 0u64;
        let mut steps = 0u64;
        let mut most = 0;
        loop {
            let before = v.query_stats().evaluated;
            let done = q.step(&v, &mut |_, _| {
                matched += 1;
                ControlFlow::Continue(())
            });
            most = most.max(v.query_stats().evaluated - before);
            steps += 1;
            if done {
                break;
            }
        }
        assert_eq!(matched, 10_000);
        let weight = q.plan.as_ref().map_or(0, |p| p.weight);
        assert!(weight > 100, "four Aho-Corasick text checks: {weight}");
        // A step ends once its budget is spent: at most one instance beyond it.
        let per_instance = VISIT_COST + weight + COUNT_COST;
        assert!(most <= STEP_BUDGET / per_instance + 1, "{most} in one step");
        assert!(
            steps >= 10_000 / (STEP_BUDGET / per_instance + 1),
            "{steps} steps"
        );
    }

    /// What a writer does between two steps.
    type Writer<'a> = Box<dyn FnMut(&mut LiveView) + 'a>;

    /// A view behind a lock that lets a writer in before every step, as heartbeats get in.
    struct Interleaved<'a> {
        lock: &'a RwLock<LiveView>,
        between: std::cell::RefCell<Writer<'a>>,
        steps: std::cell::Cell<usize>,
    }

    impl ViewLock for Interleaved<'_> {
        fn with_view<R>(&self, f: impl FnOnce(&LiveView) -> R) -> R {
            {
                // Free between steps: a writer gets it at once.
                let mut w = self
                    .lock
                    .try_write()
                    .expect("the lock is free between steps");
                (self.between.borrow_mut())(&mut w);
            }
            self.steps.set(self.steps.get() + 1);
            self.lock.with_view(f)
        }
    }

    #[test]
    fn heartbeats_get_the_lock_between_steps() {
        let (v, _) = tenants_view();
        let ids = v.matching(&Filter::all(), &TenantScope::All);
        let lock = RwLock::new(v);
        let mut beats = 0;
        let at = T0.saturating_add(std::time::Duration::from_secs(1));
        let src = Interleaved {
            lock: &lock,
            between: std::cell::RefCell::new(Box::new(|v: &mut LiveView| {
                let id = ids[beats % ids.len()];
                assert!(v.heartbeat(id, at, None).is_some());
                beats += 1;
            })),
            steps: std::cell::Cell::new(0),
        };
        let heavy = heaviest_text_filter();
        let s = summary(&src, &heavy, &TenantScope::All, Tuning::DEFAULT);
        assert_eq!(s.total, 1010);
        assert!(src.steps.get() > 3, "{} steps", src.steps.get());
    }

    #[test]
    fn an_arena_search_survives_a_compaction_between_steps() {
        let mut v = view();
        let mut keep = BTreeSet::new();
        let mut drop = Vec::new();
        // ~120 KiB of text: past the size at which the arena compacts.
        for n in 0..3000u32 {
            let host = if n % 3 == 0 {
                format!("keep-{n:05}.long-domain-name.example.net")
            } else {
                format!("drop-{n:05}.long-domain-name.example.net")
            };
            let i = inst(n, None, &host, &[]);
            if n % 3 == 0 {
                keep.insert(i.id);
            } else {
                drop.push(i.id);
            }
            assert!(v.upsert(&i, 0, T0));
        }
        let f = Filter::parse("text:keep|long-domain").unwrap();
        let scope = TenantScope::All;
        let tuning = Tuning {
            budget: 200,
            arena: ArenaMode::Always,
        };
        let mut q = Query::new(&f, &scope, 0, COUNT_COST, tuning);
        let mut found = BTreeSet::new();
        let mut sink = |v: &LiveView, s: u32| {
            let id = v.slot(s).map(|s| s.id);
            assert!(found.insert(id), "answered twice");
            ControlFlow::Continue(())
        };
        for _ in 0..3 {
            assert!(!q.step(&v, &mut sink));
        }
        let generation = v.text.generation();
        for id in &drop {
            assert!(v.remove(*id, 0));
        }
        assert!(v.text.generation() > generation, "the arena was compacted");
        while !q.step(&v, &mut sink) {}
        let found: BTreeSet<InstanceId> = found.into_iter().flatten().collect();
        assert_eq!(found, keep);
    }

    /// Found by `changes_between_steps_keep_the_guarantees`: `env!=dev` compiled while no
    /// instance had `dev` held for everyone, so an instance registered with `env=dev` during the
    /// query was answered.
    #[test]
    fn a_name_that_appears_during_a_query_is_judged_by_what_it_means_now() {
        let mut v = view();
        for n in 0..4 {
            assert!(v.upsert(&inst(n, None, "web", &[("env", "prod")]), 0, T0));
        }
        for filter in [
            "env!=dev",
            "env notin (dev,x)",
            "!team",
            "group:a|b status:online",
        ] {
            let f = Filter::parse(filter).unwrap();
            let scope = TenantScope::All;
            let tuning = Tuning {
                budget: 1,
                arena: ArenaMode::Never,
            };
            let mut q = Query::new(&f, &scope, 0, COUNT_COST, tuning);
            let mut answered = Vec::new();
            let mut sink = |v: &LiveView, s: u32| {
                answered.extend(v.slot(s).map(|s| s.id));
                ControlFlow::Continue(())
            };
            // (`group:a|b`, naming no known group, is done at once: it selects nobody.)
            let done = q.step(&v, &mut sink);
            assert_eq!(done, filter.starts_with("group"), "{filter}");
            let mut late = inst(9, None, "web", &[("env", "dev"), ("team", "x")]);
            late.groups = Groups::from_names(["c"]).unwrap();
            assert!(v.upsert(&late, 0, T0));
            while !q.step(&v, &mut sink) {}
            assert!(!answered.contains(&late.id), "{filter} answered {late:?}");
            assert!(v.remove(late.id, 0));
        }
    }

    #[derive(Debug, Clone)]
    enum Change {
        Add { tenant: u8, host: u8, env: u8 },
        Remove(usize),
        Relabel(usize, u8),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (0u8..3, 0u8..4, 0u8..3).prop_map(|(tenant, host, env)| Change::Add {
                tenant,
                host,
                env
            }),
            any::<usize>().prop_map(Change::Remove),
            (any::<usize>(), 0u8..3).prop_map(|(i, e)| Change::Relabel(i, e)),
        ]
    }

    const HOSTS: [&str; 4] = ["web-01", "db-02", "web-db", "cache"];
    const ENVS: [&str; 3] = ["prod", "dev", "x"];

    fn labelled(n: u32, tenant: u8, host: u8, env: u8) -> Instance {
        let tenant = ["t0", "t1"].get(tenant as usize).copied();
        inst(
            n,
            tenant,
            HOSTS[host as usize],
            &[("env", ENVS[env as usize])],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Changes between the steps of a query: nothing is answered twice, lists stay in slot
        /// order, instances nobody touched are answered exactly, and a touched instance is only
        /// answered if one of its versions matched.
        #[test]
        fn changes_between_steps_keep_the_guarantees(
            start in prop::collection::vec((0u8..3, 0u8..4, 0u8..3), 0..40),
            changes in prop::collection::vec(change(), 0..40),
            filter in prop_oneof![
                Just("text:web"), Just("env=prod"), Just("env=prod text:db|web"),
                Just("env!=dev"), Just("text:0|b tenant:t1"), Just(""), Just("env in (prod,x)"),
            ],
            tenant in prop::option::of(0u8..2),
            arena in prop_oneof![Just(ArenaMode::Never), Just(ArenaMode::Always), Just(ArenaMode::Auto)],
        ) {
            let mut v = view();
            // Every version of every instance, and whether it was ever changed.
            let mut versions: BTreeMap<InstanceId, Vec<Instance>> = BTreeMap::new();
            let mut touched = BTreeSet::new();
            let mut order = Vec::new();
            for (n, &(t, h, e)) in start.iter().enumerate() {
                let i = labelled(n as u32, t, h, e);
                prop_assert!(v.upsert(&i, 0, T0));
                order.push(i.id);
                versions.insert(i.id, vec![i]);
            }
            let f = Filter::parse(filter).unwrap();
            let scope = match tenant {
                None => TenantScope::All,
                Some(t) => TenantScope::Tenant(TenantId::new(format!("t{t}")).unwrap()),
            };
            let tuning = Tuning { budget: 1, arena };
            let mut q = Query::new(&f, &scope, 0, COUNT_COST, tuning);
            let mut answered: Vec<(u32, InstanceId)> = Vec::new();
            let mut changes = changes.into_iter();
            let mut n = start.len() as u32;
            loop {
                let done = q.step(&v, &mut |v, s| {
                    if let Some(slot) = v.slot(s) {
                        answered.push((s, slot.id));
                    }
                    ControlFlow::Continue(())
                });
                if done {
                    break;
                }
                let Some(c) = changes.next() else { continue };
                match c {
                    Change::Add { tenant, host, env } => {
                        let i = labelled(n, tenant, host, env);
                        n += 1;
                        v.upsert(&i, 0, T0);
                        order.push(i.id);
                        touched.insert(i.id);
                        versions.insert(i.id, vec![i]);
                    }
                    Change::Remove(k) if !order.is_empty() => {
                        let id = order.remove(k % order.len());
                        v.remove(id, 0);
                        touched.insert(id);
                    }
                    Change::Relabel(k, env) if !order.is_empty() => {
                        let id = order[k % order.len()];
                        let tags = Tags::from_pairs([("env", ENVS[env as usize])]).unwrap();
                        v.set_labels(id, Some(&tags), None, 0);
                        touched.insert(id);
                        if let Some(vs) = versions.get_mut(&id) {
                            let mut next = vs[vs.len() - 1].clone();
                            next.tags = tags;
                            vs.push(next);
                        }
                    }
                    _ => {}
                }
            }
            let slots: Vec<u32> = answered.iter().map(|a| a.0).collect();
            prop_assert!(slots.windows(2).all(|w| w[0] < w[1]), "slot order: {:?}", slots);
            let got: BTreeSet<InstanceId> = answered.iter().map(|a| a.1).collect();
            prop_assert_eq!(got.len(), answered.len(), "an instance answered twice");
            let matches = |i: &Instance| {
                scope.allows(i.tenant.as_ref()) && f.matches(i, Status::Online)
            };
            for (id, vs) in &versions {
                if touched.contains(id) {
                    if got.contains(id) {
                        prop_assert!(vs.iter().any(matches), "{} answered, never matched", id);
                    }
                } else {
                    prop_assert_eq!(got.contains(id), matches(&vs[0]), "untouched {}", id);
                }
            }
        }
    }
}
