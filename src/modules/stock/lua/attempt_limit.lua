-- The per-user attempt limit of the flash-sale path, in a one-minute window.
-- A borrowing round of the same attempt counts once.
if move == '' then
  local attempts = redis.call('INCR', attempts_key)
  if attempts == 1 then redis.call('EXPIRE', attempts_key, 60) end
  if attempts > attempts_per_minute then return {'rate_limited'} end
end
