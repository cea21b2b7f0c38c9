-- Flash-sale attempts against a sale that sold out: each API process answers 409 sold_out
-- from memory. One buyer (raise rate_limit.user_per_minute for the server under test):
--
--   TOKEN=$(order_load --mint-tokens 1) wrk -t2 -c64 -d10s -s bench/wrk/sold_out.lua \
--     http://127.0.0.1:8080/orders/flash-sale/<sold-out product id>
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
wrk.headers["Idempotency-Key"] = "sold-out-bench"
