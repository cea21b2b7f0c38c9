-- Stock movements caused by order changes in this shard, written in the same transaction as
-- the change (one row per product per transaction; delta < 0: sold, > 0: back on the shelf)
-- and moved to the global ledger by the worker. Applied rows are deleted; the global
-- ledger's (source_shard, source_id) key makes moving a row twice impossible.
CREATE TABLE ledger_pending (
    id         BIGSERIAL PRIMARY KEY,
    product_id UUID NOT NULL,
    delta      INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
