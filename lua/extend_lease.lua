-- extend_lease: push the lease of running tasks forward (asynq §4.15 does ZADD XX).
-- KEYS[1] -> asynq:{q}:lease
-- ARGV[1] -> new lease expiry (Unix seconds, integer)
-- ARGV[2..n] -> task ids
-- Returns the ids that no longer hold a lease (recovered elsewhere or finished), so the
-- server stops those handlers instead of letting them run unleased. A plain ZADD XX cannot
-- say which members were missing.
local lost = {}
for i = 2, #ARGV do
  if redis.call("ZSCORE", KEYS[1], ARGV[i]) then
    redis.call("ZADD", KEYS[1], "XX", ARGV[1], ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
