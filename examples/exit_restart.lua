-- Seed: Event 'exit' (v4 docs), restarting dead workers:
--   cluster.on('exit', function(worker, code, signal) {
--     console.log('worker %d died (%s). restarting...', worker.process.pid, signal || code);
--     cluster.fork(); });
-- To end by itself, this master restarts at most 3 times, and the workers die
-- on their own shortly after they start (code 1).
local cluster = require "cluster"

if cluster.isMaster then
  local restarts = 0
  cluster.on("exit", function(worker, code, signal)
    if restarts < 3 then
      restarts = restarts + 1
      print(("worker %d died (%s). restarting..."):format(worker.process.pid, signal or code))
      cluster.fork()
    else
      print(("worker %d died (%s). giving up"):format(worker.process.pid, signal or code))
    end
  end)
  cluster.fork()
  cluster.run()
  assert(restarts == 3)
else
  cluster.setTimeout(function() os.exit(1) end, 50)
  cluster.run()
end
