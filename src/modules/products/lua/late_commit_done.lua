return 'committed'
