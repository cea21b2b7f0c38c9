-- Refunds owed, written before the gateway is asked (in the transaction that ends a charged
-- order where there is one) and deleted once it answered: a refund survives a crash, a lost
-- retry message or a dead-lettered one, and the reconciler retries it from here until done.
CREATE TABLE refunds_owed (
    order_id UUID PRIMARY KEY,
    user_id UUID NOT NULL,
    due_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX refunds_owed_due ON refunds_owed (due_at);
