-- Which sale (by its start) of each product was loaded into Redis: that sale, once it lost
-- its keys, is rebuilt from the truth (orders, ledger), never loaded afresh. The on-hand count and the ledger position
-- at that moment let the invariant auditor check that the count agrees with the ledger.
CREATE TABLE stock_loads (
    product_id       UUID PRIMARY KEY REFERENCES products (id),
    sale_start       TIMESTAMPTZ NOT NULL,
    loaded_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    loaded_inventory INTEGER NOT NULL,
    ledger_mark      BIGINT NOT NULL
);

-- An operator's change of the on-hand count is a ledger row too, so the count always equals
-- where it started plus the ledger.
ALTER TABLE inventory_ledger
    DROP CONSTRAINT inventory_ledger_reason_check,
    ADD CONSTRAINT inventory_ledger_reason_check CHECK (reason IN ('sold', 'released', 'adjusted')),
    DROP CONSTRAINT inventory_ledger_keyed,
    ADD CONSTRAINT inventory_ledger_keyed
        CHECK (order_id IS NOT NULL OR source_id IS NOT NULL OR reason = 'adjusted');
