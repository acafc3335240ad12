-- reclaim_stale_aggregation_sets: aggregation sets past their deadline (their aggregator died
-- or failed to enqueue) give their tasks back to their groups (asynq §4.20.5).
-- KEYS[1] -> asynq:{q}:aggregation_sets      set key -> deadline
-- ARGV[1] -> now (Unix seconds)
-- Returns OK.
-- The group key is the set key cut at its last ":", so it shares the set's {q} hash tag and
-- slot. As in asynq, the group's name is not put back into asynq:{q}:groups (quirk Q5): the
-- group is found again only once another task joins it.
for _, set_key in ipairs(redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1])) do
  local group_key = string.sub(set_key, 1, string.find(set_key, ":[^:]*$") - 1)
  local members = redis.call("ZRANGE", set_key, 0, -1, "WITHSCORES")
  for i = 1, #members - 1, 2 do
    redis.call("ZADD", group_key, tonumber(members[i + 1]), members[i])
  end
  redis.call("DEL", set_key)
end
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", ARGV[1])
return redis.status_reply("OK")
