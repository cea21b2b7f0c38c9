-- Drops records of orders that PostgreSQL holds final and that can no longer give units
-- back (failed, cancelled, shipped, completed): ARGV pairs of order and the record as the
-- caller read it. A record changed since that read stays. Answers how many went.
local reservations_key = KEYS[1]
local dropped = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', reservations_key, ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', reservations_key, ARGV[i])
    dropped = dropped + 1
  end
end
return dropped
