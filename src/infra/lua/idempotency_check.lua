-- The check shared by every script that takes an Idempotency-Key (the script defines
-- idem_key and body_hash): replay what an accepted key holds, refuse the same key with
-- another body, or one still in flight.
local idem = redis.call('GET', idem_key)
if idem then
  local rec = cjson.decode(idem)
  if rec.body_hash ~= body_hash then return {'mismatch'} end
  if rec.state == 'in_progress' then return {'in_progress'} end
  return {'replay', idem}
end
