-- reserved -> committed for each order in ARGV (one call per product per worker batch), the
-- units counted in the sale's `committed` (what the auditor reads instead of every record),
-- and the order noted in the committed set with the time, until it is persisted (so an order
-- whose message was lost between commit and persist is found by the reconciler).
-- Answers the bucket's epoch ('' when lost), then per order: committed | already (committed or
-- persisted) | released (released, or fenced by the reconciler for release: the order must
-- not proceed) | missing. The worker writes an order sold only under a current epoch.
local reservations_key, pending_key, sale_key, committed_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local epoch = redis.call('GET', KEYS[5]) or ''
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local out = {epoch}
local committed = 0
for i = 1, #ARGV do
  local order = ARGV[i]
  local rec = redis.call('HGET', reservations_key, order)
  if not rec then
    out[i + 1] = 'missing'
  else
    local state = string.sub(rec, 1, 1)
    if state == 'x' or state == 'f' then
      out[i + 1] = 'released'
    elseif state == 'c' or state == 'p' then
      out[i + 1] = 'already'
    else
      redis.call('HSET', reservations_key, order, 'c' .. string.sub(rec, 2))
      redis.call('ZREM', pending_key, order)
      redis.call('ZADD', committed_key, now_ms, order)
      committed = committed + tonumber(string.match(rec, ':(%d+)$'))
      out[i + 1] = 'committed'
    end
  end
end
if committed > 0 then
  redis.call('HINCRBY', sale_key, 'committed', committed)
  local expire_at = redis.call('EXPIRETIME', sale_key)
  if expire_at > 0 and redis.call('TTL', committed_key) == -1 then
    redis.call('EXPIREAT', committed_key, expire_at)
  end
end
return out
