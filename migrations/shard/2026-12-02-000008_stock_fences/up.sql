-- A rebuild of a product's stock in Redis (after a loss) voids every commit made there before
-- it: the rebuild counts those units back on the shelf. It writes its epoch here, in every
-- shard, before it reads PostgreSQL; a worker writes an order sold only when no fence is newer
-- than the epoch it committed under, checked in the transaction that writes the order, under a
-- shared advisory lock the fence's write takes exclusively (see orders/fences.rs).
CREATE TABLE stock_fences (
    product_id UUID NOT NULL,
    bucket INTEGER NOT NULL,
    epoch UUID NOT NULL,
    PRIMARY KEY (product_id, bucket)
);
