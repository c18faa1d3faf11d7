-- Seed: worker.disconnect() (v4 docs), the disconnect-with-timeout pattern:
--   worker.on('listening') -> worker.send('shutdown'); worker.disconnect();
--                             timeout = setTimeout(function() { worker.kill(); }, 2000);
--   worker.on('disconnect') -> clearTimeout(timeout);
--   the worker's server has connections that never end and does nothing on 'shutdown'.
-- Here the master itself opens the connection that never ends (a client of the worker's
-- server), so the worker's disconnect waits for it and the kill timer (1000 ms) fires.
local cluster = require "cluster"
local net = require "cluster.net"

if cluster.isMaster then
  local worker = cluster.fork()
  local timeout
  local killed = false
  local client

  worker:on("listening", function(address)
    -- a connection that never ends
    client = net.connect(address.port, "127.0.0.1", function()
      worker:send("shutdown")
      worker:disconnect()
      timeout = cluster.setTimeout(function()
        print("worker did not disconnect in time: killing it")
        killed = true
        worker:kill()
      end, 1000)
    end)
    client:on("error", function() end)
    client:on("close", function() print("the never-ending connection closed") end)
  end)

  worker:on("disconnect", function()
    cluster.clearTimeout(timeout)
  end)

  worker:on("exit", function(code, signal)
    print(("worker %d exited (%s)"):format(worker.id, signal or code))
    client:destroy()
  end)

  cluster.run()
  assert(killed, "the kill timer should have fired")
else
  local server = net.createServer(function(socket)
    -- connections never end
  end)
  server:listen(0)

  cluster.worker:on("message", function(msg)
    if msg == "shutdown" then
      -- initiate graceful close of any connections to server (this one doesn't)
    end
  end)
  cluster.run()
end
