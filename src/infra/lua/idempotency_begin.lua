-- Starts an idempotent request whose work spans several Redis slots: check the key, and
-- mark it in progress when it is new, atomically.
local idem_key = KEYS[1]
local body_hash, idem_ttl_secs = ARGV[1], ARGV[2]
