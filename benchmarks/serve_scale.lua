-- wrk script of benchmarks/serve_scale.py: a request mix, closed loop or paced to a fixed rate.
--
--   SERVE_SCALE_RATE=R wrk -t T -c C -d 8s --timeout 5s -s benchmarks/serve_scale.lua URL -- REQUESTS T
--
-- REQUESTS: a file of tab-separated lines "METHOD<TAB>PATH<TAB>BODY" (BODY may be empty: a GET),
-- cycled; each thread starts at its own offset. T: wrk's -t again (the script cannot read it).
--
-- $SERVE_SCALE_RATE (requests/s of the whole run) unset or 0: no delay() at all, plain closed loop
-- (wrk decides whether a script has delay() before init() sees the arguments, hence the variable).
-- Set: each thread hands out request slots 1000 * T / RATE ms apart; a connection that is free takes
-- the next slot (or "now" when the schedule is behind: no burst to catch up). With enough connections
-- this is an open-loop arrival process: a slow answer delays only its own connection, the others
-- keep the schedule. A slot taken more than 1 ms after it was due means no connection was free when
-- it came (the run is then closed-loop for a moment): those are counted in "late_slots".
--
-- done(): one line "KGREC-WRK-JSON {...}" (wrk's own summary: requests, errors by kind -- "status" is
-- the non-2xx/3xx answers --, latency percentiles from wrk's histogram).

local has_ffi, ffi = pcall(require, "ffi")
local now_ms = nil
if has_ffi then
  local ok = pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_nsec; } kgrec_timespec_s;
    int clock_gettime(int clk_id, kgrec_timespec_s *tp);
  ]])
  if ok then
    local ts = ffi.new("kgrec_timespec_s")
    now_ms = function()
      ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
    end
  end
end

local rate = tonumber(os.getenv("SERVE_SCALE_RATE") or "0") or 0

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

local requests = {}
local position = 1
local interval_ms = 0
local next_slot = nil
late_slots = 0

function init(args)
  local path = args[1]
  local file = assert(io.open(path, "r"), "cannot open " .. tostring(path))
  for line in file:lines() do
    local method, target, body = line:match("^([^\t]+)\t([^\t]+)\t?(.*)$")
    if method then
      local headers = {}
      if body == "" then
        body = nil
      else
        headers["Content-Type"] = "application/json"
      end
      table.insert(requests, wrk.format(method, target, headers, body))
    end
  end
  file:close()
  assert(#requests > 0, "no requests in " .. path)
  local n_threads = tonumber(args[2]) or 1
  if rate > 0 then
    interval_ms = 1000 * n_threads / rate
  end
  position = ((id or 1) - 1) * math.floor(#requests / n_threads) % #requests + 1
end

function request()
  local r = requests[position]
  position = position % #requests + 1
  return r
end

if rate > 0 then
  assert(now_ms ~= nil, "a fixed rate needs LuaJIT's ffi (wall clock)")
  function delay()
    local now = now_ms()
    local slot = next_slot or now
    if slot < now - 1 then
      late_slots = late_slots + 1
    end
    slot = math.max(slot, now)
    next_slot = slot + interval_ms
    return math.floor(slot - now + 0.5)
  end
end

function done(summary, latency, requests_stats)
  local late = 0
  for _, thread in ipairs(threads) do
    late = late + (thread:get("late_slots") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'KGREC-WRK-JSON {"requests":%d,"duration_s":%.6f,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_ms":{"p50":%.4f,"p90":%.4f,"p99":%.4f,"p999":%.4f,"max":%.4f,"mean":%.4f},' ..
    '"rate_target":%.3f,"late_slots":%d}\n',
    summary.requests, summary.duration / 1e6, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000, latency.mean / 1000,
    rate, late))
end
