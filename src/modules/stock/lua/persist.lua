-- committed -> persisted for each order in ARGV, once its final row is in PostgreSQL: it
-- leaves the committed set the reconciler scans. Its units stay sold (the sale's
-- `committed` keeps counting them). Any other state is left as it is.
local reservations_key, committed_key = KEYS[1], KEYS[2]
for i = 1, #ARGV do
  local order = ARGV[i]
  local rec = redis.call('HGET', reservations_key, order)
  if rec and string.sub(rec, 1, 1) == 'c' then
    redis.call('HSET', reservations_key, order, 'p' .. string.sub(rec, 2))
  end
  redis.call('ZREM', committed_key, order)
end
return #ARGV
