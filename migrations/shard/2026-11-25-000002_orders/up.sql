CREATE TABLE orders (
    id               UUID PRIMARY KEY,
    user_id          UUID NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'shipped', 'completed', 'cancelled', 'failed')),
    kind             TEXT NOT NULL CHECK (kind IN ('flash_sale', 'regular')),
    total_amount     NUMERIC(12, 2) NOT NULL,
    payment_method   TEXT NOT NULL,
    shipping_address TEXT,
    -- Why a failed order failed (declined, sold out after a reconcile, retries exhausted).
    failure_reason   TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX orders_user_id_id ON orders (user_id, id DESC);

CREATE TABLE order_items (
    order_id   UUID NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id UUID NOT NULL,
    quantity   INTEGER NOT NULL CHECK (quantity > 0),
    price      NUMERIC(12, 2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

CREATE INDEX order_items_product_id ON order_items (product_id);
