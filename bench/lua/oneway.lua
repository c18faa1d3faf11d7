-- One-way messages per second, worker -> master: the worker sends N small tables
-- {cmd="notifyRequest", n=i} in a loop as fast as it can; the master counts them on
-- arrival. Timed on the master from sending "go" to the arrival of the Nth message.
-- Pair: bench/node/oneway.js
local cluster = require "cluster"
local hrtime = require("cluster.core").hrtime

local N = tonumber(os.getenv("N")) or 1000000

if cluster.isWorker then
  local worker = cluster.worker
  worker:on("message", function(msg)
    if msg ~= "go" then return end
    for i = 1, N do worker:send({ cmd = "notifyRequest", n = i }) end
  end)
  return cluster.run()
end

local worker = cluster.fork()
local count, t0, elapsed = 0, nil, nil

worker:on("message", function(msg)
  if msg.cmd == "notifyRequest" then
    count = count + 1
    if count == N then
      elapsed = hrtime() - t0
      worker:disconnect()
    end
  end
end)
worker:on("online", function()
  t0 = hrtime()
  worker:send("go")
end)

cluster.run()
print(string.format("messages: %d in %.3f s", count, elapsed))
print(string.format("result %.0f", N / elapsed))
