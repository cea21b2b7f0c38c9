-- Sale kind and window, per-user limit, stock check and decrement, reservation record.
if redis.call('EXISTS', epoch_key) == 0 then return {'not_loaded'} end
local stock = redis.call('GET', stock_key)
if not stock then return {'not_loaded'} end
local sale = redis.call('HMGET', sale_key, 'start', 'end', 'limit', 'price', 'kind', 'recovering', 'buckets', 'rebuilt')
-- Rebuilt after a loss, and closed until the orders in flight then have settled.
if sale[6] then return {'not_loaded'} end
-- The caller chose this bucket with another bucket count (a stale layout): it looks again.
if (sale[7] or '1') ~= buckets then return {'not_loaded'} end
-- Rebuilt after a loss less than the keys' lifetime ago: Redis may have forgotten this
-- request's Idempotency-Key, which PostgreSQL keeps with its order. The caller asks it, and
-- comes back with a window of 0 when it holds no order.
if verify_window_ms > 0 and sale[8] and now_ms - tonumber(sale[8]) < verify_window_ms then
  return {'verify'}
end
if not sale[1] or sale[5] ~= sale_kind then return {'not_active'} end
if now_ms < tonumber(sale[1]) or now_ms >= tonumber(sale[2]) then return {'not_active'} end
-- Regular stock has no per-buyer limit, so it keeps no allowances (they would only grow).
local limited = sale_kind ~= 'regular'
if limited and tonumber(redis.call('HGET', buyers_key, user) or '0') + units > tonumber(sale[3]) then
  return {'limit'}
end
if tonumber(stock) < units then return {'sold_out'} end
redis.call('DECRBY', stock_key, units)
if limited then redis.call('HINCRBY', buyers_key, user, units) end
redis.call('HSET', reservations_key, order, 'r:' .. user .. ':' .. units)
redis.call('ZADD', pending_key, now_ms, order)
-- The pending set empties (and goes) whenever every order in flight settled; the records and
-- buyers go only with it, in a rebuild. So when it held other orders, all three already carry
-- their expiry (expire_with_sale.lua).
local expiring = redis.call('ZCARD', pending_key) > 1
local unit_price = sale[4]
