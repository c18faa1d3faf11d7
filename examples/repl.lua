-- An interactive prompt on a running cluster: two echo workers keep answering while
-- you type. Try:  w = cluster.workers[1]   w:send("hello")   cluster.stats().count
-- Ctrl-D leaves; the workers follow their master out.
local cluster = require "cluster"

if cluster.isMaster then
  cluster.on("message", function(worker, msg)
    print(("from worker %d: %s"):format(worker.id, tostring(msg)))
  end)
  cluster.on("exit", function(worker, code, signal)
    print(("worker %d exited (%s)"):format(worker.id, signal or code))
  end)
  cluster.fork()
  cluster.fork()
  cluster.repl()
else
  cluster.worker:on("message", function(msg) cluster.worker:send(msg) end)
  cluster.run()
end
