-- fleet store, layout 1. Times are Unix milliseconds (bigint); records are the fleet-core types as
-- JSON, with the columns queries filter or index on pulled out beside them.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE fleet_meta (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);

-- The change feed. Every durable write takes the one head row's lock to number its changes, so
-- numbers are handed out in commit order: once a reader has seen change n, nothing smaller
-- commits later.
CREATE TABLE fleet_feed_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL
);
INSERT INTO fleet_feed_head (one, seq) VALUES (true, 0);

CREATE TABLE fleet_changes (
    seq      bigint PRIMARY KEY,
    instance uuid NOT NULL,
    kind     smallint NOT NULL
);

-- Durable instance records (registration, tags, groups, certificates).
CREATE TABLE fleet_instances (
    id       uuid PRIMARY KEY,
    tenant   text,
    hostname text NOT NULL,
    tags     jsonb NOT NULL,
    groups   text[] NOT NULL,
    record   jsonb NOT NULL
);
CREATE INDEX fleet_instances_tenant ON fleet_instances (tenant, id);
CREATE INDEX fleet_instances_tags ON fleet_instances USING gin (tags jsonb_path_ops);
CREATE INDEX fleet_instances_groups ON fleet_instances USING gin (groups);
CREATE INDEX fleet_instances_hostname ON fleet_instances USING gin (hostname gin_trgm_ops);

-- Last known state from heartbeats, written behind in batches. No index but the key, and room on
-- each page, so the updates stay HOT.
CREATE TABLE fleet_heartbeats (
    id        uuid PRIMARY KEY,
    last_seen bigint NOT NULL,
    metrics   jsonb,
    apps      jsonb
) WITH (fillfactor = 70);

-- The heartbeat log: each flush's records (ids, last-seen times, metrics), so every replica sees
-- the heartbeats that reached the others. Numbered under its own head row's lock (commit order),
-- kept for ten minutes.
CREATE TABLE fleet_hb_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL
);
INSERT INTO fleet_hb_head (one, seq) VALUES (true, 0);

CREATE TABLE fleet_hb_log (
    seq       bigint PRIMARY KEY,
    logged_at timestamptz NOT NULL DEFAULT now(),
    ids       uuid[] NOT NULL,
    last_seen int8[] NOT NULL,
    metrics   jsonb[] NOT NULL
);

CREATE TABLE fleet_tokens (
    id         text PRIMARY KEY,
    created_at bigint NOT NULL,
    record     jsonb NOT NULL
);

CREATE TABLE fleet_ledger (
    token text NOT NULL,
    n     bigserial,
    entry jsonb NOT NULL,
    PRIMARY KEY (token, n)
);

-- The retry-window index: the last enrollment per token and key.
CREATE TABLE fleet_enrollments (
    token    text NOT NULL,
    key      bytea NOT NULL,
    instance uuid NOT NULL,
    at       bigint NOT NULL,
    PRIMARY KEY (token, key)
);

CREATE TABLE fleet_revoked (
    serial    bytea PRIMARY KEY,
    not_after bigint NOT NULL,
    record    jsonb NOT NULL
);

CREATE TABLE fleet_status_changes (
    at          bigint NOT NULL,
    instance    uuid NOT NULL,
    from_status smallint NOT NULL,
    to_status   smallint NOT NULL,
    n           bigserial,
    PRIMARY KEY (at, instance, from_status, to_status)
);
CREATE INDEX fleet_status_changes_instance ON fleet_status_changes (instance, at);

CREATE TABLE fleet_alerts (
    at     bigint NOT NULL,
    kind   text NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (at, kind)
);

CREATE TABLE fleet_trends (
    start  bigint PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE fleet_commands (
    id              uuid PRIMARY KEY,
    instance        uuid NOT NULL,
    batch           uuid,
    tenant          text,
    state           text NOT NULL,
    expires_at      bigint NOT NULL,
    lease_until     bigint,
    idempotency_key text,
    finished_at     bigint,
    record          jsonb NOT NULL
);
CREATE UNIQUE INDEX fleet_commands_key ON fleet_commands (instance, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX fleet_commands_instance ON fleet_commands (instance, id);
CREATE INDEX fleet_commands_open ON fleet_commands (instance, id)
    WHERE state IN ('queued', 'delivered');
CREATE INDEX fleet_commands_expiry ON fleet_commands (expires_at)
    WHERE state IN ('queued', 'delivered');
CREATE INDEX fleet_commands_batch ON fleet_commands (batch, id) WHERE batch IS NOT NULL;
CREATE INDEX fleet_commands_finished ON fleet_commands (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE fleet_policies (
    name   text PRIMARY KEY,
    record jsonb NOT NULL
);

-- Leases for singleton work across replicas (the sweeper); the epoch grows at each change of hands.
CREATE TABLE fleet_leases (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at bigint NOT NULL
);
