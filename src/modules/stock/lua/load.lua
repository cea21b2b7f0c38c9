-- Loads one bucket of a sale: the window, price and limit always (one HSET, so an edit lands
-- at once), the counter only on the first load (a later load must not reset units already
-- reserved) and never when `inventory` is '-' (terms only: the sale's first bucket was
-- loaded before, so a missing bucket here is a loss for the rebuild, not a fresh sale).
-- `units` is what the bucket holds in all: available + reserved + `committed` (the auditor's
-- sum); `buckets` is how many buckets the sale was split into, fixed at its first load.
-- Answers {1 when it loaded the counter, the sale's bucket count}.
local stock_key, epoch_key, sale_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local reservations_key, pending_key, out_key, in_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inventory, epoch, start_ms, end_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local per_user_limit, price, expire_at, sale_kind = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local buckets = ARGV[9]
redis.call('HSET', sale_key, 'start', start_ms, 'end', end_ms, 'limit', per_user_limit, 'price', price, 'kind', sale_kind)
local loaded = 0
if inventory ~= '-' and redis.call('SET', epoch_key, epoch, 'NX') then
  redis.call('SET', stock_key, inventory)
  redis.call('HSET', sale_key, 'units', inventory, 'committed', 0, 'buckets', buckets)
  loaded = 1
end
-- Loaded before buckets existed: one bucket.
redis.call('HSETNX', sale_key, 'buckets', 1)
for _, key in ipairs({stock_key, epoch_key, sale_key, buyers_key, reservations_key, pending_key, out_key, in_key}) do
  redis.call('EXPIREAT', key, expire_at)
end
return {loaded, tonumber(redis.call('HGET', sale_key, 'buckets'))}
