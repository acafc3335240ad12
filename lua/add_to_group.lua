-- add_to_group: a new task joins a group and waits there to be aggregated (asynq §4.6).
-- KEYS[1] -> asynq:{q}:t:<id>        task hash
-- KEYS[2] -> asynq:{q}:g:<group>     the group's zset
-- KEYS[3] -> asynq:{q}:groups        names of groups holding tasks
-- ARGV[1] -> encoded TaskMessage (group_key set)
-- ARGV[2] -> task id
-- ARGV[3] -> now (Unix seconds): the task's score in the group
-- ARGV[4] -> group name
-- Returns 1 when added, 0 when a task with this id already exists.
if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
redis.call("HSET", KEYS[1], "msg", ARGV[1], "state", "aggregating", "group", ARGV[4])
redis.call("ZADD", KEYS[2], ARGV[3], ARGV[2])
redis.call("SADD", KEYS[3], ARGV[4])
return 1
