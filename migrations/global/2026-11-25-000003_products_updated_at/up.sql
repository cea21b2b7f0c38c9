CREATE INDEX products_updated_at ON products (updated_at, id);
