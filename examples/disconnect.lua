-- Seed: Event 'disconnect' (v4 docs):
--   cluster.on('disconnect', function(worker) { 'The worker #' + worker.id + ' has disconnected' });
-- and cluster.disconnect([callback]): "called when all workers are disconnected".
-- A worker leaves cluster.workers when it is disconnected and dead.
local cluster = require "cluster"

if cluster.isMaster then
  cluster.on("disconnect", function(worker)
    print("The worker #" .. worker.id .. " has disconnected")
  end)
  cluster.on("exit", function(worker, code)
    print(("worker #%d exited with code %s, exitedAfterDisconnect = %s"):format(
      worker.id, tostring(code), tostring(worker.exitedAfterDisconnect)))
  end)

  local online = 0
  cluster.on("online", function()
    online = online + 1
    if online == 2 then
      cluster.disconnect(function()
        print("all workers disconnected")
      end)
    end
  end)
  cluster.fork()
  cluster.fork()
  cluster.run()
  assert(next(cluster.workers) == nil)
else
  cluster.worker:on("message", function() end) -- stay until disconnected
  cluster.run()
end
