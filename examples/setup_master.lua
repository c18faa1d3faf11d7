-- Seed: cluster.setupMaster([settings]) (v4 docs):
--   cluster.setupMaster({ exec: 'worker.js', args: ['--use', 'https'], silent: true });
--   cluster.fork(); // https worker
--   cluster.setupMaster({ args: ['--use', 'http'] });
--   cluster.fork(); // http worker
-- The worker script is examples/workers/use.lua; it tells the master which
-- protocol it was given. Also shows the 'setup' event and cluster.settings.
-- silent = true: the workers' stdout/stderr go to the master instead of the
-- terminal; the master sees each line as cluster 'output'(worker, stream, line).
local cluster = require "cluster"

local here = arg[0]:match("^(.*)/[^/]*$") or "."

local setups = 0
cluster.on("setup", function(settings)
  setups = setups + 1
  print(("'setup': args = %s, silent = %s"):format(table.concat(settings.args, " "), tostring(settings.silent)))
end)

cluster.setupMaster {
  exec = here .. "/workers/use.lua",
  args = { "--use", "https" },
  silent = true,
}
local https = cluster.fork() -- https worker
cluster.setupMaster {
  args = { "--use", "http" },
}
local http = cluster.fork()  -- http worker

print("cluster.settings.exec = " .. cluster.settings.exec)
assert(cluster.settings.silent == true, "silent is kept across setupMaster calls")

local lines = {}
cluster.on("output", function(worker, stream, line)
  print(("worker %d's %s (silent, through the master): %s"):format(worker.id, stream, line))
  lines[worker.id] = line
end)

local got = {}
cluster.on("message", function(worker, msg)
  print(("worker %d uses %s (args: %s)"):format(worker.id, msg.use, table.concat(msg.args, " ")))
  got[worker.id] = msg.use
end)

cluster.run()
-- fork() calls setupMaster() itself, as Node's does: two calls + two forks
assert(setups == 4, "'setup' fires on every call")
assert(got[https.id] == "https" and got[http.id] == "http", "each worker got its own args")
assert(lines[https.id] and lines[http.id], "silent output reached the master")
