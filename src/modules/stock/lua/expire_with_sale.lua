-- Records made after the load (or after a rebuild emptied them) expire with the sale
-- (the script defines stock_key, buyers_key, reservations_key, pending_key, and `expiring`:
-- true when they are known to expire already, which spares the four reads below).
local expire_at = expiring and 0 or redis.call('EXPIRETIME', stock_key)
if expire_at > 0 then
  for _, key in ipairs({buyers_key, reservations_key, pending_key}) do
    if redis.call('TTL', key) == -1 then redis.call('EXPIREAT', key, expire_at) end
  end
end
