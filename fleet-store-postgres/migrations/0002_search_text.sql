-- fleet store, layout 2: the text `text:` filter terms search, folded in Rust.
--
-- `search_text` holds exactly what the live view searches for an instance
-- (`fleet_core::live::searchable_text`: the hostname folded with Rust's `str::to_lowercase`, then
-- each IP address, one per line). The push-down matches it with `LIKE` under the "C" collation,
-- so no locale rule of this server folds or compares anything: `ILIKE` on the hostname folded
-- with the database's locale and disagreed with the live view on non-ASCII text (İ, final Σ, …).
--
-- SQL's `lower()` is not Rust's `to_lowercase`, so existing rows are not filled in here:
-- `PgStore::migrate` fills every row whose `search_text` is NULL from Rust, in batches, after
-- this migration; until then (and for rows an older binary writes meanwhile) the push-down
-- checks such rows in Rust.

ALTER TABLE fleet_instances ADD COLUMN search_text text COLLATE "C";

CREATE INDEX fleet_instances_search_text ON fleet_instances USING gin (search_text gin_trgm_ops);

-- The rows still to fill in (empty once the backfill ran).
CREATE INDEX fleet_instances_unfolded ON fleet_instances (id) WHERE search_text IS NULL;

-- Only the push-down's ILIKE used it.
DROP INDEX fleet_instances_hostname;
