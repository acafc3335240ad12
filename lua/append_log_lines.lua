-- append_log_lines: append a batch of output lines to a task's log stream, exactly once.
-- KEYS[1] -> logs:<task_id>          Redis Stream (aqsh-only key)
-- KEYS[2] -> the stream's meta hash  (optional: left out when it cannot share KEYS[1]'s slot)
-- ARGV[1] -> approximate maximum stream length (XADD MAXLEN ~)
-- ARGV[2] -> retention (whole seconds) applied with EXPIRE to both keys after the batch
-- ARGV[3] -> writer id: unique per attempt (one LogWriter)
-- ARGV[4] -> batch number: 1, 2, ... per writer; a retried batch repeats its number
-- ARGV[5..] -> alternating stream name (stdout|stderr|eof|start) and line text
-- Returns {id of the stream's last entry, 1 if this call appended the batch, 0 if it was a repeat}.
--
-- One script call carries a whole batch: encoding one command instead of one XADD per line is
-- what lets a script printing 100,000 lines per second be followed without falling behind.
-- An "eof" pair writes the end marker entry {eof = 1, exit_code = <text>}; a "start" pair
-- writes {start = 1, retry = <text>} when an attempt begins (its id dates the start).
--
-- Exactly once: a writer sends one batch at a time and repeats it until a reply arrives, so
-- the meta hash need only remember the last batch number each writer got applied. A repeat
-- (the first call applied it, its reply was lost) is answered without writing anything.
-- Scripts are atomic, and an error reply that refuses writes (OOM, MISCONF, READONLY) is only
-- ever given to a script's first write, so a batch is applied whole or not at all.
--
-- Entry ids are chosen here as <ms>-<n>: ms is Redis's clock (never behind the last entry's),
-- n counts the stream's entries (1, 2, ...) across every attempt. Ids stay strictly increasing
-- and still date each entry, and a follower that sees n jump knows exactly how many entries
-- the MAXLEN cap trimmed before it read them.
--
-- The meta hash keeps what the API reports after the stream's markers may have been trimmed:
-- started_ms (first attempt's start), finished_ms and exit_code (the last attempt's end; a new
-- start clears them), with the stream's retention.
local meta = KEYS[2]
local batch = tonumber(ARGV[4])
local writer_field = "w:" .. ARGV[3]
if meta then
  local done = redis.call("HGET", meta, writer_field)
  if done and tonumber(done) >= batch then
    local top = redis.call("XREVRANGE", KEYS[1], "+", "-", "COUNT", 1)
    return {top[1] and top[1][1] or "", 0}
  end
end

local now = redis.call("TIME")
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local n = 0
local top = redis.call("XREVRANGE", KEYS[1], "+", "-", "COUNT", 1)
if top[1] then
  local top_ms, top_n = string.match(top[1][1], "^(%d+)-(%d+)$")
  top_ms = tonumber(top_ms)
  if top_ms > ms then
    ms = top_ms
  end
  n = tonumber(top_n)
end

local last = ""
local updates = {}
for i = 5, #ARGV, 2 do
  n = n + 1
  local id = string.format("%d-%d", ms, n)
  if ARGV[i] == "eof" then
    last = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[1], id, "eof", "1",
      "exit_code", ARGV[i + 1])
    updates.finished_ms = ms
    updates.exit_code = ARGV[i + 1]
  elseif ARGV[i] == "start" then
    last = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[1], id, "start", "1",
      "retry", ARGV[i + 1])
    updates.start = ms
    updates.finished_ms = nil
    updates.exit_code = nil
  else
    last = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[1], id, "stream", ARGV[i],
      "line", ARGV[i + 1])
  end
end

if meta then
  if updates.start then
    redis.call("HSETNX", meta, "started_ms", string.format("%d", updates.start))
    if not updates.finished_ms then
      redis.call("HDEL", meta, "finished_ms", "exit_code")
    end
  end
  if updates.finished_ms then
    redis.call("HSET", meta, "finished_ms", string.format("%d", updates.finished_ms),
      "exit_code", updates.exit_code)
  end
  redis.call("HSET", meta, writer_field, ARGV[4])
  redis.call("EXPIRE", meta, ARGV[2])
end
redis.call("EXPIRE", KEYS[1], ARGV[2])
return {last, 1}
