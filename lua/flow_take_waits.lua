-- flow_take_waits: the waits recorded since the last call, taken off the record in one step
-- (API replicas that scrape share them; none is counted twice).
-- KEYS[1] -> aqsh:{q}:flow:waited
-- ARGV[1] -> at most this many
-- Returns the members "<task type>\t<ms waited>\t<id>", oldest first.
local taken = redis.call("ZRANGE", KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #taken > 0 then
  redis.call("ZREMRANGEBYRANK", KEYS[1], 0, #taken - 1)
end
return taken
