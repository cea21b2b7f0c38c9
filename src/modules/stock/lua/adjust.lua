-- Applies an inventory change to a loaded counter, refusing to go below zero (the units
-- already reserved). Answers {status, stock}.
local stock_key, epoch_key, sale_key = KEYS[1], KEYS[2], KEYS[3]
local delta = tonumber(ARGV[1])
if redis.call('EXISTS', epoch_key) == 0 then return {'not_loaded', 0} end
local stock = tonumber(redis.call('GET', stock_key) or '0')
if stock + delta < 0 then return {'below', stock} end
redis.call('HINCRBY', sale_key, 'units', delta)
return {'ok', redis.call('INCRBY', stock_key, delta)}
