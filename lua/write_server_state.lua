-- write_server_state: a server's heartbeat (asynq §4.21).
-- KEYS[1] -> asynq:servers:{host:pid:sid}   ServerInfo string
-- KEYS[2] -> asynq:workers:{host:pid:sid}   hash task id -> WorkerInfo
-- ARGV[1] -> TTL (whole seconds)
-- ARGV[2] -> encoded ServerInfo
-- ARGV[3..] -> alternating task id, encoded WorkerInfo
-- Returns OK.
redis.call("SETEX", KEYS[1], ARGV[1], ARGV[2])
redis.call("DEL", KEYS[2])
for i = 3, #ARGV, 2 do
  redis.call("HSET", KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call("EXPIRE", KEYS[2], ARGV[1])
return redis.status_reply("OK")
