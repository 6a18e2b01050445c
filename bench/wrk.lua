-- wrk script for the ingress figures: GET <path>, or <path><click_id> cycling
-- through a file of valid click IDs; prints one JSON summary line at the end.
-- With a third argument "once", each click ID is sent once: then the
-- connections ask for /healthz (no event) until every ID is surely answered,
-- and the thread stops sending; wrk itself ends at SIGINT (or its -d).
local ids, n, i = {}, 0, 0
local path = "/"
local once, answered = false, 0

function init(args)
  path = args[1] or wrk.path
  if args[2] then
    for line in io.lines(args[2]) do
      n = n + 1
      ids[n] = line
    end
  end
  once = args[3] == "once"
  if not once then
    response = nil -- wrk reads answers' headers and bodies only for a response()
  end
end

function request()
  if n == 0 then
    return wrk.format("GET", path)
  end
  if once and i >= n then
    return wrk.format("GET", "/healthz")
  end
  i = i % n + 1
  return wrk.format("GET", path .. ids[i])
end

function response(status, headers, body)
  if once then
    answered = answered + 1
    -- the /healthz answers come after every ID's request was sent; a few in flight
    -- per connection at most
    if answered >= n + 1024 then
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
