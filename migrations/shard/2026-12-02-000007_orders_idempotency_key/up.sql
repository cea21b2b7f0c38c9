-- The Idempotency-Key of the request that made an order (its digest, scoped to the route:
-- `flash:<product>:<digest>` or `orders:<digest>`), kept with the order: PostgreSQL is the
-- arbiter where Redis can forget. One order per user and key, whatever Redis remembers.
ALTER TABLE orders ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX orders_user_idempotency_key ON orders (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
