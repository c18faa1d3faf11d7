-- Seed: Event 'fork' (v0.6 and v4 docs), the timeout watcher:
--   cluster.on('fork')      -> timeouts[worker.id] = setTimeout(errorMsg, 2000)
--   cluster.on('listening') -> clearTimeout(timeouts[worker.id])
--   cluster.on('exit')      -> clearTimeout(timeouts[worker.id]); errorMsg()
-- 'listening' needs sockets, so here a worker clears its watcher with an explicit
-- message {cmd = "ready"} (what a worker would send once its server is up).
-- Worker 1 reports ready; worker 2 is told (through its env) to hang, so its
-- watcher fires and the master kills it. The delay is 1000 ms, not 2000, to keep it short.
local cluster = require "cluster"

if cluster.isMaster then
  local timeouts = {}
  local fired = 0
  local function errorMsg(worker)
    fired = fired + 1
    io.stderr:write("Something must be wrong with the connection of worker " .. worker.id .. " ...\n")
  end

  cluster.on("fork", function(worker)
    print("forked worker " .. worker.id)
    timeouts[worker.id] = cluster.setTimeout(function()
      errorMsg(worker)
      worker:kill()
    end, 1000)
  end)
  cluster.on("message", function(worker, msg)
    if type(msg) == "table" and msg.cmd == "ready" then
      print("worker " .. worker.id .. " is ready: watcher cleared")
      cluster.clearTimeout(timeouts[worker.id])
      worker:disconnect()
    end
  end)
  cluster.on("exit", function(worker, code, signal)
    cluster.clearTimeout(timeouts[worker.id])
    -- the seed reports every exit; report only the ones nobody asked for
    if not worker.exitedAfterDisconnect then
      print(("worker %d exited unexpectedly (%s)"):format(worker.id, signal or code))
    else
      print("worker " .. worker.id .. " exited after disconnect")
    end
  end)

  cluster.fork()
  cluster.fork { HANG = "1" }
  cluster.run()
  assert(fired == 1, "exactly one watcher should have fired")
else
  if os.getenv("HANG") then
    -- never report ready; stay alive until the master's watcher kills us
    cluster.setInterval(function() end, 1000)
  else
    cluster.worker:on("message", function() end) -- stay connected until disconnected
    cluster.worker:send { cmd = "ready" }
  end
  cluster.run()
end
