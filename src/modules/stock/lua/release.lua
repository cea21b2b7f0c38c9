-- A compare-and-set to released: from one of the states in ARGV[2] (`rcfp` for an order whose
-- final state in PostgreSQL is failed or cancelled; `f` for the reconciler, which fenced the
-- reservation first), giving the units and the buyer's allowance back once (and a committed
-- order's units out of the sale's `committed`).
-- Answers the previous state (r | c | f | p), already (released before), missing, or
-- kept:<state> when the reservation is in a state this release may not take it from (the
-- worker committed it: the units are sold, and stay so).
local stock_key, buyers_key, reservations_key, pending_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sale_key, committed_key = KEYS[5], KEYS[6]
local order, allowed = ARGV[1], ARGV[2]
local rec = redis.call('HGET', reservations_key, order)
if not rec then return 'missing' end
local state, user, units = string.match(rec, '^(%a):([^:]+):(%d+)$')
if state == 'x' then return 'already' end
if not string.find(allowed, state, 1, true) then return 'kept:' .. state end
redis.call('INCRBY', stock_key, units)
-- The buyer's allowance, never below 0 (regular stock keeps none; a product once sold
-- regularly and now on flash sale has orders its allowances never counted).
local allowance = tonumber(redis.call('HGET', buyers_key, user) or '0')
if allowance > tonumber(units) then
  redis.call('HINCRBY', buyers_key, user, -tonumber(units))
elseif allowance > 0 then
  redis.call('HDEL', buyers_key, user)
end
redis.call('HSET', reservations_key, order, 'x:' .. user .. ':' .. units)
redis.call('ZREM', pending_key, order)
if state == 'c' or state == 'p' then
  redis.call('HINCRBY', sale_key, 'committed', -tonumber(units))
  redis.call('ZREM', committed_key, order)
end
return state
