-- Seed: cluster.isMaster / cluster.isWorker / cluster.worker (v0.6 and v4 docs):
--   if (cluster.isMaster) { console.log('I am master'); cluster.fork(); cluster.fork(); }
--   else if (cluster.isWorker) { console.log('I am worker #' + cluster.worker.id); }
-- The role comes from the environment variable LUACLUSTER_WORKER_ID, which the
-- master sets for its workers (Node's NODE_UNIQUE_ID).
local cluster = require "cluster"

if cluster.isMaster then
  assert(cluster.isPrimary and not cluster.isWorker and cluster.worker == nil)
  print("I am master")
  cluster.fork()
  cluster.fork()
elseif cluster.isWorker then
  assert(not cluster.isMaster and not cluster.isPrimary)
  print("I am worker #" .. cluster.worker.id)
end

-- the workers have nothing to do and end; the master ends when they have
cluster.run()
