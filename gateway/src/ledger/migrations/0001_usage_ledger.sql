-- The usage ledger: one row per metered request, and per-day rollups kept with it.
--
-- Raw events are partitioned by month of `time_ms` (the partitions are created by the
-- gateway as months arrive, and dropped whole by retention). The primary key holds the
-- partition key, as PostgreSQL requires; an event's time never changes between deliveries,
-- so (time_ms, id) makes a redelivered event a conflict. Token counts are NUMERIC: a
-- backend reports them as unsigned 64-bit numbers, which BIGINT cannot always hold.
CREATE TABLE usage_events (
    id                  text        NOT NULL,
    time_ms             bigint      NOT NULL,
    request_id          text        NOT NULL,
    key_id              text        NOT NULL,
    tenant              text        NOT NULL,
    tier                text        NOT NULL,
    model               text        NOT NULL,
    backend             text        NOT NULL,
    route               text        NOT NULL,
    prompt_tokens       numeric(20) NOT NULL,
    completion_tokens   numeric(20) NOT NULL,
    cached_tokens       numeric(20) NOT NULL,
    cache_status        text        NOT NULL,
    status              integer     NOT NULL,
    latency_ms          bigint      NOT NULL,
    ttft_ms             bigint,
    client_disconnected boolean     NOT NULL,
    usage_reported      boolean     NOT NULL,
    usage_source        text        NOT NULL,
    PRIMARY KEY (time_ms, id)
) PARTITION BY RANGE (time_ms);

-- A tenant's events, for its purge.
CREATE INDEX usage_events_by_tenant ON usage_events (tenant);

-- Sums per UTC day, key, model, tier and tenant, added to in the same statement that
-- inserts the events they count (only those that were new). `billed_*` are the tokens of
-- each price kind (a cache hit bills every token as cached); `spend_nano` is what the
-- events counted against the key's monthly budget.
CREATE TABLE usage_rollups (
    day               date    NOT NULL,
    key_id            text    NOT NULL,
    model             text    NOT NULL,
    tier              text    NOT NULL,
    tenant            text    NOT NULL,
    requests          bigint  NOT NULL,
    prompt_tokens     numeric NOT NULL,
    completion_tokens numeric NOT NULL,
    cached_tokens     numeric NOT NULL,
    billed_input      numeric NOT NULL,
    billed_output     numeric NOT NULL,
    billed_cached     numeric NOT NULL,
    spend_nano        numeric NOT NULL,
    PRIMARY KEY (day, key_id, model, tier, tenant)
);

CREATE INDEX usage_rollups_by_tenant ON usage_rollups (tenant);
