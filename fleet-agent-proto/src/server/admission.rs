//! Admission: which connections the agent listener keeps when it is full.
//!
//! Every connection is accepted — a listener that stops accepting cannot tell an agent from an
//! attacker — and counted in one of two budgets:
//!
//! - **pending**: handshaking, or without a client certificate the fleet has accepted for a
//!   request yet (enrollment, and every attacker who has no certificate). Bounded in total and per
//!   source (an IPv4 address, or an IPv6 /64). A source at its cap loses its own oldest pending
//!   connection; a full budget loses the oldest pending connection of the source holding the most.
//!   A newcomer from a quiet source therefore always gets in, however many connections others
//!   hold.
//! - **verified**: a request on the connection authenticated with a certificate the fleet
//!   accepts (current serial, instance not revoked). Bounded in total and per instance (the
//!   instance's oldest connection goes). When the verified budget is full a verified connection
//!   is still served, but stays pending — with the pending deadlines — until a slot frees.
//!
//! Shedding a connection drops it (the socket closes); its slot is free at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use fleet_core::InstanceId;
use fleet_core::limiter::Source;
use tokio::sync::oneshot;

/// The budgets (copied from [`super::ServerConfig`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budgets {
    pub(crate) pending: usize,
    pub(crate) pending_per_source: usize,
    pub(crate) verified: usize,
    pub(crate) verified_per_instance: usize,
}

/// The listener's table of connections.
#[derive(Debug)]
pub(crate) struct Admission {
    budgets: Budgets,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    /// Pending connections by id; ids grow, so the first is the oldest.
    pending: BTreeMap<u64, Pending>,
    /// Pending connection ids per source.
    by_source: HashMap<Source, BTreeSet<u64>>,
    /// Sources by how many pending connections they hold (the last holds the most).
    weight: BTreeSet<(usize, Source)>,
    /// Verified connections by id.
    verified: BTreeMap<u64, Verified>,
    /// Verified connection ids per instance.
    by_instance: HashMap<InstanceId, BTreeSet<u64>>,
    /// Connections shed since the start.
    shed: u64,
}

#[derive(Debug)]
struct Pending {
    source: Source,
    close: oneshot::Sender<()>,
}

#[derive(Debug)]
struct Verified {
    instance: InstanceId,
    close: oneshot::Sender<()>,
}

/// How many connections are in each budget (for metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdmissionCounts {
    /// Connections handshaking or not yet verified.
    pub pending: usize,
    /// Connections whose client certificate a request authenticated.
    pub verified: usize,
    /// Connections closed to make room for others since the server started.
    pub shed: u64,
}

/// One admitted connection's place in the table; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
}

impl Admission {
    pub(crate) fn new(budgets: Budgets) -> Self {
        Self {
            budgets: Budgets {
                pending: budgets.pending.max(1),
                pending_per_source: budgets.pending_per_source.max(1),
                verified: budgets.verified,
                verified_per_instance: budgets.verified_per_instance.max(1),
            },
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table is consistent after every statement that can panic (none can), so a
        // poisoned lock holds a usable table.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `ip` as pending, shedding another when a budget is full. The
    /// receiver completes when this connection is shed in turn.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> (Ticket, oneshot::Receiver<()>) {
        let source = Source::of(ip);
        let (close, closed) = oneshot::channel();
        let mut t = self.table();
        let held = t.by_source.get(&source).map_or(0, BTreeSet::len);
        if held >= self.budgets.pending_per_source {
            t.shed_oldest_of(source);
        } else if t.pending.len() >= self.budgets.pending
            && let Some(&(_, heaviest)) = t.weight.last()
        {
            t.shed_oldest_of(heaviest);
        }
        let id = t.next;
        t.next += 1;
        t.pending.insert(id, Pending { source, close });
        t.add_to_source(source, id);
        drop(t);
        (
            Ticket {
                admission: Arc::clone(self),
                id,
            },
            closed,
        )
    }

    /// Sheds the oldest pending connection of the source holding the most (the process is out
    /// of file descriptors: the next accept needs one).
    pub(crate) fn shed_heaviest(&self) {
        let mut t = self.table();
        if let Some(&(_, heaviest)) = t.weight.last() {
            t.shed_oldest_of(heaviest);
        }
    }

    pub(crate) fn counts(&self) -> AdmissionCounts {
        let t = self.table();
        AdmissionCounts {
            pending: t.pending.len(),
            verified: t.verified.len(),
            shed: t.shed,
        }
    }
}

impl Table {
    fn add_to_source(&mut self, source: Source, id: u64) {
        let ids = self.by_source.entry(source).or_default();
        let before = ids.len();
        ids.insert(id);
        let after = ids.len();
        if before > 0 {
            self.weight.remove(&(before, source));
        }
        self.weight.insert((after, source));
    }

    /// Takes pending connection `id` out of its source's set.
    fn remove_pending(&mut self, id: u64) -> Option<Pending> {
        let entry = self.pending.remove(&id)?;
        let source = entry.source;
        if let Some(ids) = self.by_source.get_mut(&source) {
            let before = ids.len();
            ids.remove(&id);
            let after = ids.len();
            self.weight.remove(&(before, source));
            if after == 0 {
                self.by_source.remove(&source);
            } else {
                self.weight.insert((after, source));
            }
        }
        Some(entry)
    }

