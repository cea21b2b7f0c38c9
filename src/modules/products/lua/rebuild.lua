-- Replaces the counters after a Redis loss: stock, buyers (ARGV pairs user, units), epoch.
local stock_key, epoch_key, buyers_key = KEYS[1], KEYS[2], KEYS[3]
local stock, epoch = ARGV[1], ARGV[2]
redis.call('SET', stock_key, stock)
redis.call('DEL', buyers_key)
for i = 3, #ARGV, 2 do redis.call('HSET', buyers_key, ARGV[i], ARGV[i + 1]) end
redis.call('SET', epoch_key, epoch)
return 1
