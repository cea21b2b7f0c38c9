-- A commit for an order whose reservation Redis no longer knows (it lost its data and the
-- counters were rebuilt without this in-flight order): take the units now if they are
-- still there and the buyer stays within the limit.
-- Answers {committed, the epoch committed under} or {sold_out | limit | not_loaded}. The units
-- a move from another bucket brought this buyer are taken first (take_units.lua).
local stock_key, epoch_key, reservations_key, buyers_key, sale_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
-- Only for the expiry fragment that follows: a late commit adds no pending record, so it
-- always checks every key.
local pending_key, expiring = KEYS[6], false
local order, user, units, in_key = ARGV[1], ARGV[2], tonumber(ARGV[3]), KEYS[7]
local committed_key = KEYS[8]
local move, move_units, move_epoch = ARGV[4], tonumber(ARGV[5]), ARGV[6]
