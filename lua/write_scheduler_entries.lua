-- write_scheduler_entries: a scheduler's heartbeat (asynq §4.22).
-- KEYS[1] -> asynq:schedulers:{<scheduler id>}   list of SchedulerEntry
-- ARGV[1] -> TTL (whole seconds)
-- ARGV[2..] -> encoded SchedulerEntry, one per registered entry
-- Returns OK. asynq LPUSHes the entries in turn, so the list ends up in reverse order; so do we.
-- (The ZADD to asynq:schedulers is a separate command: that key lives in another slot.)
redis.call("DEL", KEYS[1])
for i = 2, #ARGV do
  redis.call("LPUSH", KEYS[1], ARGV[i])
end
redis.call("EXPIRE", KEYS[1], ARGV[1])
return redis.status_reply("OK")
