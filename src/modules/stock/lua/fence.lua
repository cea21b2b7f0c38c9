-- The reconciler's fence, before it reads PostgreSQL: reserved -> releasing for each order in
-- ARGV. A worker's commit that comes after finds `f` and backs off (the order fails), so the
-- release that follows the read can never hand back units a worker sold in between.
-- A reservation stays in the pending set while `f`, so a pass that died here is finished by
-- the next one. Answers, per order: fenced (now or by an earlier pass) | the state it is in
-- (c: committed, x: released) | missing.
local reservations_key = KEYS[1]
local out = {}
for i = 1, #ARGV do
  local order = ARGV[i]
  local rec = redis.call('HGET', reservations_key, order)
  if not rec then
    out[i] = 'missing'
  else
    local state = string.sub(rec, 1, 1)
    if state == 'r' then
      redis.call('HSET', reservations_key, order, 'f' .. string.sub(rec, 2))
      out[i] = 'fenced'
    elseif state == 'f' then
      out[i] = 'fenced'
    else
      out[i] = state
    end
  end
end
return out
