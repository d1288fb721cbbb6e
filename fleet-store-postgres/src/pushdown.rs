//! Filters pushed down to SQL: [`PgStore::list_matching`] answers a fleet filter from the
//! database alone, on the indexed columns, for tools that have no live view (reports, exports,
//! a one-off script against a replica's database).
//!
//! A control plane lists from its live view instead, which answers the same first page in a
//! fraction of the time (see the README's figures). Status terms are live state that the
//! database does not hold, so they are refused with [`PushdownError::Status`].
//!
//! Every other filter selects exactly what the live view selects:
//!
//! - `text:` matches `fleet_instances.search_text`, which the store writes from Rust with the
//!   live view's own function ([`fleet_core::live::searchable_text`]: the hostname folded by
//!   `str::to_lowercase`, then the IP addresses, one per line), with `LIKE` under the `"C"`
//!   collation and the needle (already folded by the filter) escaped — a plain substring test,
//!   code point for code point, that no locale of the server takes part in. Needles the live view
//!   never matches (empty, or holding a line break or NUL; only a filter built in code can hold
//!   them) match nothing here either. Rows without `search_text` (written by a binary from before
//!   it, until [`PgStore::migrate`] fills them in) are fetched as candidates and their `text:`
//!   terms checked in Rust, the same way.
//! - Tag, group and tenant terms compare exactly and case-sensitively (jsonb containment and
//!   text equality, which are byte comparisons), as the live view's interned postings do.

use fleet_core::filter::{TagSelector, Term};
use fleet_core::{Filter, Instance, InstanceId, StoreError, TenantScope};
use sqlx::{Postgres, QueryBuilder, Row};

use crate::PgStore;
use crate::store::{instance_from_row, search_text};

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

/// `%needle%` for LIKE, with the pattern characters of the needle escaped (`\` is LIKE's
/// default escape character).
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

/// Whether the live view's text index can match `needle` at all: it refuses empty needles and
/// needles with its line separator or NUL (which PostgreSQL text cannot hold either).
fn searchable(needle: &str) -> bool {
    !needle.is_empty() && !needle.contains(['\n', '\0'])
}

/// The live view's test of one `text:` term against an instance's searchable text.
fn text_matches(text: &str, needles: &[String]) -> bool {
    needles
        .iter()
        .any(|n| searchable(n) && text.contains(n.as_str()))
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
            let patterns: Vec<String> = needles
                .iter()
                .filter(|n| searchable(n))
                .map(|n| contains_pattern(n))
                .collect();
            if patterns.is_empty() {
                q.push("false");
            } else {
                // Rows not yet folded are candidates, checked in Rust (`text_matches`).
                q.push("(i.search_text IS NULL OR i.search_text COLLATE \"C\" LIKE ANY(")
                    .push_bind(patterns)
                    .push("::text[]))");
            }
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

fn query(
    filter: &Filter,
    scope: &TenantScope,
    after: Option<InstanceId>,
    limit: usize,
) -> Result<QueryBuilder<'static, Postgres>, PushdownError> {
    let mut q: QueryBuilder<'static, Postgres> = QueryBuilder::new(
        "SELECT i.record, h.last_seen, h.metrics, h.apps, i.search_text IS NULL AS unfolded \
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
    Ok(q)
}

impl PgStore {
    /// Up to `limit` instances that `filter` selects within `scope`, with ids greater than
    /// `after`, in id order — the filter evaluated by PostgreSQL on the indexed columns (tags
    /// `jsonb` with a GIN index, groups `text[]` with a GIN index, the searchable text with a
    /// trigram index), selecting exactly what the live view selects (see the module docs).
    /// Page on with the last id returned. [`PushdownError::Status`] for a filter with `status:`
    /// terms.
    pub async fn list_matching(
        &self,
        filter: &Filter,
        scope: &TenantScope,
        after: Option<InstanceId>,
        limit: usize,
    ) -> Result<Vec<Instance>, PushdownError> {
        let texts: Vec<&[String]> = filter
            .terms()
            .iter()
            .filter_map(|t| match t {
                Term::Text(needles) => Some(needles.as_slice()),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let want = limit - out.len();
            let rows = query(filter, scope, cursor, want)?
                .build()
                .fetch_all(self.pool())
                .await
                .map_err(crate::db)?;
            let fetched = rows.len();
            for row in &rows {
                let inst = instance_from_row(row)?;
                cursor = Some(inst.id);
                let unfolded: bool = row.try_get("unfolded").map_err(crate::db)?;
                if unfolded {
                    // A row without `search_text` passed the text terms unchecked.
                    let text = search_text(&inst);
                    if !texts.iter().all(|needles| text_matches(&text, needles)) {
                        continue;
                    }
                }
                out.push(inst);
            }
            // Done when the page is full, or the database has no more candidates.
            if out.len() >= limit || fetched < want {
                return Ok(out);
            }
        }
    }
}
