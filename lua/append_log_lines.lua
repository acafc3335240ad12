-- append_log_lines: append a batch of output lines to a task's log stream (aqsh-only key).
-- KEYS[1] -> logs:{task_id}   Redis Stream
-- ARGV[1] -> approximate maximum stream length (XADD MAXLEN ~)
-- ARGV[2] -> retention (whole seconds) applied with EXPIRE after the batch
-- ARGV[3..] -> alternating stream name (stdout|stderr|eof) and line text
-- Returns the id of the last entry added.
-- One script call carries a whole batch: encoding one command instead of one XADD per line is
-- what lets a script printing 100,000 lines per second be followed without falling behind.
-- An "eof" pair writes the end marker entry {eof = 1, exit_code = <text>}; a "start" pair
-- writes {start = 1, retry = <text>} when an attempt begins (its id dates the start).
local last = ""
for i = 3, #ARGV, 2 do
  if ARGV[i] == "eof" then
    last = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[1], "*", "eof", "1",
      "exit_code", ARGV[i + 1])
  elseif ARGV[i] == "start" then
    last = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[1], "*", "start", "1",
      "retry", ARGV[i + 1])
  else
    last = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[1], "*", "stream", ARGV[i],
      "line", ARGV[i + 1])
  end
end
redis.call("EXPIRE", KEYS[1], ARGV[2])
return last
