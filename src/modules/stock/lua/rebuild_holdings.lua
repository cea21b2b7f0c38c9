-- Gives a bucket rebuilt under ARGV[1] its live orders back (ARGV triples order, user, units
-- after the epoch and ARGV[2]), in chunks so a big sale's rebuild never holds Redis for long:
-- each order's record as persisted, so a later cancel releases its units exactly once
-- (release.lua), and with ARGV[2] = '1' (a sale with a per-buyer limit) each buyer's
-- allowance. Nothing when another rebuild replaced the bucket meanwhile. A flash sale is
-- closed until reopened, so no reservation reads a buyer before all of them are back.
local buyers_key, epoch_key, reservations_key = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', epoch_key) ~= ARGV[1] then return 0 end
local limited = ARGV[2] == '1'
for i = 3, #ARGV, 3 do
  local order, user, units = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if limited then redis.call('HINCRBY', buyers_key, user, units) end
  redis.call('HSET', reservations_key, order, 'p:' .. user .. ':' .. units)
end
return 1
