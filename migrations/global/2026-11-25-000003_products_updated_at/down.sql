DROP INDEX products_updated_at;
