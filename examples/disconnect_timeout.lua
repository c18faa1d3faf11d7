-- Seed: worker.disconnect() (v4 docs), the disconnect-with-timeout pattern:
--   worker.on('listening') -> worker.send('shutdown'); worker.disconnect();
--                             timeout = setTimeout(function() { worker.kill(); }, 2000);
--   worker.on('disconnect') -> clearTimeout(timeout);
--   the worker has connections that never end and does nothing on 'shutdown'.
-- Without sockets: the master starts the shutdown on 'online' instead of
-- 'listening', and the worker, instead of holding a connection that never ends,
-- is stuck in a long synchronous job, so it never gets to the disconnect request
-- and never closes its channel. The master's kill timer (1000 ms here) fires.
local cluster = require "cluster"

if cluster.isMaster then
  local worker = cluster.fork()
  local timeout
  local killed = false

  worker:on("online", function()
    worker:send("shutdown")
    worker:disconnect()
    timeout = cluster.setTimeout(function()
      print("worker did not disconnect in time: killing it")
      killed = true
      worker:kill()
    end, 1000)
  end)

  worker:on("disconnect", function()
    cluster.clearTimeout(timeout)
  end)

  worker:on("exit", function(code, signal)
    print(("worker %d exited (%s)"):format(worker.id, signal or code))
  end)

  cluster.run()
  assert(killed, "the kill timer should have fired")
else
  cluster.worker:on("message", function(msg)
    if msg == "shutdown" then
      -- initiate graceful close of any connections... this worker ignores it
    end
  end)
  -- a job that takes far longer than the master is willing to wait (10 s of CPU)
  local stop = os.clock() + 10
  while os.clock() < stop do end
  cluster.run()
end
