-- The ledger takes one row per product per shard transaction (moved from the shards'
-- ledger_pending), keyed by where it came from, instead of one row per order.
ALTER TABLE inventory_ledger
    ALTER COLUMN order_id DROP NOT NULL,
    ADD COLUMN source_shard INTEGER,
    ADD COLUMN source_id BIGINT,
    ADD CONSTRAINT inventory_ledger_keyed CHECK (order_id IS NOT NULL OR source_id IS NOT NULL);
CREATE UNIQUE INDEX inventory_ledger_source ON inventory_ledger (source_shard, source_id)
    WHERE source_id IS NOT NULL;
