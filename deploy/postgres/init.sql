-- Runs once when the compose PostgreSQL volume is created: the application role and the
-- global and shard databases (`flashsale migrate` creates missing ones too, given rights).
CREATE ROLE flashsale LOGIN PASSWORD 'flashsale' CREATEDB;
CREATE DATABASE flashsale_global OWNER flashsale;
CREATE DATABASE flashsale_shard_0 OWNER flashsale;
CREATE DATABASE flashsale_shard_1 OWNER flashsale;
CREATE DATABASE flashsale_shard_2 OWNER flashsale;
CREATE DATABASE flashsale_shard_3 OWNER flashsale;
