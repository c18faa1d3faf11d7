-- Seed: cluster.workers (v0.6 and v4 docs):
--   function eachWorker(callback) { for (var id in cluster.workers) callback(cluster.workers[id]); }
--   eachWorker(function(worker) { worker.send('big announcement to all workers'); });
-- and "using the worker's unique id is the easiest way to find the worker":
--   var worker = cluster.workers[id];
-- Once all workers are online the master sends the announcement to each; every
-- worker replies with its id, and the master finds the worker by that id.
local cluster = require "cluster"

local N = 3

if cluster.isMaster then
  local function eachWorker(callback)
    for _, worker in pairs(cluster.workers) do callback(worker) end
  end

  local online, replies = 0, 0
  cluster.on("online", function()
    online = online + 1
    if online < N then return end
    eachWorker(function(worker)
      worker:send("big announcement to all workers")
    end)
  end)

  cluster.on("message", function(_, msg)
    local worker = cluster.workers[msg.id] -- reference a worker by its id
    print(("worker #%d (pid %d) got: %s"):format(worker.id, worker.process.pid, msg.got))
    replies = replies + 1
    if replies == N then cluster.disconnect() end
  end)

  for _ = 1, N do cluster.fork() end
  cluster.run()
  assert(replies == N)
  assert(next(cluster.workers) == nil, "all workers left cluster.workers")
else
  cluster.worker:on("message", function(msg)
    cluster.worker:send { id = cluster.worker.id, got = msg }
  end)
  cluster.run()
end
