-- The auditor's look at one sale, atomic: available + reserved + committed against the units
-- the sale holds, and the buyers over the limit. Answers {state, units_off, over_limit}.
local stock_key, epoch_key, sale_key, buyers_key, reservations_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('EXISTS', epoch_key) == 0 then return {'not_loaded', 0, 0} end
local sale = redis.call('HMGET', sale_key, 'units', 'limit', 'recovering')
if not sale[1] then return {'not_loaded', 0, 0} end
local held = 0
local records = redis.call('HVALS', reservations_key)
for _, rec in ipairs(records) do
  local state, units = string.match(rec, '^(%a):[^:]+:(%d+)$')
  if state ~= 'x' then held = held + tonumber(units) end
end
local available = tonumber(redis.call('GET', stock_key) or '0')
local over_limit = 0
local limit = tonumber(sale[2])
for _, bought in ipairs(redis.call('HVALS', buyers_key)) do
  if tonumber(bought) > limit then over_limit = over_limit + 1 end
end
local state = 'open'
if sale[3] then state = 'recovering' end
return {state, available + held - tonumber(sale[1]), over_limit}
