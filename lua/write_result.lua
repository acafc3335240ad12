-- write_result: store a handler's result on its task (asynq §4.19).
-- KEYS[1] -> asynq:{q}:t:<id>
-- ARGV[1] -> result bytes
-- Returns the number of bytes written, or -1 when the task hash does not exist. asynq's plain
-- HSET would create a stray hash holding only `result` for a deleted task; we refuse instead.
if redis.call("EXISTS", KEYS[1]) == 0 then
  return -1
end
redis.call("HSET", KEYS[1], "result", ARGV[1])
return string.len(ARGV[1])