    fn remove_verified(&mut self, id: u64) -> Option<Verified> {
        let entry = self.verified.remove(&id)?;
        if let Some(ids) = self.by_instance.get_mut(&entry.instance) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_instance.remove(&entry.instance);
            }
        }
        Some(entry)
    }

    fn shed_oldest_of(&mut self, source: Source) {
        let oldest = self
            .by_source
            .get(&source)
            .and_then(|ids| ids.first().copied());
        if let Some(entry) = oldest.and_then(|id| self.remove_pending(id)) {
            // The connection may be gone already (its receiver dropped): nothing to tell.
            let _ = entry.close.send(());
            self.shed += 1;
        }
    }
}

impl Ticket {
    /// Moves this connection to the verified budget for `instance`. Returns `false` — the
    /// connection stays pending — when the verified budget is full. An instance at its cap
    /// loses its oldest verified connection.
    pub(crate) fn promote(&self, instance: InstanceId) -> bool {
        let budgets = self.admission.budgets;
        let mut t = self.admission.table();
        if t.verified.contains_key(&self.id) {
            return true;
        }
        let held = t.by_instance.get(&instance).map_or(0, BTreeSet::len);
        if held >= budgets.verified_per_instance {
            let oldest = t
                .by_instance
                .get(&instance)
                .and_then(|ids| ids.first().copied());
            if let Some(entry) = oldest.and_then(|id| t.remove_verified(id)) {
                let _ = entry.close.send(());
                t.shed += 1;
            }
        } else if t.verified.len() >= budgets.verified {
            return false;
        }
        let Some(entry) = t.remove_pending(self.id) else {
            // Shed while its request ran: it is closing, so it takes no verified slot.
            return false;
        };
        t.verified.insert(
            self.id,
            Verified {
                instance,
                close: entry.close,
            },
        );
        t.by_instance.entry(instance).or_default().insert(self.id);
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self.admission.table();
        if t.remove_pending(self.id).is_none() {
            t.remove_verified(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Budgets {
        Budgets {
            pending: 4,
            pending_per_source: 2,
            verified: 2,
            verified_per_instance: 1,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_at_its_cap_loses_its_own_oldest() {
        let a = Arc::new(Admission::new(budgets()));
        let (_t1, mut r1) = a.admit(ip("10.0.0.1"));
        let (_t2, mut r2) = a.admit(ip("10.0.0.1"));
        let (_t3, mut r3) = a.admit(ip("10.0.0.1"));
        assert!(r1.try_recv().is_ok(), "the oldest of the source is shed");
        assert!(r2.try_recv().is_err());
        assert!(r3.try_recv().is_err());
        assert_eq!(a.counts().pending, 2);
        // An IPv6 /64 is one source.
        let (_v1, mut s1) = a.admit(ip("2001:db8::1"));
        let (_v2, _) = a.admit(ip("2001:db8::2"));
        let (_v3, _) = a.admit(ip("2001:db8::3"));
        assert!(
            s1.try_recv().is_ok(),
            "another address of the same /64 counts"
        );
    }

    #[test]
    fn a_full_budget_sheds_the_heaviest_source_and_admits_a_newcomer() {
        let a = Arc::new(Admission::new(budgets()));
        let (_a1, mut ra1) = a.admit(ip("10.0.0.1"));
        let (_a2, _ra2) = a.admit(ip("10.0.0.1"));
        let (_b1, mut rb1) = a.admit(ip("10.0.0.2"));
        let (_c1, mut rc1) = a.admit(ip("10.0.0.3"));
        // Full (4): the newcomer gets in, the heaviest source (10.0.0.1) pays.
        let (_d1, mut rd1) = a.admit(ip("10.0.0.4"));
        assert!(ra1.try_recv().is_ok());
        assert!(rb1.try_recv().is_err() && rc1.try_recv().is_err() && rd1.try_recv().is_err());
        assert_eq!(a.counts().pending, 4);
        assert_eq!(a.counts().shed, 1);
    }

    #[test]
    fn verified_connections_leave_the_pending_budget_and_are_capped_per_instance() {
        let a = Arc::new(Admission::new(budgets()));
        let instance = InstanceId::random();
        let (t1, mut r1) = a.admit(ip("10.0.0.1"));
        assert!(t1.promote(instance));
        assert_eq!(
            a.counts(),
            AdmissionCounts {
                pending: 0,
                verified: 1,
                shed: 0
            }
        );
        let (t2, mut r2) = a.admit(ip("10.0.0.1"));
        assert!(
            t2.promote(instance),
            "the instance's newest connection wins"
        );
        assert!(r1.try_recv().is_ok(), "its oldest is shed");
        assert!(r2.try_recv().is_err());
        let (t3, _) = a.admit(ip("10.0.0.2"));
        assert!(t3.promote(InstanceId::random()));
        // The verified budget (2) is full: a third instance is served but stays pending.
        let (t4, _) = a.admit(ip("10.0.0.3"));
        assert!(!t4.promote(InstanceId::random()));
        assert_eq!(a.counts().pending, 1);
        drop((t2, t3, t4));
        assert_eq!(a.counts().pending + a.counts().verified, 0, "drops free");
    }
}
