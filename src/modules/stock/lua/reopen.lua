-- Opens a rebuilt sale once the orders in flight at the loss have settled.
local sale_key, lost_key = KEYS[1], KEYS[2]
redis.call('DEL', lost_key)
return redis.call('HDEL', sale_key, 'recovering')
