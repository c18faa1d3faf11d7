-- 16 workers from fork to 'online', wall time on the master, repeated REPEAT times;
-- prints the median. Also the CPU time it took (master's share plus all the workers'
-- CPU up to the moment the last one is online). Workers stay idle until disconnected.
-- Pair: bench/node/fork_online.js
local cluster = require "cluster"
local hrtime = require("cluster.core").hrtime

local WORKERS = tonumber(os.getenv("WORKERS")) or 16
local REPEAT = tonumber(os.getenv("REPEAT")) or 5

if cluster.isWorker then
  cluster.worker:on("message", function() end) -- idle until disconnected
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
local times, cpus = {}, {}

local function round()
  local c0 = cpu_seconds("self") -- read before the clock starts: it runs `cat`
  local online, t0 = 0, hrtime()
  local function on_online()
    online = online + 1
    if online < WORKERS then return end
    times[#times + 1] = (hrtime() - t0) * 1000
    local pids = {}
    for _, w in pairs(cluster.workers) do pids[#pids + 1] = w.process.pid end
    local cpu = cpu_seconds("self", table.unpack(pids)) - c0
    cpus[#cpus + 1] = cpu * 1000
    cluster.off("online", on_online)
    cluster.disconnect(function()
      if #times < REPEAT then round() end
    end)
  end
  cluster.on("online", on_online)
  for _ = 1, WORKERS do cluster.fork() end
end

round()
cluster.run()

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end
local parts = {}
for i, t in ipairs(times) do parts[i] = string.format("%.1f", t) end
print(string.format("runs (ms): %s", table.concat(parts, " ")))
print(string.format("cpu %.1f", median(cpus)))
print(string.format("result %.2f", median(times)))
