return took
