-- wrk script for bench/run.py: POST a small chat completion and rotate X-Forwarded-For.
--
-- Usage: wrk -t1 -c64 -d10s -s bench/xff.lua URL -- ADDR [ADDR ...]
--
-- The client addresses come from the command line (bench/run.py owns the list and knows
-- which ones must be refused); the default below is the same list. Requests cycle
-- through them in order, so with one CN address among four exactly one request in four
-- comes from a refused country.
--
-- The requests are formatted once in init() and request() only picks one: wrk's own
-- cost per request must stay negligible next to what is being measured. There is
-- deliberately no response() callback, because defining one makes wrk parse every
-- response body; refusals are counted from summary.errors.status (non-2xx/3xx) instead.
--
-- done() prints one line "BENCH_JSON {...}" that bench/run.py parses, which is sturdier
-- than scraping wrk's human-readable summary (units change with magnitude there).

local default_addrs = { "2.125.160.216", "89.160.20.112", "216.160.83.56", "175.16.199.1" }

local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],'
  .. '"max_tokens":16}'

local requests = {}
local counter = 0

function init(args)
  local addrs = default_addrs
  if #args > 0 then
    addrs = args
  end
  wrk.headers["Authorization"] = "Bearer sk-bench-not-a-real-key"
  if wrk.path == "/authz/nginx" then
    -- The decision endpoint asked directly, as nginx's auth_request subrequest asks it: no body,
    -- the original request in X-Original-Method / X-Original-URI.
    wrk.method = "GET"
    wrk.headers["X-Original-Method"] = "POST"
    wrk.headers["X-Original-URI"] = "/v1/chat/completions"
  else
    wrk.method = "POST"
    wrk.body = body
    wrk.headers["Content-Type"] = "application/json"
  end
  for i, addr in ipairs(addrs) do
    wrk.headers["X-Forwarded-For"] = addr
    requests[i] = wrk.format()
  end
end

function request()
  counter = counter + 1
  return requests[(counter - 1) % #requests + 1]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,'
      .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
