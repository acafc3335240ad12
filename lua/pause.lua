-- pause: stop dequeues from a queue (asynq §4.24).
-- KEYS[1] -> asynq:{q}:paused
-- ARGV[1] -> now (Unix seconds), the stored value
-- Returns 1 when paused now, 0 when it already was.
return redis.call("SETNX", KEYS[1], ARGV[1])
