-- The waiting room of one sale, fair across API pods: tickets in order of first arrival, one
-- per buyer, and a horizon (`admitted`) that moves at most once per tick by the capacity the
-- caller's admission controller grants, and never past what the stock can serve.
-- The units left and whether the buyer's Idempotency-Key already has an answer: read here
-- when the sale has one bucket (KEYS[2], KEYS[3] share the room's slot); with several, whose
-- buckets may live on other nodes, from the caller's read just before (ARGV[8], ARGV[9]).
-- Answers {'pass'} (no one waits and there is room), {'admitted'}, {'waiting', ticket,
-- position}, {'sold_out'}, or {'replay'} (the key was used: the reservation script replays
-- its answer, or resumes, answers or frees the reservation its unanswered request left).
-- With no buyer (ARGV[1] = ''; KEYS[3] unused), an API process watching the room for its
-- pushed streams moves the horizon like a buyer would and reads it: {'tick', admitted,
-- units left}, or {'pass'} when the sale is not loaded.
-- Every answer read from the room ends with its unserved tickets (taken, not yet back through
-- an admission): while there are any, pods send every attempt here, or a returning ticket
-- holder is never counted `consumed` and the horizon stops short of the units left.
local room_key, stock_key, idem_key = KEYS[1], KEYS[2], KEYS[3]
local buyer, key_digest, now_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local capacity, tick_ms, slack, ttl_secs = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local stock, key_used, hold_ms = ARGV[8], ARGV[9] == '1', tonumber(ARGV[10])
if stock_key then
  if buyer ~= '' then
    key_used = redis.call('EXISTS', idem_key) == 1
  end
  stock = redis.call('GET', stock_key) or ''
end
if key_used then return {'replay'} end
-- Not loaded: the reservation script answers that.
if stock == '' then return {'pass'} end
stock = tonumber(stock)
local room = redis.call('HMGET', room_key, 'seq', 'admitted', 'consumed', 'advanced_at', 'mark', 'mark_at', 'held')
local seq, admitted = tonumber(room[1] or '0'), tonumber(room[2] or '0')
local consumed, advanced_at = tonumber(room[3] or '0'), tonumber(room[4] or '0')
local mark, mark_at, held = tonumber(room[5] or '0'), tonumber(room[6] or '0'), tonumber(room[7] or '0')
if now_ms - mark_at >= hold_ms then
  -- Tickets admitted before the last mark have had their hold (hold_ms to twice that): they
  -- count as served from now on, come back or not, so holders who went away cannot stop
  -- the horizon short of the units left (one who comes back late may still buy).
  held, mark, mark_at = mark, admitted, now_ms
  redis.call('HSET', room_key, 'held', held, 'mark', mark, 'mark_at', mark_at)
  -- This may be the room's first write (no ticket yet): it must not live forever.
  redis.call('EXPIRE', room_key, ttl_secs)
end
if capacity > 0 and admitted < seq and now_ms - advanced_at >= tick_ms then
  -- Admitted tickets not yet served never exceed the units left (plus a slack for failures).
  local servable = math.max(consumed, held) + stock + slack
  admitted = math.max(admitted, math.min(seq, admitted + capacity, servable))
  redis.call('HSET', room_key, 'admitted', admitted, 'advanced_at', now_ms)
end
local function answer(...)
  local reply = {...}
  reply[#reply + 1] = tostring(seq - consumed)
  return reply
end
if buyer == '' then return answer('tick', tostring(admitted), tostring(stock)) end
local ticket_field = 't:' .. buyer
local ticket = redis.call('HGET', room_key, ticket_field)
if not ticket then
  if stock == 0 then return answer('sold_out') end
  if capacity > 0 and admitted >= seq then return answer('pass') end
  seq = redis.call('HINCRBY', room_key, 'seq', 1)
  ticket = seq
  redis.call('HSET', room_key, ticket_field, seq, 'k:' .. buyer, key_digest)
  redis.call('EXPIRE', room_key, ttl_secs)
end
ticket = tonumber(ticket)
if ticket <= admitted then
  if redis.call('HSETNX', room_key, 'c:' .. buyer, 1) == 1 then
    consumed = redis.call('HINCRBY', room_key, 'consumed', 1)
  end
  return answer('admitted')
end
if stock == 0 then return answer('sold_out') end
return answer('waiting', tostring(ticket), tostring(ticket - admitted))
