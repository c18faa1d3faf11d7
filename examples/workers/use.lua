-- Worker script for setup_master.lua (the seed's 'worker.js'): reads `--use <proto>`
-- from its arguments and reports it to the master.
local cluster = require "cluster"

local use
for i = 1, #arg do
  if arg[i] == "--use" then use = arg[i + 1] end
end
-- settings.silent: this line goes to a pipe read by the master, not to the terminal
print("I use " .. tostring(use))
cluster.worker:send { id = cluster.worker.id, use = use, args = arg }
cluster.run()  -- nothing keeps the worker alive: it exits once the message is written
