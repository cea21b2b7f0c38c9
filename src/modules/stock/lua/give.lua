-- The first half of moving units between two buckets of a sale (each its own slot, maybe its
-- own node): takes up to `want` units off this bucket's counter and records the move as
-- outgoing, until the receiving bucket has them (take.lua) and the record goes. The bucket
-- gives its `units` with them, so its books balance at every step.
-- Answers {units given, the sale's epoch}.
local stock_key, epoch_key, sale_key, out_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local move, to_bucket, want, now_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local epoch = redis.call('GET', epoch_key)
if not epoch then return {0, ''} end
local units = math.min(want, tonumber(redis.call('GET', stock_key) or '0'))
if units <= 0 then return {0, epoch} end
redis.call('DECRBY', stock_key, units)
redis.call('HINCRBY', sale_key, 'units', -units)
redis.call('HSET', out_key, move, to_bucket .. ':' .. units .. ':' .. epoch .. ':' .. now_ms)
local expire_at = redis.call('EXPIRETIME', stock_key)
if expire_at > 0 then redis.call('EXPIREAT', out_key, expire_at) end
return {units, epoch}
