-- Seed: the v0.6 API (v0.6 docs), with its old names:
--   cluster.autoFork();                       // one worker per CPU
--   cluster.on('death', function(worker) { 'worker ' + worker.pid + ' died. restart...'; cluster.fork(); });
--   cluster.fork().on('death', ...)           // per-worker 'death'
--   worker.destroy(); worker.suicide          // "Oh, it was just suicide' – no need to worry"
--   cluster.workers[uniqueID], worker.uniqueID
-- Every worker sends {cmd = 'notifyRequest'} a few times (the v0.6 'message'
-- example, without its HTTP server). Worker 1 then dies by accident and is
-- restarted once; the others, and the replacement, destroy themselves when the
-- master asks. (A worker-side destroy() sets suicide; a master-side one only sends
-- SIGTERM and leaves suicide false, as Node 20's kill() does; see the contract.)
local cluster = require "cluster"

local NOTIFY = 3

if cluster.isMaster then
  local numReqs = 0
  local function messageHandler(msg)
    if type(msg) == "table" and msg.cmd == "notifyRequest" then numReqs = numReqs + 1 end
  end

  local restarted = false
  local deaths, suicides = 0, 0
  cluster.on("death", function(worker)
    deaths = deaths + 1
    if worker.suicide == true then
      suicides = suicides + 1
      print("Oh, it was just suicide' - no need to worry (worker " .. worker.uniqueID .. ")")
    else
      print("worker " .. worker.process.pid .. " died. restart...")
      if not restarted then
        restarted = true
        local replacement = cluster.fork()
        replacement:on("message", messageHandler)
        replacement:on("death", function()
          print("the replacement, worker " .. replacement.uniqueID .. ", is gone too")
        end)
      end
    end
  end)

  -- destroy a worker once it has reported all its requests
  local reported = {}
  cluster.on("message", function(worker, msg)
    if type(msg) ~= "table" or msg.cmd ~= "notifyRequest" then return end
    reported[worker.uniqueID] = (reported[worker.uniqueID] or 0) + 1
    if reported[worker.uniqueID] == NOTIFY then
      if worker.uniqueID == 1 then
        worker:send("die") -- an accident: worker 1 exits on its own with code 1
      else
        worker:send("destroy") -- the worker calls cluster.worker:destroy()
      end
    end
  end)

  local forked = cluster.autoFork()
  print("autoFork forked " .. #forked .. " workers")
  for uniqueID, worker in pairs(cluster.workers) do
    assert(worker.uniqueID == uniqueID and worker.id == uniqueID)
    worker:on("message", messageHandler)
  end

  cluster.run()
  print("numReqs = " .. numReqs)
  assert(numReqs == NOTIFY * (#forked + 1))
  assert(deaths == #forked + 1)
  assert(suicides == #forked, "every worker but the one that crashed destroyed itself")
else
  cluster.worker:on("message", function(msg)
    if msg == "die" then os.exit(1) end
    if msg == "destroy" then cluster.worker:destroy() end
  end)
  for _ = 1, NOTIFY do cluster.worker:send { cmd = "notifyRequest" } end
  cluster.run()
end
