DELETE FROM inventory_ledger WHERE reason = 'adjusted';
ALTER TABLE inventory_ledger
    DROP CONSTRAINT inventory_ledger_keyed,
    ADD CONSTRAINT inventory_ledger_keyed CHECK (order_id IS NOT NULL OR source_id IS NOT NULL),
    DROP CONSTRAINT inventory_ledger_reason_check,
    ADD CONSTRAINT inventory_ledger_reason_check CHECK (reason IN ('sold', 'released'));
DROP TABLE stock_loads;
