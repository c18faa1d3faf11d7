-- Seed: Event 'fork' (v0.6 and v4 docs), the timeout watcher:
--   cluster.on('fork')      -> timeouts[worker.id] = setTimeout(errorMsg, 2000)
--   cluster.on('listening') -> clearTimeout(timeouts[worker.id])
--   cluster.on('exit')      -> clearTimeout(timeouts[worker.id]); errorMsg()
-- Worker 1 listens (on a free port shared through the master); worker 2 is told, through
-- its env, never to listen, so its watcher fires and the master kills it. The delay is
-- 1000 ms, not 2000, to keep the example short; then the master disconnects everyone.
local cluster = require "cluster"
local net = require "cluster.net"

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
  cluster.on("listening", function(worker, address)
    print(("worker %d is listening on port %d: watcher cleared"):format(worker.id, address.port))
    cluster.clearTimeout(timeouts[worker.id])
  end)
  cluster.on("exit", function(worker, code, signal)
    cluster.clearTimeout(timeouts[worker.id])
    print(("worker %d exited (%s)"):format(worker.id, signal or code))
    if signal then cluster.disconnect() end -- the hung one is gone: end the example
  end)

  cluster.fork()
  cluster.fork { HANG = "1" }
  cluster.run()
  assert(fired == 1, "exactly one watcher should have fired")
else
  if os.getenv("HANG") then
    -- never listen; stay alive until the master's watcher kills us
    cluster.setInterval(function() end, 1000)
  else
    net.createServer(function(socket) socket:close("hello\n") end):listen(0)
  end
  cluster.run()
end
