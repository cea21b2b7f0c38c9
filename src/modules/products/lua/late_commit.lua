-- A commit for an order whose reservation Redis no longer knows (it lost its data and the
-- counters were rebuilt without this in-flight order): take the units now if they are
-- still there and the buyer stays within the limit.
-- Answers committed | sold_out | limit | not_loaded.
local stock_key, epoch_key, reservations_key, buyers_key, sale_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
-- Only for the expiry fragment that follows: a late commit adds no pending record.
local pending_key = KEYS[6]
local order, user, units = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', epoch_key) == 0 then return 'not_loaded' end
local stock = redis.call('GET', stock_key)
if not stock then return 'not_loaded' end
if redis.call('HGET', reservations_key, order) then return 'committed' end
if tonumber(stock) < units then return 'sold_out' end
local limit = tonumber(redis.call('HGET', sale_key, 'limit') or '0')
if tonumber(redis.call('HGET', buyers_key, user) or '0') + units > limit then return 'limit' end
redis.call('DECRBY', stock_key, units)
redis.call('HINCRBY', buyers_key, user, units)
redis.call('HSET', reservations_key, order, 'c:' .. user .. ':' .. units)
