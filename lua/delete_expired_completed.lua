-- delete_expired_completed: the janitor drops completed tasks past their retention (§4.18).
-- KEYS[1] -> asynq:{q}:completed
-- ARGV[1] -> now (Unix seconds)
-- ARGV[2] -> task key prefix asynq:{q}:t:
-- ARGV[3] -> batch size
-- Returns how many were deleted; callers repeat until 0.
local ids = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1], "LIMIT", 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call("DEL", ARGV[2] .. id)
  redis.call("ZREM", KEYS[1], id)
end
return #ids
