-- The units held by the orders in the sorted set `set` whose record in `reservations` is in
-- one of `states` (HMGET in chunks: Lua's unpack takes a few thousand values at most). A
-- fragment that goes before the script using it.
local function units_held(reservations, set, states)
  local orders = redis.call('ZRANGE', set, 0, -1)
  local units = 0
  for first = 1, #orders, 1000 do
    local last = math.min(first + 999, #orders)
    for _, rec in ipairs(redis.call('HMGET', reservations, unpack(orders, first, last))) do
      if rec then
        local state, n = string.match(rec, '^(%a):[^:]+:(%d+)$')
        if string.find(states, state, 1, true) then units = units + tonumber(n) end
      end
    end
  end
  return units
end
