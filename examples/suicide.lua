-- Seed: worker.suicide (v4 docs), alias of worker.exitedAfterDisconnect:
--   cluster.on('exit', function(worker, code, signal) {
--     if (worker.suicide === true) console.log("Oh, it was just suicide' – no need to worry"); });
--   worker.kill();
-- "Set by calling .kill() or .disconnect()". Worker 1 is disconnected by the
-- master, worker 2 kills itself (worker-side kill), worker 3 dies by accident
-- (its error message on stderr is expected). In the master, worker:kill() only
-- signals the process and leaves suicide false, as in Node 20 (Node v4 disconnected
-- first and set it); the contract follows Node 20.
local cluster = require "cluster"

if cluster.isMaster then
  local result = {}
  cluster.on("exit", function(worker, code, signal)
    result[worker.id] = worker.suicide
    if worker.suicide == true then
      print("Oh, it was just suicide' - no need to worry (worker " .. worker.id .. ")")
    else
      print(("worker %d died by accident (%s)"):format(worker.id, signal or code))
    end
  end)

  local w1 = cluster.fork { MODE = "wait" }
  w1:on("online", function() w1:disconnect() end)
  cluster.fork { MODE = "kill" }
  cluster.fork { MODE = "crash" }
  cluster.run()
  assert(result[1] == true and result[2] == true and result[3] == false)
else
  local mode = os.getenv("MODE")
  if mode == "wait" then
    cluster.worker:on("message", function() end) -- stay until disconnected
  elseif mode == "kill" then
    cluster.worker:kill()
  else
    error("crash (on purpose)")
  end
  cluster.run()
end
