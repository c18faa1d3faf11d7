-- Seed: Event 'online' (v0.6 and v4 docs), on the cluster and on one worker:
--   cluster.on('online', function(worker) { "Yay, the worker responded after it was forked" });
--   cluster.fork().on('online', function() { /* Worker is online */ });
-- 'fork' comes first (when the master forks), 'online' once the worker runs.
local cluster = require "cluster"

if cluster.isMaster then
  local order = {}
  cluster.on("fork", function(worker)
    order[#order + 1] = "fork " .. worker.id
  end)
  cluster.on("online", function(worker)
    order[#order + 1] = "cluster online " .. worker.id
    print("Yay, the worker responded after it was forked (worker " .. worker.id .. ")")
    worker:disconnect()
  end)

  local worker = cluster.fork()
  worker:on("online", function()
    order[#order + 1] = "worker online " .. worker.id
    print("Worker " .. worker.id .. " is online, state = " .. worker.state)
  end)

  cluster.run()
  print(table.concat(order, ", "))
  -- a worker's own listeners run before the cluster's
  assert(table.concat(order, ",") == "fork 1,worker online 1,cluster online 1")
else
  cluster.worker:on("message", function() end) -- stay until disconnected
  cluster.run()
end
