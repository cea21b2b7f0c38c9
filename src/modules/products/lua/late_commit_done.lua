return {'committed'}
