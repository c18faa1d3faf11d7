-- Seed: Worker Event 'exit' (v4 docs):
--   worker.on('exit', function(code, signal) {
--     if (signal) "worker was killed by signal: " + signal
--     else if (code !== 0) "worker exited with error code: " + code
--     else "worker success!" })
-- Three workers, one per branch: one ends normally, one calls os.exit(3),
-- one is killed by the master with SIGKILL.
local cluster = require "cluster"

if cluster.isMaster then
  local seen = {}
  local function watch(worker, mode)
    worker:on("exit", function(code, signal)
      if signal then
        print("worker was killed by signal: " .. signal)
      elseif code ~= 0 then
        print("worker exited with error code: " .. code)
      else
        print("worker success!")
      end
      assert(worker:isDead())
      seen[mode] = signal or code
    end)
  end

  watch(cluster.fork { MODE = "success" }, "success")
  watch(cluster.fork { MODE = "error" }, "error")
  local doomed = cluster.fork { MODE = "stuck" }
  watch(doomed, "stuck")
  doomed:on("online", function() doomed:kill("SIGKILL") end)

  cluster.run()
  assert(seen.success == 0 and seen.error == 3 and seen.stuck == "SIGKILL")
else
  local mode = os.getenv("MODE")
  if mode == "error" then
    os.exit(3)
  elseif mode == "stuck" then
    cluster.setInterval(function() end, 1000) -- would run forever
  end
  cluster.run() -- "success": nothing to do, ends with code 0
end
