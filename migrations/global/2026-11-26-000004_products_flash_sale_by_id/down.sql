DROP INDEX products_flash_sale_id;
