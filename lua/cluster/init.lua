--- luacluster: Node's cluster module for Lua 5.4 on a libuv core.
-- `require "cluster"` decides the role from the environment variable
-- LUACLUSTER_WORKER_ID, set by the master for its workers.
-- @module cluster
local core = require "cluster.core"
local Emitter = require "cluster.emitter"
local loop = require "cluster.loop"

local cluster = Emitter.new()

-- Events on the module are called with a dot, as in Node (cluster.on("exit", fn));
-- the colon form works too.
for _, name in ipairs { "on", "once", "off", "addListener", "removeListener",
                        "removeAllListeners", "listenerCount", "listeners", "emit" } do
  local method = Emitter[name]
  cluster[name] = function(first, ...)
    if first == cluster then return method(cluster, ...) end
    return method(cluster, first, ...)
  end
end

cluster.SCHED_NONE = 1
cluster.SCHED_RR = 2
local POLICY_WORDS = { rr = cluster.SCHED_RR, none = cluster.SCHED_NONE }
cluster._policyWords = POLICY_WORDS

local env_policy = os.getenv("CLUSTER_SCHED_POLICY")
if env_policy ~= nil and POLICY_WORDS[env_policy] == nil then
  io.stderr:write("cluster: ignoring CLUSTER_SCHED_POLICY=" .. env_policy .. " (expected rr or none)\n")
end
cluster.schedulingPolicy = POLICY_WORDS[env_policy] or cluster.SCHED_RR

cluster.run = loop.run
cluster.poll = loop.poll
cluster.stop = loop.stop
cluster.setTimeout = loop.setTimeout
cluster.setInterval = loop.setInterval
cluster.clearTimeout = loop.clearTimeout
cluster.clearInterval = loop.clearInterval
cluster.defer = loop.defer

--- Number of processors available.
function cluster.cpus() return core.cpus() end

--- An interactive Lua prompt served by the loop (see the README).
function cluster.repl(options)
  return require("cluster.repl").start(cluster, options)
end

local worker_id = os.getenv("LUACLUSTER_WORKER_ID")
if worker_id and math.tointeger(tonumber(worker_id)) then
  require("cluster.child").install(cluster, math.tointeger(tonumber(worker_id)))
else
  require("cluster.master").install(cluster)
end

return cluster
