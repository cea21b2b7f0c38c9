CREATE TABLE products (
    id               UUID PRIMARY KEY,
    name             TEXT NOT NULL CHECK (length(name) > 0),
    description      TEXT NOT NULL DEFAULT '',
    price            NUMERIC(12, 2) NOT NULL CHECK (price >= 0),
    -- Unsold units on hand: decremented when an order is persisted, given back on release.
    inventory        INTEGER NOT NULL CHECK (inventory >= 0),
    category_id      UUID,
    is_flash_sale    BOOLEAN NOT NULL DEFAULT false,
    flash_sale_price NUMERIC(12, 2) CHECK (flash_sale_price >= 0),
    flash_sale_start TIMESTAMPTZ,
    flash_sale_end   TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (NOT is_flash_sale OR (flash_sale_price IS NOT NULL AND flash_sale_start IS NOT NULL
                                 AND flash_sale_end IS NOT NULL AND flash_sale_end > flash_sale_start))
);

CREATE INDEX products_category_id ON products (category_id, id);
CREATE INDEX products_flash_sale ON products (flash_sale_start) WHERE is_flash_sale;

-- Every stock movement caused by an order, once per (order, product, reason).
CREATE TABLE inventory_ledger (
    id         BIGSERIAL PRIMARY KEY,
    order_id   UUID NOT NULL,
    product_id UUID NOT NULL REFERENCES products (id),
    delta      INTEGER NOT NULL,
    reason     TEXT NOT NULL CHECK (reason IN ('sold', 'released')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (order_id, product_id, reason)
);
