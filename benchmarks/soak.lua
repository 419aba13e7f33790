-- wrk script of benchmarks/soak.py: a fixed-rate request mix, answers counted per model version.
--
--   wrk -t T -c C -d 600s --timeout 10s -s benchmarks/soak.lua http://127.0.0.1:PORT -- REQUESTS RATE T C
--
-- REQUESTS: a file of tab-separated lines "METHOD<TAB>PATH<TAB>BODY" (BODY may be empty), cycled;
-- each thread starts at its own offset. RATE: total requests per second of the run; T and C: wrk's
-- -t and -c again (the script cannot read them).
--
-- Rate: wrk is closed-loop; delay() holds it to RATE. Each thread hands out request slots
-- 1000 * T / RATE ms apart (the next slot, or now if the thread is behind: a late answer does not
-- cause a burst to catch up), so the rate does not drift with the service's latency. Without LuaJIT's
-- ffi (no wall clock in plain Lua) delay() returns the per-connection interval instead,
-- 1000 * C / RATE ms (rate = C * 1000 / delay_ms, less the latency).
--
-- response(): non-2xx statuses (by status) and answers per model version ("version":"N", the first
-- one in the body: the "model" block of the answer) with the first and last wall-clock millisecond
-- each version answered. done(): one line "KGREC-WRK-JSON {...}" aggregated over the threads.

local has_ffi, ffi = pcall(require, "ffi")
local now_ms = nil
if has_ffi then
  local ok = pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_nsec; } kgrec_timespec;
    int clock_gettime(int clk_id, kgrec_timespec *tp);
  ]])
  if ok then
    local ts = ffi.new("kgrec_timespec")
    now_ms = function()
      ffi.C.clock_gettime(0, ts)  -- CLOCK_REALTIME: comparable with the driver's time.time()
      return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
    end
  end
end

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

-- per-thread state (each thread has its own Lua state)
local requests = {}
local position = 1
local interval_ms = 0
local fallback_delay_ms = 0
local next_slot = nil
non2xx = {}
versions = {}
first_ms = {}
last_ms = {}
unparsed = 0

function init(args)
  local path, rate = args[1], tonumber(args[2])
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
  local n_threads = tonumber(args[3]) or 1
  local n_connections = tonumber(args[4]) or n_threads
  interval_ms = 1000 * n_threads / rate
  fallback_delay_ms = 1000 * n_connections / rate
  position = ((id or 1) - 1) * math.floor(#requests / n_threads) % #requests + 1
end

function request()
  local r = requests[position]
  position = position % #requests + 1
  return r
end

function delay()
  if now_ms == nil then
    return fallback_delay_ms
  end
  local now = now_ms()
  local slot = math.max(next_slot or now, now)
  next_slot = slot + interval_ms
  return math.floor(slot - now + 0.5)
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    local key = tostring(status)
    non2xx[key] = (non2xx[key] or 0) + 1
  end
  local version = body and body:match('"version":"?([%w%.%-]+)"?')
  if version then
    versions[version] = (versions[version] or 0) + 1
    if now_ms then
      local now = now_ms()
      first_ms[version] = first_ms[version] or now
      last_ms[version] = now
    end
  else
    unparsed = unparsed + 1
  end
end

local function merge_counts(into, from)
  for key, n in pairs(from or {}) do
    into[key] = (into[key] or 0) + n
  end
end

local function json_value(v)
  if type(v) == "table" then
    local parts = {}
    for key, value in pairs(v) do
      table.insert(parts, string.format("%q:%s", tostring(key), json_value(value)))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(v) == "boolean" then
    return tostring(v)
  elseif type(v) == "number" then
    return string.format("%.17g", v)
  elseif v == nil then
    return "null"
  end
  return string.format("%q", tostring(v))
end

function done(summary, latency, requests_stats)
  local all = {non2xx = {}, versions = {}, first_ms = {}, last_ms = {}, unparsed = 0}
  for _, thread in ipairs(threads) do
    merge_counts(all.non2xx, thread:get("non2xx"))
    merge_counts(all.versions, thread:get("versions"))
    all.unparsed = all.unparsed + (thread:get("unparsed") or 0)
    for version, ms in pairs(thread:get("first_ms") or {}) do
      all.first_ms[version] = math.min(all.first_ms[version] or ms, ms)
    end
    for version, ms in pairs(thread:get("last_ms") or {}) do
      all.last_ms[version] = math.max(all.last_ms[version] or ms, ms)
    end
  end
  local out = {
    requests = summary.requests,
    duration_s = summary.duration / 1e6,
    rate = summary.requests / (summary.duration / 1e6),
    bytes = summary.bytes,
    errors = summary.errors,
    latency_ms = {
      p50 = latency:percentile(50) / 1000,
      p90 = latency:percentile(90) / 1000,
      p99 = latency:percentile(99) / 1000,
      p999 = latency:percentile(99.9) / 1000,
      max = latency.max / 1000,
      mean = latency.mean / 1000,
    },
    paced = now_ms ~= nil,
    non2xx = all.non2xx,
    versions = all.versions,
    version_first_ms = all.first_ms,
    version_last_ms = all.last_ms,
    unparsed = all.unparsed,
  }
  io.write("KGREC-WRK-JSON " .. json_value(out) .. "\n")
end
