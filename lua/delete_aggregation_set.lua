-- delete_aggregation_set: an aggregation is enqueued; its tasks and its set go (asynq §4.20.4).
-- KEYS[1] -> asynq:{q}:g:<group>:<set id>    the aggregation set
-- KEYS[2] -> asynq:{q}:aggregation_sets      set key -> deadline
-- ARGV[1] -> task key prefix asynq:{q}:t:
-- Returns OK.
for _, id in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  redis.call("DEL", ARGV[1] .. id)
end
redis.call("DEL", KEYS[1])
redis.call("ZREM", KEYS[2], KEYS[1])
return redis.status_reply("OK")
