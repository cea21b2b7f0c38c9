-- The flash-sale list pages in id order. With only an index on flash_sale_start, PostgreSQL
-- walked the primary key in id order and filtered, reading the whole catalogue (10 s on
-- 5M products) to find the few products on sale; this partial index holds only those.
CREATE INDEX products_flash_sale_id ON products (id) WHERE is_flash_sale;
