-- The flash-sale path in one script: attempt limit, idempotency, the units a move from
-- another bucket brought this buyer (a borrowing round, which is not a new attempt),
-- reservation, and the Idempotency-Key marked in progress. Fragments that follow read these
-- names.
local stock_key, epoch_key, sale_key, buyers_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local reservations_key, pending_key, idem_key, attempts_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local user, units, order, now_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local sale_kind, body_hash, key_ttl_secs, attempts_per_minute = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local buckets, in_key = ARGV[9], KEYS[9]
local move, move_units, move_epoch = ARGV[10], tonumber(ARGV[11]), ARGV[12]
local verify_window_ms, in_flight_ms = tonumber(ARGV[13]), tonumber(ARGV[14])
