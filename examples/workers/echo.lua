-- A worker that answers every message with the same message (used by the README's
-- `lua5.4 -i` session). Listening for 'message' keeps it alive.
local cluster = require "cluster"
cluster.worker:on("message", function(msg) cluster.worker:send(msg) end)
cluster.run()
