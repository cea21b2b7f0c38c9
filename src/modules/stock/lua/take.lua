-- The second half of a move between buckets (give.lua is the first), when no reservation
-- took it. Answers ok | already | stale | not_loaded.
local stock_key, epoch_key, sale_key, in_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local move, move_units, move_epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3]
