-- 16 workers from fork to 'online', wall time on the master, repeated; prints the median.
-- Workers stay idle until disconnected. Pair: bench/node/fork_online.js
local cluster = require "cluster"
local hrtime = require("cluster.core").hrtime

local WORKERS = tonumber(os.getenv("WORKERS")) or 16
local REPEAT = tonumber(os.getenv("REPEAT")) or 5

if cluster.isWorker then
  cluster.worker:on("message", function() end) -- idle until disconnected
  return cluster.run()
end

local times = {}

local function round()
  local online, t0 = 0, hrtime()
  local function on_online()
    online = online + 1
    if online < WORKERS then return end
    times[#times + 1] = (hrtime() - t0) * 1000
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

table.sort(times)
local parts = {}
for i, t in ipairs(times) do parts[i] = string.format("%.1f", t) end
print(string.format("runs (ms, sorted): %s", table.concat(parts, " ")))
print(string.format("result %.2f", times[(#times + 1) // 2]))
