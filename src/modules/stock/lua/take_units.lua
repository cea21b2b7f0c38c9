-- Adds the units of a move between buckets to this bucket: once per move (a repeat finds it
-- done), and only within the epoch they were given in (a rebuild since counted them).
-- The script defines stock_key, epoch_key, sale_key, in_key, move, move_units, move_epoch.
local took = 'none'
if move ~= '' then
  local current = redis.call('GET', epoch_key)
  if not current then
    took = 'not_loaded'
  elseif current ~= move_epoch then
    took = 'stale'
  elseif redis.call('SADD', in_key, move) == 0 then
    took = 'already'
  else
    redis.call('INCRBY', stock_key, move_units)
    redis.call('HINCRBY', sale_key, 'units', move_units)
    local expire_at = redis.call('EXPIRETIME', stock_key)
    if expire_at > 0 then redis.call('EXPIREAT', in_key, expire_at) end
    took = 'ok'
  end
end
