return {'committed', redis.call('GET', epoch_key)}
