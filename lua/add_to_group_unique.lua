-- add_to_group_unique: add_to_group holding a uniqueness lock (asynq §4.6, unique variant).
-- KEYS[1] -> asynq:{q}:t:<id>                task hash
-- KEYS[2] -> asynq:{q}:g:<group>             the group's zset
-- KEYS[3] -> asynq:{q}:groups                names of groups holding tasks
-- KEYS[4] -> asynq:{q}:unique:<type>:<md5>   lock
-- ARGV[1] -> encoded TaskMessage (group_key and unique_key set)
-- ARGV[2] -> task id (lock value)
-- ARGV[3] -> now (Unix seconds): the task's score in the group
-- ARGV[4] -> group name
-- ARGV[5] -> lock TTL (whole seconds)
-- Returns 1 when added, -1 when the lock is held (duplicate), 0 on an id conflict.
-- As in asynq, no unique_key hash field is written (the message carries the key) and a lock
-- taken before an id conflict is kept until its TTL.
if not redis.call("SET", KEYS[4], ARGV[2], "NX", "EX", ARGV[5]) then
  return -1
end
if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
redis.call("HSET", KEYS[1], "msg", ARGV[1], "state", "aggregating", "group", ARGV[4])
redis.call("ZADD", KEYS[2], ARGV[3], ARGV[2])
redis.call("SADD", KEYS[3], ARGV[4])
return 1
