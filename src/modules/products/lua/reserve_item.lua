-- One item of a regular order (its idempotency is handled per request, not per item).
local stock_key, epoch_key, sale_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local reservations_key, pending_key = KEYS[5], KEYS[6]
local user, units, order, now_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local sale_kind, buckets = ARGV[5], ARGV[6]
