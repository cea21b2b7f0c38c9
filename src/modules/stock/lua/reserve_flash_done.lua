redis.call('SET', idem_key, cjson.encode({state = 'in_progress', order_id = order, body_hash = body_hash}), 'EX', idem_ttl_secs)
-- When the sale was rebuilt after a loss (ms), Redis may have forgotten Idempotency-Keys:
-- the caller asks PostgreSQL before it accepts a new order.
return {'ok', unit_price, sale[8] or ''}
