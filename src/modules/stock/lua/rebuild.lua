-- Replaces one lost bucket's counters after a Redis loss (a flash sale's buckets the loss
-- spared go through rebuild_kept.lua instead): stock, epoch (the same in every bucket of
-- the sale), bucket count, closed ('1': a flash sale, closed until reopened). The live orders'
-- holdings come after, in chunks (rebuild_holdings.lua). The caller fenced PostgreSQL with this epoch before it read the numbers:
-- a bucket already at this epoch or a later one (another rebuild's) is left as it is.
-- Reservation records a partial loss left behind go too: the rebuilt stock already counts
-- their units (on hand, or sold and off the shelf). The sale stays closed (`recovering`)
-- until the orders in flight at the loss have settled: they take their units at commit
-- (late_commit.lua), within the limit.
local stock_key, epoch_key, sale_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local reservations_key, pending_key, out_key, in_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
-- KEYS[9]: the committed set (its orders' records go with the rest).
local stock, epoch, buckets, closed = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local stored = redis.call('GET', epoch_key)
if stored and stored >= epoch then return 0 end
-- Regular stock another order loaded meanwhile is intact: its reservations stay, and its
-- commits are renewed under this epoch (the fence voided the older one).
if closed ~= '1' and stored and redis.call('EXISTS', stock_key) == 1 then
  redis.call('SET', epoch_key, epoch, 'KEEPTTL')
  return 2
end
redis.call('SET', stock_key, stock)
-- Moves between buckets in flight are void: the rebuilt stock already counts their units.
redis.call('DEL', buyers_key, reservations_key, pending_key, out_key, in_key, KEYS[9])
local now = redis.call('TIME')
redis.call('HSET', sale_key, 'units', stock, 'committed', 0, 'buckets', buckets,
  'rebuilt', now[1] * 1000 + math.floor(now[2] / 1000))
if closed == '1' then redis.call('HSET', sale_key, 'recovering', 1) end
redis.call('SET', epoch_key, epoch)
return 1
