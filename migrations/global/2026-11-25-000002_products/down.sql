DROP TABLE inventory_ledger;
DROP TABLE products;
