-- wrk script for benchmarks/api.py: POST a valid echo input (or GET when WRK_METHOD=GET) and
-- print one JSON line of figures at the end.
wrk.method = os.getenv("WRK_METHOD") or "POST"
if wrk.method == "POST" then
  wrk.body = '{"name":"bench","times":1}'
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local s = summary.duration / 1e6
  local bad = summary.errors.status + summary.errors.connect + summary.errors.read
            + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"req_per_s":%.1f,"errors":%d,"p50_ms":%.3f,"p99_ms":%.3f}\n',
    summary.requests, s, summary.requests / s, bad,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
