-- wrk script for the ingress figures: GET <path>, or <path><click_id> cycling
-- through a file of valid click IDs; prints one JSON summary line at the end.
local ids, n, i = {}, 0, 0
local path = "/"

function init(args)
  path = args[1] or wrk.path
  if args[2] then
    for line in io.lines(args[2]) do
      n = n + 1
      ids[n] = line
    end
  end
end

function request()
  if n == 0 then
    return wrk.format("GET", path)
  end
  i = i % n + 1
  return wrk.format("GET", path .. ids[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
