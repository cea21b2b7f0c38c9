return {'ok', unit_price}
