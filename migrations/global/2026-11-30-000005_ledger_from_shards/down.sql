DROP INDEX inventory_ledger_source;
DELETE FROM inventory_ledger WHERE order_id IS NULL;
ALTER TABLE inventory_ledger
    DROP CONSTRAINT inventory_ledger_keyed,
    DROP COLUMN source_id,
    DROP COLUMN source_shard,
    ALTER COLUMN order_id SET NOT NULL;
