-- reserved -> committed for each order in ARGV (one call per product per worker batch), the
-- units counted in the sale's `committed` (what the auditor reads instead of every record).
-- Answers, per order: committed | already | released (released, or fenced by the reconciler
-- for release: the order must not proceed) | missing.
local reservations_key, pending_key, sale_key = KEYS[1], KEYS[2], KEYS[3]
local out = {}
local committed = 0
for i = 1, #ARGV do
  local order = ARGV[i]
  local rec = redis.call('HGET', reservations_key, order)
  if not rec then
    out[i] = 'missing'
  else
    local state = string.sub(rec, 1, 1)
    if state == 'x' or state == 'f' then
      out[i] = 'released'
    elseif state == 'c' then
      out[i] = 'already'
    else
      redis.call('HSET', reservations_key, order, 'c' .. string.sub(rec, 2))
      redis.call('ZREM', pending_key, order)
      committed = committed + tonumber(string.match(rec, ':(%d+)$'))
      out[i] = 'committed'
    end
  end
end
if committed > 0 then redis.call('HINCRBY', sale_key, 'committed', committed) end
return out
