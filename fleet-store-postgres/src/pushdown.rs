//! Filters pushed down to SQL: [`PgStore::list_matching`] answers a fleet filter from the
//! database alone, on the indexed columns, for tools that have no live view (reports, exports,
//! a one-off script against a replica's database).
//!
//! A control plane lists from its live view instead, which answers the same first page in a
//! fraction of the time (see the README's figures). Status terms are live state that the
//! database does not hold, so they are refused with [`PushdownError::Status`].

use fleet_core::filter::{TagSelector, Term};
use fleet_core::{Filter, Instance, InstanceId, StoreError, TenantScope};
use sqlx::{Postgres, QueryBuilder};

use crate::PgStore;
use crate::store::instance_from_row;

/// Why a filter could not be answered from SQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushdownError {
    /// `status:` terms depend on the live view; the database has only last-seen times.
    #[error("status terms cannot be pushed down: the database holds last-seen times, not status")]
    Status,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `%needle%` for ILIKE, with the pattern characters of the needle escaped.
fn contains_pattern(needle: &str) -> String {
    let mut p = String::with_capacity(needle.len() + 2);
    p.push('%');
    for c in needle.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

fn push_term(q: &mut QueryBuilder<'_, Postgres>, term: &Term) -> Result<(), PushdownError> {
    match term {
        Term::Status(_) => return Err(PushdownError::Status),
        Term::Group(groups) => {
            let names: Vec<String> = groups.iter().map(|g| g.as_str().to_owned()).collect();
            q.push("i.groups && ").push_bind(names).push("::text[]");
        }
        Term::Tenant(tenants) => {
            let names: Vec<String> = tenants.iter().map(|t| t.as_str().to_owned()).collect();
            q.push("i.tenant = ANY(").push_bind(names).push("::text[])");
        }
        Term::Text(needles) => {
            let patterns: Vec<String> = needles.iter().map(|n| contains_pattern(n)).collect();
            q.push("(i.hostname ILIKE ANY(")
                .push_bind(patterns.clone())
                .push("::text[]) OR EXISTS (SELECT 1 FROM jsonb_array_elements_text(")
                .push("i.record->'system'->'ip_addresses') ip WHERE ip ILIKE ANY(")
                .push_bind(patterns)
                .push("::text[])))");
        }
        Term::Tag(sel) => {
            let key = sel.key().as_str().to_owned();
            match sel {
                TagSelector::Exists(_) => {
                    q.push("i.tags ? ").push_bind(key);
                }
                TagSelector::Absent(_) => {
                    q.push("NOT i.tags ? ").push_bind(key);
                }
                TagSelector::Eq(_, v) => {
                    q.push("i.tags @> ")
                        .push_bind(serde_json::json!({ key: v.as_str() }));
                }
                TagSelector::NotEq(_, v) => {
                    q.push("NOT i.tags @> ")
                        .push_bind(serde_json::json!({ key: v.as_str() }));
                }
                TagSelector::In(_, vs) => {
                    let vs: Vec<String> = vs.iter().map(|v| v.as_str().to_owned()).collect();
                    q.push("i.tags->>")
                        .push_bind(key)
                        .push(" = ANY(")
                        .push_bind(vs)
                        .push("::text[])");
                }
                TagSelector::NotIn(_, vs) => {
                    let vs: Vec<String> = vs.iter().map(|v| v.as_str().to_owned()).collect();
                    q.push("NOT coalesce(i.tags->>")
                        .push_bind(key)
                        .push(" = ANY(")
                        .push_bind(vs)
                        .push("::text[]), false)");
                }
            }
        }
    }
    Ok(())
}

impl PgStore {
    /// Up to `limit` instances that `filter` selects within `scope`, with ids greater than
    /// `after`, in id order — the filter evaluated by PostgreSQL on the indexed columns (tags
    /// `jsonb` with a GIN index, groups `text[]` with a GIN index, hostname with a trigram index).
    /// Page on with the last id returned. [`PushdownError::Status`] for a filter with `status:`
    /// terms.
    pub async fn list_matching(
        &self,
        filter: &Filter,
        scope: &TenantScope,
        after: Option<InstanceId>,
        limit: usize,
    ) -> Result<Vec<Instance>, PushdownError> {
        let mut q: QueryBuilder<'_, Postgres> = QueryBuilder::new(
            "SELECT i.record, h.last_seen, h.metrics, h.apps \
             FROM fleet_instances i LEFT JOIN fleet_heartbeats h ON h.id = i.id WHERE true",
        );
        for term in filter.terms() {
            q.push(" AND ");
            push_term(&mut q, term)?;
        }
        if let TenantScope::Tenant(t) = scope {
            q.push(" AND i.tenant = ").push_bind(t.as_str().to_owned());
        }
        if let Some(a) = after {
            q.push(" AND i.id > ").push_bind(a.as_uuid());
        }
        q.push(" ORDER BY i.id LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = q.build().fetch_all(self.pool()).await.map_err(crate::db)?;
        rows.iter()
            .map(|r| instance_from_row(r).map_err(PushdownError::from))
            .collect()
    }
}
