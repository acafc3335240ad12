-- inspect_live_members: live entries of asynq:servers / asynq:workers, purging stale ones (§9.8).
-- KEYS[1] -> asynq:servers or asynq:workers
-- ARGV[1] -> now (Unix seconds)
-- Returns the member key names whose expiry score is >= now; members expired for over a second
-- are removed, as the Go Inspector does.
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", tonumber(ARGV[1]) - 1)
return redis.call("ZRANGEBYSCORE", KEYS[1], ARGV[1], "+inf")
