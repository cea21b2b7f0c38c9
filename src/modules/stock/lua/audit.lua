-- The auditor's look at one sale's books, atomic and as cheap as the orders in flight:
-- available + reserved (the records of the pending orders, fenced ones included) + committed (a counter the commit,
-- late commit and release scripts keep beside their records) against the units the sale
-- holds. Settled records are not read again: a sale of millions of units would hold Redis
-- for as long as it took to read them. Answers {state, units_off, per-buyer limit}.
local stock_key, epoch_key, sale_key, reservations_key, pending_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', epoch_key) == 0 then return {'not_loaded', 0, 0} end
local sale = redis.call('HMGET', sale_key, 'units', 'limit', 'recovering', 'committed')
if not sale[1] then return {'not_loaded', 0, 0} end
local state = 'open'
if sale[3] then state = 'recovering' end
local limit = tonumber(sale[2] or '0')
-- Loaded by a version without the counter: not checked (a sale ends within hours).
if not sale[4] then return {state, 0, limit} end
local held = tonumber(sale[4]) + units_held(reservations_key, pending_key, 'rf')
local available = tonumber(redis.call('GET', stock_key) or '0')
return {state, available + held - tonumber(sale[1]), limit}
