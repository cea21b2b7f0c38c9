-- One item of a regular order (its idempotency is handled per request, not per item), with
-- the units a move from another bucket brought this buyer.
local stock_key, epoch_key, sale_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local reservations_key, pending_key = KEYS[5], KEYS[6]
local user, units, order, now_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local sale_kind, buckets, in_key = ARGV[5], ARGV[6], KEYS[7]
local move, move_units, move_epoch = ARGV[7], tonumber(ARGV[8]), ARGV[9]
-- A regular order's key was checked against PostgreSQL before its first item.
local verify_window_ms = 0
