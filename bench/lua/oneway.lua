-- One-way messages per second, worker -> master: the worker sends N small tables
-- {cmd="notifyRequest", n=i} in a loop as fast as it can; the master counts them on
-- arrival. Timed on the master from sending "go" to the arrival of the Nth message.
-- Also the CPU time (master + worker) per message in that window, in microseconds.
-- Pair: bench/node/oneway.js
local cluster = require "cluster"
local hrtime = require("cluster.core").hrtime

local N = tonumber(os.getenv("N")) or 1000000

if cluster.isWorker then
  local worker = cluster.worker
  worker:on("message", function(msg)
    if msg ~= "go" then return end
    for i = 1, N do worker:send({ cmd = "notifyRequest", n = i }) end
  end)
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
local count, t0, c0, elapsed, cpu_us = 0, nil, nil, nil, nil

local function cpu_both() return cpu_seconds("self", worker.process.pid) end

worker:on("message", function(msg)
  if msg.cmd == "notifyRequest" then
    count = count + 1
    if count == N then
      elapsed = hrtime() - t0
      cpu_us = (cpu_both() - c0) / N * 1e6
      worker:disconnect()
    end
  end
end)
worker:on("online", function()
  t0, c0 = hrtime(), cpu_both()
  worker:send("go")
end)

cluster.run()
print(string.format("messages: %d in %.3f s, %.2f us CPU each", count, elapsed, cpu_us))
print(string.format("cpu %.3f", cpu_us))
print(string.format("result %.0f", N / elapsed))
