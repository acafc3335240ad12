-- read_aggregation_set: the messages of an aggregation set, and its deadline (asynq §4.20.3).
-- KEYS[1] -> asynq:{q}:g:<group>:<set id>    the aggregation set
-- KEYS[2] -> asynq:{q}:aggregation_sets      set key -> deadline
-- ARGV[1] -> task key prefix asynq:{q}:t:
-- Returns {deadline (Unix seconds, false when the set is not listed), msg1, msg2, ...} in the
-- set's score order (oldest first); ids without a hash are skipped.
-- asynq reads the deadline with a separate ZSCORE; one script saves a round trip.
local out = {redis.call("ZSCORE", KEYS[2], KEYS[1])}
for _, id in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  local msg = redis.call("HGET", ARGV[1] .. id, "msg")
  if msg then
    out[#out + 1] = msg
  end
end
return out
