-- A retry of a request this script reserved for, once its first try is surely over (the
-- in-flight window passed: its Redis reply was lost, or its process died before publishing).
-- The key keeps naming one order: while the reservation is held, or gone with a rebuild, the
-- retry carries on with that order (reserving again would read `purchase_limit`; a
-- rebuilt sale's order takes its units at commit, as every order in flight at a loss does).
-- Once committed it replays it; once released the marker is stale and the key starts
-- afresh. A reservation fenced for release stays in progress until the reconciler decides,
-- and one whose bucket is not loaded again yet until it is.
local marked = redis.call('GET', idem_key)
if marked then
  local rec = cjson.decode(marked)
  if rec.state == 'in_progress' and rec.order_id and rec.body_hash == body_hash
      and now_ms - (tonumber(rec.since) or 0) >= in_flight_ms then
    local held = redis.call('HGET', reservations_key, rec.order_id)
    local state = held and string.sub(held, 1, 1)
    local price = redis.call('HGET', sale_key, 'price')
    if price and (state == 'r' or (not held and redis.call('EXISTS', epoch_key) == 1)) then
      rec.since = now_ms
      redis.call('SET', idem_key, cjson.encode(rec), 'KEEPTTL')
      return {'resume', rec.order_id, price}
    elseif state == 'c' or state == 'p' then
      return {'replay', marked}
    elseif state == 'x' then
      redis.call('DEL', idem_key)
    end
  end
end
