-- webhook_enqueue: the delivery tasks of ended attempts, their delivery index entries and the
-- removal of those attempts' intents, in one atomic call (aqsh/webhooks/notifier.py). The
-- intent is what makes a delivery durable (a sweep enqueues what a dead worker left), so it
-- goes only in the call that created the delivery task: both exist, or neither changes.
-- Not for Redis Cluster: the delivery queue, each task's index and the intents set are in
-- slots of their own there, and the notifier writes them one slot at a time instead (delivery
-- tasks first, the intents last).
-- KEYS[1] -> asynq:{aqsh:webhooks}:pending
-- KEYS[2] -> aqsh:{aqsh:webhooks}:runs:aqsh:webhook  run index (used when ARGV[6] is "1")
-- KEYS[3] -> aqsh:webhooks:intents
-- KEYS[4..] -> aqsh:webhooks:{<task id>}:deliveries, one per ended task
-- ARGV[1..5] -> as enqueue_batch's: now (Unix ns), task key prefix, the packed delivery
--               tasks, wake-up channel or "", queue name or ""
-- ARGV[6] -> "1": add the tasks to the run index KEYS[2]; "0": not
-- ARGV[7] -> the index entries' TTL (seconds)
-- ARGV[8] -> intents to remove, packed: each a 4-byte big-endian length + member
-- ARGV[9..] -> for KEYS[4 + i], its entries packed: each a 4-byte length + delivery id, then a
--              4-byte length + its DeliveryMeta
-- Returns enqueue_batch's reply (one integer per delivery task: 1, 0 exists, 2 unwoken).
--@include enqueue_packed
local function unpacked(blob)
  local items, pos = {}, 1
  while pos <= #blob do
    local len
    len, pos = struct.unpack(">I4", blob, pos)
    items[#items + 1] = string.sub(blob, pos, pos + len - 1)
    pos = pos + len
  end
  return items
end

local out, enqueued = enqueue_packed(KEYS[1], ARGV[2], ARGV[1], ARGV[3],
  ARGV[6] == "1" and KEYS[2] or nil)
for i = 4, #KEYS do
  redis.call("HSET", KEYS[i], unpack(unpacked(ARGV[i + 5])))
  redis.call("EXPIRE", KEYS[i], ARGV[7])
end
local done = unpacked(ARGV[8])
for first = 1, #done, 500 do
  redis.call("ZREM", KEYS[3], unpack(done, first, math.min(first + 499, #done)))
end
return wake_packed(out, enqueued, ARGV[4], ARGV[5])
