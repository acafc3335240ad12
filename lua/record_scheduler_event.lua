-- record_scheduler_event: one periodic enqueue in an entry's history (asynq §4.22).
-- KEYS[1] -> asynq:scheduler_history:<entry id>   zset of SchedulerEnqueueEvent
-- ARGV[1] -> enqueue time (Unix seconds, integer)
-- ARGV[2] -> encoded SchedulerEnqueueEvent
-- ARGV[3] -> most events kept (asynq: 1000)
-- Returns OK. Trims before adding, as asynq does, so at most ARGV[3] events remain.
redis.call("ZREMRANGEBYRANK", KEYS[1], 0, -tonumber(ARGV[3]))
redis.call("ZADD", KEYS[1], ARGV[1], ARGV[2])
return redis.status_reply("OK")
