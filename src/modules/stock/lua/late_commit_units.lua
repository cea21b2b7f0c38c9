-- The late commit itself (late_commit.lua names the keys and arguments).
if redis.call('EXISTS', epoch_key) == 0 then return {'not_loaded'} end
local stock = redis.call('GET', stock_key)
if not stock then return {'not_loaded'} end
-- A record made meanwhile (a redelivery's late commit) decides; a released one stays released.
local rec = redis.call('HGET', reservations_key, order)
if rec then
  local state = string.sub(rec, 1, 1)
  if state == 'c' or state == 'p' then return {'committed', redis.call('GET', epoch_key)} end
  return {'released'}
end
if tonumber(stock) < units then return {'sold_out'} end
-- No terms yet (a rebuild writes them first; a bucket lost since): not loaded, never a limit of 0.
local terms = redis.call('HMGET', sale_key, 'limit', 'kind')
local limit, limited = terms[1], terms[2] ~= 'regular'
if not limit then return {'not_loaded'} end
if limited and tonumber(redis.call('HGET', buyers_key, user) or '0') + units > tonumber(limit) then
  return {'limit'}
end
redis.call('DECRBY', stock_key, units)
if limited then redis.call('HINCRBY', buyers_key, user, units) end
redis.call('HSET', reservations_key, order, 'c:' .. user .. ':' .. units)
redis.call('HINCRBY', sale_key, 'committed', units)
local now = redis.call('TIME')
redis.call('ZADD', committed_key, now[1] * 1000 + math.floor(now[2] / 1000), order)
local committed_until = redis.call('EXPIRETIME', stock_key)
if committed_until > 0 and redis.call('TTL', committed_key) == -1 then
  redis.call('EXPIREAT', committed_key, committed_until)
end
