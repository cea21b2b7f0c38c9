redis.call('SET', idem_key, cjson.encode({state = 'in_progress', order_id = order, body_hash = body_hash, since = now_ms}), 'EX', key_ttl_secs)
return {'ok', unit_price}
