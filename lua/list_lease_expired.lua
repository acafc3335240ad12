-- list_lease_expired: messages of active tasks whose lease ran out (asynq §4.16, v0.25+).
-- KEYS[1] -> asynq:{q}:lease
-- ARGV[1] -> cutoff (Unix seconds): leases scored at or before it are expired
-- ARGV[2] -> task key prefix asynq:{q}:t:
-- Returns the encoded TaskMessages; ids without a hash are skipped.
local out = {}
for _, id in ipairs(redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1])) do
  local msg = redis.call("HGET", ARGV[2] .. id, "msg")
  if msg then
    out[#out + 1] = msg
  end
end
return out
