-- Gives a bucket rebuilt under ARGV[1] its live orders back (ARGV triples order, user, units
-- after the epoch), in chunks so a big sale's rebuild never holds Redis for long: each buyer's
-- allowance, and each order's record as persisted, so a later cancel releases its units and
-- allowance exactly once (release.lua). Nothing when another rebuild replaced the bucket
-- meanwhile. The sale is closed until reopened, so no reservation reads a buyer before all of
-- them are back.
local buyers_key, epoch_key, reservations_key = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', epoch_key) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 3 do
  local order, user, units = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('HINCRBY', buyers_key, user, units)
  redis.call('HSET', reservations_key, order, 'p:' .. user .. ':' .. units)
end
return 1
