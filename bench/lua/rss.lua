-- Idle worker RSS: fork WORKERS workers that stay idle; once each is online (and
-- SETTLE ms more), read VmRSS from /proc/PID/status. Prints the median in KB.
-- Pair: bench/node/rss.js
local cluster = require "cluster"

local WORKERS = tonumber(os.getenv("WORKERS")) or 4
local SETTLE = tonumber(os.getenv("SETTLE")) or 500

if cluster.isWorker then
  cluster.worker:on("message", function() end) -- idle until disconnected
  return cluster.run()
end

local function vmrss_kb(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local rss = {}
local online = 0
cluster.on("online", function()
  online = online + 1
  if online < WORKERS then return end
  cluster.setTimeout(function()
    for _, w in pairs(cluster.workers) do rss[#rss + 1] = vmrss_kb(w.process.pid) end
    cluster.disconnect()
  end, SETTLE)
end)
for _ = 1, WORKERS do cluster.fork() end
cluster.run()

table.sort(rss)
print("worker VmRSS (KB): " .. table.concat(rss, " ") .. "; master: " .. vmrss_kb("self"))
print("result " .. rss[(#rss + 1) // 2])
