-- The seed's echo: the master sends a message, the worker sends it back.
local cluster = require "cluster"

if cluster.isMaster then
  local worker = cluster.fork()
  worker:send("hi there")
  worker:on("message", function(msg)
    print("master got back: " .. tostring(msg))
    worker:kill()
  end)
  cluster.on("exit", function(w, code, signal)
    print(("worker %d exited (%s)"):format(w.id, signal or code))
  end)
else
  cluster.worker:on("message", function(msg)
    cluster.worker:send(msg)
  end)
end

cluster.run()
