-- Flash-sale attempts, each by a buyer not seen before (a token from TOKENS_FILE, one per
-- line; thread i of THREADS takes tokens i, i + THREADS, ...) with a fresh Idempotency-Key:
-- the crowd of a sale's first second, as one-shot clients that never retry.
--
--   order_load --mint-tokens 400000 > /tmp/tokens
--   THREADS=2 TOKENS_FILE=/tmp/tokens wrk -t2 -c1000 -d20s --timeout 10s \
--     -s bench/wrk/fresh_buyers.lua http://127.0.0.1:8080/orders/flash-sale/<product id>
local tokens = {}
for line in io.lines(os.getenv("TOKENS_FILE")) do tokens[#tokens + 1] = line end
local stride = tonumber(os.getenv("THREADS") or "2")

local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

local sent = 0
function request()
  local index = (sent * stride + id) % #tokens
  sent = sent + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[index + 1],
    ["Idempotency-Key"] = "k-" .. id .. "-" .. sent,
  }
  return wrk.format("POST", nil, headers, "{}")
end
