-- Message round trips per second, master <-> one worker, one message in flight:
-- the master sends {cmd="ping", n=i}, the worker sends the same table back, the
-- master sends the next one on arrival. Warm-up first, then ~DURATION seconds.
-- Pair: bench/node/roundtrip.js
local cluster = require "cluster"
local hrtime = require("cluster.core").hrtime

local DURATION = tonumber(os.getenv("DURATION")) or 2
local WARMUP = 2000

if cluster.isWorker then
  local worker = cluster.worker
  worker:on("message", function(msg) worker:send(msg) end)
  return cluster.run()
end

local worker = cluster.fork()
local n, t0, deadline, count = 0, nil, nil, 0
local result

worker:on("message", function(msg)
  n = n + 1
  if n == WARMUP then
    t0 = hrtime()
    deadline = t0 + DURATION
  elseif n > WARMUP then
    count = count + 1
    -- reading the clock every round trip is cheap (vDSO); the same on both sides
    if count % 256 == 0 then
      local now = hrtime()
      if now >= deadline then
        result = count / (now - t0)
        worker:disconnect()
        return
      end
    end
  end
  worker:send({ cmd = "ping", n = n })
end)
worker:on("online", function() worker:send({ cmd = "ping", n = 0 }) end)

cluster.run()
print(string.format("round trips: %d in %.3f s", count, count / result))
print(string.format("result %.0f", result))
