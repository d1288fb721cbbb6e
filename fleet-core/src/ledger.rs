//! The token ledger's writer: attempts refused after their token was found (a wrong secret, a
//! bad CSR, a used-up token) and retries are recorded **off the response path** and **up to a
//! bound per token**.
//!
//! - **Off the response path.** A refusal is answered without waiting for its ledger row, so an
//!   attempt naming a real token with a wrong secret costs the caller the same time as one naming
//!   no token at all: the answer's latency no longer tells which token ids exist. The rows are
//!   written by a background task moments later ([`Fleet::flush_ledger`] waits for them;
//!   [`Fleet::token_ledger`] calls it first, so readers through the fleet see every row).
//! - **Bounded.** At most [`MAX_RECORDED_ATTEMPTS`] such rows are written per token (counted
//!   from the store the first time this process records for a token; each replica keeps its own
//!   count, so with `n` replicas a token holds at most `n` × the bound). Beyond it, and whenever
//!   more than [`MAX_QUEUED`] rows are waiting, attempts are only **counted per source** (an IPv4
//!   address or an IPv6 /64) in memory ([`Fleet::unrecorded_attempts`]), for at most
//!   [`MAX_UNRECORDED_SOURCES`] sources; the rest are counted together under no source.
//!   Enrollments themselves are always recorded: they are bounded by the token's uses.
//!
//! A row that cannot be written (the store is down) is dropped and counted like an unrecorded
//! attempt: the ledger is an audit aid, and a refusal never waits for it.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::limiter::Source;
use crate::store::FleetStore;
use crate::telemetry::StoreOp;
use crate::token::{LedgerEntry, LedgerOutcome, TokenId};
use crate::{Fleet, FleetError, TenantScope, Timestamp};

/// Refusals and retries recorded as ledger rows per token (by one process), before they are only
/// counted per source.
pub const MAX_RECORDED_ATTEMPTS: u32 = 1_000;
/// Rows waiting to be written before further attempts are only counted.
pub const MAX_QUEUED: usize = 4_096;
/// (token, source) pairs counted in memory beyond the bound; more are counted under no source.
pub const MAX_UNRECORDED_SOURCES: usize = 65_536;

/// Attempts of one source on one token that were counted but not recorded as rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnrecordedAttempts {
    /// The source: an IPv4 address or the network of an IPv6 /64; `None` for attempts
    /// without a peer address, or beyond [`MAX_UNRECORDED_SOURCES`].
    pub source: Option<IpAddr>,
    /// How many.
    pub attempts: u64,
    /// The last one.
    pub last_at: Timestamp,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<LedgerEntry>,
    /// A drain task is running (or about to).
    draining: bool,
    /// Rows recorded per token, once known.
    rows: FxHashMap<TokenId, u32>,
    unrecorded: FxHashMap<TokenId, FxHashMap<Option<Source>, UnrecordedAttempts>>,
    unrecorded_pairs: usize,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct LedgerWriter {
    state: Mutex<State>,
    /// One drain at a time, so rows keep their order.
    drain: tokio::sync::Mutex<()>,
}

fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

impl State {
    fn count_unrecorded(&mut self, e: &LedgerEntry) {
        let ip = e.peer.map(|p| network(p.ip()));
        let full = self.unrecorded_pairs >= MAX_UNRECORDED_SOURCES;
        let per_token = self.unrecorded.entry(e.token.clone()).or_default();
        let key = ip
            .map(Source::of)
            .filter(|k| !full || per_token.contains_key(&Some(*k)));
        let slot = per_token.entry(key).or_insert_with(|| {
            self.unrecorded_pairs += 1;
            UnrecordedAttempts {
                source: key.and(ip),
                attempts: 0,
                last_at: e.at,
            }
        });
        slot.attempts += 1;
        slot.last_at = slot.last_at.max(e.at);
    }
}

impl LedgerWriter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `entry`; returns whether a drain must be started.
    fn push(&self, entry: LedgerEntry) -> bool {
        let mut state = self.lock();
        let over = state
            .rows
            .get(&entry.token)
            .is_some_and(|&n| n >= MAX_RECORDED_ATTEMPTS);
        if over || state.queue.len() >= MAX_QUEUED {
            state.count_unrecorded(&entry);
            return false;
        }
        state.queue.push_back(entry);
        !std::mem::replace(&mut state.draining, true)
    }
}

impl<S: FleetStore> Fleet<S> {
    /// Records a refused attempt or a retry in its token's ledger without waiting for it; see
    /// [`crate::ledger`].
    pub(crate) fn record_later(&self, entry: LedgerEntry) {
        if self.inner.ledger.push(entry) {
            // The task does not keep a dropped fleet alive: call `flush_ledger` before dropping
            // the last handle to keep every row. Without a runtime no one drains until then.
            let inner = Arc::downgrade(&self.inner);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Some(inner) = inner.upgrade() {
                        Self { inner }.flush_ledger().await;
                    }
                });
            }
        }
    }

    /// Waits until every refused attempt and retry answered so far is in its token's ledger (or
    /// counted as unrecorded); see [`crate::ledger`].
    pub async fn flush_ledger(&self) {
        let writer = &self.inner.ledger;
        let _turn = writer.drain.lock().await;
        loop {
            let (entry, known) = {
                let mut state = writer.lock();
                let Some(entry) = state.queue.pop_front() else {
                    state.draining = false;
                    return;
                };
                let known = state.rows.get(&entry.token).copied();
                (entry, known)
            };
            let recorded = match known {
                Some(n) => Some(n),
                // First row for this token in this process: count what the store holds.
                None => self
                    .timed(
                        StoreOp::Ledger,
                        self.inner
                            .store
                            .ledger(&entry.token, MAX_RECORDED_ATTEMPTS as usize),
                    )
                    .await
                    .ok()
                    .map(|rows| {
                        let n = rows
                            .iter()
                            .filter(|r| {
                                !matches!(
                                    r.outcome,
                                    LedgerOutcome::Enrolled | LedgerOutcome::Reenrolled
                                )
                            })
                            .count();
                        u32::try_from(n).unwrap_or(u32::MAX)
                    }),
            };
            let written = match recorded {
                Some(n) if n < MAX_RECORDED_ATTEMPTS => self
                    .timed(
                        StoreOp::AppendLedger,
                        self.inner.store.append_ledger(&entry),
                    )
                    .await
                    .is_ok()
                    .then_some(n + 1),
                _ => None,
            };
            let mut state = writer.lock();
            match written {
                Some(n) => {
                    state.rows.insert(entry.token.clone(), n);
                }
                None => {
                    if let Some(n) = recorded {
                        state.rows.insert(entry.token.clone(), n);
                    }
                    state.count_unrecorded(&entry);
                }
            }
        }
    }

    /// Attempts on token `id` that were counted but not recorded as ledger rows (beyond the
    /// bound, or while the store was down), by source, if the token is visible in `scope`.
    /// Kept in this process's memory; see [`crate::ledger`].
    pub async fn unrecorded_attempts(
        &self,
        scope: &TenantScope,
        id: &TokenId,
    ) -> Result<Vec<UnrecordedAttempts>, FleetError> {
        self.get_token(scope, id).await?;
        self.flush_ledger().await;
        let state = self.inner.ledger.lock();
        let mut out: Vec<_> = state
            .unrecorded
            .get(id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        out.sort_by(|a, b| b.attempts.cmp(&a.attempts).then(b.last_at.cmp(&a.last_at)));
        Ok(out)
    }
}
