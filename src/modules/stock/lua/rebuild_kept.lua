-- Rebuilds a bucket of a flash sale that another bucket's loss (a Cluster node) left intact:
-- its records, buyers and orders in flight stay, so those orders commit as they would have
-- (no late commit). Its counter becomes what the caller dealt it (ARGV[1], its share of the
-- on-hand units PostgreSQL holds after the caller fenced it with this epoch) less the units
-- its orders in flight hold (reserved, fenced or committed, and not yet written: on hand in
-- PostgreSQL), never more than the units not yet dealt (ARGV[2]) allow. The bucket closes
-- (`recovering`) with the rest of the sale until it reopens; moves in flight are void (the
-- dealt units already count theirs).
-- Answers {'kept', units taken from what was left to deal} | {'lost'} (no epoch or counter:
-- the caller rebuilds it from nothing) | {'newer'} (at this epoch or a later one already).
local stock_key, epoch_key, sale_key = KEYS[1], KEYS[2], KEYS[3]
local reservations_key, pending_key, out_key, in_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local committed_key = KEYS[9]
local share, undealt, epoch = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local stored = redis.call('GET', epoch_key)
if stored and stored >= epoch then return {'newer', 0} end
if not stored or redis.call('EXISTS', stock_key) == 0 then return {'lost', 0} end
local reserved = units_held(reservations_key, pending_key, 'rf')
local in_flight = reserved + units_held(reservations_key, committed_key, 'c')
local taken = math.max(share, in_flight)
if taken > undealt then taken = math.max(undealt, in_flight) end
local stock = taken - in_flight
redis.call('SET', stock_key, stock, 'KEEPTTL')
local committed = tonumber(redis.call('HGET', sale_key, 'committed') or '0')
redis.call('HSET', sale_key, 'units', stock + reserved + committed, 'recovering', 1)
redis.call('DEL', out_key, in_key)
redis.call('SET', epoch_key, epoch, 'KEEPTTL')
return {'kept', taken}
