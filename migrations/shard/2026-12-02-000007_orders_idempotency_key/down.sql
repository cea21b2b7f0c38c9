DROP INDEX orders_user_idempotency_key;
ALTER TABLE orders DROP COLUMN idempotency_key;
