-- Adds the next buyers (ARGV pairs user, units, after the epoch) of a bucket rebuilt under
-- ARGV[1], in chunks, so a big sale's rebuild never holds Redis for long; nothing when another
-- rebuild replaced the bucket meanwhile. The sale is closed until reopened, so no
-- reservation checks a buyer before all of them are back.
local buyers_key, epoch_key = KEYS[1], KEYS[2]
if redis.call('GET', epoch_key) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', buyers_key, ARGV[i], ARGV[i + 1]) end
return 1
