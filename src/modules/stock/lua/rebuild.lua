-- Replaces one bucket's counters after a Redis loss: stock, buyers (ARGV pairs user, units),
-- epoch (the same in every bucket of the sale), bucket count.
-- Reservation records a partial loss left behind go too: the rebuilt stock already counts
-- their units (on hand, or sold and off the shelf). The sale stays closed (`recovering`)
-- until the orders in flight at the loss have settled: they take their units at commit
-- (late_commit.lua), within the limit.
local stock_key, epoch_key, sale_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local reservations_key, pending_key, out_key, in_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
-- KEYS[9]: the committed set (its orders' records go with the rest).
local stock, epoch, buckets = ARGV[1], ARGV[2], ARGV[3]
redis.call('SET', stock_key, stock)
-- Moves between buckets in flight are void: the rebuilt stock already counts their units.
redis.call('DEL', buyers_key, reservations_key, pending_key, out_key, in_key, KEYS[9])
for i = 4, #ARGV, 2 do redis.call('HSET', buyers_key, ARGV[i], ARGV[i + 1]) end
local now = redis.call('TIME')
redis.call('HSET', sale_key, 'units', stock, 'committed', 0, 'recovering', 1, 'buckets', buckets,
  'rebuilt', now[1] * 1000 + math.floor(now[2] / 1000))
redis.call('SET', epoch_key, epoch)
return 1
