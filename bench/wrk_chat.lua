-- wrk script for bench/gateway_overhead.py: POSTs one chat completion body,
-- paced to a fixed rate per thread when a rate is given (each request takes
-- the next free slot of a clock; a thread that falls behind catches up), and
-- prints a JSON summary with latency percentiles.
--   wrk -t1 -c64 -d10s -s bench/wrk_chat.lua URL -- <key> <rate per thread, 0 = as fast as possible> <stream 0|1>
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } mariana_timespec;
int clock_gettime(int clock_id, mariana_timespec *tp);
]]
local now_ts = ffi.new("mariana_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, now_ts) -- CLOCK_MONOTONIC
  return tonumber(now_ts.tv_sec) * 1000 + tonumber(now_ts.tv_nsec) / 1e6
end

local interval_ms = 0
local next_slot = nil

function init(args)
  local key, rate, stream = args[1], tonumber(args[2] or "0"), args[3] == "1"
  if rate > 0 then
    interval_ms = 1000 / rate
  end
  wrk.method = "POST"
  wrk.headers["Authorization"] = "Bearer " .. key
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"model": "smollm2-135m-instruct", "max_tokens": 16, "stream": ' .. tostring(stream) ..
    ', "messages": [{"role": "user", "content": "Say hello to the benchmark"}]}'
end

function delay()
  if interval_ms == 0 then
    return 0
  end
  local now = now_ms()
  if next_slot == nil or next_slot < now - 1000 then
    next_slot = now
  end
  next_slot = next_slot + interval_ms
  local wait = next_slot - now
  if wait < 0 then
    return 0
  end
  return wait
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"sent": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50": %.3f, "p90": %.3f, "p99": %.3f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000))
end
