-- Message round trips per second, master <-> one worker, one message in flight:
-- the master sends {cmd="ping", n=i}, the worker sends the same table back, the
-- master sends the next one on arrival. Warm-up first, then ~DURATION seconds.
-- Also the CPU time (master + worker) per round trip in that window, in microseconds.
-- Pair: bench/node/roundtrip.js
local cluster = require "cluster"
local hrtime = require("cluster.core").hrtime

local DURATION = tonumber(os.getenv("DURATION")) or 2
local WARMUP = 2000

if cluster.isWorker then
  local worker = cluster.worker
  worker:on("message", function(msg) worker:send(msg) end)
  return cluster.run()
end

-- CPU seconds (user + system) the given processes have used so far, all their
-- threads, from /proc/PID/task/*/schedstat (nanoseconds; the same reading on the
-- Node side). "self" is the master. Read with one `cat`, outside the timed region.
local getpid = require("cluster.core").getpid
local function cpu_seconds(...)
  local paths = {}
  for i, pid in ipairs { ... } do
    if pid == "self" then pid = getpid() end
    paths[i] = "/proc/" .. pid .. "/task/*/schedstat"
  end
  local p = io.popen("cat " .. table.concat(paths, " ") .. " 2>/dev/null")
  local total = 0
  for line in p:lines() do total = total + (tonumber(line:match("^(%d+)")) or 0) end
  p:close()
  return total / 1e9
end
local worker = cluster.fork()
local n, t0, c0, deadline, count = 0, nil, nil, nil, 0
local result, cpu_us

local function cpu_both() return cpu_seconds("self", worker.process.pid) end

worker:on("message", function(msg)
  n = n + 1
  if n == WARMUP then
    t0, c0 = hrtime(), cpu_both()
    deadline = t0 + DURATION
  elseif n > WARMUP then
    count = count + 1
    -- the clock is read every 256 round trips, the same on both sides
    if count % 256 == 0 then
      local now = hrtime()
      if now >= deadline then
        result = count / (now - t0)
        cpu_us = (cpu_both() - c0) / count * 1e6
        worker:disconnect()
        return
      end
    end
  end
  worker:send({ cmd = "ping", n = n })
end)
worker:on("online", function() worker:send({ cmd = "ping", n = 0 }) end)

cluster.run()
print(string.format("round trips: %d in %.3f s, %.1f us CPU each", count, count / result, cpu_us))
print(string.format("cpu %.2f", cpu_us))
print(string.format("result %.0f", result))
