-- reserved/committed -> released, giving the units and the buyer's allowance back once (and
-- a committed order's units out of the sale's `committed`).
-- Answers the previous state (r | c), or already | missing.
local stock_key, buyers_key, reservations_key, pending_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sale_key = KEYS[5]
local order = ARGV[1]
local rec = redis.call('HGET', reservations_key, order)
if not rec then return 'missing' end
local state, user, units = string.match(rec, '^(%a):([^:]+):(%d+)$')
if state == 'x' then return 'already' end
redis.call('INCRBY', stock_key, units)
redis.call('HINCRBY', buyers_key, user, -tonumber(units))
redis.call('HSET', reservations_key, order, 'x:' .. user .. ':' .. units)
redis.call('ZREM', pending_key, order)
if state == 'c' then redis.call('HINCRBY', sale_key, 'committed', -tonumber(units)) end
return state
