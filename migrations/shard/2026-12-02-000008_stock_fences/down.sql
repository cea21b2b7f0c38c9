DROP TABLE stock_fences;
