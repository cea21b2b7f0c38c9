redis.call('SET', idem_key, cjson.encode({state = 'in_progress', order_id = order, body_hash = body_hash}), 'EX', idem_ttl_secs)
return {'ok', unit_price}
